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
"""

from __future__ import annotations

import re
from typing import Any, Final

import asyncpg

__all__ = ["GharConnection", "may_write", "touches_session_state"]

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

    __slots__ = ("_ghar_dirty", "_ghar_failure", "_ghar_notifies", "_ghar_writes")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ghar_dirty = False
        self._ghar_writes = False
        self._ghar_notifies = False
        self._ghar_failure: BaseException | None = None

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

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        self._note(query)
        try:
            result: str = await super().execute(query, *args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise
        if self._ghar_failure is not None and _ROLLBACK_TO_RE.match(query):
            self._ghar_failure = None  # back to a savepoint: the transaction is healthy
        return result

    async def executemany(self, command: str, args: Any, **kwargs: Any) -> None:
        self._note(command)
        try:
            await super().executemany(command, args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        self._note(query)
        try:
            result: list[Any] = await super().fetch(query, *args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise
        return result

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._note(query)
        try:
            return await super().fetchval(query, *args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._note(query)
        try:
            return await super().fetchrow(query, *args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def fetchmany(self, query: str, args: Any, **kwargs: Any) -> list[Any]:
        self._note(query)
        try:
            result: list[Any] = await super().fetchmany(query, args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise
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
