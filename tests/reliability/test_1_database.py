"""Case 1: Postgres and PgBouncer faults under a read/write load on ``ghar-core serve``.

While 12 users write and read back, the suite terminates random backends,
kills PgBouncer with SIGKILL and restarts it, stops Postgres (fast shutdown)
and starts it again. Every answer must be a success or a 503 envelope with
``Retry-After`` (never a 500, never a hang), the app must be back within 2 s
of Postgres accepting connections, without a restart; afterwards Postgres
itself is read: every acknowledged write is there once, no refused write is
there, the counters agree with the rows, and the pools are back to idle.
A statement past ``DB_COMMAND_TIMEOUT`` must become a 503 and stop running
on the server.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import asyncpg
import pytest

from tests.reliability.load import Ledger, run_load, verify_writes, write
from tests.reliability.report import section
from tests.reliability.stack import Stack, bearer, call, percentiles

WORKERS = 12
RECOVERY_BOUND = 2.0


async def _terminate_backends(dsn: str, count: int) -> int:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        killed: int = await conn.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
            "ORDER BY random() LIMIT $2) AS t",
            "reliability",
            count,
        )
        return killed
    finally:
        await conn.close()


async def _recovery(stack: Stack, token: str, ledger: Ledger) -> float:
    """Seconds from now until a write is acknowledged again (probing every 50 ms)."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < 30:
            _, answer = await write(session, stack.url, token, ledger, timeout=10)
            if 200 <= answer.status < 300:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
    return float("inf")


async def _pools_idle(url: str, seconds: float = 10.0) -> dict[str, int]:
    """The main pool's stats once nothing is in use (or the last seen after ``seconds``)."""
    deadline = time.monotonic() + seconds
    stats: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            answer = await call(session, "GET", f"{url}/ready")
            if answer.status == 200:
                stats = answer.body["stats"]["database"]["main"]
                # /ready itself holds one connection while it checks.
                if stats["in_use"] <= 1 and stats["waiters"] == 0:
                    return stats
            await asyncio.sleep(0.2)
    return stats


async def test_postgres_and_pgbouncer_faults_under_load(stack: Stack) -> None:
    tokens = [stack.provider.token(email=f"load{i}@example.com") for i in range(WORKERS)]
    probe_token = stack.provider.token(email="probe@example.com")
    ledger = Ledger()
    stop = asyncio.Event()
    faults: list[str] = []
    load = asyncio.create_task(run_load(stack.url, tokens, stop, ledger))
    try:
        await asyncio.sleep(1.5)
        for _ in range(4):
            killed = await _terminate_backends(stack.cluster.dsn, 2)
            faults.append(f"pg_terminate_backend of {killed} random backends")
            await asyncio.sleep(0.4)
        await asyncio.sleep(1.0)

        await asyncio.to_thread(stack.bouncer.kill)
        faults.append("PgBouncer killed with SIGKILL, restarted 0.5 s later")
        await asyncio.sleep(0.5)
        await asyncio.to_thread(stack.bouncer.start)
        bouncer_back = await _recovery(stack, probe_token, ledger)
        await asyncio.sleep(1.0)

        await asyncio.to_thread(stack.cluster.stop)
        faults.append("Postgres stopped (fast shutdown) for 2 s, then started")
        await asyncio.sleep(2.0)
        await asyncio.to_thread(stack.cluster.start)
        postgres_back = await _recovery(stack, probe_token, ledger)
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await load
    pools = await _pools_idle(stack.url)
    audit = await verify_writes(stack.cluster.dsn, ledger)

    statuses = ledger.statuses()
    report = section(1, "Postgres and PgBouncer faults under a read/write load")
    report.add("load", f"{WORKERS} users writing (70%) and reading back (30%) without pause")
    report.add("requests", sum(statuses.values()))
    report.add("answers by status", dict(sorted(statuses.items())))
    report.add("writes acknowledged / refused with 503", f"{len(ledger.acknowledged)} / {len(ledger.refused)}")
    report.add("latency, all requests (ms)", percentiles(ledger.latencies()))
    report.add("back after PgBouncer restart (s)", f"{bouncer_back:.2f}")
    report.add(f"back after Postgres returned (s, bound {RECOVERY_BOUND:g})", f"{postgres_back:.2f}")
    report.add("main pool after the load", pools)
    report.add(
        "lost",
        f"{len(audit.missing)} acknowledged writes missing, {len(audit.twice)} applied twice, "
        f"{len(audit.applied_after_503)} applied after a 503, "
        f"{len(audit.counter_mismatches)} counters off ({audit.rows} rows checked)",
    )
    for fault in faults:
        report.note(f"fault: {fault}")

    assert ledger.unexpected == [], ledger.unexpected[:10]
    assert ledger.bad_reads == []
    assert set(statuses) <= {200, 503}
    assert statuses[200] > 0 and statuses[503] > 0  # the faults were felt, and survived
    assert postgres_back <= RECOVERY_BOUND
    assert bouncer_back <= RECOVERY_BOUND
    assert audit.missing == set()
    assert audit.twice == {}
    assert audit.applied_after_503 == set()
    assert audit.counter_mismatches == {}
    assert pools["waiters"] == 0 and pools["in_use"] <= 1
    assert pools["size"] <= pools["max_size"]


@pytest.mark.xfail(
    strict=True,
    reason="issue 9: a statement past the command timeout is abandoned, not cancelled on the server",
)
async def test_a_statement_past_the_command_timeout_is_a_503_and_cancelled_on_the_server(
    stack: Stack,
) -> None:
    token = stack.provider.token(email="slow@example.com")
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(
                call(session, "GET", f"{stack.url}/api/v1/slow?seconds=30", headers=bearer(token))
                for _ in range(3)
            )
        )
        elapsed = time.monotonic() - started
        # Meanwhile the rest of the app answers.
        ok = await call(session, "GET", f"{stack.url}/api/v1/me", headers=bearer(token))
    await asyncio.sleep(0.5)
    conn = await asyncpg.connect(stack.cluster.dsn, timeout=5)
    try:
        still_running = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
            "AND state = 'active' AND pid <> pg_backend_pid()"
        )
        # Whatever the verdict, leave no sleeper holding a PgBouncer slot for later cases.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'SELECT pg_sleep%' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    report = section(1, "Postgres and PgBouncer faults under a read/write load")
    report.add(
        "statements past DB_COMMAND_TIMEOUT=2 s (3 x pg_sleep(30))",
        f"answers {[a.status for a in answers]} in {elapsed:.1f} s; "
        f"{still_running} still running on the server 0.5 s later",
    )
    assert all(a.is_clean_503() for a in answers), answers
    assert elapsed < 15
    assert ok.status == 200
    assert still_running == 0
