"""Database against the real Postgres (and PgBouncer): pools, session-state guard, modes."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ghar_core.config import Settings
from ghar_core.database import (
    BACKGROUND_APPLICATION_NAME,
    MAIN_APPLICATION_NAME,
    Database,
    touches_session_state,
)
from ghar_core.exceptions import (
    DatabaseUnavailableException,
    PoolExhaustedException,
    render_error,
)
from ghar_core.lifecycle import Resource
from tests.pg import PgBouncer, free_port, holding, run_sync, started, with_database

# --- the session-state classifier (pure) ---------------------------------------------

# (statement template, leaves session state?)
SESSION_STATEMENTS = [
    ("SET statement_timeout = 1234", True),
    ("set SESSION timezone TO 'UTC'", True),
    ("RESET statement_timeout", True),
    ("SELECT set_config('app.user', 'x', false)", True),
    ("LISTEN ghar_events", True),
    ("SELECT pg_advisory_lock(42)", True),
    ("SELECT pg_try_advisory_lock_shared(42)", True),
    ("CREATE TEMP TABLE t (x int)", True),
    ("create temporary table t (x int)", True),
    ("PREPARE p AS SELECT 1", True),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", True),
    ("SET ROLE postgres", True),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", True),
    ("SELECT 1; SET work_mem = '8MB'", True),
    ("/* hint */ SET search_path = public", True),
    ("SELECT $1::int", False),
    ("SET LOCAL statement_timeout = 5", False),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", False),
    ("SET CONSTRAINTS ALL DEFERRED", False),
    ("SELECT pg_advisory_xact_lock(42)", False),
    ("UPDATE users SET email = $1 WHERE id = $2", False),
    ("UPDATE users\nSET email = $1\nWHERE id = $2", False),
    ("UPDATE users /* who */ SET email = $1", False),
    ("INSERT INTO t VALUES ($1)\nON CONFLICT (id)\nDO UPDATE\nSET x = 1", False),
    ("-- comment\nSET work_mem = '8MB'", True),
    ("SELECT 1;\n  -- next\n  LISTEN ch", True),
    ("INSERT INTO t (settings) VALUES ($1)", False),
    ("SELECT reset_count FROM stats", False),
    ("BEGIN ISOLATION LEVEL READ COMMITTED", False),
    ("DISCARD ALL", False),
]


def _recase(text: str, flips: list[bool]) -> str:
    return "".join(ch.swapcase() if flips[i % len(flips)] else ch for i, ch in enumerate(text))


@given(
    case=st.sampled_from(SESSION_STATEMENTS),
    flips=st.lists(st.booleans(), min_size=1, max_size=8),
    lead=st.sampled_from(["", " ", "\n", "\t  "]),
)
def test_classifier_matches_table_under_case_and_whitespace(
    case: tuple[str, bool], flips: list[bool], lead: str
) -> None:
    statement, dirty = case
    # Keywords are case-insensitive; identifiers in the table are too for this purpose.
    assert touches_session_state(lead + _recase(statement, flips)) is dirty


# --- lifecycle ------------------------------------------------------------------------------


async def test_is_a_resource_with_both_application_names(db: Database) -> None:
    assert isinstance(db, Resource)
    assert db.name == "database"
    async with db.connection() as conn:
        assert await conn.fetchval("SHOW application_name") == MAIN_APPLICATION_NAME
    async with db.background_connection() as conn:
        assert await conn.fetchval("SHOW application_name") == BACKGROUND_APPLICATION_NAME
    await db.check()


async def test_transaction_commits_and_rolls_back(db: Database) -> None:
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS tx_probe (v int)")
        await conn.execute("TRUNCATE tx_probe")
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO tx_probe VALUES (1)")

    async def fail_inside() -> None:
        async with db.background_transaction() as conn:
            await conn.execute("INSERT INTO tx_probe VALUES (2)")
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await fail_inside()
    async with db.connection() as conn:
        assert await conn.fetch("SELECT v FROM tx_probe") == [(1,)]
        assert not conn.is_in_transaction()


async def test_statement_cache_is_off_and_json_decodes(db: Database) -> None:
    async with db.connection() as conn:
        assert conn._config.statement_cache_size == 0
        assert await conn.fetchval("SELECT $1::jsonb", {"a": [1, 2]}) == {"a": [1, 2]}
        assert await conn.fetchval("SELECT $1::jsonb", '{"b": 1}') == {"b": 1}


async def test_not_started_is_a_clear_error(db_settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        Database(db_settings).connection()


async def test_stop_is_bounded_and_idempotent(db_settings: Settings) -> None:
    database = Database(db_settings)
    await database.start()
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with database.connection() as conn:
            await conn.fetchval("SELECT 1")
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await database.stop(grace=0.2)
    assert loop.time() - started < 2.0
    release.set()
    await task
    await database.stop()
    database.terminate()


async def test_leases_keep_asyncpgs_books_and_stop_waits_for_the_last_one(
    db_settings: Settings,
) -> None:
    # Leases take and give back holders without asyncpg's acquire/release
    # coroutines: its queue, sizes and in-use futures must stay as its own.
    settings = dataclasses.replace(db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=3)
    database = Database(settings)
    await database.start()
    pool = database._pool(False).pool
    assert pool is not None

    async def one(i: int) -> None:
        lease = database.transaction() if i % 3 == 0 else database.connection()
        async with lease as conn:
            if i % 4 == 0:
                await conn.execute("SET work_mem = '8MB'")  # dirty: the full release
            assert await conn.fetchval("SELECT $1::int", i) == i
            await asyncio.sleep(0)

    for _ in range(3):
        await asyncio.gather(*(one(i) for i in range(12)))
    free = list(pool._queue._queue)
    assert len(free) == len({id(h) for h in free}) == 3
    stats = database.stats()["main"]
    assert stats["idle"] == stats["size"] >= 1
    assert stats["in_use"] == 0
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with database.connection() as conn:
            await conn.fetchval("SELECT 1")
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    stopping = asyncio.create_task(database.stop(grace=10))
    await asyncio.sleep(0.2)
    assert not stopping.done()  # Pool.close() waits for the lease ...
    release.set()
    await task
    await asyncio.wait_for(stopping, 2)  # ... and its release wakes it


async def test_a_released_lease_cannot_be_used(db: Database) -> None:
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT 1") == 1
    for call in (conn.fetchval, conn.execute, conn.fetch, conn.fetchrow):
        with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
            await call("SELECT 1")


async def test_down_at_start_then_503(db_settings: Settings) -> None:
    dead = with_database(db_settings.DATABASE_URL, "postgres", port=free_port())
    database = Database(dataclasses.replace(db_settings, DATABASE_URL=dead))
    await database.start()  # must not raise: the app starts anyway
    try:
        with pytest.raises(DatabaseUnavailableException) as info:
            async with database.connection():
                pass
        rendered = render_error(info.value)
        assert rendered.status_code == 503
        assert (b"retry-after", b"5") in rendered.headers
        with pytest.raises(DatabaseUnavailableException):
            await database.check()
    finally:
        await database.stop()


# --- pool exhaustion --------------------------------------------------------------------------


async def test_exhaustion_is_503_after_the_acquire_timeout(db_settings: Settings) -> None:
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=0,
        DB_POOL_MAX_SIZE=2,
        DB_POOL_ACQUIRE_TIMEOUT=0.2,
    ) as database:
        async with holding(database, 2):
            with pytest.raises(PoolExhaustedException) as info:
                async with database.connection():
                    pass
        rendered = render_error(info.value)
        assert rendered.status_code == 503
        assert b'"SERVICE_UNAVAILABLE"' in rendered.body
        assert any(name == b"retry-after" for name, _ in rendered.headers)
        # Capacity is back: the next acquire succeeds on a pooled connection.
        async with database.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        stats = database.stats()["main"]
        assert stats["exhausted"] == 1
        assert stats["opened"] == 2


async def test_cancelled_waiter_does_not_leak_capacity(db_settings: Settings) -> None:
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=0,
        DB_POOL_MAX_SIZE=1,
        DB_POOL_ACQUIRE_TIMEOUT=5,
    ) as database:
        async with database.connection():
            waiter = asyncio.create_task(database.connection().__aenter__())
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with asyncio.timeout(2):
            async with database.connection() as conn:
                assert await conn.fetchval("SELECT 2") == 2
        assert database.stats()["main"]["size"] == 1


async def test_a_waiter_gets_the_connection_a_busy_task_releases(db_settings: Settings) -> None:
    # A task that releases and takes again at once (two leases in a row, a
    # loop of queries) must not jump ahead of a task already waiting: the
    # waiter gets the released connection, not a 503 after the acquire timeout.
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=1,
        DB_POOL_MAX_SIZE=1,
        DB_POOL_ACQUIRE_TIMEOUT=0.5,
    ) as database:
        waiting = asyncio.Event()
        leases = 0

        async def busy() -> None:
            nonlocal leases
            for i in range(40):
                async with database.connection() as conn:
                    if i == 0:
                        waiting.set()
                        await asyncio.sleep(0.05)  # the waiter is queued by now
                    await conn.fetchval("SELECT pg_sleep(0.02)")
                leases += 1

        async def waiter() -> int:
            await waiting.wait()
            async with database.connection() as conn:
                assert await conn.fetchval("SELECT 1") == 1
                return leases

        _, busy_leases = await asyncio.gather(busy(), waiter())
        assert busy_leases <= 1  # right after the busy task's first lease, not its forty
        assert database.stats()["main"]["exhausted"] == 0


@pytest.mark.parametrize("size", [1, 2])
async def test_a_waiter_is_served_before_tasks_that_ask_after_it(
    db_settings: Settings, size: int
) -> None:
    # Streams of brief leases, each creating the next task just before it
    # releases: that task runs before the woken waiter does. Unless a released
    # connection goes to the oldest waiter, each new task takes it and the
    # waiter queues again, until its acquire timeout (a 503) although
    # connections came free all the while.
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=size,
        DB_POOL_MAX_SIZE=size,
        DB_POOL_ACQUIRE_TIMEOUT=1.0,
    ) as database:
        releases = 0
        served_after: list[int] = []  # releases seen when the waiter got its connection
        all_held = asyncio.Event()
        streams: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()

        def spawn(n: int) -> None:
            task = loop.create_task(brief(n))
            streams.add(task)
            task.add_done_callback(streams.discard)

        async def brief(n: int) -> None:
            nonlocal releases
            async with database.connection() as conn:
                if database.stats()["main"]["idle"] == 0:
                    all_held.set()
                await conn.fetchval("SELECT pg_sleep(0.005)")
                if len(served_after) < size and n < 2000:
                    spawn(n + 1)  # created before this lease ends
            releases += 1

        async def waiter() -> None:
            await all_held.wait()
            async with database.connection() as conn:
                served_after.append(releases)
                assert await conn.fetchval("SELECT 1") == 1

        for _ in range(size):
            spawn(0)
        # One waiter per connection (two releases in one loop iteration would
        # otherwise leave one connection free for a lone waiter by chance).
        # PoolExhaustedException here: the queue was jumped.
        await asyncio.gather(*(waiter() for _ in range(size)))
        assert max(served_after) <= 3 * size  # at about the first releases, not the hundredth
        while streams:
            await asyncio.gather(*streams)
        assert database.stats()["main"]["exhausted"] == 0


async def test_a_waiter_cancelled_as_it_is_handed_a_connection_passes_it_on(
    db_settings: Settings,
) -> None:
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=1,
        DB_POOL_MAX_SIZE=1,
        DB_POOL_ACQUIRE_TIMEOUT=5,
    ) as database:
        release = asyncio.Event()
        held = asyncio.Event()

        async def hold() -> None:
            async with database.connection():
                held.set()
                await release.wait()
                first.cancel()  # handed the connection by this release, then cancelled

        async def lease() -> int:
            async with database.connection() as conn:
                return int(await conn.fetchval("SELECT 2"))

        holder = asyncio.create_task(hold())
        await held.wait()
        first = asyncio.create_task(lease())
        await asyncio.sleep(0.05)
        second = asyncio.create_task(lease())
        await asyncio.sleep(0.05)
        assert database.stats()["main"]["waiters"] == 2
        release.set()
        await holder
        with pytest.raises(asyncio.CancelledError):
            await first
        async with asyncio.timeout(2):
            assert await second == 2
        stats = database.stats()["main"]
        assert (stats["size"], stats["idle"], stats["waiters"]) == (1, 1, 0)


async def test_a_waiter_handed_a_connection_as_its_timeout_fires_is_a_busy_503(
    db_settings: Settings,
) -> None:
    # The release hands the holder to the waiter, then the waiter's acquire
    # timeout fires before it runs: it passes the holder on and times out.
    # That is exhaustion (a 503 the retry helper does not retry, counted),
    # not "opening a connection took too long", although a holder is free now.
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=1,
        DB_POOL_MAX_SIZE=1,
        DB_POOL_ACQUIRE_TIMEOUT=0.05,
    ) as database:
        held = asyncio.Event()

        async def hold() -> None:
            async with database.connection():
                held.set()
                await asyncio.sleep(0.01)  # the waiter is queued
                time.sleep(0.1)  # noqa: ASYNC251 - the loop blocked past the waiter's deadline
                # The next iteration runs this task (released: the holder is
                # handed to the waiter), then the due timer: the waiter's timeout.
                await asyncio.sleep(0)

        async def wait() -> None:
            await held.wait()
            async with database.connection():
                pass

        holder = asyncio.create_task(hold())
        with pytest.raises(PoolExhaustedException):
            await asyncio.gather(holder, wait())
        await holder
        stats = database.stats()["main"]
        assert stats["exhausted"] == 1
        assert (stats["size"], stats["idle"], stats["waiters"]) == (1, 1, 0)


# --- session state does not leak -----------------------------------------------------------

# (statement leaving state, query that is true while the state is present)
LEAKS = [
    ("SET statement_timeout = 1234", "SELECT current_setting('statement_timeout') = '1234ms'"),
    (
        "SELECT set_config('app.user_id', 'u1', false)",
        "SELECT coalesce(current_setting('app.user_id', true), '') = 'u1'",
    ),
    ("LISTEN ghar_leak", "SELECT 'ghar_leak' IN (SELECT pg_listening_channels())"),
    (
        "SELECT pg_advisory_lock(777)",
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
        " AND pid = pg_backend_pid())",
    ),
    ("CREATE TEMP TABLE leak_t (x int)", "SELECT to_regclass('pg_temp.leak_t') IS NOT NULL"),
    ("PREPARE leak_p AS SELECT 1", "SELECT EXISTS (SELECT 1 FROM pg_prepared_statements)"),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SELECT current_setting('default_transaction_isolation') = 'serializable'",
    ),
]


@pytest.fixture
async def one_conn_db(db: Database, db_settings: Settings) -> Database:
    settings = dataclasses.replace(db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1)
    database = Database(settings)
    await database.start()
    yield database  # type: ignore[misc]
    await database.stop()


@hsettings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(range(len(LEAKS) + 1)), min_size=1, max_size=4))
async def test_next_acquirer_never_sees_session_state(
    one_conn_db: Database, steps: list[int]
) -> None:
    """A pool of one: each user's session state is gone for the next user (same backend)."""
    async with one_conn_db.connection() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    for step in steps:
        if step == len(LEAKS):
            async with one_conn_db.transaction() as conn:
                # Transaction-scoped state needs no reset and must not mark the connection.
                await conn.execute("SET LOCAL statement_timeout = 999")
                await conn.fetchval("SELECT pg_advisory_xact_lock(778)")
                assert not conn.session_dirty
            continue
        setup, probe = LEAKS[step]
        async with one_conn_db.connection() as conn:
            await conn.execute(setup)
            assert await conn.fetchval(probe) is True
            assert conn.session_dirty
        async with one_conn_db.connection() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert await conn.fetchval(probe) is False
            assert not conn.session_dirty
    assert one_conn_db.stats()["main"]["opened"] == 1


async def test_clean_queries_keep_the_connection_without_reset(one_conn_db: Database) -> None:
    async with one_conn_db.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS clean_t (x int)")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    for _ in range(3):
        async with one_conn_db.connection() as conn:
            assert await conn.fetchval("SELECT $1::int", 1) == 1
            await conn.execute("UPDATE clean_t SET x = $1", 2)
            assert not conn.session_dirty
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid


async def test_server_side_state_can_be_declared(one_conn_db: Database) -> None:
    async with one_conn_db.connection() as conn:
        await conn.execute(
            "CREATE OR REPLACE FUNCTION pg_temp.sneaky() RETURNS void LANGUAGE sql AS "
            "$$ SELECT set_config('app.sneaky', 'yes', false) $$"
        )
        conn._con._ghar_dirty = False  # the CREATE above was flagged; start clean
        await conn.fetchval("SELECT pg_temp.sneaky()")
        conn.mark_session_state()
    async with one_conn_db.connection() as conn:
        assert await conn.fetchval("SELECT current_setting('app.sneaky', true)") in (None, "")


async def test_left_open_transaction_is_rolled_back(one_conn_db: Database) -> None:
    async with one_conn_db.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS open_tx (v int)")
        await conn.execute("TRUNCATE open_tx")
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, _ctx: None)  # asyncpg reports the misuse
    try:
        async with one_conn_db.connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO open_tx VALUES (1)")
    finally:
        loop.set_exception_handler(previous)
    async with one_conn_db.connection() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM open_tx") == 0


# --- serverless ---------------------------------------------------------------------------------


async def _backends(admin_dsn: str, dsn: str) -> int:
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        return count
    finally:
        await conn.close()


async def test_serverless_keeps_nothing_connected(
    pg_admin_dsn: str, fresh_database: str, db_settings: Settings
) -> None:
    async with started(
        db_settings,
        DATABASE_URL=fresh_database,
        SERVERLESS_ENABLED=True,
        DB_POOL_MIN_SIZE=3,
    ) as database:
        assert await _backends(pg_admin_dsn, fresh_database) == 0
        async with database.connection() as conn:
            assert await conn.fetchval("SELECT $1::int", 7) == 7
            assert await _backends(pg_admin_dsn, fresh_database) == 1

        async def one(i: int) -> int:
            async with database.transaction() as conn:
                value: int = await conn.fetchval("SELECT $1::int", i)
                return value

        assert await asyncio.gather(*(one(i) for i in range(8))) == list(range(8))
        async with database.background_connection() as conn:
            await conn.fetchval("SELECT 1")
        await database.check()
        # Idle now: nothing may stay connected (closes finish within a moment).
        for _ in range(40):
            if await _backends(pg_admin_dsn, fresh_database) == 0:
                break
            await asyncio.sleep(0.05)
        assert await _backends(pg_admin_dsn, fresh_database) == 0
        assert database.stats()["main"]["size"] == 0


async def test_serverless_keeps_the_cap_and_fails_fast(db_settings: Settings) -> None:
    async with started(
        db_settings,
        SERVERLESS_ENABLED=True,
        DB_POOL_MAX_SIZE=2,
        DB_POOL_ACQUIRE_TIMEOUT=0.2,
    ) as database:
        async with holding(database, 2):
            assert database.stats()["main"]["in_use"] == 2
            with pytest.raises(PoolExhaustedException):
                async with database.connection():
                    pass
        async with database.connection() as conn:
            assert await conn.fetchval("SELECT 3") == 3


async def test_idle_connections_age_out(
    pg_admin_dsn: str, fresh_database: str, db_settings: Settings
) -> None:
    async with started(
        db_settings,
        DATABASE_URL=fresh_database,
        DB_POOL_MIN_SIZE=0,
        DB_MAX_INACTIVE_LIFETIME=0.1,
    ) as database:
        async with database.connection() as conn:
            await conn.fetchval("SELECT 1")
        assert database.stats()["main"]["idle"] == 1
        for _ in range(40):
            if database.stats()["main"]["size"] == 0:
                break
            await asyncio.sleep(0.05)
        assert database.stats()["main"]["size"] == 0
        for _ in range(40):
            if await _backends(pg_admin_dsn, fresh_database) == 0:
                break
            await asyncio.sleep(0.05)
        assert await _backends(pg_admin_dsn, fresh_database) == 0


# --- the command timeout (the pool's watchdog) --------------------------------------------


def _watchdogs(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and "pool watchdog" in t.name]


def _gone_within(threads: list[threading.Thread], bound: float) -> bool:
    deadline = time.monotonic() + bound
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not any(t.is_alive() for t in threads)


def _idle_settings(db_settings: Settings) -> Settings:
    # Nothing connected (no socket left open with the loop), and the
    # watchdog's longest sleep a minute.
    return dataclasses.replace(
        db_settings,
        DB_POOL_MIN_SIZE=0,
        DB_BG_POOL_MIN_SIZE=0,
        DB_COMMAND_TIMEOUT=60.0,
        DB_MAX_INACTIVE_LIFETIME=300.0,
    )


def test_the_watchdogs_end_soon_after_their_loop_is_closed_unstopped(
    db_settings: Settings,
) -> None:
    database = Database(_idle_settings(db_settings))
    before = set(threading.enumerate())
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(database.start())
        watchdogs = _watchdogs(before)
        assert len(watchdogs) == 2  # main and background
    finally:
        loop.close()  # never stopped
    # A correctness bound (about a second), not a timing: not DB_COMMAND_TIMEOUT.
    assert _gone_within(watchdogs, 3.0)


async def test_the_watchdogs_end_soon_after_their_database_is_collected(
    db_settings: Settings,
) -> None:
    database = Database(_idle_settings(db_settings))
    before = set(threading.enumerate())
    await database.start()
    watchdogs = _watchdogs(before)
    assert len(watchdogs) == 2
    await asyncio.sleep(1.2)  # the threads have looked a few times
    del database  # never stopped
    gc.collect()
    assert await asyncio.to_thread(_gone_within, watchdogs, 3.0)


async def test_a_statement_past_the_command_timeout_times_out_on_its_own_task(
    db_settings: Settings,
) -> None:
    settings = dataclasses.replace(db_settings, DB_COMMAND_TIMEOUT=0.2, DB_POOL_MIN_SIZE=0)
    database = Database(settings)
    await database.start()
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(DatabaseUnavailableException) as info:
            async with database.connection() as conn:
                await conn.fetchval("SELECT pg_sleep(5)")
        assert isinstance(info.value.__cause__, TimeoutError)
        assert 0.19 <= loop.time() - started < 1.5
        # The watchdog's cancellation was taken back: later timeouts still work.
        assert task.cancelling() == 0
        async with database.connection() as conn:
            for query in ("SELECT pg_sleep(5)", "SELECT pg_sleep($1::float8)"):
                started = loop.time()
                with pytest.raises(TimeoutError):
                    await conn.fetchval(query, *([5] if "$1" in query else []))
                assert loop.time() - started < 1.5
            # The cancel was acknowledged before the next statement ran.
            assert await conn.fetchval("SELECT 1") == 1
            # A statement that finishes in time is not disturbed by a past expiry.
            assert await conn.fetchval("SELECT pg_sleep(0.1)::text") == ""
        assert task.cancelling() == 0
    finally:
        await database.stop()


async def test_a_statement_whose_answer_arrived_is_not_timed_out_after_it(
    db_settings: Settings, pg_admin_dsn: str
) -> None:
    """The watchdog acts on the loop, maybe after the answer came in but before
    the waiting task resumed: cancelling then would throw away a statement that
    ran (an autocommit INSERT applied, its client told it timed out)."""
    settings = dataclasses.replace(db_settings, DB_POOL_MIN_SIZE=0)
    database = Database(settings)
    await database.start()
    try:
        async with database.connection() as conn:
            await conn.execute("CREATE TABLE race_probe (n int)")
        async with database.connection() as conn:
            raw = conn

            async def insert() -> str:
                return await raw.execute("INSERT INTO race_probe VALUES (1)")

            task = asyncio.create_task(insert())
            # Spin until the answer is in (the task's waiter done) but the task
            # has not run since: this coroutine was scheduled before its wakeup.
            while True:
                await asyncio.sleep(0)
                waiter = task._fut_waiter  # type: ignore[attr-defined]
                if waiter is not None and waiter.done():
                    break
                assert not task.done()
            assert raw.statement_started() > 0  # still "in flight" for the watchdog
            raw.expire_overdue()  # the watchdog's sweep, landing in that window
            assert await task == "INSERT 0 1"
            assert await raw.fetchval("SELECT count(*) FROM race_probe") == 1
    finally:
        await database.stop()


async def test_a_cancellation_on_top_of_the_timeout_stays_a_cancellation(
    db_settings: Settings,
) -> None:
    settings = dataclasses.replace(db_settings, DB_POOL_MIN_SIZE=0)
    database = Database(settings)
    await database.start()
    running = asyncio.Event()
    try:

        async def sleeper() -> None:
            async with database.connection() as conn:
                running.set()
                await conn.fetchval("SELECT pg_sleep(5)")

        task = asyncio.create_task(sleeper())
        await running.wait()
        await asyncio.sleep(0.05)
        (raw,) = [h._con for h in database._pool(False).pool._holders if h._in_use]
        assert raw.statement_started() > 0
        raw.expire_overdue()  # what the watchdog does, and a shutdown's cancel with it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with database.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await database.stop()


async def test_an_explicit_timeout_and_unwatched_calls_keep_asyncpgs_timer(
    db_settings: Settings,
) -> None:
    settings = dataclasses.replace(db_settings, DB_COMMAND_TIMEOUT=0.3, DB_POOL_MIN_SIZE=0)
    database = Database(settings)
    await database.start()
    loop = asyncio.get_running_loop()
    try:
        async with database.connection() as conn:
            started = loop.time()
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(5)", timeout=0.05)
            assert loop.time() - started < 0.25
            statement = await conn.prepare("SELECT pg_sleep(5)")
            started = loop.time()
            with pytest.raises(TimeoutError):
                await statement.fetchval()
            assert 0.29 <= loop.time() - started < 1.5
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await database.stop()


# --- through PgBouncer (transaction mode) --------------------------------------------------


async def test_our_pools_work_through_pgbouncer(
    pgbouncer: PgBouncer, db_settings: Settings, db: Database
) -> None:
    settings = dataclasses.replace(
        db_settings, DB_POOL_MIN_SIZE=2, DB_POOL_MAX_SIZE=8, DB_BG_POOL_MAX_SIZE=4
    )
    database = Database(settings, dsn=pgbouncer.dsn(db_settings.DATABASE_URL))
    await database.start()
    try:
        pids: set[int] = set()

        async def query(i: int) -> None:
            lease = database.transaction() if i % 2 else database.connection()
            async with lease as conn:
                value, pid = await conn.fetchrow("SELECT $1::int * 2, pg_backend_pid()", i)
                assert value == i * 2
                assert await conn.fetchval("SELECT $1::text || 'x'", str(i)) == f"{i}x"
                pids.add(pid)

        for _ in range(5):
            await asyncio.gather(*(query(i) for i in range(40)))
        async with database.background_transaction() as conn:
            assert await conn.fetchval("SELECT $1::jsonb", {"k": 1}) == {"k": 1}
        await database.check()
        assert len(pids) > 1, "the queries should have crossed several server connections"
    finally:
        await database.stop()


def test_default_statement_cache_fails_through_pgbouncer(
    pgbouncer: PgBouncer, pg_database: str
) -> None:
    """The failure our statement_cache_size=0 avoids: a cached statement on another server."""
    dsn = pgbouncer.dsn(pg_database)

    async def scenario(cache_size: int) -> BaseException | None:
        c1 = await asyncpg.connect(dsn, statement_cache_size=cache_size)
        c2 = await asyncpg.connect(dsn, statement_cache_size=cache_size)
        try:
            # c1 prepares (and, with a cache, names) its statement on server S1.
            assert await c1.fetchval("SELECT $1::int + 1", 1) == 2
            # c2 pins S1 inside a transaction, so c1's next query lands on S2.
            async with c2.transaction():
                await c2.fetchval("SELECT 1")
                try:
                    assert await c1.fetchval("SELECT $1::int + 1", 2) == 3
                except asyncpg.PostgresError as exc:
                    return exc
            return None
        finally:
            await c1.close()
            await c2.close()

    failure = run_sync(scenario(100))
    assert isinstance(failure, asyncpg.InvalidSQLStatementNameError), failure
    assert "pgbouncer" in str(failure).lower() or "does not exist" in str(failure)
    assert run_sync(scenario(0)) is None


# --- through the app ------------------------------------------------------------------------


async def test_app_owns_a_database_and_renders_503_on_exhaustion(db_settings: Settings) -> None:
    from ghar_core.asgi.app import create_app
    from ghar_core.testing import TestClient

    settings = dataclasses.replace(
        db_settings, DB_POOL_MIN_SIZE=0, DB_POOL_MAX_SIZE=1, DB_POOL_ACQUIRE_TIMEOUT=0.1
    )
    app = create_app(settings, access_log=False)

    @app.get("/count")
    async def count(request: object) -> dict[str, int]:
        database = request.resources.get("database")  # type: ignore[attr-defined]
        async with database.connection() as conn:
            return {"one": await conn.fetchval("SELECT 1")}

    async with TestClient(app) as client:
        ok = await client.get("/count")
        assert ok.status_code == 200
        assert ok.json() == {"one": 1}
        assert (await client.get("/ready")).status_code == 200
        database = app.resources.get("database")
        assert isinstance(database, Database)
        async with database.connection():  # the only connection is busy
            busy = await client.get("/count")
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert busy.headers.get("retry-after") == "1"


async def test_a_database_never_reached_says_so_not_temporary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing at DATABASE_URL since start: the 503 and the log say it never answered."""
    from ghar_core.config import load_settings
    from ghar_core.db_resilience import execute_with_transient_retry

    port = free_port()
    settings = dataclasses.replace(
        load_settings(app_env="test"),
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/nowhere",
        DB_POOL_MIN_SIZE=0,
    )
    database = Database(settings)
    await database.start()
    try:
        with caplog.at_level("ERROR", logger="ghar_core.database"):

            async def one(conn: object) -> int:
                return 1

            with pytest.raises(DatabaseUnavailableException, match="has not answered since"):
                await execute_with_transient_retry(database, one, operation_name="probe")
        (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
        assert f"127.0.0.1:{port}/nowhere" in record.getMessage()
        assert "is it running, and is DATABASE_URL right?" in record.getMessage()
    finally:
        await database.stop()


@pytest.mark.parametrize(
    ("query", "notifies"),
    [
        ("NOTIFY jobs", True),
        ("  notify jobs, 'x'", True),
        ("SELECT pg_notify($1, $2)", True),
        ("SELECT 1; NOTIFY jobs", True),
        ("SELECT notify FROM prefs", False),
        ("UPDATE prefs SET notify = true", False),
    ],
)
def test_a_notification_is_a_write_that_needs_its_id_before_commit(
    query: str, notifies: bool
) -> None:
    """Review: a NOTIFY gets its transaction id only at COMMIT (see _db_session)."""
    from ghar_core._db_session import _NOTIFIES, _verdict, may_write

    assert bool(_verdict(query) & _NOTIFIES) is notifies
    if notifies:
        assert may_write(query)
