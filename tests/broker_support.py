"""Shared by the broker tests: a recording sink and a started database + broker pair."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg

from ghar_core.broker import PostgresBroker, Record
from ghar_core.config import Settings, load_settings
from ghar_core.database import Database


class Recorder:
    """A real :class:`~ghar_core.broker.Sink` that keeps what it is given, per key."""

    def __init__(self, *keys: str) -> None:
        self.keys = set(keys)
        self.records: dict[str, list[Record]] = defaultdict(list)
        self.resets: list[tuple[str, str, int, str]] = []

    def wants(self, key: str) -> bool:
        return key in self.keys

    def receive(self, record: Record) -> None:
        self.records[record.key].append(record)

    def reset(self, key: str, epoch: str, position: int, reason: str) -> None:
        self.resets.append((key, epoch, position, reason))

    def positions(self, key: str) -> list[int]:
        return [r.position for r in self.records[key]]


def broker_settings(dsn: str, **changes: Any) -> Settings:
    base = load_settings(app_env="test", environ={})
    return dataclasses.replace(base, **{"DATABASE_URL": dsn, "EVENT_BROKER": "postgres", **changes})


@contextlib.asynccontextmanager
async def instance(
    dsn: str,
    *,
    direct_dsn: str | None = None,
    changes: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[PostgresBroker]:
    """A started Database on ``dsn`` and a started PostgresBroker over it (one "instance").

    ``changes``: settings that differ from the test defaults; ``options`` go to the broker.
    """
    settings = broker_settings(dsn, **(changes or {}))
    database = Database(settings)
    await database.start()
    broker = PostgresBroker(settings, database, direct_dsn=direct_dsn, **options)
    try:
        await broker.start()
        assert await broker.wait_connected(10)
        yield broker
    finally:
        await broker.stop(grace=5)
        await database.stop(grace=2)


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> float:
    """Wait until ``condition()`` holds; how long it took (TimeoutError past ``seconds``)."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - polls state other tasks change
            await asyncio.sleep(0.01)
    return time.monotonic() - started


async def kill_listeners(dsn: str, application_name: str = "ghar-core-listen") -> int:
    """``pg_terminate_backend`` every LISTEN connection of the brokers; how many.

    ``application_name="ghar-core-outbox"``: their outbox writers' connections instead.
    """
    conn = await asyncpg.connect(dsn)
    try:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            application_name,
        )
    finally:
        await conn.close()
    return killed
