"""The Postgres layer: a main pool for HTTP traffic and a background pool, on asyncpg.

Ownership: the app's lifespan owns one :class:`Database` (resource name
``"database"``); handlers get it with ``request.resources.get("database")``
(services receive it as an argument) and never build pools on the side.
``start()`` creates both pools (``asyncpg.create_pool``) and warms
``DB_POOL_MIN_SIZE`` connections, ``stop()`` closes gracefully within a bound,
``terminate()`` is immediate.

Usage::

    async with db.connection() as conn:          # main pool, autocommit
        row = await conn.fetchrow("SELECT ...", user_id)
    async with db.transaction() as conn:         # main pool, one transaction
        await conn.execute("UPDATE ...", ...)
    async with db.background_connection() as conn: ...   # schedulers
    async with db.background_transaction() as conn: ...

Design choices, and why:

* **asyncpg's own pool**, configured: the statement cache off
  (``statement_cache_size=0``: PgBouncer in transaction mode hands each
  transaction to any server connection, so a named prepared statement made
  on one is missing on the next), ``application_name`` per pool,
  ``init=`` for the JSON codecs (``json``/``jsonb`` decode with orjson;
  parameters may be Python objects or already-encoded JSON text), and
  ``connection_class=`` :class:`GharConnection`, which classifies each
  statement it runs (see :mod:`ghar_core._db_session`).
* **Reset only what is dirty.** asyncpg's default reset sends
  ``RESET ALL; UNLISTEN *; ...`` on every release, a full round trip. Our
  ``reset=`` hook sends ``DISCARD ALL`` only for a connection that ran a
  statement leaving session state, or that was left inside a transaction
  (rolled back first). ``SET LOCAL`` and ``pg_advisory_xact_lock`` need
  nothing. Session state is wrong behind PgBouncer's transaction mode anyway;
  prefer ``SET LOCAL`` inside :meth:`Database.transaction`. A clean
  connection's holder goes straight back to the pool's queue of free
  holders (asyncpg's queue class, subclassed to serve waiters in order: see
  below), and a free connected one is taken straight from it (asyncpg's own acquire and release
  coroutines, with the ``asyncio.timeout`` around its reset, cost more than
  the query).
* **No timer on the event loop.** asyncpg arms a ``call_later``
  timer per round trip for ``command_timeout`` and one per release for
  ``max_inactive_connection_lifetime``: three per query, each a heap push
  and a cancelled handle left behind, together about as much CPU as the
  query itself (and any scheduled timer makes each loop iteration read
  the clock twice). Instead each pool has a watchdog thread that sleeps
  until the earliest deadline and has the loop cancel a statement past
  ``DB_COMMAND_TIMEOUT`` (the
  statement methods of :class:`GharConnection` stamp their start, see
  :mod:`ghar_core._db_session`) and drops a connection idle for longer
  than ``DB_MAX_INACTIVE_LIFETIME`` while the pool is above its min size.
  ``stop()`` ends the threads; for a Database never stopped, each holds its
  pool by a weak reference and looks at least every half second, so it
  ends soon after its loop is closed or its pool garbage-collected.
* **Exhaustion fails fast.** When every connection is busy the wait is
  bounded by a timer (``asyncio.timeout``; asyncpg's own acquire timeout
  wraps a task on Python 3.11, about 40 µs per acquire), and the pool is not
  timed at all when a connection is free. Past ``DB_POOL_ACQUIRE_TIMEOUT``
  it raises :class:`~ghar_core.exceptions.PoolExhaustedException` (503,
  Retry-After), which the retry helper never retries. Waiters are served
  first come, first served: a released connection is handed to the oldest
  waiter, and a task asking later (even one that runs before the woken
  waiter does, or the releasing task leasing again) queues behind it.
* **COMMIT is never guessed.** Before COMMIT, a transaction that may have
  written asks for its id (``pg_current_xact_id_if_assigned()``, one round
  trip; read-only transactions skip it). When COMMIT's answer is lost
  (connection lost, PgBouncer killed, COMMIT past the command timeout), a
  fresh connection asks ``pg_xact_status``: committed -> the block succeeds;
  aborted (or no id: nothing was written) -> a retryable 503; no answer
  within ``DB_CONNECT_TIMEOUT`` ->
  :class:`~ghar_core.db_resilience.CommitOutcomeUnknownException` (503
  ``DB_COMMIT_OUTCOME_UNKNOWN``), never retried.
* **No silent rollback.** COMMIT of a transaction in which a statement
  failed (and the handler caught the error) raises
  :class:`FailedTransactionError` naming that failure, instead of returning
  as if the server had committed.
* **Timeouts cancel on the server.** A statement past ``DB_COMMAND_TIMEOUT``
  (its task cancelled by the watchdog, the call raising ``TimeoutError``)
  or a cancelled task makes asyncpg send a cancel request; the lease waits
  for it to be acknowledged before the connection is rolled back or
  released, so nothing of ours keeps running (or later applies) after the
  client got its 503, directly or through PgBouncer.
* **Outages recover by themselves.** If Postgres is down at ``start()`` the
  app still starts (logged); each use then tries to connect and fails with
  :class:`~ghar_core.exceptions.DatabaseUnavailableException` (503,
  Retry-After) until Postgres is back. A pooled connection found dead before
  anything was sent on it (its server said goodbye while it was idle) is
  replaced transparently, for :meth:`Database.connection` as for
  :meth:`Database.transaction` (news on an idle socket is read, and a
  connection still open after it is asked one empty statement; one whose
  backend dies at the very moment of the lease can still be a 503). A
  connection lost mid-use is terminated and the error leaves the
  ``async with`` block as a 503.
* **Serverless mode** (``SERVERLESS_ENABLED``): the same pools keep nothing
  idle; every use opens a connection and closes it afterwards, still capped
  at the pool's max size with the same fast-fail.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
import weakref
from collections.abc import Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

import asyncpg
import orjson

from ghar_core._db_session import (
    GharConnection,
    GharPoolProxy,
    HolderQueue,
    _current_task_of,
    gave_up_waiting,
    touches_session_state,
)
from ghar_core.config import Settings
from ghar_core.db_resilience import CommitOutcomeUnknownException, is_transient_error
from ghar_core.exceptions import (
    BaseAPIException,
    DatabaseUnavailableException,
    PoolExhaustedException,
)

if TYPE_CHECKING:
    from ghar_core.migrate import MigrationSet

__all__ = [
    "BACKGROUND_APPLICATION_NAME",
    "MAIN_APPLICATION_NAME",
    "Database",
    "FailedTransactionError",
    "GharConnection",
    "held_connection",
    "touches_session_state",
]

logger = logging.getLogger(__name__)

MAIN_APPLICATION_NAME: Final = "360ghar"
BACKGROUND_APPLICATION_NAME: Final = "360ghar_bg"
_RESET_QUERY: Final = "DISCARD ALL"
_RESET_TIMEOUT: Final = 5.0
_XACT_ID_QUERY: Final = "SELECT pg_current_xact_id_if_assigned()::text"
# After a NOTIFY: assign the id now (Postgres would only at pre-commit).
_XACT_ID_ASSIGN_QUERY: Final = "SELECT pg_current_xact_id()::text"
_XACT_STATUS_QUERY: Final = "SELECT pg_xact_status($1::text::xid8)"
_monotonic: Final = time.monotonic
# How often at most a pool's watchdog thread sleeps before looking whether its
# loop is closed or its pool gone (see _watch).
_WATCH_TICK: Final = 0.5
_Future: Final = asyncio.Future
# At most this many loop iterations for a connection with news to close (see
# _Lease._replace_if_gone); about four when the backend was killed.
_GOODBYE_LOOKS: Final = 12


class FailedTransactionError(Exception):
    """COMMIT of a transaction in which a statement had failed: it was rolled back.

    Raised from the end of ``async with db.transaction()`` when the block
    caught a database error and carried on; ``__cause__`` is that error.
    """


def _encode_json(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


async def _init_connection(conn: GharConnection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=_encode_json, decoder=orjson.loads
        )


async def _reset_connection(conn: GharConnection) -> None:
    # asyncpg has already rolled back an open transaction and dropped listeners.
    if conn._ghar_dirty:
        await conn.execute(_RESET_QUERY)
        conn._ghar_dirty = False


class _Pool:
    """One role's ``asyncpg.Pool`` plus what it lacks: fast-fail, counters, serverless."""

    def __init__(
        self,
        db: Database,
        *,
        label: str,
        application_name: str,
        min_size: int,
        max_size: int,
        acquire_timeout: float,
    ) -> None:
        self.db = db
        self.label = label
        self.application_name = application_name
        self.serverless = db.serverless
        self.min_size = 0 if self.serverless else min(min_size, max_size)
        self.max_size = max_size
        self.acquire_timeout = acquire_timeout
        self.check_outcome = True  # the benchmark turns it off to show its cost
        self.pool: asyncpg.Pool | None = None
        self.closing = False
        self._closers: set[asyncio.Task[None]] = set()
        self._watchdog: threading.Event | None = None  # set: the watchdog thread ends
        self.opened = 0
        self.discarded = 0
        self.exhausted = 0

    async def open(self) -> None:
        """Create the asyncpg pool and warm it; Postgres being down is logged, not fatal."""
        s = self.db.settings
        options: dict[str, Any] = {
            "min_size": self.min_size,
            "max_size": self.max_size,
            # The watchdog retires idle connections: asyncpg's own way is a
            # timer armed on every release.
            "max_inactive_connection_lifetime": 0,
            "connect": self._connect,
            "init": _init_connection,
            "reset": _reset_connection,
            "connection_class": GharConnection,
            "statement_cache_size": 0,
            "command_timeout": s.DB_COMMAND_TIMEOUT,
            "timeout": s.DB_CONNECT_TIMEOUT,
            "server_settings": {"application_name": self.application_name},
        }
        try:
            self.pool = await asyncpg.create_pool(self.db.dsn, **options)
        except (
            DatabaseUnavailableException,
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            # Start cold, without a floor (asyncpg would keep none while Postgres is
            # down anyway): connections open on first use, and are kept while used.
            logger.warning(
                "could not warm the %s pool (%s); connections will open on first use",
                self.label,
                exc,
            )
            options["min_size"] = 0
            self.pool = await asyncpg.create_pool(self.db.dsn, **options)
        # Released holders go to the oldest waiter first (see HolderQueue).
        raw_pool = cast(Any, self.pool)
        raw_pool._queue = HolderQueue.replacing(raw_pool._queue)
        self._watchdog = stop = threading.Event()
        threading.Thread(
            target=_watch,
            args=(weakref.ref(self), asyncio.get_running_loop(), stop),
            name=f"ghar {self.label} pool watchdog",
            daemon=True,
        ).start()

    async def _connect(self, *args: Any, **kwargs: Any) -> GharConnection:
        try:
            conn: GharConnection = await asyncpg.connect(*args, **kwargs)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            message = self.db._connect_failed(self.application_name, exc)
            raise DatabaseUnavailableException(message) from exc
        self.db._reached = True
        self.opened += 1
        conn.watch_statements()
        conn._ghar_released = _monotonic()
        sock = conn._transport.get_extra_info("socket") if conn._transport is not None else None
        if sock is not None:
            conn._ghar_poll = select.poll()
            conn._ghar_poll.register(sock.fileno(), select.POLLIN)
        return conn

    def _deadlines(self, now: float) -> tuple[float, bool]:
        """(When to look again, whether something is due now); plain reads only (thread)."""
        s = self.db.settings
        timeout = s.DB_COMMAND_TIMEOUT
        lifetime = s.DB_MAX_INACTIVE_LIFETIME
        wake = now + (min(timeout, lifetime) if lifetime else timeout)
        due = False
        pool = self.pool
        if pool is None:
            return wake, due
        for holder in pool._holders:
            conn = holder._con
            if conn is None or conn._aborted:
                continue
            since = conn._ghar_since
            if since:
                if conn._ghar_cancelling is None:
                    deadline = since + timeout
                    due = due or deadline <= now
                    wake = min(wake, deadline)
            elif lifetime and holder._in_use is None:
                deadline = conn._ghar_released + lifetime
                due = due or deadline <= now
                wake = min(wake, deadline)
        return wake, due

    def _sweep(self) -> None:
        """On the loop: cancel overdue statements, drop connections idle too long."""
        s = self.db.settings
        timeout = s.DB_COMMAND_TIMEOUT
        lifetime = s.DB_MAX_INACTIVE_LIFETIME
        pool = self.pool
        if pool is None:
            return
        now = _monotonic()
        for holder in tuple(pool._holders):
            conn: GharConnection | None = holder._con
            if conn is None or conn.is_closed():
                continue
            since = conn._ghar_since
            if since:
                if since + timeout <= now:
                    conn.expire_overdue()
            elif lifetime and holder._in_use is None and conn._ghar_released + lifetime <= now:
                if pool.get_size() > pool.get_min_size() and not self.closing:
                    conn.terminate()  # asyncpg gives the holder back its slot
                else:
                    conn._ghar_released = now  # a floor connection: look again later

    # --- acquire / release ----------------------------------------------------

    def take(self) -> GharConnection | None:
        """A free connected holder's lease, taken at once; None: :meth:`acquire` must.

        The steps of asyncpg's acquire for a connected holder (``Queue.get``
        preferring connected holders, newest first; then the holder's proxy
        and in-use future), without its three coroutines. Anything else (no
        free holder, one to connect or replace, a closing pool) takes
        asyncpg's own path. A free holder never jumps a waiter: while anyone
        waits, a released holder is handed to the oldest waiter instead of
        being queued (:class:`~ghar_core._db_session.HolderQueue`).
        """
        pool: Any = self.pool
        if pool is None or self.closing or pool._closing:
            return None
        queue = pool._queue
        free = queue._queue
        if not free:
            return None
        holder = free[-1]  # most often the one: released last, connected
        raw = holder._con
        # raw.is_closed() inline (it is asyncpg's whole test): once per lease.
        if raw is None or raw._aborted or not raw._protocol.is_connected():
            for i in range(len(free) - 2, -1, -1):
                holder = free[i]
                raw = holder._con
                if raw is not None and not raw.is_closed():
                    break
            else:
                return None
        else:
            i = len(free) - 1
        if holder._setup is not None or holder._generation != pool._generation:
            return None
        del free[i]
        if queue._putters:  # pragma: no cover - asyncpg never blocks on put
            queue._wakeup_next(queue._putters)
        if holder._inactive_callback is not None:  # pragma: no cover - lifetime 0: never armed
            holder._maybe_cancel_inactive_callback()
        proxy: GharConnection = GharPoolProxy(holder, raw)
        holder._proxy = proxy
        # The holder's in-use future (what Pool.close() awaits): a pending one
        # nobody awaited is kept on the connection for its next lease, as
        # creating one costs about a tenth of a lease.
        in_use = raw._ghar_in_use
        if in_use is None or in_use.done():
            in_use = raw._ghar_in_use = _Future(loop=raw._loop)
        holder._in_use = in_use
        holder._timeout = None
        return proxy

    async def acquire(self) -> GharConnection:
        pool = self.pool
        if pool is None or self.closing:
            raise DatabaseUnavailableException(f"The {self.label} database pool is closed.")
        try:
            if pool._queue.qsize():
                # A holder is free: no wait (a connect is bounded by its own timeout).
                return cast(GharConnection, await pool.acquire())
            deadline = asyncio.timeout(self.acquire_timeout)
            gave_up_waiting.set(False)
            try:
                async with deadline:
                    return cast(GharConnection, await pool.acquire())
            except TimeoutError:
                if not deadline.expired():
                    raise
                if not gave_up_waiting.get():  # it had a holder: connecting took the time
                    raise DatabaseUnavailableException(
                        f"Opening a {self.label} database connection took longer than "
                        f"{self.acquire_timeout:g} s; please retry."
                    ) from None
                self.exhausted += 1
                raise PoolExhaustedException(
                    f"All {self.max_size} {self.label} database connections stayed busy for "
                    f"{self.acquire_timeout:g} s; retry shortly.",
                    details={"pool": self.label, "max_size": self.max_size},
                ) from None
        except asyncpg.InterfaceError as exc:  # "pool is closing", "pool is closed"
            raise DatabaseUnavailableException(
                f"The {self.label} database pool is closed."
            ) from exc

    def discard(self, raw: GharConnection) -> None:
        """Terminate ``raw`` (a failed lease's); asyncpg returns its slot to the pool at once."""
        self.discarded += 1
        raw.terminate()

    def release_clean(self, conn: GharConnection, raw: GharConnection) -> bool:
        """Give back a lease that needs no reset, at once; False: :meth:`release` must.

        What asyncpg's release does for such a connection (no transaction,
        no listeners, not cancelling, not dirty, not expired) is only to put
        its holder back in the queue; its reset coroutine, the
        ``asyncio.timeout`` around it and the proxy layers cost more than the
        query. Anything else takes the full path.
        """
        holder: Any = conn._holder
        pool: Any = holder._pool
        if (
            self.serverless
            or conn._con is not raw
            or raw._ghar_dirty
            or raw._top_xact is not None
            or raw._aborted  # raw.is_closed() inline, with is_connected() below
            or raw._listeners
            or raw._log_listeners
            or holder._generation != pool._generation
            or pool is not self.pool
        ):
            return False
        protocol = raw._protocol
        if (
            not protocol.is_connected()
            or protocol.is_in_transaction()
            or protocol._is_cancelling()
            or protocol.queries_count >= holder._max_queries
        ):
            return False
        raw._pool_release_ctr += 1  # Connection._on_release: stale cursors/statements fail
        holder._timeout = None
        # PoolConnectionHolder._release(), and Queue.put_nowait() when nobody waits
        # (asyncpg's queue is never full and never joined). No inactivity timer
        # to arm: the watchdog retires idle connections.
        in_use = holder._in_use
        if in_use._callbacks is not None and not in_use.done():
            in_use.set_result(None)  # someone waits for this release (Pool.close)
        holder._in_use = None
        holder._proxy = None
        conn._con = None  # the proxy is detached: using it now raises
        raw._proxy = None
        queue: Any = holder._pool._queue
        if queue._getters:
            queue.put_nowait(holder)  # handed to the oldest waiter (HolderQueue)
        else:
            queue._queue.append(holder)
        raw._ghar_released = _monotonic()
        return True

    async def release(self, conn: GharConnection, raw: GharConnection) -> None:
        """Give the lease ``conn`` (asyncpg's proxy of ``raw``) back; closed in serverless mode.

        A connection that died while leased was already given back by asyncpg
        (its proxy is detached): nothing to do then.
        """
        pool = self.pool
        if conn._con is None:
            return
        if raw.is_closed() or pool is None:
            raw.terminate()
            return
        if raw.is_in_transaction():
            raw._ghar_dirty = True  # left open: rolled back, then DISCARD ALL
        if self.serverless:
            if raw._protocol._is_cancelling():
                # A timed-out or cancelled statement: the caller's 503 waits until
                # the server acknowledged the cancel (close waits for it), as a
                # pooled release does, so nothing of ours is left running.
                await self._close(raw)
                return
            closer = asyncio.get_running_loop().create_task(self._close(raw))
            self._closers.add(closer)
            closer.add_done_callback(self._closers.discard)
            return
        try:
            holder = conn._holder
            if holder._pool is pool:
                # Pool.release() minus its asyncio.shield(), a task per release
                # (about 25 µs, the largest cost of a lease): the lease exits once
                # and asyncpg terminates a connection whose reset is interrupted.
                # The reset is bounded by the command timeout of its statements.
                raw._on_release()
                await holder.release(None)
                raw._ghar_released = _monotonic()
            else:  # pragma: no cover - not a proxy of this pool
                await pool.release(conn, timeout=_RESET_TIMEOUT)
        except Exception as exc:  # asyncpg terminated it; its slot is free again
            self.discarded += 1
            logger.warning("resetting a %s connection failed (%s); dropped", self.label, exc)

    async def _close(self, conn: GharConnection) -> None:
        try:
            await conn.close(timeout=_RESET_TIMEOUT)
        except Exception:
            conn.terminate()

    # --- lifecycle -----------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for busy connections, then terminate the rest."""
        self.closing = True
        pool = self.pool
        if pool is None:
            return
        try:
            async with asyncio.timeout(grace):
                if self._closers:
                    await asyncio.gather(*self._closers, return_exceptions=True)
                await pool.close()
        except TimeoutError:
            logger.warning(
                "%s connection(s) still busy after %.1f s; terminating",
                self.label,
                grace,
            )
            self.terminate()
        self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.set()  # its thread wakes and ends

    def terminate(self) -> None:
        """Drop every connection now (no goodbye to the server)."""
        self.closing = True
        for closer in self._closers:
            closer.cancel()
        if self.pool is not None:
            self.pool.terminate()
        self._stop_watchdog()

    def stats(self) -> dict[str, int]:
        pool = self.pool
        size = pool.get_size() if pool is not None else 0
        idle = pool.get_idle_size() if pool is not None else 0
        waiters = (
            sum(1 for f in pool._queue._getters if not f.done())
            if pool is not None and pool._queue is not None
            else 0
        )
        return {
            "size": size,
            "idle": idle,
            "in_use": size - idle,
            "waiters": waiters,
            "max_size": self.max_size,
            "opened": self.opened,
            "discarded": self.discarded,
            "exhausted": self.exhausted,
        }

    # --- the outcome of an interrupted COMMIT --------------------------------------

    async def xact_status(self, xid: str) -> str | None:
        """``pg_xact_status(xid)`` asked on a fresh connection; None when nobody answers.

        Retried until ``DB_CONNECT_TIMEOUT`` is spent: right after a failure
        the server (or PgBouncer) may be coming back, and a transaction whose
        backend has not noticed its lost client yet is still "in progress".
        """
        s = self.db.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.DB_CONNECT_TIMEOUT
        while (left := deadline - loop.time()) > 0:
            try:
                conn = await asyncpg.connect(
                    self.db.dsn,
                    statement_cache_size=0,
                    timeout=left,
                    command_timeout=max(left, 0.1),
                    server_settings={"application_name": self.application_name},
                )
                try:
                    status: str | None = await conn.fetchval(_XACT_STATUS_QUERY, xid)
                finally:
                    conn.terminate()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                status = None
            if status in ("committed", "aborted"):
                return status
            await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0)))
        return None


def _watch(ref: weakref.ref[_Pool], loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
    """A pool's watchdog thread: statements past the command timeout, idle connections.

    Statements: each watched call stamps its start (see
    :mod:`ghar_core._db_session`); a call still running
    ``DB_COMMAND_TIMEOUT`` after it is cancelled (asyncpg then cancels it
    on the server). Idle connections: one idle for more than
    ``DB_MAX_INACTIVE_LIFETIME`` is dropped while the pool is above its
    min size, as asyncpg's own per-release timer would.

    Why a thread: any timer scheduled on the event loop makes every loop
    iteration look at the clock twice (about 5% of a query here), and
    statements are in flight nearly all the time under load. The thread
    only reads the stamps; it looks again at the earliest deadline it knows
    of, never later than the shorter of the two settings (anything that
    starts, or goes idle, meanwhile has a deadline at least that far away),
    and hands the acting to the loop (:meth:`_Pool._sweep`), which checks
    everything again.

    Its owner is the pool's ``close()``/``terminate()`` (the event ``stop``).
    For a pool never closed, it holds the pool only by ``ref`` and wakes
    at least every ``_WATCH_TICK`` seconds: it ends within that once the
    loop is closed or the pool is garbage-collected, instead of sleeping
    on for up to ``DB_COMMAND_TIMEOUT``.
    """
    wake = 0.0
    while not stop.is_set() and not loop.is_closed():
        pool = ref()
        if pool is None:
            return
        now = _monotonic()
        if now >= wake:
            wake = now + pool.db.settings.DB_COMMAND_TIMEOUT
            try:
                wake, due = pool._deadlines(now)
                if due:
                    loop.call_soon_threadsafe(pool._sweep)
                    wake = max(wake, now + 0.01)  # let the loop act before looking again
            except RuntimeError:  # the loop is closed: nothing left to watch
                return
            except Exception:  # pragma: no cover - a bug here must not end all timeouts
                logger.exception("the %s pool watchdog failed; going on", pool.label)
        del pool  # only the weak reference while asleep
        stop.wait(min(max(wake - now, 0.001), _WATCH_TICK))


def _news_on(conn: GharConnection) -> bool:
    """Whether the idle connection's socket has something to read (most likely a goodbye).

    One ``poll`` on the descriptor registered at connect time (the
    connection is open, so it is still its socket's).
    """
    poller = conn._ghar_poll
    if poller is None:
        return False
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


# The connection the current task holds through a lease (with that task), so
# code deep inside an operation (current_user's users-row sync) can use it
# instead of taking a second one from the pool (a pool of 1 would deadlock).
_held: ContextVar[tuple[GharConnection, GharConnection, asyncio.Task[Any] | None] | None] = (
    ContextVar("ghar_held_connection", default=None)
)


def held_connection() -> GharConnection | None:
    """The pooled connection this task holds right now (``async with db.transaction()``).

    ``None`` outside a lease, and in tasks spawned inside one: a connection
    runs one statement at a time, so only its holder may use it.
    """
    held = _held.get()
    if held is None:
        return None
    conn, raw, task = held  # raw: the proxy is detached once the connection is lost
    if task is not asyncio.current_task() or raw.is_closed():
        return None
    return conn


class _Lease:
    """``async with`` over one pooled connection, optionally inside a transaction.

    A plain class rather than ``@asynccontextmanager``: it is on every
    request's path and a generator-based manager costs several µs more.
    The block gets asyncpg's pool proxy; the lease keeps the connection
    behind it (``_raw``), because asyncpg detaches the proxy as soon as the
    connection is lost, and the lease must still look at it then.
    """

    __slots__ = ("_conn", "_held_token", "_pool", "_raw", "_transactional", "_tx")

    def __init__(self, pool: _Pool, transactional: bool) -> None:
        self._pool = pool
        self._transactional = transactional
        self._conn: GharConnection | None = None
        self._raw: GharConnection | None = None
        self._tx: Any = None
        self._held_token: Token[Any] | None = None

    async def _fresh(self) -> tuple[GharConnection, GharConnection]:
        pool = self._pool
        conn = pool.take() or await pool.acquire()
        raw: GharConnection = conn._con
        if _news_on(raw):
            conn, raw = await self._replace_if_gone(conn, raw)
        raw._ghar_writes = raw._ghar_notifies = False
        raw._ghar_failure = None
        return conn, raw

    async def _replace_if_gone(
        self, conn: GharConnection, raw: GharConnection
    ) -> tuple[GharConnection, GharConnection]:
        # The server spoke while the connection sat idle: let asyncpg read it.
        # A goodbye (restart, idle kill) closes it; nothing was sent yet, so
        # one fresh connection is safe to take. Closing takes asyncpg several
        # loop iterations (the FATAL message, the end of the stream, then the
        # transport's close): look again while the socket still has something
        # to say; news on a live connection (a NOTIFY) is read in one.
        # The end of the stream can come a little after the FATAL message,
        # which asyncpg, idle, took as a failed operation (its protocol now
        # refuses any statement with InternalClientError): a connection still
        # open then is asked one empty statement before it is leased (a round
        # trip, only after news on an idle connection: rare).
        # Cancelled meanwhile: the lease is not entered, so it is given back here.
        pool = self._pool
        try:
            for _ in range(_GOODBYE_LOOKS):
                await asyncio.sleep(0)
                if raw.is_closed() or not _news_on(raw):
                    break
            if not raw.is_closed():
                try:
                    await raw.execute("")
                    return conn, raw
                except Exception:
                    pool.discard(raw)
        except BaseException:
            pool.discard(raw)
            await pool.release(conn, raw)
            raise
        await pool.release(conn, raw)
        conn = await pool.acquire()
        raw = conn._con
        return conn, raw

    async def _begin(self) -> None:
        pool = self._pool
        for attempt in (1, 2):
            conn, raw = await self._fresh()
            tx = conn.transaction()
            try:
                await tx.start()
            except BaseException as exc:
                lost = _lost(raw, exc)
                pool.discard(raw)
                await pool.release(conn, raw)
                if not (lost or _should_translate(exc)):
                    raise
                if attempt == 2:
                    raise _unavailable(exc) from exc
                # It died between the check and BEGIN: nothing ran yet, so one
                # fresh connection is safe to try.
                continue
            self._conn, self._raw, self._tx = conn, raw, tx
            return

    async def __aenter__(self) -> GharConnection:
        if self._transactional:
            await self._begin()
            conn, raw = self._conn, self._raw
            assert conn is not None
            assert raw is not None
        else:
            # _fresh() inline: this is the path of every plain query.
            pool = self._pool
            conn = pool.take() or await pool.acquire()
            raw = conn._con
            poller = raw._ghar_poll  # _news_on() inline
            if poller is not None:
                try:
                    news = bool(poller.poll(0))
                except OSError:
                    news = True
                if news:
                    conn, raw = await self._replace_if_gone(conn, raw)
            raw._ghar_writes = raw._ghar_notifies = False
            raw._ghar_failure = None
            self._conn, self._raw = conn, raw
        self._held_token = _held.set((conn, raw, _current_task_of(raw._loop)))
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, raw, tx = self._conn, self._raw, self._tx
        assert conn is not None, "lease exited without being entered"
        assert raw is not None
        self._conn = self._raw = self._tx = None
        token, self._held_token = self._held_token, None
        if token is not None:
            try:
                _held.reset(token)
            except ValueError:  # exited in another context than entered: just forget it
                _held.set(None)
        pool = self._pool
        if exc is None:
            try:
                if tx is not None:
                    await self._commit(raw, tx)
            finally:
                if not pool.release_clean(conn, raw):
                    await pool.release(conn, raw)
            return
        # An error from a connection that is closed now is a lost connection
        # whatever asyncpg called it: a backend killed just before a query
        # surfaces as InternalClientError("cannot switch to state ...").
        lost = _lost(raw, exc)
        # A timeout or a cancellation leaves asyncpg cancelling the statement on
        # the server: rollback and release wait for that, so nothing keeps
        # running. Other transient failures may leave the protocol mid-way: drop.
        waits = isinstance(exc, TimeoutError | asyncio.CancelledError)
        try:
            if lost or raw.is_closed() or (not waits and is_transient_error(exc)):
                pool.discard(raw)
            elif tx is not None:
                try:
                    await tx.rollback()
                except BaseException as failed:
                    # The original error is the one to report; this connection is done.
                    pool.discard(raw)
                    if not isinstance(failed, Exception):
                        raise
        finally:
            await pool.release(conn, raw)
        if lost or _should_translate(exc):
            raise _unavailable(exc) from exc

    async def _commit(self, raw: GharConnection, tx: Any) -> None:
        pool = self._pool
        failure = raw._ghar_failure
        if failure is not None:
            # The server would answer COMMIT with ROLLBACK: say so instead.
            try:
                await tx.rollback()
            except BaseException:
                pool.discard(raw)
                raise
            raise FailedTransactionError(
                "The transaction was rolled back, not committed: a statement in it failed "
                f"({type(failure).__name__}: {failure}) and the error was caught inside the "
                "block. Let the error leave the `async with`, or run the statement in a "
                "savepoint (`async with conn.transaction():`) to carry on after it."
            ) from failure
        xid: str | None = None
        check = pool.check_outcome
        writes = raw._ghar_writes
        if writes and check:
            # Nothing is committed yet: a failure here is an ordinary (retryable) one.
            try:
                xid = await raw.fetchval(
                    _XACT_ID_ASSIGN_QUERY if raw._ghar_notifies else _XACT_ID_QUERY
                )
            except BaseException as exc:
                lost = _lost(raw, exc)
                pool.discard(raw)
                if lost or _should_translate(exc):
                    raise _unavailable(exc) from exc
                raise
        try:
            await tx.commit()
        except BaseException as exc:
            if isinstance(exc, asyncpg.PostgresError) and not is_transient_error(exc):
                raise  # the server answered: rolled back (deferred constraint, serialization)
            lost = _lost(raw, exc)
            pool.discard(raw)
            if isinstance(exc, asyncio.CancelledError) or not (lost or _should_translate(exc)):
                raise
            if not check or (writes and xid is None):
                raise _unavailable(exc) from exc  # nothing was written: a retry is safe
            status = await pool.xact_status(xid) if xid is not None else None
            if status == "committed":
                logger.warning(
                    "COMMIT's answer was lost (%s); transaction %s is committed",
                    type(exc).__name__,
                    xid,
                )
                return
            if status == "aborted":
                raise _unavailable(exc) from exc
            # No id (a read judged read-only) or no answer: nobody can tell.
            raise CommitOutcomeUnknownException(
                details={"transaction_id": xid} if xid is not None else None
            ) from exc


def _lost(conn: GharConnection, exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, BaseAPIException) and conn.is_closed()


def _unavailable(exc: BaseException) -> DatabaseUnavailableException:
    return DatabaseUnavailableException(
        f"The database connection failed ({type(exc).__name__}); please retry.",
    )


def _should_translate(exc: BaseException) -> bool:
    return (
        isinstance(exc, Exception)
        and not isinstance(exc, BaseAPIException)
        and is_transient_error(exc)
    )


class Database:
    """The resource owning the main and background pools (``name = "database"``).

    Implements the lifecycle ``Resource`` protocol; see the module docstring
    for usage and design. ``dsn`` overrides ``settings.DATABASE_URL`` (tests,
    PgBouncer). ``migrations``: the app's own migration sets, applied after
    the core's when ``DB_MIGRATE_ON_STARTUP`` is true (see ``ghar_core.migrate``).
    """

    name = "database"

    def __init__(
        self,
        settings: Settings,
        *,
        dsn: str | None = None,
        migrations: Sequence[MigrationSet] = (),
    ) -> None:
        self.settings = settings
        self.migrations = tuple(migrations)
        self.dsn = dsn or settings.DATABASE_URL
        self.serverless = settings.SERVERLESS_ENABLED
        self._main: _Pool | None = None
        self._bg: _Pool | None = None
        self._migrations_pending = settings.DB_MIGRATE_ON_STARTUP
        self._last_connect_warning = 0.0
        self._reached = False  # any connection opened since start: outages vs. setup errors
        where = urlsplit(self.dsn)
        self._where = f"{where.hostname or 'localhost'}:{where.port or 5432}{where.path}"
        self._stopped = False

    # --- connections ----------------------------------------------------------------

    def _connect_failed(self, application_name: str, exc: BaseException) -> str:
        """Log a failed connect (rate-limited); the message the 503 carries."""
        now = time.monotonic()
        if now - self._last_connect_warning > 5.0:
            self._last_connect_warning = now
            if self._reached:
                logger.warning(
                    "cannot connect to Postgres for %s: %s: %s",
                    application_name,
                    type(exc).__name__,
                    exc,
                )
            else:
                # Never reached since start: more likely a wrong DATABASE_URL or
                # a server that is not running than a blip; say so.
                logger.error(
                    "cannot connect to Postgres at %s for %s: %s: %s; it has not answered "
                    "since this instance started: is it running, and is DATABASE_URL "
                    "right? (`ghar-core dev` starts one for development)",
                    self._where,
                    application_name,
                    type(exc).__name__,
                    exc,
                )
        if self._reached:
            return "The database cannot be reached right now; please retry."
        return "The database has not answered since this service started; please retry."

    def _make_pool(self, background: bool) -> _Pool:
        s = self.settings
        return _Pool(
            self,
            label="background" if background else "main",
            application_name=BACKGROUND_APPLICATION_NAME if background else MAIN_APPLICATION_NAME,
            min_size=s.DB_BG_POOL_MIN_SIZE if background else s.DB_POOL_MIN_SIZE,
            max_size=s.DB_BG_POOL_MAX_SIZE if background else s.DB_POOL_MAX_SIZE,
            acquire_timeout=(
                s.DB_BG_POOL_ACQUIRE_TIMEOUT if background else s.DB_POOL_ACQUIRE_TIMEOUT
            ),
        )

    def _pool(self, background: bool) -> _Pool:
        pool = self._bg if background else self._main
        if pool is None:
            if self._stopped:
                # Work racing shutdown (a background task, a late request) gets
                # the same 503 as a closing pool's waiters, not a 500.
                raise DatabaseUnavailableException("The database is shutting down.")
            raise RuntimeError("Database is not started: the app's lifespan starts it")
        return pool

    def connection(self) -> _Lease:
        """``async with db.connection() as conn``: a main-pool connection, autocommit."""
        return _Lease(self._main or self._pool(False), False)

    def transaction(self) -> _Lease:
        """``async with db.transaction() as conn``: committed on success, rolled back on error."""
        return _Lease(self._main or self._pool(False), True)

    def background_connection(self) -> _Lease:
        """A background-pool connection (schedulers, streams)."""
        return _Lease(self._pool(True), False)

    def background_transaction(self) -> _Lease:
        """A background-pool connection inside a transaction."""
        return _Lease(self._pool(True), True)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create both pools and warm them; Postgres being down is logged, not fatal."""
        if self._main is not None:
            return
        self._stopped = False
        main, bg = self._make_pool(False), self._make_pool(True)
        await asyncio.gather(main.open(), bg.open())
        self._main, self._bg = main, bg
        if self._migrations_pending:
            await self._migrate_if_pending()

    async def _migrate_if_pending(self) -> None:
        from ghar_core.migrate import apply_migrations

        try:
            async with self.background_connection() as conn:
                applied = await apply_migrations(conn, self.migrations)
        except DatabaseUnavailableException as exc:
            logger.warning("migrations postponed until Postgres is reachable: %s", exc)
            return
        self._migrations_pending = False
        if applied:
            logger.info("applied migrations: %s", ", ".join(m.label for m in applied))

    async def stop(self, grace: float | None = None) -> None:
        """Close both pools; busy connections get ``grace`` seconds, then are terminated."""
        main, bg = self._main, self._bg
        self._main = self._bg = None
        self._stopped = True
        bound = self.settings.SHUTDOWN_STEP_TIMEOUT * 0.8 if grace is None else grace
        await asyncio.gather(*(p.close(bound) for p in (main, bg) if p is not None))

    def terminate(self) -> None:
        """Drop every connection immediately (last resort; ``stop`` is the polite way)."""
        for pool in (self._main, self._bg):
            if pool is not None:
                pool.terminate()
        self._main = self._bg = None
        self._stopped = True

    async def check(self) -> None:
        """Readiness: ``SELECT 1`` on each pool; pending startup migrations are retried."""
        for background in (False, True):
            async with _Lease(self._pool(background), False) as conn:
                await conn.fetchval("SELECT 1")
        if self._migrations_pending:
            await self._migrate_if_pending()
            if self._migrations_pending:
                raise DatabaseUnavailableException("Startup migrations are not applied yet.")

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per pool (size, idle, in_use, waiters, opened, discarded, exhausted)."""
        return {
            "main": self._pool(False).stats(),
            "background": self._pool(True).stats(),
        }
