"""The pool's hand-off of released connections to waiters, under cancellations.

Many tasks lease from a small pool; each is cancelled (or times out) at a
random loop iteration around its wait and the hand-off, some leases have
their backend killed, the acquire timeout is short. Afterwards every holder
must be free, in the queue exactly once, and every lease must have ended in
a working connection, a cancellation or a clean 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from typing import Any

import asyncpg

from ghar_core.config import Settings
from ghar_core.database import Database
from ghar_core.exceptions import DatabaseUnavailableException, PoolExhaustedException
from tests.pg import started


def _settled(database: Database, size: int) -> None:
    raw: Any = database._pool(False).pool
    queue = raw._queue
    holders = list(raw._holders)
    assert len(holders) == size
    assert all(h._in_use is None for h in holders), "a holder is still leased"
    assert sorted(map(id, queue._queue)) == sorted(map(id, holders)), "holder lost or doubled"
    assert not [g for g in queue._getters if not g.done()]
    stats = database.stats()["main"]
    assert stats["in_use"] == 0
    assert stats["waiters"] == 0


async def _storm(database: Database, seed: int, tasks: int, size: int) -> dict[str, int]:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    pids: list[int] = []

    def count(name: str) -> None:
        outcomes[name] = outcomes.get(name, 0) + 1

    async def lease(i: int) -> None:
        try:
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            async with database.connection() as conn:
                value = await conn.fetchval("SELECT $1::int", i)
                assert value == i
                if rng.random() < 0.3:
                    pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
                for _ in range(rng.randrange(4)):
                    await asyncio.sleep(0)
                if rng.random() < 0.2:
                    await conn.fetchval("SELECT pg_sleep(0.002)")
            count("ok")
        except asyncio.CancelledError:
            count("cancelled")
        except PoolExhaustedException:
            count("503 exhausted")
        except DatabaseUnavailableException:
            count("503 unavailable")

    async def killer(admin: asyncpg.Connection) -> None:
        while True:
            await asyncio.sleep(0.003)
            if pids and rng.random() < 0.3:
                await admin.execute("SELECT pg_terminate_backend($1)", pids.pop())

    async def cancel_after(task: asyncio.Task[None], ticks: int) -> None:
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()

    admin = await asyncpg.connect(database.dsn)
    kill = asyncio.create_task(killer(admin))
    try:
        running = []
        cancellers = []
        for i in range(tasks):
            task = asyncio.create_task(lease(i))
            running.append(task)
            if rng.random() < 0.5:
                cancellers.append(asyncio.create_task(cancel_after(task, rng.randrange(40))))
            if rng.random() < 0.2:
                await asyncio.sleep(0)
        async with asyncio.timeout(30):
            await asyncio.gather(*running, *cancellers)
    finally:
        kill.cancel()
        await asyncio.gather(kill, return_exceptions=True)
        await admin.close()
    return outcomes


async def test_random_cancellations_around_the_hand_off_lose_no_connection(
    db_settings: Settings,
) -> None:
    size = 3
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=size,
        DB_POOL_MAX_SIZE=size,
        DB_POOL_ACQUIRE_TIMEOUT=0.05,
    ) as database:
        totals: dict[str, int] = {}
        for seed in range(12):
            outcomes = await _storm(database, seed, tasks=150, size=size)
            for name, n in outcomes.items():
                totals[name] = totals.get(name, 0) + n
            # Let the last kills land (a lease on a backend killed that instant is
            # a clean 503, not a replacement: asyncpg may have read the FATAL
            # message with the end of the stream still on its way), reconnects
            # and asyncpg's floor upkeep finish, then look.
            await asyncio.sleep(0.2)
            raw: Any = database._pool(False).pool
            for _ in range(300):
                if len(raw._queue._queue) == size and raw._maintenance_task is None:
                    break
                await asyncio.sleep(0.01)
            _settled(database, size)
            # Every connection still works.
            async with asyncio.timeout(5):
                await asyncio.gather(*(_one(database) for _ in range(size * 3)))
            _settled(database, size)
        assert totals.get("ok", 0) > 0, totals
        assert totals.get("cancelled", 0) > 0, totals


async def _one(database: Database) -> None:
    async with database.connection() as conn:
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_release_at_the_waiters_acquire_timeout_loses_nothing(
    db_settings: Settings,
) -> None:
    settings = dataclasses.replace(
        db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1, DB_POOL_ACQUIRE_TIMEOUT=0.02
    )
    database = Database(settings)
    await database.start()
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    seen: dict[str, int] = {}
    try:
        for _ in range(150):
            taken = asyncio.Event()
            go = asyncio.Event()

            async def hold(taken: asyncio.Event, go: asyncio.Event) -> None:
                async with database.connection():
                    taken.set()
                    await go.wait()

            async def wait() -> str:
                try:
                    async with database.connection() as conn:
                        assert await conn.fetchval("SELECT 1") == 1
                    return "ok"
                except PoolExhaustedException:
                    return "503"

            holder = asyncio.create_task(hold(taken, go))
            await taken.wait()
            waiter = asyncio.create_task(wait())
            await asyncio.sleep(0)  # the waiter is queued, its deadline armed
            # Release within a few hundred microseconds of its deadline, either side.
            loop.call_later(0.02 + rng.uniform(-0.0005, 0.0005), go.set)
            await holder
            outcome = await waiter
            seen[outcome] = seen.get(outcome, 0) + 1
            assert database.stats()["main"]["exhausted"] == seen.get("503", 0)
            _settled(database, 1)
        assert set(seen) <= {"ok", "503"}
    finally:
        await database.stop()


async def _waiters(database: Database, n: int) -> list[asyncio.Task[str]]:
    async def wait() -> str:
        try:
            async with database.connection() as conn:
                assert await conn.fetchval("SELECT 1") == 1
            return "ok"
        except PoolExhaustedException:
            return "503 exhausted"
        except DatabaseUnavailableException:
            return "503 unavailable"

    tasks = [asyncio.create_task(wait()) for _ in range(n)]
    for _ in range(5):
        await asyncio.sleep(0)
    return tasks


async def test_expire_connections_while_waiters_wait_serves_them_fresh_ones(
    db_settings: Settings,
) -> None:
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=2,
        DB_POOL_MAX_SIZE=2,
        DB_POOL_ACQUIRE_TIMEOUT=5,
    ) as database:
        release = asyncio.Event()
        ready = asyncio.Semaphore(0)

        async def hold() -> None:
            async with database.connection():
                ready.release()
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        for _ in range(2):
            await ready.acquire()
        waiters = await _waiters(database, 6)
        assert database.stats()["main"]["waiters"] == 6
        raw: Any = database._pool(False).pool
        await raw.expire_connections()
        release.set()
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*waiters)
            await asyncio.gather(*holders)
        assert outcomes == ["ok"] * 6
        _settled(database, 2)


async def test_stop_and_terminate_while_waiters_wait_end_every_waiter(
    db_settings: Settings,
) -> None:
    for how in ("stop", "terminate"):
        settings = dataclasses.replace(
            db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1, DB_POOL_ACQUIRE_TIMEOUT=1
        )
        database = Database(settings)
        await database.start()
        release = asyncio.Event()
        held = asyncio.Event()

        async def hold(held: asyncio.Event, release: asyncio.Event, db: Database) -> str:
            try:
                async with db.connection() as conn:
                    held.set()
                    await release.wait()
                    await conn.fetchval("SELECT 1")
                return "ok"
            except DatabaseUnavailableException:
                return "503"

        holder = asyncio.create_task(hold(held, release, database))
        await held.wait()
        waiters = await _waiters(database, 4)
        if how == "stop":
            stopping = asyncio.create_task(database.stop(grace=0.5))
            await asyncio.sleep(0.05)
            release.set()
            await stopping
        else:
            database.terminate()
            release.set()
        async with asyncio.timeout(5):
            outcomes = await asyncio.gather(*waiters)
            await holder
        assert set(outcomes) <= {"ok", "503 exhausted", "503 unavailable"}, (how, outcomes)
        if how == "terminate":
            assert "ok" not in outcomes, outcomes


async def test_the_watchdog_times_out_a_statement_a_waiter_waits_behind_and_ends_with_stop(
    db_settings: Settings,
) -> None:
    before = set(threading.enumerate())
    async with started(
        db_settings,
        DB_POOL_MIN_SIZE=1,
        DB_POOL_MAX_SIZE=1,
        DB_POOL_ACQUIRE_TIMEOUT=5,
        DB_COMMAND_TIMEOUT=0.3,
    ) as database:
        held = asyncio.Event()

        async def overdue() -> BaseException | None:
            try:
                async with database.connection() as conn:
                    held.set()
                    await conn.fetchval("SELECT pg_sleep(5)")
            except DatabaseUnavailableException as exc:
                return exc.__cause__
            return None

        slow = asyncio.create_task(overdue())
        await held.wait()
        waiters = await _waiters(database, 2)
        async with asyncio.timeout(4):  # a bound well under pg_sleep(5)
            cause = await slow
            outcomes = await asyncio.gather(*waiters)
        assert isinstance(cause, TimeoutError)
        assert outcomes == ["ok", "ok"]
        _settled(database, 1)
    # Stopped: the watchdog threads end (they wake at least every half second).
    for _ in range(60):
        if not [t for t in set(threading.enumerate()) - before if "watchdog" in t.name]:
            break
        await asyncio.sleep(0.05)
    assert not [t for t in set(threading.enumerate()) - before if "watchdog" in t.name]


async def test_a_held_connection_killed_while_waiters_wait_goes_to_them_reconnected(
    db_settings: Settings,
) -> None:
    settings = dataclasses.replace(
        db_settings, DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1, DB_POOL_ACQUIRE_TIMEOUT=5
    )
    database = Database(settings)
    await database.start()
    admin = await asyncpg.connect(database.dsn)
    try:
        for quiet in (True, False):
            release = asyncio.Event()
            held: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            async def hold(held: asyncio.Future[int], release: asyncio.Event, quiet: bool) -> str:
                try:
                    async with database.connection() as conn:
                        held.set_result(await conn.fetchval("SELECT pg_backend_pid()"))
                        await release.wait()
                        if not quiet:
                            await conn.fetchval("SELECT 1")
                    return "ok"
                except DatabaseUnavailableException:
                    return "503"

            holder = asyncio.create_task(hold(held, release, quiet))
            pid = await held
            waiters = await _waiters(database, 3)
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.2)  # asyncpg notices; the holder goes to the first waiter
            release.set()
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*waiters)
                held_outcome = await holder
            assert outcomes == ["ok"] * 3
            assert held_outcome == ("ok" if quiet else "503")
            _settled(database, 1)
    finally:
        await admin.close()
        await database.stop()
