"""Correctness of the Postgres layer under real faults (issue 9).

Each fault is made for real: a TCP relay in front of Postgres that forwards a
COMMIT and swallows the server's answer (or the COMMIT itself), a private
PgBouncer killed with ``kill -9`` under a write load and started again, a
statement waiting on a lock past ``DB_COMMAND_TIMEOUT``, a pooled connection
whose backend died while idle, and a handler that swallows a database error
inside a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections import Counter
from urllib.parse import urlsplit

import asyncpg
import pytest

from ghar_core.config import Settings
from ghar_core.database import Database, FailedTransactionError
from ghar_core.db_resilience import CommitOutcomeUnknownException, execute_with_transient_retry
from ghar_core.exceptions import DatabaseUnavailableException, render_error
from tests.pg import (
    PgBouncer,
    free_port,
    run_sync,
    start_pgbouncer,
    stop_pgbouncer,
    with_database,
)

# asyncpg's Transaction.commit() sends this simple Query message.
_COMMIT = b"Q\x00\x00\x00\x0cCOMMIT;\x00"


class CommitRelay:
    """A TCP relay to Postgres that can lose a COMMIT's answer (or the COMMIT).

    ``arm("answer")``: the next COMMIT is forwarded, the server's reply is
    dropped and the client's socket is cut once the server had time to commit.
    ``arm("commit")``: the next COMMIT is not forwarded and both sides are cut
    (the server rolls back). ``close_listener=True`` also stops accepting new
    connections, so nobody can find out what happened.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.port = free_port()
        self.target = target
        self.mode: str | None = None
        self.close_listener = False
        self.fired = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def arm(self, mode: str, *, close_listener: bool = False) -> None:
        self.mode, self.close_listener = mode, close_listener
        self.fired.clear()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        state = {"mute": False}

        def cut() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        async def upstream() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    if self.mode is not None and _COMMIT in data:
                        mode, self.mode = self.mode, None
                        if self.close_listener and self._server is not None:
                            self._server.close()
                            self._server = None
                        if mode == "commit":
                            cut()
                            self.fired.set()
                            return
                        state["mute"] = True
                        up_writer.write(data)
                        await up_writer.drain()
                        await asyncio.sleep(0.3)  # the server commits meanwhile
                        cut()
                        self.fired.set()
                        return
                    up_writer.write(data)
                    await up_writer.drain()
            cut()

        async def downstream() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await up_reader.read(65536):
                    if state["mute"]:
                        continue
                    writer.write(data)
                    await writer.drain()
            cut()

        self._spawn(upstream())
        self._spawn(downstream())


@pytest.fixture
async def relayed(db: Database, db_settings: Settings) -> object:
    """(database through a CommitRelay, the relay); the table ``appends`` is empty."""
    target = urlsplit(db_settings.DATABASE_URL)
    relay = CommitRelay((target.hostname or "127.0.0.1", target.port or 5432))
    await relay.start()
    dsn = with_database(
        db_settings.DATABASE_URL, db_settings.DATABASE_URL.rsplit("/", 1)[1], port=relay.port
    )
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS appends (op text NOT NULL)")
        await conn.execute("TRUNCATE appends")
    settings = dataclasses.replace(db_settings, DB_POOL_MIN_SIZE=1, DB_CONNECT_TIMEOUT=1.0)
    database = Database(settings, dsn=dsn)
    await database.start()
    try:
        yield database, relay
    finally:
        await database.stop(grace=1.0)
        await relay.stop()


async def _rows(db: Database, op: str) -> int:
    async with db.connection() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM appends WHERE op = $1", op)
        return count


# --- COMMIT outcome --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lose", "runs"),
    [("answer", 1), ("commit", 2)],
    ids=["answer-lost-found-committed", "commit-lost-found-aborted"],
)
async def test_lost_commit_applies_a_non_idempotent_append_exactly_once(
    db: Database, relayed: tuple[Database, CommitRelay], lose: str, runs: int
) -> None:
    """Committed: the first result stands, nothing re-runs. Aborted: the retry runs."""
    database, relay = relayed
    op = f"once-{lose}"
    calls = 0

    async def append(conn: asyncpg.Connection) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            relay.arm(lose)
        await conn.execute("INSERT INTO appends (op) VALUES ($1)", op)
        return calls

    assert await execute_with_transient_retry(database, append, operation_name="append") == runs
    assert relay.fired.is_set()
    assert calls == runs
    assert await _rows(db, op) == 1


async def test_lost_commit_answer_in_a_bare_transaction_is_a_success(
    db: Database, relayed: tuple[Database, CommitRelay]
) -> None:
    database, relay = relayed
    async with database.transaction() as conn:
        await conn.execute("INSERT INTO appends (op) VALUES ('bare')")
        relay.arm("answer")
    assert relay.fired.is_set()
    assert await _rows(db, "bare") == 1


async def test_unknown_commit_outcome_is_its_own_503_and_never_retried(
    db: Database, relayed: tuple[Database, CommitRelay]
) -> None:
    database, relay = relayed
    calls = 0

    async def append(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        relay.arm("answer", close_listener=True)
        await conn.execute("INSERT INTO appends (op) VALUES ('unknown')")

    with pytest.raises(CommitOutcomeUnknownException) as info:
        await execute_with_transient_retry(database, append, operation_name="append")
    assert calls == 1
    rendered = render_error(info.value)
    assert rendered.status_code == 503
    assert b'"DB_COMMIT_OUTCOME_UNKNOWN"' in rendered.body
    assert any(name == b"retry-after" for name, _ in rendered.headers)
    assert await _rows(db, "unknown") <= 1  # here it did commit: the client must check


async def test_read_only_transaction_asks_for_no_transaction_id(db: Database) -> None:
    """The outcome check costs nothing when nothing was written."""
    async with db.transaction() as conn:
        await conn.fetchval("SELECT 1")
        assert not conn.may_have_written
    async with db.transaction() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS ro_probe (v int)")
        assert conn.may_have_written


# --- PgBouncer killed -9 under a write load ---------------------------------------------------


async def test_pgbouncer_killed_under_write_load_loses_and_duplicates_nothing(
    db: Database, db_settings: Settings, pg_admin_dsn: str
) -> None:
    bouncer = start_pgbouncer(pg_admin_dsn)
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS appends (op text NOT NULL)")
        await conn.execute("TRUNCATE appends")
    settings = dataclasses.replace(
        db_settings, DB_POOL_MIN_SIZE=2, DB_POOL_MAX_SIZE=6, DB_CONNECT_TIMEOUT=1.0
    )
    database = Database(settings, dsn=bouncer.dsn(db_settings.DATABASE_URL))
    await database.start()
    outcomes: dict[str, str] = {}
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            op = f"{w}-{i}"
            i += 1

            async def append(conn: asyncpg.Connection, op: str = op) -> None:
                await conn.execute("INSERT INTO appends (op) VALUES ($1)", op)

            try:
                await execute_with_transient_retry(database, append, operation_name="append")
                outcomes[op] = "ok"
            except CommitOutcomeUnknownException:
                outcomes[op] = "unknown"
            except DatabaseUnavailableException:
                outcomes[op] = "failed"
                await asyncio.sleep(0.05)

    async def killer() -> None:
        nonlocal bouncer
        for _ in range(3):
            await asyncio.sleep(0.7)
            bouncer.process.kill()  # SIGKILL: no goodbye to anyone
            await asyncio.to_thread(bouncer.process.wait)
            stop_pgbouncer(bouncer, remove=False)  # dead already: closes its pipe
            await asyncio.sleep(0.1)
            bouncer = await asyncio.to_thread(
                start_pgbouncer, pg_admin_dsn, port=bouncer.port, directory=bouncer.directory
            )
        await asyncio.sleep(0.5)
        stop.set()

    try:
        await asyncio.gather(killer(), *(writer(w) for w in range(5)))
    finally:
        stop.set()
        await database.stop(grace=1.0)
        stop_pgbouncer(bouncer)
    async with db.connection() as conn:
        counts = Counter(
            {
                r["op"]: r["n"]
                for r in await conn.fetch("SELECT op, count(*) AS n FROM appends GROUP BY op")
            }
        )
    tally = Counter(outcomes.values())
    print(f"outcomes under 3 PgBouncer kills: {dict(tally)}")  # shown with -s
    assert tally["ok"] > 50, tally
    duplicated = [op for op, n in counts.items() if n > 1]
    lost = [op for op, how in outcomes.items() if how == "ok" and counts[op] != 1]
    applied_after_failure = [op for op, how in outcomes.items() if how == "failed" and counts[op]]
    assert duplicated == []
    assert lost == []
    assert applied_after_failure == []
    assert set(counts) <= set(outcomes)


# --- a statement past the command timeout is cancelled on the server --------------------------


async def _waiting_backends(admin: asyncpg.Connection, datname: str) -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
        " AND application_name = '360ghar' AND wait_event_type = 'Lock'",
        datname,
    )
    return count


@pytest.mark.parametrize("transactional", [False, True], ids=["connection", "transaction"])
@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
async def test_timed_out_statement_is_cancelled_on_the_server(
    request: pytest.FixtureRequest,
    db: Database,
    db_settings: Settings,
    pg_admin_dsn: str,
    route: str,
    transactional: bool,
) -> None:
    dsn = db_settings.DATABASE_URL
    if route == "pgbouncer":
        bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
        dsn = bouncer.dsn(dsn)
    table = f"locked_{uuid.uuid4().hex[:8]}"
    async with db.connection() as conn:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'before')")
    settings = dataclasses.replace(db_settings, DB_COMMAND_TIMEOUT=0.3, DB_POOL_MIN_SIZE=0)
    database = Database(settings, dsn=dsn)
    await database.start()
    holder = await asyncpg.connect(db_settings.DATABASE_URL)
    admin = await asyncpg.connect(pg_admin_dsn)
    datname = db_settings.DATABASE_URL.rsplit("/", 1)[1]
    try:
        holder_tx = holder.transaction()
        await holder_tx.start()
        await holder.execute(f"UPDATE {table} SET v = 'holder' WHERE id = 1")
        lease = database.transaction() if transactional else database.connection()
        with pytest.raises(DatabaseUnavailableException) as info:
            async with lease as conn:
                await conn.execute(f"UPDATE {table} SET v = 'ours' WHERE id = 1")
        assert render_error(info.value).status_code == 503
        # Nothing of ours is still waiting on the lock once the client has its 503.
        assert await _waiting_backends(admin, datname) == 0
        await holder.execute(f"UPDATE {table} SET v = 'holder2' WHERE id = 1")
        await holder_tx.commit()
        await asyncio.sleep(0.2)
        assert await holder.fetchval(f"SELECT v FROM {table} WHERE id = 1") == "holder2"
    finally:
        await holder.close()
        await admin.close()
        await database.stop(grace=1.0)


# --- a pooled connection that died while idle ----------------------------------------------------


def _kill_and_wait(admin_dsn: str, pid: int) -> None:
    """Terminate backend ``pid`` and wait until it is gone, without yielding our loop."""

    async def go() -> None:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            for _ in range(200):
                if not await admin.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", pid
                ):
                    return
                await asyncio.sleep(0.01)
        finally:
            await admin.close()

    run_sync(go())


@pytest.mark.parametrize("transactional", [False, True], ids=["connection", "transaction"])
async def test_idle_connection_killed_before_use_is_replaced(
    db_settings: Settings, pg_admin_dsn: str, transactional: bool
) -> None:
    from ghar_core.asgi.app import create_app
    from ghar_core.testing import TestClient

    settings = dataclasses.replace(db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1)
    app = create_app(settings, access_log=False)

    @app.get("/pid")
    async def pid(request: object) -> dict[str, int]:
        database = request.resources.get("database")  # type: ignore[attr-defined]
        lease = database.transaction() if transactional else database.connection()
        async with lease as conn:
            return {"pid": await conn.fetchval("SELECT pg_backend_pid()")}

    async with TestClient(app) as client:
        first = await client.get("/pid")
        assert first.status_code == 200
        # The loop is blocked while the backend dies: the pool cannot have noticed.
        _kill_and_wait(pg_admin_dsn, first.json()["pid"])
        second = await client.get("/pid")
        assert second.status_code == 200, second.json()
        assert second.json()["pid"] != first.json()["pid"]


@pytest.mark.parametrize("transactional", [False, True], ids=["connection", "transaction"])
async def test_idle_connection_killed_before_a_direct_lease_is_replaced(
    db_settings: Settings, pg_admin_dsn: str, transactional: bool
) -> None:
    # No request plumbing between the kill and the lease: asyncpg needs a few
    # loop iterations to read the goodbye, then the end of the stream, then
    # close; the lease must wait for that, not use the dying connection.
    settings = dataclasses.replace(db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1)
    database = Database(settings)
    await database.start()
    try:
        for _ in range(5):
            async with database.connection() as conn:
                pid = await conn.fetchval("SELECT pg_backend_pid()")
            _kill_and_wait(pg_admin_dsn, pid)
            lease = database.transaction() if transactional else database.connection()
            async with lease as conn:
                assert await conn.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await database.stop()


async def test_a_lease_cancelled_while_it_looks_at_a_dying_connection_gives_it_back(
    db_settings: Settings, pg_admin_dsn: str
) -> None:
    # The lease saw news on its idle connection and yields for asyncpg to read
    # it; cancelled there, __aenter__ never returns, so nobody else releases it.
    settings = dataclasses.replace(
        db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1, DB_POOL_ACQUIRE_TIMEOUT=1
    )
    database = Database(settings)
    await database.start()
    try:
        for ticks in range(1, 6):
            async with database.connection() as conn:
                pid = await conn.fetchval("SELECT pg_backend_pid()")
            _kill_and_wait(pg_admin_dsn, pid)

            async def lease() -> None:
                async with database.connection() as conn:
                    await conn.fetchval("SELECT 1")

            task = asyncio.create_task(lease())
            for _ in range(ticks):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert database.stats()["main"]["in_use"] == 0, ticks  # nothing still leased
            # The slot is back: a lease gets a working connection, no 503.
            async with database.connection() as conn:
                assert await conn.fetchval("SELECT 2") == 2
    finally:
        await database.stop()


# --- a swallowed error inside a transaction ------------------------------------------------------


async def test_swallowed_error_inside_a_transaction_raises_at_commit(db: Database) -> None:
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS swallowed (v int UNIQUE)")
        await conn.execute("TRUNCATE swallowed")
        await conn.execute("INSERT INTO swallowed VALUES (1)")

    async def swallow() -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO swallowed VALUES (2)")
            with contextlib.suppress(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO swallowed VALUES (1)")

    with pytest.raises(FailedTransactionError, match="UniqueViolationError") as info:
        await swallow()
    assert isinstance(info.value.__cause__, asyncpg.UniqueViolationError)
    assert "rolled back" in str(info.value)
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM swallowed WHERE v = 2") == 0
    # A savepoint that caught the error leaves a healthy transaction: it commits.
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO swallowed VALUES (3)")
        with contextlib.suppress(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute("INSERT INTO swallowed VALUES (1)")
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM swallowed WHERE v = 3") == 1


# --- review: what the outcome check and the swallowed-error check still miss --------------------


async def test_lost_commit_of_a_notify_does_not_deliver_it_twice(
    db_settings: Settings, relayed: tuple[Database, CommitRelay]
) -> None:
    """NOTIFY is a write that has no transaction id before COMMIT (Postgres assigns one
    in pre-commit): "no id" does not mean "nothing was written"."""
    database, relay = relayed
    channel = f"review_{uuid.uuid4().hex[:8]}"
    received: list[str] = []
    listener = await asyncpg.connect(db_settings.DATABASE_URL)
    await listener.add_listener(channel, lambda *args: received.append(args[3]))
    calls = 0

    async def notify(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            relay.arm("answer")
        await conn.execute(f"NOTIFY {channel}, 'once'")

    try:
        with contextlib.suppress(CommitOutcomeUnknownException):
            await execute_with_transient_retry(database, notify, operation_name="notify")
        assert relay.fired.is_set()
        await asyncio.sleep(0.3)
        assert received == ["once"], f"{calls} runs delivered {received}"
    finally:
        await listener.close()


async def test_swallowed_copy_error_inside_a_transaction_raises_at_commit(db: Database) -> None:
    """The COPY methods are statements too: a caught COPY failure must not commit silently."""
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS copied (v int UNIQUE)")
        await conn.execute("TRUNCATE copied")
        await conn.execute("INSERT INTO copied VALUES (1)")

    async def swallow() -> None:
        async with db.transaction() as conn:
            await conn.copy_records_to_table("copied", records=[(2,)])
            with contextlib.suppress(asyncpg.UniqueViolationError):
                await conn.copy_records_to_table("copied", records=[(1,)])
            assert conn.may_have_written

    with pytest.raises(FailedTransactionError, match="UniqueViolationError"):
        await swallow()
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM copied WHERE v = 2") == 0


async def test_timed_out_statement_is_cancelled_on_the_server_in_serverless_mode(
    db: Database, db_settings: Settings, pg_admin_dsn: str
) -> None:
    """Serverless mode closes the connection in the background: the 503 must still wait."""
    table = f"locked_{uuid.uuid4().hex[:8]}"
    async with db.connection() as conn:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'before')")
    settings = dataclasses.replace(
        db_settings, DB_COMMAND_TIMEOUT=0.3, DB_POOL_MIN_SIZE=0, SERVERLESS_ENABLED=True
    )
    database = Database(settings)
    await database.start()
    holder = await asyncpg.connect(db_settings.DATABASE_URL)
    admin = await asyncpg.connect(pg_admin_dsn)
    datname = db_settings.DATABASE_URL.rsplit("/", 1)[1]
    try:
        holder_tx = holder.transaction()
        await holder_tx.start()
        await holder.execute(f"UPDATE {table} SET v = 'holder' WHERE id = 1")
        for _ in range(5):
            with pytest.raises(DatabaseUnavailableException):
                async with database.connection() as conn:
                    await conn.execute(f"UPDATE {table} SET v = 'ours' WHERE id = 1")
            assert await _waiting_backends(admin, datname) == 0
        await holder_tx.commit()
        await asyncio.sleep(0.2)
        assert await holder.fetchval(f"SELECT v FROM {table} WHERE id = 1") == "holder"
    finally:
        await holder.close()
        await admin.close()
        await database.stop(grace=1.0)
