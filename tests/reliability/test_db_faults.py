"""Database faults against the real Postgres: killed backends, exhaustion, an outage.

The outage is made with a real TCP relay in front of Postgres that the test
can cut and restore (the shared Postgres itself is never stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from urllib.parse import urlsplit

import asyncpg
import pytest

from ghar_core.config import Settings
from ghar_core.database import Database
from ghar_core.db_resilience import execute_with_transient_retry
from ghar_core.exceptions import (
    DatabaseUnavailableException,
    PoolExhaustedException,
    render_error,
)
from tests.pg import free_port, holding, with_database


async def test_terminated_backend_mid_operation_is_retried_on_a_fresh_connection(
    db: Database, pg_admin_dsn: str
) -> None:
    attempts: list[int] = []
    admin = await asyncpg.connect(pg_admin_dsn)
    try:

        async def op(conn: asyncpg.Connection) -> int:
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            attempts.append(pid)
            if len(attempts) == 1:

                async def kill() -> None:
                    await asyncio.sleep(0.1)
                    await admin.fetchval("SELECT pg_terminate_backend($1)", pid)

                killer = asyncio.create_task(kill())
                try:
                    await conn.fetchval("SELECT pg_sleep(5)")
                finally:
                    await killer
            value: int = await conn.fetchval("SELECT $1::int", 7)
            return value

        result = await execute_with_transient_retry(db, op, operation_name="killed_mid_query")
    finally:
        await admin.close()
    assert result == 7
    assert len(attempts) == 2
    killed = attempts[0]
    assert attempts[1] != killed
    assert db.stats()["main"]["discarded"] >= 1
    # The pool holds no broken connection: every connection it can hand out works.
    size = db.settings.DB_POOL_MAX_SIZE
    gate = asyncio.Barrier(size)

    async def use() -> int:
        async with db.connection() as conn:
            await gate.wait()
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            return pid

    pids = await asyncio.gather(*(use() for _ in range(size)))
    assert killed not in pids
    assert len(set(pids)) == size


async def test_exhaustion_fails_fast_and_is_never_retried(
    db_settings: Settings, db: Database
) -> None:
    timeout = 0.3
    settings = dataclasses.replace(
        db_settings, DB_POOL_MIN_SIZE=0, DB_POOL_MAX_SIZE=3, DB_POOL_ACQUIRE_TIMEOUT=timeout
    )
    database = Database(settings)
    await database.start()
    try:
        async with holding(database, 3):
            calls = 0

            async def op(conn: asyncpg.Connection) -> None:
                nonlocal calls
                calls += 1

            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(PoolExhaustedException) as info:
                await execute_with_transient_retry(database, op, operation_name="one_too_many")
            elapsed = loop.time() - started
        assert timeout * 0.9 <= elapsed <= timeout + 0.05
        # Exactly one acquire timed out (no retry) and the operation never ran.
        assert database.stats()["main"]["exhausted"] == 1
        assert calls == 0
        rendered = render_error(info.value)
        assert rendered.status_code == 503
        assert b"SERVICE_UNAVAILABLE" in rendered.body
        assert any(name == b"retry-after" for name, _ in rendered.headers)
    finally:
        await database.stop()


class Relay:
    """A TCP relay to Postgres that can be cut (every socket closed) and restored."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for a, b in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(a, b))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_outage_gives_503_and_recovers_by_itself(db_settings: Settings, db: Database) -> None:
    target = urlsplit(db_settings.DATABASE_URL)
    relay = Relay(free_port(), (target.hostname or "127.0.0.1", target.port or 5432))
    dsn = with_database(
        db_settings.DATABASE_URL, db_settings.DATABASE_URL.rsplit("/", 1)[1], port=relay.port
    )
    settings = dataclasses.replace(
        db_settings, DB_POOL_MIN_SIZE=2, DB_POOL_MAX_SIZE=3, DB_CONNECT_TIMEOUT=1.0
    )
    database = Database(settings, dsn=dsn)
    # Postgres "down" at start: the app still starts.
    await database.start()
    try:
        with pytest.raises(DatabaseUnavailableException):
            await database.check()
        # It comes back: the next use connects, nobody restarts anything.
        await relay.start()
        await database.check()
        async with database.transaction() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        assert database.stats()["main"]["idle"] >= 1
        # Outage with warm connections in the pool: clean 503s, no 500s.
        await relay.cut()
        for _ in range(3):
            with pytest.raises(DatabaseUnavailableException) as info:
                async with database.transaction() as conn:
                    await conn.fetchval("SELECT 1")
            assert render_error(info.value).status_code == 503
        # Back again: the dead connections were dropped, fresh ones serve.
        await relay.start()

        async def one(i: int) -> int:
            async with database.transaction() as conn:
                value: int = await conn.fetchval("SELECT $1::int", i)
                return value

        assert await asyncio.gather(*(one(i) for i in range(6))) == list(range(6))
        await database.check()
    finally:
        await database.stop(grace=1.0)
        await relay.cut()
