"""Adversarial checks of our pool against the real Postgres: session-state leaks the
classifier must catch, and a state machine of acquire/release/cancel/timeout/kill steps.

The state machine runs on a pool of two and asserts, after every step: the pool
never counts more than ``max_size`` connections, no connection is held twice,
every connection is usable, outside a transaction (``connection()``) and free
of the previous user's session state when handed out, and only the expected
exceptions leave a lease. After draining, the pool's size and
``pg_stat_activity`` agree, and after ``stop()`` nothing stays connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ghar_core.config import Settings, load_settings
from ghar_core.database import MAIN_APPLICATION_NAME, Database, touches_session_state
from ghar_core.db_resilience import execute_with_transient_retry
from ghar_core.exceptions import DatabaseUnavailableException, PoolExhaustedException

# --- statements leaving session state that the classifier used to miss --------------------

# (statement leaving session state, probe that is true while the state is present)
MISSED_LEAKS = [
    (
        "DO $$ BEGIN SET work_mem = '7MB'; END $$",
        "SELECT current_setting('work_mem') = '7MB'",
    ),
    (
        "DO $$ BEGIN EXECUTE 'SET work_mem = ''6MB'''; END $$",
        "SELECT current_setting('work_mem') = '6MB'",
    ),
    (
        "SET/**/work_mem = '5MB'",
        "SELECT current_setting('work_mem') = '5MB'",
    ),
    (
        "SELECT \"set_config\"('app.quoted', 'x', false)",
        "SELECT coalesce(current_setting('app.quoted', true), '') = 'x'",
    ),
    (
        "SELECT set_config/* why not */('app.commented', 'x', false)",
        "SELECT coalesce(current_setting('app.commented', true), '') = 'x'",
    ),
    (
        "CREATE OR REPLACE TEMP VIEW leak_v AS SELECT 1 AS x",
        "SELECT to_regclass('pg_temp.leak_v') IS NOT NULL",
    ),
    (
        "SELECT 1 AS x INTO TEMP leak_into",
        "SELECT to_regclass('pg_temp.leak_into') IS NOT NULL",
    ),
    (
        "CREATE TABLE pg_temp.leak_qualified (x int)",
        "SELECT to_regclass('pg_temp.leak_qualified') IS NOT NULL",
    ),
    (
        "CREATE FUNCTION pg_temp.leak_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'leak_fn')",
    ),
]


@pytest.fixture
async def one_conn(db_settings: Settings) -> Any:
    database = Database(dataclasses.replace(db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1))
    await database.start()
    yield database
    await database.stop()


@pytest.mark.parametrize(("setup", "probe"), MISSED_LEAKS, ids=[s for s, _ in MISSED_LEAKS])
async def test_state_left_by_less_obvious_statements_does_not_leak(
    one_conn: Database, setup: str, probe: str
) -> None:
    async with one_conn.connection() as conn:
        await conn.execute(setup)
        assert await conn.fetchval(probe) is True
        pid = conn.get_server_pid()
    async with one_conn.connection() as conn:
        assert conn.get_server_pid() == pid  # the same backend, so the state would show
        assert await conn.fetchval(probe) is False


async def test_explicitly_named_prepared_statement_does_not_leak(one_conn: Database) -> None:
    probe = "SELECT EXISTS (SELECT 1 FROM pg_prepared_statements WHERE name = 'leak_named')"
    async with one_conn.connection() as conn:
        # Kept past the lease (a module-level "prepared once" cache does this);
        # asyncpg would only deallocate it when the object is collected.
        stmt = await conn.prepare("SELECT 1", name="leak_named")
        assert await conn.fetchval(probe) is True
    async with one_conn.connection() as conn:
        assert await conn.fetchval(probe) is False
    del stmt


_SEPARATORS = st.sampled_from([" ", "  ", "\n", "\t", "/**/", " /* c */ ", "\n-- c\n"])
# Statements as token lists; every one leaves session state.
_TOKENS = [
    ["SET", "work_mem", "=", "'8MB'"],
    ["SET", "SESSION", "work_mem", "TO", "'8MB'"],
    ["SELECT", "set_config", "('a.b', 'c', false)"],
    ["SELECT", "pg_catalog.set_config", "('a.b', 'c', false)"],
    ["DO", "$$ BEGIN PERFORM 1; END $$"],
    ["CREATE", "OR", "REPLACE", "TEMPORARY", "VIEW", "v", "AS", "SELECT 1"],
    ["CREATE", "GLOBAL", "TEMP", "TABLE", "t", "(x int)"],
    ["SELECT", "1", "INTO", "TEMPORARY", "t"],
    ["DECLARE", "c", "CURSOR", "WITH", "HOLD", "FOR", "SELECT 1"],
    ["LISTEN", "chan"],
    ["SELECT", "pg_advisory_lock", "(1)"],
    ["RESET", "ALL"],
]


@given(
    tokens=st.sampled_from(_TOKENS),
    seps=st.lists(_SEPARATORS, min_size=12, max_size=12),
    lead=st.sampled_from(["", "\n", "/* hint */ ", "SELECT 1;", "-- c\n"]),
    upper=st.booleans(),
)
def test_classifier_sees_state_through_comments_case_and_whitespace(
    tokens: list[str], seps: list[str], lead: str, upper: bool
) -> None:
    body = tokens[0] + "".join(sep + tok for sep, tok in zip(seps, tokens[1:], strict=False))
    statement = lead + (body.upper() if upper else body.lower())
    assert touches_session_state(statement), statement


# --- use after stop ---------------------------------------------------------------------------


async def test_use_after_stop_is_a_503_not_a_500(db_settings: Settings) -> None:
    database = Database(db_settings)
    await database.start()
    await database.stop()
    with pytest.raises(DatabaseUnavailableException):
        database.connection()
    with pytest.raises(DatabaseUnavailableException):
        await database.check()
    await database.start()  # a stopped Database can be started again
    try:
        async with database.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        database.terminate()
    with pytest.raises(DatabaseUnavailableException):
        database.background_transaction()


# --- a backend killed just before a query ------------------------------------------------

KILL_DELAYS = [0.0, 0.0005, 0.001, 0.001, 0.001, 0.0015, 0.002, 0.005]


async def test_backend_killed_between_queries_is_a_503_and_retried(
    db: Database, pg_admin_dsn: str
) -> None:
    """asyncpg reports this race as InternalClientError; it is still a lost connection."""
    admin = await asyncpg.connect(pg_admin_dsn)
    try:

        async def use_after_kill(delay: float) -> None:
            async with db.connection() as conn:
                await conn.fetchval("SELECT 1")
                await admin.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
                await asyncio.sleep(delay)
                await conn.fetchval("SELECT 1")

        for delay in KILL_DELAYS:
            with pytest.raises(DatabaseUnavailableException):
                await use_after_kill(delay)
        for delay in KILL_DELAYS:
            calls = 0

            async def op(conn: Any, delay: float = delay) -> int:
                nonlocal calls
                calls += 1
                if calls == 1:
                    await admin.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
                    await asyncio.sleep(delay)
                value: int = await conn.fetchval("SELECT $1::int", 5)
                return value

            assert await execute_with_transient_retry(db, op, operation_name="killed") == 5
            assert calls == 2
    finally:
        await admin.close()
    # No broken connection stays pooled: every idle one is open.
    for holder in db._pool(False).pool._holders:
        if holder._con is not None and holder.is_idle():
            assert not holder._con.is_closed()


# --- the state machine ---------------------------------------------------------------------

_CLEAN = (
    "SELECT coalesce(current_setting('app.leak', true), '') = ''"
    " AND NOT EXISTS (SELECT pg_listening_channels())"
    " AND NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
    " AND pid = pg_backend_pid())"
)
_DIRTY = "SELECT set_config('app.leak', 'x', false), pg_advisory_lock(99); LISTEN leak"
_ALLOWED = (
    asyncio.CancelledError,
    ZeroDivisionError,
    PoolExhaustedException,
    DatabaseUnavailableException,
)
MAX_SIZE = 2


class _Holder:
    """One task holding a lease until told how to finish."""

    def __init__(self, machine: PoolMachine, transactional: bool) -> None:
        self.machine = machine
        self.transactional = transactional
        self.conn: Any = None
        self.held = asyncio.Event()
        self.go: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        db = self.machine.db
        lease = db.transaction() if self.transactional else db.connection()
        async with lease as conn:
            assert conn not in self.machine.holding, "one connection handed to two holders"
            assert not conn.is_closed()
            assert conn.is_in_transaction() is self.transactional
            assert await conn.fetchval(_CLEAN) is True, "the previous user's state leaked"
            self.machine.holding.add(conn)
            self.conn = conn
            self.held.set()
            try:
                how = await self.go
            finally:
                self.machine.holding.discard(conn)
            if how == "dirty":
                await conn.execute(_DIRTY)
            elif how == "query":
                await conn.fetchval("SELECT pg_sleep(0.002)")
            elif how == "raise":
                await conn.fetchval("SELECT 1")
                raise ZeroDivisionError
            elif how == "killed":
                await conn.fetchval("SELECT 1")


class PoolMachine(RuleBasedStateMachine):
    settings: Settings
    admin_dsn: str

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.holding: set[Any] = set()
        self.holders: list[_Holder] = []
        self.db = Database(
            dataclasses.replace(
                self.settings,
                DB_POOL_MIN_SIZE=0,
                DB_POOL_MAX_SIZE=MAX_SIZE,
                DB_POOL_ACQUIRE_TIMEOUT=0.2,
            )
        )
        self.run(self.db.start())
        self.admin = self.run(asyncpg.connect(self.admin_dsn))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _settle(self, new: _Holder | None = None) -> None:
        """Wait until each holder (and ``new``) holds a connection, queues, or finished.

        The rules' preconditions read who holds: they must not depend on how
        fast Postgres answers. A holder handed a connection is no longer
        queued but holds it only once its first query answered, so "someone
        queues" is not enough: the holders neither holding nor finished must
        be exactly the pool's waiters.
        """
        pool = self.db._pool(False)
        holders = [*self.holders, new] if new is not None else self.holders
        async with asyncio.timeout(5):
            # Several sources and no one event to wait on: poll.
            unsettled = sum(not (h.held.is_set() or h.task.done()) for h in holders)
            while unsettled != pool.stats()["waiters"]:
                await asyncio.sleep(0.001)
                unsettled = sum(not (h.held.is_set() or h.task.done()) for h in holders)

    async def _outcome(self, holder: _Holder) -> None:
        async with asyncio.timeout(5):
            with contextlib.suppress(*_ALLOWED):
                await holder.task

    @rule(transactional=st.booleans())
    def acquire(self, transactional: bool) -> None:
        async def go() -> None:
            holder = _Holder(self, transactional)
            await self._settle(holder)
            if holder.task.done():
                await self._outcome(holder)
            else:
                self.holders.append(holder)

        self.run(go())

    @precondition(lambda self: any(not h.held.is_set() for h in self.holders))
    @rule(pick=st.integers(0, 7))
    def cancel_waiter(self, pick: int) -> None:
        waiting = [h for h in self.holders if not h.held.is_set()]
        holder = waiting[pick % len(waiting)]

        async def go() -> None:
            holder.task.cancel()
            await self._outcome(holder)
            await self._settle()

        self.holders.remove(holder)
        self.run(go())

    @precondition(lambda self: any(not h.held.is_set() for h in self.holders))
    @rule()
    def wait_out_the_acquire_timeout(self) -> None:
        async def go() -> None:
            for holder in [h for h in self.holders if not h.held.is_set()]:
                held = asyncio.ensure_future(holder.held.wait())
                await asyncio.wait(
                    [holder.task, held], return_when=asyncio.FIRST_COMPLETED, timeout=2
                )
                held.cancel()  # never leave the helper task pending
                if holder.task.done():
                    self.holders.remove(holder)
                    await self._outcome(holder)
            await self._settle()

        self.run(go())

    @precondition(lambda self: any(h.held.is_set() for h in self.holders))
    @rule(
        pick=st.integers(0, 7),
        how=st.sampled_from(["ok", "dirty", "query", "raise", "killed"]),
        cancel_after=st.none() | st.sampled_from([0.0, 0.0005, 0.001, 0.002, 0.004]),
    )
    def finish(self, pick: int, how: str, cancel_after: float | None) -> None:
        held = [h for h in self.holders if h.held.is_set()]
        holder = held[pick % len(held)]
        self.holders.remove(holder)

        async def go() -> None:
            if how == "killed":
                await self.admin.fetchval(
                    "SELECT pg_terminate_backend($1)", holder.conn.get_server_pid()
                )
            holder.go.set_result(how)
            if cancel_after is not None:
                await asyncio.sleep(cancel_after)
                holder.task.cancel()
            await self._outcome(holder)
            # Whoever was queued may now hold a connection: let them settle.
            await self._settle()
            for other in [h for h in self.holders if h.task.done()]:
                self.holders.remove(other)
                await self._outcome(other)

        self.run(go())

    @invariant()
    def capacity_is_bounded(self) -> None:
        pool = self.db._pool(False)
        stats = pool.stats()
        assert stats["idle"] <= stats["size"] <= MAX_SIZE, stats
        raws = [conn._con for conn in self.holding]
        assert None not in raws, "a held lease's proxy was detached"
        assert len({id(raw) for raw in raws}) == len(raws), "one connection held twice"
        for holder in pool.pool._holders:
            if holder._con is not None and holder._con in raws:
                assert not holder.is_idle(), "a held connection is also idle"

    def teardown(self) -> None:
        async def drain() -> None:
            for holder in self.holders:
                if not holder.go.done():
                    holder.go.set_result("ok")
                await self._outcome(holder)
            pool = self.db._pool(False)
            for _ in range(100):
                await asyncio.sleep(0.01)
                backends = await self._backends()
                stats = pool.stats()
                if backends == stats["size"] == stats["idle"]:
                    break
            assert backends == stats["size"] == stats["idle"], (backends, stats)
            # Every pooled connection is open and outside a transaction.
            for holder in pool.pool._holders:
                if holder._con is not None:
                    assert not holder._con.is_closed()
                    assert not holder._con.is_in_transaction()
            await self.db.stop(grace=1.0)
            for _ in range(100):
                if await self._backends() == 0:
                    break
                await asyncio.sleep(0.01)
            assert await self._backends() == 0
            await self.admin.close()

        try:
            self.run(drain())
        finally:
            self.loop.close()

    async def _backends(self) -> int:
        count: int = await self.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            self.settings.DATABASE_URL.rsplit("/", 1)[1],
            MAIN_APPLICATION_NAME,
        )
        return count


def test_pool_state_machine(pg_database: str, pg_admin_dsn: str) -> None:
    PoolMachine.settings = dataclasses.replace(
        load_settings(app_env="test"), DATABASE_URL=pg_database
    )
    PoolMachine.admin_dsn = pg_admin_dsn
    run_state_machine_as_test(
        PoolMachine,
        settings=hsettings(
            max_examples=25,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
