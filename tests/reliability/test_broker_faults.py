"""The Postgres broker under real faults, two instances publishing at once.

- The LISTEN backends of both instances are terminated 100 times while both
  publish: every subscriber of every user gets the user's whole sequence, in
  position order, with each publisher's events in the order it emitted them,
  and no ``reset``.
- Postgres itself (a throwaway cluster of the test's own) is restarted while
  both publish: the same holds, and nothing is written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ghar_core.broker import PostgresBroker
from ghar_core.database import Database
from ghar_core.devtools.pg_binaries import find_binaries
from ghar_core.devtools.postgres import EmbeddedPostgres, free_port
from ghar_core.migrate import migrate_dsn
from ghar_core.sse import Event, SSEEventBus, Subscription
from tests.broker_support import broker_settings, kill_listeners, until
from tests.conftest import require
from tests.pg import run_sync
from tests.reliability.report import section
from tests.reliability.test_3_realtime import TITLE

USERS = [f"user-{i}" for i in range(6)]


@dataclasses.dataclass
class Instance:
    name: str
    database: Database
    broker: PostgresBroker
    bus: SSEEventBus
    sent: Counter[str] = dataclasses.field(default_factory=Counter)


@contextlib.asynccontextmanager
async def _instance(name: str, dsn: str, *, notify_rows: bool = False) -> AsyncIterator[Instance]:
    settings = broker_settings(
        dsn,
        SSE_QUEUE_MAX_SIZE=100_000,
        DB_COMMAND_TIMEOUT=5.0,
        EVENT_OUTBOX_NOTIFY_ROWS=notify_rows,
    )
    database = Database(settings)
    broker = PostgresBroker(settings, database, head_timeout=30.0)
    bus = SSEEventBus(settings, broker=broker, handle_signals=False)
    await database.start()
    await broker.start()
    await bus.start()
    try:
        yield Instance(name, database, broker, bus)
    finally:
        await bus.stop()
        await broker.stop(grace=10)
        await database.stop(grace=2)


class Reader:
    """One open subscription, drained by a task, keeping every event it got."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.events: list[Event] = []
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            batch = self.sub.take()
            if batch is None:
                return
            self.events.extend(batch)
            if not batch:
                await self.sub.wait()


async def _publish(instance: Instance, stop: asyncio.Event) -> None:
    rng = random.Random(instance.name)
    while not stop.is_set():
        user = rng.choice(USERS)
        instance.sent[user] += 1
        instance.bus.emit(user, {"type": "t", "src": instance.name, "n": instance.sent[user]})
        await asyncio.sleep(0.004)


async def _readers(instances: list[Instance]) -> list[tuple[str, Reader]]:
    readers = []
    for instance in instances:
        for user in USERS:
            sub = instance.bus.subscribe(user)
            await sub.open()
            readers.append((user, Reader(sub)))
    return readers


async def _check_complete(instances: list[Instance], readers: list[tuple[str, Reader]]) -> int:
    """Wait for every event to arrive everywhere; assert order and completeness."""
    for instance in instances:
        await until(lambda i=instance: i.broker.stats()["queued"] == 0, 60)
    total = {user: sum(i.sent[user] for i in instances) for user in USERS}
    for user, reader in readers:
        await until(lambda r=reader, u=user: len(r.events) >= total[u], 60)
    for user, reader in readers:
        events = reader.events
        assert [e.type for e in events if e.type == "reset"] == []
        assert [e.position for e in events] == list(range(1, total[user] + 1))
        assert len({e.epoch for e in events}) == 1
        for instance in instances:
            mine = [e.data["n"] for e in events if e.data["src"] == instance.name]
            assert mine == list(range(1, instance.sent[user] + 1))
    return sum(total.values())


@pytest.fixture
def outbox_dsn(fresh_database: str) -> str:
    run_sync(migrate_dsn(fresh_database))
    return fresh_database


async def test_listener_backends_killed_100_times_while_both_publish(outbox_dsn: str) -> None:
    # A's NOTIFYs carry its rows (EVENT_OUTBOX_NOTIFY_ROWS), B's their ids: each
    # instance's readers get both kinds, so both paths are under the kills.
    async with (
        _instance("A", outbox_dsn, notify_rows=True) as a,
        _instance("B", outbox_dsn) as b,
    ):
        readers = await _readers([a, b])
        stop = asyncio.Event()
        publishers = [asyncio.ensure_future(_publish(i, stop)) for i in (a, b)]
        killed = 0
        try:
            for round_ in range(100):
                # Kill both once each has listened again since the last kill.
                await until(lambda r=round_: min(a.broker.connects, b.broker.connects) > r)
                await asyncio.sleep(random.uniform(0.0, 0.04))
                killed += await kill_listeners(outbox_dsn)
        finally:
            stop.set()
            await asyncio.gather(*publishers)
        delivered = await _check_complete([a, b], readers)
        assert killed >= 200  # each round killed both listeners
        assert delivered > 500
        assert a.broker.stats()["disconnects"] + b.broker.stats()["disconnects"] >= 100
        assert a.broker.stats()["failed"] == b.broker.stats()["failed"] == 0
        assert b.broker.stats()["carried"] > 0  # A's copies were heard and used
        report = section(3, TITLE)
        report.add(
            "two instances publishing (EVENT_BROKER=postgres), both LISTEN backends"
            " terminated 100 times",
            f"{killed} listeners killed, {delivered} events to {len(USERS)} users' readers on"
            " both instances: every sequence complete, in position order, 0 resets",
        )


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    require(find_binaries() is not None, "PostgreSQL server binaries")
    parent = Path(tempfile.mkdtemp(prefix="ghar-test-broker-"))
    parent.chmod(0o755)
    pg = EmbeddedPostgres(parent / "pg", database="outbox", port=free_port(), durable=False)
    try:
        pg.start()
        run_sync(migrate_dsn(pg.dsn))
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(parent, ignore_errors=True)


async def test_postgres_restarted_while_both_publish(cluster: EmbeddedPostgres) -> None:
    dsn = cluster.dsn
    async with _instance("A", dsn) as a, _instance("B", dsn) as b:
        readers = await _readers([a, b])
        stop = asyncio.Event()
        publishers = [asyncio.ensure_future(_publish(i, stop)) for i in (a, b)]
        try:
            for _ in range(2):
                await asyncio.sleep(0.5)
                before = a.broker.connects, b.broker.connects
                await asyncio.to_thread(cluster.stop)
                await asyncio.sleep(0.5)  # publishing goes on into the queues meanwhile
                await asyncio.to_thread(cluster.start)
                # Both listeners come back by themselves (and read back what they missed).
                await until(
                    lambda b0=before: min(a.broker.connects - b0[0], b.broker.connects - b0[1]) > 0,
                    30,
                )
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*publishers)
        delivered = await _check_complete([a, b], readers)
        assert delivered > 200
        conn: Any = await asyncpg.connect(dsn)
        try:
            # Nothing written twice: one row per event sent.
            assert await conn.fetchval("SELECT count(*) FROM ghar_event_outbox") == delivered
        finally:
            await conn.close()
        assert a.broker.stats()["connects"] >= 3
        section(3, TITLE).add(
            "two instances publishing, Postgres restarted twice",
            f"{delivered} events, every sequence complete and in order, one outbox row each"
            " (none written twice), both listeners back by themselves",
        )
