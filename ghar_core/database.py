"""The Postgres layer: a main pool for HTTP traffic and a background pool, on asyncpg.

Ownership: the app's lifespan owns one :class:`Database` (resource name
``"database"``); handlers get it with ``request.resources.get("database")``
(services receive it as an argument) and never build pools on the side.
``start()`` creates both pools and warms ``DB_POOL_MIN_SIZE`` connections,
``stop()`` closes gracefully within a bound, ``terminate()`` is immediate.

Usage::

    async with db.connection() as conn:          # main pool, autocommit
        row = await conn.fetchrow("SELECT ...", user_id)
    async with db.transaction() as conn:         # main pool, one transaction
        await conn.execute("UPDATE ...", ...)
    async with db.background_connection() as conn: ...   # schedulers, LISTEN
    async with db.background_transaction() as conn: ...

Design choices, and why:

* **Statement cache off** (``statement_cache_size=0``) on every connection:
  PgBouncer in transaction mode hands each transaction to any server
  connection, so a named prepared statement made on one is missing on the
  next ("prepared statement ... does not exist"). The cost is one extra
  round trip per parameterised query, paid equally by the held-connection
  floor in the benchmark.
* **Our own small pool instead of asyncpg's.** asyncpg's pool sends a reset
  query (``RESET ALL; UNLISTEN *; ...``) on every release, a full round trip
  (with the statement cache off, as PgBouncer needs, it measured about 1.8x
  the per-query time of a held connection, ours about 1.05-1.1x: see
  ``benchmarks/results/database.md``), and its acquire timeout
  costs a task per acquire. Ours hands connections over with a deque and a
  future (a timer, not a task, bounds the wait) and resets **only connections
  that may carry session state**: :class:`GharConnection` classifies each
  statement it runs (``SET`` without ``LOCAL``, ``set_config``, ``LISTEN``,
  session advisory locks, temp tables, ``PREPARE``, ``WITH HOLD`` cursors,
  ...; the verdict is cached per query text) and marks itself dirty; a dirty
  connection, or one left inside a transaction, is reset with
  ``DISCARD ALL`` before anyone else gets it. Transaction-scoped state
  (``SET LOCAL``, ``pg_advisory_xact_lock``) needs nothing. Server-side code
  that changes session state (a function calling ``set_config(..., false)``)
  is invisible to the classifier: call ``conn.mark_session_state()`` after it.
  Session state is wrong behind PgBouncer's transaction mode anyway; prefer
  ``SET LOCAL`` inside :meth:`Database.transaction`.
* **Exhaustion fails fast.** Waiting past the acquire timeout raises
  :class:`~ghar_core.exceptions.PoolExhaustedException` (503, Retry-After),
  which the retry helper never retries.
* **Outages recover by themselves.** Connections are opened on demand: if
  Postgres is down at ``start()`` the app still starts (the warm-up is logged
  and skipped); each use then tries to connect and fails with
  :class:`~ghar_core.exceptions.DatabaseUnavailableException` (503,
  Retry-After) until Postgres is back. A connection that failed with a
  transient error (see :mod:`ghar_core.db_resilience`) is terminated rather
  than returned, and that error leaves the ``async with`` block as a 503.
* **Serverless mode** (``SERVERLESS_ENABLED``): the same pools keep nothing
  idle; every use opens a connection and closes it afterwards, still capped
  at the pool's max size with the same fast-fail, so nothing stays connected
  between requests.
* ``json``/``jsonb`` columns decode to Python objects (orjson); parameters
  may be Python objects or already-encoded JSON text (``str``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import orjson

from ghar_core.config import Settings
from ghar_core.db_resilience import is_transient_error
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
    "GharConnection",
    "touches_session_state",
]

logger = logging.getLogger(__name__)

MAIN_APPLICATION_NAME: Final = "360ghar"
BACKGROUND_APPLICATION_NAME: Final = "360ghar_bg"
_RESET_QUERY: Final = "DISCARD ALL"
_RESET_TIMEOUT: Final = 5.0

# Statements whose effect outlives the transaction. Over-matching only costs a
# reset round trip; under-matching would leak state, so the patterns are broad.
# A statement starts at the beginning or after a ';' (then any whitespace and
# comments): not after a bare newline, or every ``UPDATE t\nSET x = 1`` would
# pay a needless ``DISCARD ALL``.
# Tokens may be separated by comments as well as whitespace (Postgres accepts
# ``SET/**/work_mem``), and ``DO`` blocks count as dirty: their body can run
# ``SET``/``EXECUTE 'SET ...'`` where no statement-start pattern can see it.
_GAP: Final = r"(?:\s|/\*.*?\*/|--[^\n]*(?:\n|$))"
_SESSION_STATE_RE: Final = re.compile(
    rf"""
    (?:^|;){_GAP}*
      (?:SET{_GAP}+(?!LOCAL\b|TRANSACTION\b|CONSTRAINTS\b)
        |RESET\b|LISTEN\b|PREPARE\b|LOAD\b
        |DO\b(?!{_GAP}+(?:UPDATE|NOTHING)\b))
    | \bpg_(?:try_)?advisory_lock(?:_shared)?"?{_GAP}*\(
    | \bset_config"?{_GAP}*\(
    | \bWITH{_GAP}+HOLD\b
    | \bCREATE{_GAP}+(?:OR{_GAP}+REPLACE{_GAP}+)?(?:(?:GLOBAL|LOCAL){_GAP}+)?TEMP(?:ORARY)?\b
    | \bINTO{_GAP}+(?:TEMP|TEMPORARY)\b
    | \bCREATE\b[^;]*?\bpg_temp\b
    """,
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_VERDICTS: dict[str, bool] = {}
_VERDICTS_MAX: Final = 4096


def touches_session_state(query: str) -> bool:
    """True when ``query`` may leave state on the session beyond its transaction.

    Cached per query text (application queries are constant strings), so
    the hot path is one dict lookup.
    """
    verdict = _VERDICTS.get(query)
    if verdict is None:
        verdict = _SESSION_STATE_RE.search(query) is not None
        if len(_VERDICTS) < _VERDICTS_MAX:
            _VERDICTS[query] = verdict
    return verdict


def _encode_json(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class GharConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that notices statements leaving session state.

    Created only by :class:`Database`; handed out inside ``async with`` blocks
    and owned by its pool, which resets it (``DISCARD ALL``) on release only
    when :attr:`session_dirty` is set.
    """

    __slots__ = ("_ghar_dirty", "_ghar_idle_since")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ghar_dirty = False
        self._ghar_idle_since = 0.0

    @property
    def session_dirty(self) -> bool:
        """Whether this connection must be reset before its next user."""
        return self._ghar_dirty

    def mark_session_state(self) -> None:
        """Declare session state the classifier cannot see (e.g. set by a function)."""
        self._ghar_dirty = True

    def _note(self, query: str) -> None:
        if touches_session_state(query):
            self._ghar_dirty = True

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        self._note(query)
        result: str = await super().execute(query, *args, **kwargs)
        return result

    async def executemany(self, command: str, args: Any, **kwargs: Any) -> None:
        self._note(command)
        await super().executemany(command, args, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        self._note(query)
        result: list[Any] = await super().fetch(query, *args, **kwargs)
        return result

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._note(query)
        return await super().fetchval(query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._note(query)
        return await super().fetchrow(query, *args, **kwargs)

    async def fetchmany(self, query: str, args: Any, **kwargs: Any) -> list[Any]:
        self._note(query)
        result: list[Any] = await super().fetchmany(query, args, **kwargs)
        return result

    async def prepare(self, query: str, **kwargs: Any) -> Any:
        self._note(query)
        if kwargs.get("name"):
            # An explicitly named statement outlives the lease (the unnamed
            # one our cache-off default uses does not): DISCARD ALL drops it.
            self._ghar_dirty = True
        return await super().prepare(query, **kwargs)

    def cursor(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._note(query)
        return super().cursor(query, *args, **kwargs)

    def get_reset_query(self) -> str:
        # Fuller than asyncpg's default: also drops temp tables, prepared
        # statements and SET ROLE. Sent only for dirty connections.
        return _RESET_QUERY

    def add_log_listener(self, callback: Any) -> None:
        # Client-side state; the reset clears it.
        self._ghar_dirty = True
        super().add_log_listener(callback)


class _Pool:
    """A small asyncpg connection pool; one per :class:`Database` role.

    LIFO idle list (hot connections stay hot, cold ones age out past
    ``max_inactive``), FIFO waiters bounded by ``acquire_timeout``, ``size``
    counting open and opening connections. With ``keep_idle=False``
    (serverless) released connections are closed instead of kept.
    """

    def __init__(
        self,
        *,
        label: str,
        connect: Callable[[], Awaitable[GharConnection]],
        min_size: int,
        max_size: int,
        acquire_timeout: float,
        max_inactive: float,
        keep_idle: bool,
    ) -> None:
        self.label = label
        self._connect = connect
        self._min_size = min(min_size, max_size) if keep_idle else 0
        self._max_size = max_size
        self._acquire_timeout = acquire_timeout
        self._max_inactive = max_inactive
        self._keep_idle = keep_idle
        self._loop = asyncio.get_running_loop()
        self._idle: deque[GharConnection] = deque()
        self._all: set[GharConnection] = set()
        self._size = 0
        self._waiters: deque[asyncio.Future[GharConnection | None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._drained = asyncio.Event()
        self._closed = False
        self.opened = 0
        self.discarded = 0
        self.exhausted = 0

    # --- acquire / release ----------------------------------------------------

    async def acquire(self) -> GharConnection:
        if self._closed:
            raise DatabaseUnavailableException(f"The {self.label} database pool is closed.")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.is_closed():
                return conn
            self._forget(conn)
        if self._size < self._max_size:
            self._size += 1
            return await self._open()
        return await self._wait()

    async def _open(self) -> GharConnection:
        try:
            conn = await self._connect()
        except BaseException:
            self._size -= 1
            self._hand_slot()
            raise
        if self._closed:
            conn.terminate()
            self._size -= 1
            raise DatabaseUnavailableException(f"The {self.label} database pool is closed.")
        self._all.add(conn)
        self.opened += 1
        return conn

    async def _wait(self) -> GharConnection:
        fut: asyncio.Future[GharConnection | None] = self._loop.create_future()
        self._waiters.append(fut)
        timer = self._loop.call_later(self._acquire_timeout, self._expire, fut)
        try:
            got = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                handed = fut.result()
                if handed is None:
                    self._size -= 1
                    self._hand_slot()
                else:
                    await self.release(handed)
            raise
        finally:
            timer.cancel()
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
        if got is None:  # a slot freed up (a connection was dropped): open our own
            return await self._open()
        return got

    def _expire(self, fut: asyncio.Future[GharConnection | None]) -> None:
        if not fut.done():
            self.exhausted += 1
            fut.set_exception(
                PoolExhaustedException(
                    f"All {self._max_size} {self.label} database connections stayed busy for "
                    f"{self._acquire_timeout:g} s; retry shortly.",
                    details={"pool": self.label, "max_size": self._max_size},
                )
            )

    def _hand(self, conn: GharConnection | None) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def _hand_slot(self) -> None:
        # Capacity freed: let the first waiter open a connection (counted for it now).
        if not self._closed and self._size < self._max_size and self._hand(None):
            self._size += 1

    def _forget(self, conn: GharConnection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._size -= 1
            if not conn.is_closed():
                conn.terminate()
            if self._closed and not self._all:
                self._drained.set()
            self._hand_slot()

    async def release(self, conn: GharConnection, *, discard: bool = False) -> None:
        """Return ``conn``; ``discard`` terminates it instead (it never comes back)."""
        if discard or conn.is_closed():
            if conn in self._all:
                self.discarded += 1
            self._forget(conn)
            return
        if conn._ghar_dirty or conn.is_in_transaction():
            try:
                await conn.reset(timeout=_RESET_TIMEOUT)
            except BaseException as exc:
                self.discarded += 1
                self._forget(conn)
                if not isinstance(exc, Exception):
                    raise
                logger.warning("resetting a %s connection failed (%s); dropped", self.label, exc)
                return
            conn._ghar_dirty = False
        if self._closed or not self._keep_idle:
            self._spawn(self._close_one(conn))
            return
        if not self._hand(conn):
            conn._ghar_idle_since = self._loop.time()
            self._idle.append(conn)
            self._arm_reaper()

    async def _close_one(self, conn: GharConnection) -> None:
        try:
            await conn.close(timeout=_RESET_TIMEOUT)
        except Exception:
            conn.terminate()
        finally:
            self._forget(conn)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- idle lifetime ----------------------------------------------------------

    def _arm_reaper(self) -> None:
        if self._reaper is None and self._max_inactive > 0 and not self._closed:
            delay = max(min(self._max_inactive / 2, 30.0), 0.05)
            self._reaper = self._loop.call_later(delay, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        deadline = self._loop.time() - self._max_inactive
        idle = self._idle
        while idle and idle[0]._ghar_idle_since <= deadline and self._size > self._min_size:
            conn = idle.popleft()
            self._all.discard(conn)
            self._size -= 1
            self._spawn(self._close_quietly(conn))
        if idle:
            self._arm_reaper()

    @staticmethod
    async def _close_quietly(conn: GharConnection) -> None:
        try:
            await conn.close(timeout=_RESET_TIMEOUT)
        except Exception:
            conn.terminate()

    # --- lifecycle ---------------------------------------------------------------

    async def prewarm(self) -> None:
        """Open ``min_size`` connections; on failure log and carry on (lazy recovery)."""
        want = self._min_size - self._size
        if want <= 0:
            return
        self._size += want
        results = await asyncio.gather(
            *(self._open_idle() for _ in range(want)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            logger.warning(
                "could not warm the %s pool (%s); connections will open on first use",
                self.label,
                failures[0],
            )

    async def _open_idle(self) -> None:
        conn = await self._open()
        await self.release(conn)

    def _fail_waiters(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(
                    DatabaseUnavailableException(f"The {self.label} database pool is closing.")
                )

    async def close(self, grace: float) -> None:
        """Close idle connections, wait up to ``grace`` seconds for busy ones, then terminate."""
        self._closed = True
        self._fail_waiters()
        while self._idle:
            self._spawn(self._close_one(self._idle.pop()))
        if self._all:
            self._drained.clear()
            try:
                async with asyncio.timeout(grace):
                    await self._drained.wait()
            except TimeoutError:
                logger.warning(
                    "%d %s connection(s) still busy after %.1f s; terminating",
                    len(self._all),
                    self.label,
                    grace,
                )
                self.terminate()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def terminate(self) -> None:
        """Drop every connection now (no goodbye to the server)."""
        self._closed = True
        self._fail_waiters()
        self._idle.clear()
        for conn in list(self._all):
            conn.terminate()
        self._all.clear()
        self._size = 0
        self._drained.set()

    def stats(self) -> dict[str, int]:
        return {
            "size": self._size,
            "idle": len(self._idle),
            "in_use": len(self._all) - len(self._idle),
            "waiters": sum(1 for f in self._waiters if not f.done()),
            "max_size": self._max_size,
            "opened": self.opened,
            "discarded": self.discarded,
            "exhausted": self.exhausted,
        }

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if not self._closed and self._all:
            _warn(f"unclosed {self.label} database pool", ResourceWarning, source=self)


class _Lease:
    """``async with`` over one pooled connection, optionally inside a transaction.

    A plain class rather than ``@asynccontextmanager``: it is on every
    request's path and a generator-based manager costs several µs more.
    """

    __slots__ = ("_conn", "_pool", "_transactional", "_tx")

    def __init__(self, pool: _Pool, transactional: bool) -> None:
        self._pool = pool
        self._transactional = transactional
        self._conn: GharConnection | None = None
        self._tx: Any = None

    async def __aenter__(self) -> GharConnection:
        pool = self._pool
        conn = await pool.acquire()
        if self._transactional:
            tx = conn.transaction()
            try:
                await tx.start()
            except BaseException as exc:
                await pool.release(conn, discard=True)
                if not (_should_translate(exc) or _lost(conn, exc)):
                    raise
                # An idle connection died while pooled (server restart, idle
                # kill): nothing ran yet, so one fresh connection is safe to try.
                conn = await pool.acquire()
                tx = conn.transaction()
                try:
                    await tx.start()
                except BaseException as again:
                    await pool.release(conn, discard=True)
                    if not (_should_translate(again) or _lost(conn, again)):
                        raise
                    raise _unavailable(again) from again
            self._tx = tx
        self._conn = conn
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        assert conn is not None, "lease exited without being entered"
        self._conn = None
        tx, self._tx = self._tx, None
        # A cancelled or transiently failed connection may be mid-protocol: drop it.
        # An error from a connection that is closed now is a lost connection
        # whatever asyncpg called it: a backend killed just before a query
        # surfaces as InternalClientError("cannot switch to state ...").
        lost = isinstance(exc, Exception) and _lost(conn, exc)
        discard = exc is not None and (
            lost or isinstance(exc, asyncio.CancelledError) or is_transient_error(exc)
        )
        failure: BaseException | None = None
        try:
            if tx is not None and not conn.is_closed() and not discard:
                if exc is None:
                    try:
                        await tx.commit()
                    except BaseException as commit_exc:
                        discard = not isinstance(commit_exc, Exception) or is_transient_error(
                            commit_exc
                        )
                        failure = commit_exc
                else:
                    try:
                        await tx.rollback()
                    except Exception:
                        discard = True
        finally:
            await self._pool.release(conn, discard=discard)
        if failure is not None:
            if _should_translate(failure) or _lost(conn, failure):
                raise _unavailable(failure) from failure
            raise failure
        if exc is not None and (lost or _should_translate(exc)):
            raise _unavailable(exc) from exc


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
        self._stopped = False

    # --- connections ----------------------------------------------------------------

    async def _connect(self, application_name: str) -> GharConnection:
        s = self.settings
        try:
            conn: GharConnection = await asyncpg.connect(
                self.dsn,
                statement_cache_size=0,
                timeout=s.DB_CONNECT_TIMEOUT,
                command_timeout=s.DB_COMMAND_TIMEOUT,
                server_settings={"application_name": application_name},
                connection_class=GharConnection,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            now = time.monotonic()
            if now - self._last_connect_warning > 5.0:
                self._last_connect_warning = now
                logger.warning(
                    "cannot connect to Postgres for %s: %s: %s",
                    application_name,
                    type(exc).__name__,
                    exc,
                )
            raise DatabaseUnavailableException(
                "The database cannot be reached right now; please retry.",
            ) from exc
        for typename in ("json", "jsonb"):
            await conn.set_type_codec(
                typename, schema="pg_catalog", encoder=_encode_json, decoder=orjson.loads
            )
        return conn

    def _make_pool(self, background: bool) -> _Pool:
        s = self.settings
        app = BACKGROUND_APPLICATION_NAME if background else MAIN_APPLICATION_NAME
        return _Pool(
            label="background" if background else "main",
            connect=lambda: self._connect(app),
            min_size=s.DB_BG_POOL_MIN_SIZE if background else s.DB_POOL_MIN_SIZE,
            max_size=s.DB_BG_POOL_MAX_SIZE if background else s.DB_POOL_MAX_SIZE,
            acquire_timeout=(
                s.DB_BG_POOL_ACQUIRE_TIMEOUT if background else s.DB_POOL_ACQUIRE_TIMEOUT
            ),
            max_inactive=s.DB_MAX_INACTIVE_LIFETIME,
            keep_idle=not self.serverless,
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
        return _Lease(self._pool(False), False)

    def transaction(self) -> _Lease:
        """``async with db.transaction() as conn``: committed on success, rolled back on error."""
        return _Lease(self._pool(False), True)

    def background_connection(self) -> _Lease:
        """A background-pool connection (schedulers, streams, LISTEN)."""
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
        self._main = self._make_pool(False)
        self._bg = self._make_pool(True)
        await asyncio.gather(self._main.prewarm(), self._bg.prewarm())
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
