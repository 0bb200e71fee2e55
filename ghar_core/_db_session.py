"""What a pooled connection noticed about its own use (private to ``ghar_core.database``).

:class:`GharConnection` is the ``connection_class`` of our asyncpg pools. It
classifies each statement it runs, by its text (the verdict is cached per
query text, so the hot path is one dict lookup), and remembers three things:

* **session state** (``SET`` without ``LOCAL``, ``set_config``, ``LISTEN``,
  session advisory locks, temp tables, ``PREPARE``, ``WITH HOLD`` cursors,
  ``DO`` blocks, ...): the pool's ``reset=`` hook pays ``DISCARD ALL`` only
  for such a connection;
* **whether the transaction may have written**: anything but a plain read
  (``SELECT``/``SHOW``/``VALUES`` without ``INTO`` or a row lock) or
  transaction control, and every ``COPY`` into a table; a ``NOTIFY`` (or
  ``pg_notify``) also has COMMIT assign the id it would otherwise only get at
  pre-commit. Only then does COMMIT first ask for the transaction's
  id, so a read-only transaction pays no extra round trip;
* **the last error a statement raised inside the transaction**, so a COMMIT
  that the server would silently turn into a ROLLBACK raises instead, naming
  that error. A ``ROLLBACK TO SAVEPOINT`` that succeeds clears it (the
  transaction is healthy again).

Server-side code that changes session state (a function calling
``set_config(..., false)``) is invisible to the classifier: call
``conn.mark_session_state()`` after it.

It also times its own statements. asyncpg bounds each call by
``command_timeout`` with one ``loop.call_later`` timer per round trip (two
per query with the statement cache off: Parse/Describe, then
Bind/Execute), which cost about as much as the rest of a lease together.
So ``execute``/``fetch``/``fetchval``/``fetchrow``/``fetchmany``/
``executemany`` of a pooled connection run with asyncpg's timeout off and
stamp their start instead; the pool's watchdog (one thread per pool that
has the loop act, see :mod:`ghar_core.database`) cancels the task running a
call still unfinished
``DB_COMMAND_TIMEOUT`` after its start, which makes asyncpg send the server
a cancel request as for any cancelled query, and the call raises
``TimeoutError`` as asyncpg's own timeout would. A call given an explicit
``timeout=``, and everything else (cursors, prepared statements, COPY), keep
asyncpg's own timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from contextvars import ContextVar
from typing import Any, Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy, _PoolConnectionHolderQueue

__all__ = [
    "GharConnection",
    "GharPoolProxy",
    "HolderQueue",
    "gave_up_waiting",
    "may_write",
    "touches_session_state",
]

_RESET_QUERY: Final = "DISCARD ALL"

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
# A single statement that cannot write: a plain read or transaction control.
# Anything else (a CTE, a function call inside INSERT, ``SELECT ... INTO``,
# ``FOR UPDATE``, several statements) counts as a possible write. A SELECT
# calling a function that writes is read as a read: its lost COMMIT is then
# reported as an unknown outcome, never retried, so misjudging it is safe.
_READ_ONLY_RE: Final = re.compile(
    rf"""
    ^{_GAP}*
    (?:SELECT|SHOW|VALUES|TABLE|FETCH|MOVE|CLOSE|BEGIN|START{_GAP}+TRANSACTION|SAVEPOINT
      |RELEASE|ROLLBACK|COMMIT|SET{_GAP}+(?:LOCAL|TRANSACTION|CONSTRAINTS)|DISCARD)\b
    (?![^;]*\b(?:INTO|FOR{_GAP}+(?:NO{_GAP}+KEY{_GAP}+)?(?:UPDATE|SHARE|KEY))\b)
    [^;]*;?{_GAP}*$
    """,
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_ROLLBACK_TO_RE: Final = re.compile(r"^\s*ROLLBACK\s+TO\b", re.IGNORECASE)
# A notification is a write without a transaction id until COMMIT's pre-commit
# step: "no id yet" would read as "nothing written", and a lost COMMIT would be
# retried into a second delivery. Over-matching only assigns an id early.
_NOTIFY_RE: Final = re.compile(
    rf"(?:^|;){_GAP}*NOTIFY\b|\bpg_notify\"?{_GAP}*\(", re.IGNORECASE | re.DOTALL
)
_DIRTY: Final = 1
_WRITES: Final = 2
_NOTIFIES: Final = 4
_VERDICTS: dict[str, int] = {}
_VERDICTS_MAX: Final = 4096
_monotonic: Final = time.monotonic
# The statement methods call asyncpg's directly: a zero-argument super() is an
# object and a lookup per call on 3.11, and these run once per statement.
_Connection: Final = asyncpg.Connection


def _task_lookup() -> Any:
    # asyncio.current_task(loop) on 3.12+ (C). On 3.11 it is Python, and without
    # a loop asks get_running_loop(), a getpid() syscall each: there, look the
    # loop up in asyncio's own table of running tasks, which it reads too.
    table = getattr(asyncio.tasks, "_current_tasks", None)
    if sys.version_info < (3, 12) and isinstance(table, dict):
        return table.get
    return asyncio.current_task


#: ``current_task_of(loop)``: the task running on ``loop`` now.
_current_task_of: Final = _task_lookup()


def _verdict(query: str) -> int:
    verdict = _VERDICTS.get(query)
    if verdict is None:
        verdict = (
            (_DIRTY if _SESSION_STATE_RE.search(query) else 0)
            | (0 if _READ_ONLY_RE.match(query) else _WRITES)
            | (_NOTIFIES | _WRITES if _NOTIFY_RE.search(query) else 0)
        )
        if len(_VERDICTS) < _VERDICTS_MAX:
            _VERDICTS[query] = verdict
    return verdict


def touches_session_state(query: str) -> bool:
    """True when ``query`` may leave state on the session beyond its transaction."""
    return bool(_verdict(query) & _DIRTY)


def may_write(query: str) -> bool:
    """True unless ``query`` is a plain read or transaction control (see the module doc)."""
    return bool(_verdict(query) & _WRITES)


class GharConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that notes session state, writes and failures.

    Created only by the pools of :class:`ghar_core.database.Database` (their
    ``connection_class``) and owned by them; handed out inside ``async with``
    blocks.
    """

    __slots__ = (
        "_ghar_cancelling",
        "_ghar_dirty",
        "_ghar_failure",
        "_ghar_in_use",
        "_ghar_notifies",
        "_ghar_poll",
        "_ghar_released",
        "_ghar_since",
        "_ghar_task",
        "_ghar_timed",
        "_ghar_untimed",
        "_ghar_writes",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ghar_dirty = False
        self._ghar_writes = False
        self._ghar_notifies = False
        self._ghar_failure: BaseException | None = None
        # Watchdog timing (see the module doc): off until the pool's watchdog
        # takes this connection on (watch_statements).
        self._ghar_timed: Any = self._config  # type: ignore[has-type]
        self._ghar_untimed: Any = None
        self._ghar_since = 0.0  # start of the timed call in flight (0: none)
        self._ghar_task: asyncio.Task[Any] | None = None
        self._ghar_cancelling: int | None = None  # set once the watchdog cancelled it
        self._ghar_released = 0.0  # when it last went idle in the pool (time.monotonic())
        self._ghar_poll: Any = None  # a poll() on its socket, made by the pool (idle goodbye)
        self._ghar_in_use: asyncio.Future[None] | None = None  # see _Pool.take()

    def watch_statements(self) -> None:
        """Let the pool's watchdog time this connection's calls instead of asyncpg's timers.

        Called by the pool that owns the connection, which from then on must
        run :meth:`expire_overdue` for it; without that, calls would be unbounded.
        """
        timed = self._config
        if timed.command_timeout is not None:
            self._ghar_timed = timed
            self._ghar_untimed = timed._replace(command_timeout=None)

    def statement_started(self) -> float:
        """When the timed call now in flight started (``time.monotonic()``); 0 if none."""
        return self._ghar_since

    def expire_overdue(self) -> None:
        """Cancel the timed call in flight: the watchdog found it past the command timeout.

        asyncpg sends the server a cancel request when the call's waiter is
        cancelled; the call then raises ``TimeoutError`` (see :meth:`_ended`).
        """
        task = self._ghar_task
        if self._ghar_cancelling is not None or task is None or task.done():
            return
        # The answer may be in already, the task not yet resumed (its waiter
        # done, its wakeup queued behind this sweep): cancelling now would
        # throw away a statement that ran. Not overdue: it is returning.
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        if waiter is None or waiter.done():
            return
        self._ghar_cancelling = task.cancelling()
        task.cancel()

    @property
    def session_dirty(self) -> bool:
        """Whether this connection must be reset before its next user."""
        return self._ghar_dirty

    @property
    def may_have_written(self) -> bool:
        """Whether a statement of this lease may have written (COMMIT then checks its id)."""
        return self._ghar_writes

    def mark_session_state(self) -> None:
        """Declare session state the classifier cannot see (e.g. set by a function)."""
        self._ghar_dirty = True

    def _note(self, query: str) -> None:
        verdict = _VERDICTS.get(query)
        if verdict is None:
            verdict = _verdict(query)
        if verdict:
            if verdict & _DIRTY:
                self._ghar_dirty = True
            if verdict & _WRITES:
                self._ghar_writes = True
            if verdict & _NOTIFIES:
                self._ghar_notifies = True

    def _failed(self, exc: BaseException) -> None:
        # A timeout counts too: the cancelled statement failed the transaction.
        if isinstance(exc, asyncpg.PostgresError | TimeoutError) and self.is_in_transaction():
            self._ghar_failure = exc

    def _started(self, query: str, kwargs: dict[str, Any]) -> bool:
        """Note ``query``; True when the watchdog times this call (asyncpg's timer off)."""
        verdict = _VERDICTS.get(query)  # _note() inline: once per statement
        if verdict is None:
            verdict = _verdict(query)
        if verdict:
            if verdict & _DIRTY:
                self._ghar_dirty = True
            if verdict & _WRITES:
                self._ghar_writes = True
            if verdict & _NOTIFIES:
                self._ghar_notifies = True
        untimed = self._ghar_untimed
        if untimed is None or self._ghar_since or (kwargs and kwargs.get("timeout") is not None):
            return False  # not watched, a call inside a timed one, or the caller's own timeout
        self._ghar_task = _current_task_of(self._loop)
        self._ghar_since = _monotonic()
        self._config = untimed  # type: ignore[misc]
        return True

    def _ended(self, exc: BaseException | None) -> BaseException | None:
        """End a timed call; ``exc`` is what it raised, returned as the caller should see it.

        The watchdog's cancellation becomes ``TimeoutError`` unless another
        cancellation of the task came on top of it (as ``asyncio.timeout``
        decides).
        """
        self._config = self._ghar_timed
        self._ghar_since = 0.0
        task, self._ghar_task = self._ghar_task, None
        cancelling, self._ghar_cancelling = self._ghar_cancelling, None
        if cancelling is not None and task is not None:
            # Take our cancellation back whatever the call raised, so the
            # task's count stays right for later timeouts.
            others = task.uncancel() > cancelling
            if not others and isinstance(exc, asyncio.CancelledError):
                timeout = TimeoutError("the statement ran past DB_COMMAND_TIMEOUT")
                timeout.__cause__ = exc
                exc = timeout
        return exc

    def _raised(self, exc: BaseException, timed: bool) -> BaseException:
        if timed:
            exc = self._ended(exc) or exc
        self._failed(exc)
        return exc

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        timed = self._started(query, kwargs)
        try:
            result: str = await _Connection.execute(self, query, *args, **kwargs)
        except BaseException as exc:
            raise self._raised(exc, timed)  # noqa: B904 - the same error, or its TimeoutError
        if timed:
            self._ended(None)
        if self._ghar_failure is not None and _ROLLBACK_TO_RE.match(query):
            self._ghar_failure = None  # back to a savepoint: the transaction is healthy
        return result

    async def executemany(self, command: str, args: Any, **kwargs: Any) -> None:
        timed = self._started(command, kwargs)
        try:
            await _Connection.executemany(self, command, args, **kwargs)
        except BaseException as exc:
            raise self._raised(exc, timed)  # noqa: B904
        if timed:
            self._ended(None)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        timed = self._started(query, kwargs)
        try:
            result: list[Any] = await _Connection.fetch(self, query, *args, **kwargs)
        except BaseException as exc:
            raise self._raised(exc, timed)  # noqa: B904
        if timed:
            self._ended(None)
        return result

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        timed = self._started(query, kwargs)
        try:
            result = await _Connection.fetchval(self, query, *args, **kwargs)
        except BaseException as exc:
            raise self._raised(exc, timed)  # noqa: B904
        if timed:
            self._ended(None)
        return result

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        timed = self._started(query, kwargs)
        try:
            result = await _Connection.fetchrow(self, query, *args, **kwargs)
        except BaseException as exc:
            raise self._raised(exc, timed)  # noqa: B904
        if timed:
            self._ended(None)
        return result

    async def fetchmany(self, query: str, args: Any, **kwargs: Any) -> list[Any]:
        timed = self._started(query, kwargs)
        try:
            result: list[Any] = await _Connection.fetchmany(self, query, args, **kwargs)
        except BaseException as exc:
            raise self._raised(exc, timed)  # noqa: B904
        if timed:
            self._ended(None)
        return result

    async def prepare(self, query: str, **kwargs: Any) -> Any:
        self._note(query)
        if kwargs.get("name"):
            # An explicitly named statement outlives the lease (the unnamed
            # one our cache-off default uses does not): DISCARD ALL drops it.
            self._ghar_dirty = True
        return await super().prepare(query, **kwargs)

    async def _noting_failure(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await call(*args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def copy_to_table(self, table_name: str, **kwargs: Any) -> str:
        self._ghar_writes = True
        result: str = await self._noting_failure(super().copy_to_table, table_name, **kwargs)
        return result

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        self._ghar_writes = True
        call = super().copy_records_to_table
        result: str = await self._noting_failure(call, table_name, **kwargs)
        return result

    async def copy_from_table(self, table_name: str, **kwargs: Any) -> str:
        result: str = await self._noting_failure(super().copy_from_table, table_name, **kwargs)
        return result

    async def copy_from_query(self, query: str, *args: Any, **kwargs: Any) -> str:
        self._note(query)
        result: str = await self._noting_failure(super().copy_from_query, query, *args, **kwargs)
        return result

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


def _direct(name: str) -> Any:
    """A proxy method that runs GharConnection's ``name`` steps on the connection itself.

    asyncpg's proxy methods look the method up on the connection's class and
    call it, whose override then awaits asyncpg's: two frames more per
    statement than this one.
    """
    base = getattr(_Connection, name)
    resets_failure = name == "execute"

    async def method(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        con: GharConnection | None = self._con
        if con is None:
            raise asyncpg.InterfaceError(
                f"cannot call Connection.{name}(): connection has been released back to the pool"
            )
        timed = con._started(query, kwargs)
        try:
            result = await base(con, query, *args, **kwargs)
        except BaseException as exc:
            raise con._raised(exc, timed)  # noqa: B904 - the same error, or its TimeoutError
        if timed:
            con._ended(None)
        if resets_failure and con._ghar_failure is not None and _ROLLBACK_TO_RE.match(query):
            con._ghar_failure = None
        return result

    method.__name__ = method.__qualname__ = name
    method.__doc__ = base.__doc__
    return method


class GharPoolProxy(PoolConnectionProxy):  # type: ignore[misc]
    """asyncpg's pool proxy, with the statement methods one frame from asyncpg's own.

    What a lease of our pools hands out when it takes a free connection
    itself (``ghar_core.database``); it behaves as asyncpg's proxy (a
    released one raises), and its statements are noted and timed exactly as
    :class:`GharConnection`'s.
    """

    __slots__ = ()

    def __init__(self, holder: Any, con: GharConnection) -> None:
        # asyncpg's, with its con._set_proxy(self) inline (a fresh lease: no proxy yet).
        self._con = con  # type: ignore[misc]
        self._holder = holder  # type: ignore[misc]
        con._proxy = self

    execute = _direct("execute")
    executemany = _direct("executemany")
    fetch = _direct("fetch")
    fetchval = _direct("fetchval")
    fetchrow = _direct("fetchrow")
    fetchmany = _direct("fetchmany")


# Set by HolderQueue.get() when its task stops waiting (cancelled, or its
# acquire timeout fired) without keeping a holder, even one handed to it just
# before: the pool's acquire tells exhaustion from a slow connect by it, as the
# queue's size afterwards cannot (a holder passed on may sit there free, a
# connecting one may have gone to the next waiter).
gave_up_waiting: Final[ContextVar[bool]] = ContextVar("ghar_gave_up_waiting", default=False)


class HolderQueue(_PoolConnectionHolderQueue):  # type: ignore[misc]
    """asyncpg's queue of free connection holders, handing each one to the oldest waiter.

    asyncio's queue only wakes a waiter on ``put`` and leaves the item in the
    queue for it to take when it runs; any task that runs first (one created
    just before the release, or the releasing task leasing again) takes it,
    and the waiter queues again at the back, so it can reach its acquire
    timeout (a 503) while connections keep coming free. Here ``put_nowait``
    gives the holder to the oldest live waiter itself, so a holder is only
    ever in the queue while nobody waits, and whoever takes a free one (our
    pool's ``take()``, asyncpg's ``get_nowait``) cannot jump a waiter. Every
    release path of asyncpg and of ours comes through ``put_nowait``.
    """

    @classmethod
    def replacing(cls, queue: Any) -> HolderQueue:
        """A hand-off queue with the holders of ``queue`` (a fresh pool's: nobody waits)."""
        assert not queue._getters, "replaced while a task waits"
        fair = cls(maxsize=queue.maxsize)
        fair._queue.extend(queue._queue)
        return fair

    def put_nowait(self, item: Any) -> None:
        """Hand ``item`` to the oldest waiter still waiting, or keep it (never full)."""
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(item)
                return
        self._queue.append(item)

    async def get(self) -> Any:
        """A free holder now, or the next one released after those who asked earlier."""
        if self._queue:  # nobody waits while a holder is free
            return self.get_nowait()
        getter = self._get_loop().create_future()
        self._getters.append(getter)
        try:
            return await getter
        except BaseException:
            gave_up_waiting.set(True)
            if getter.done() and not getter.cancelled():
                # Handed a holder, then cancelled before running: the next waiter's.
                self.put_nowait(getter.result())
            else:
                getter.cancel()
                with contextlib.suppress(ValueError):  # a put already dropped it
                    self._getters.remove(getter)
            raise
