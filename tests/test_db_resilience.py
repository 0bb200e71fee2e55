"""The transient-error classifier (hypothesis vs a table) and the retry-once helper."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghar_core.database import Database
from ghar_core.db_resilience import (
    TRANSIENT_MESSAGE_MARKERS,
    CommitOutcomeUnknownException,
    execute_with_transient_retry,
    is_transient_error,
)
from ghar_core.exceptions import (
    DatabaseUnavailableException,
    PoolExhaustedException,
    ValidationException,
    render_error,
)
from ghar_core.logging import reset_request_id, set_request_id

# Every SQLSTATE class Postgres defines (Appendix A), and the expected answer.
SQLSTATE_CLASSES = [
    "00", "01", "02", "03", "08", "09", "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21",
    "22", "23", "24", "25", "26", "27", "28", "2B", "2D", "2F", "34", "38", "39", "3B",
    "3D", "3F", "40", "42", "44", "53", "54", "55", "57", "58", "72", "F0", "HV", "P0",
    "XX",
]  # fmt: skip
TRANSIENT_CODES = {"57P01", "57P02", "57P03", "57014", "53300"}
SQLSTATE_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NEUTRAL_WORDS = ["syntax", "error", "relation", "users", "duplicate", "key", "value", "null"]


def expected(code: str, message: str) -> bool:
    """The table: class 08 or the listed codes; a server error's text never decides."""
    return code[:2] == "08" or code in TRANSIENT_CODES


sqlstates = st.one_of(
    st.builds(
        lambda cls, rest: cls + rest,
        st.sampled_from(SQLSTATE_CLASSES),
        st.text(SQLSTATE_CHARS, min_size=3, max_size=3),
    ),
    st.sampled_from(sorted(TRANSIENT_CODES)),
)
messages = st.one_of(
    st.lists(st.sampled_from(NEUTRAL_WORDS), max_size=5).map(" ".join),
    st.builds(
        lambda pre, marker, upper: pre + " " + (marker.upper() if upper else marker),
        st.sampled_from(NEUTRAL_WORDS),
        st.sampled_from(TRANSIENT_MESSAGE_MARKERS),
        st.booleans(),
    ),
)


@given(code=sqlstates, message=messages)
def test_server_errors_follow_the_table(code: str, message: str) -> None:
    exc = asyncpg.PostgresError.new({"C": code, "M": message, "S": "ERROR"})
    assert exc.sqlstate == code
    assert is_transient_error(exc) is expected(code, message)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError("reset"), True),
        (ConnectionRefusedError(), True),
        (BrokenPipeError(), True),
        (TimeoutError(), True),
        (OSError(113, "No route to host"), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle"), True),
        (asyncpg.InterfaceError("cannot perform operation: connection is closed"), True),
        (
            asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
            False,
        ),
        (DatabaseUnavailableException(), True),
        (PoolExhaustedException(), False),
        (CommitOutcomeUnknownException(), False),
        (ValidationException("connection refused"), False),
        (ValueError("bad value"), False),
        (RuntimeError("connection to database closed"), True),
        (KeyError("id"), False),
        (asyncio.CancelledError(), False),
        (FileNotFoundError("x.sql"), False),
    ],
    ids=repr,
)
def test_python_errors_follow_the_table(exc: BaseException, transient: bool) -> None:
    assert is_transient_error(exc) is transient


@given(
    exc_type=st.sampled_from([ValueError, KeyError, TypeError, ValidationException]),
    text=st.text(max_size=40),
)
def test_ordinary_errors_without_markers_are_not_transient(
    exc_type: type[Exception], text: str
) -> None:
    exc = exc_type(text)
    if exc_type is ValidationException or not any(
        m in str(exc).lower() for m in TRANSIENT_MESSAGE_MARKERS
    ):
        assert not is_transient_error(exc)


# --- the retry helper against a real database -------------------------------------------


async def test_success_runs_once_in_a_transaction(db: Database) -> None:
    calls = 0

    async def op(conn: asyncpg.Connection) -> int:
        nonlocal calls
        calls += 1
        assert conn.is_in_transaction()
        value: int = await conn.fetchval("SELECT 41 + 1")
        return value

    assert await execute_with_transient_retry(db, op, operation_name="answer") == 42
    assert calls == 1


async def test_other_errors_pass_through_unchanged(db: Database) -> None:
    calls = 0
    boom = KeyError("missing")

    async def op(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        raise boom

    with pytest.raises(KeyError) as info:
        await execute_with_transient_retry(db, op, operation_name="keyerr")
    assert info.value is boom
    assert calls == 1

    async def bad_sql(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("SELECT * FROM no_such_table")

    with pytest.raises(asyncpg.UndefinedTableError):
        await execute_with_transient_retry(db, bad_sql, operation_name="bad_sql")
    assert calls == 2


async def test_transient_twice_is_a_503_after_one_retry(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    discarded_before = db.stats()["main"]["discarded"]

    async def op(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("CREATE TABLE IF NOT EXISTS retry_probe (v int)")
        await conn.execute("INSERT INTO retry_probe VALUES ($1)", calls)
        raise ConnectionResetError("peer reset")

    token = set_request_id("req-retry-1")
    try:
        with (
            caplog.at_level(logging.WARNING, logger="ghar_core.db_resilience"),
            pytest.raises(DatabaseUnavailableException) as info,
        ):
            await execute_with_transient_retry(db, op, operation_name="probe_insert")
    finally:
        reset_request_id(token)
    assert calls == 2
    assert isinstance(info.value.__cause__, DatabaseUnavailableException | ConnectionResetError)
    assert render_error(info.value).status_code == 503
    # Each failed attempt's connection was discarded, and both were rolled back.
    assert db.stats()["main"]["discarded"] - discarded_before == 2
    async with db.connection() as conn:
        exists = await conn.fetchval("SELECT to_regclass('retry_probe') IS NOT NULL")
        assert not exists
    retries = [r for r in caplog.records if "retrying once" in r.getMessage()]
    assert len(retries) == 1
    assert retries[0].operation == "probe_insert"  # type: ignore[attr-defined]
    assert retries[0].request_id == "req-retry-1"  # type: ignore[attr-defined]


async def test_transient_once_then_success(db: Database) -> None:
    calls = 0

    async def op(conn: asyncpg.Connection) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError
        value: str = await conn.fetchval("SELECT 'ok'")
        return value

    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await execute_with_transient_retry(db, op, operation_name="flaky") == "ok"
    assert calls == 2
    assert loop.time() - started >= 0.05  # the jittered pause happened


async def test_an_apps_own_error_that_mentions_a_timeout_passes_through(db: Database) -> None:
    """README: errors that are not transient (... your own exceptions) pass through unchanged."""
    calls = 0

    async def op(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'the payment provider timed out'; END $$")

    with pytest.raises(asyncpg.RaiseError):
        await execute_with_transient_retry(db, op, operation_name="pay")
    assert calls == 1
