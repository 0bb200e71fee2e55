"""Case 4: a bounded burst on authenticated routes, with latency percentiles recorded.

2 000 requests at a concurrency of 100 from 100 users (one token each):
half ``GET /api/v1/me``, a quarter writes, a quarter reads of earlier
writes. Every answer must be a 200 or a clean 503 (the pool fails fast by
design), none a 500 or a hang; the acknowledged writes are all in Postgres
once. The figures go to REPORT.md; no time is asserted (benchmarks/ is
where speed is judged).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import aiohttp

from tests.reliability.load import Ledger, verify_writes
from tests.reliability.report import section
from tests.reliability.stack import Answer, Stack, bearer, call, percentiles

REQUESTS = 2000
CONCURRENCY = 100


async def test_a_burst_of_authenticated_requests(stack: Stack) -> None:
    tokens = [stack.provider.token() for _ in range(CONCURRENCY)]
    ledger = Ledger()
    rng = random.Random(17)
    written: list[tuple[str, str]] = []  # (key, token)
    by_route: dict[str, list[Answer]] = {"me": [], "write": [], "read": []}
    gate = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)

    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int) -> None:
            token = tokens[index % CONCURRENCY]
            roll = rng.random()
            async with gate:
                if roll < 0.5 or (roll >= 0.75 and not written):
                    answer = await call(
                        session, "GET", f"{stack.url}/api/v1/me", headers=bearer(token)
                    )
                    by_route["me"].append(answer)
                    ledger.answers.append(("me", answer))
                    if answer.status != 200 and not answer.is_clean_503():
                        ledger.unexpected.append(
                            ("me", "", answer.status, answer.body or answer.error)
                        )
                elif roll < 0.75:
                    key = str(uuid.uuid4())
                    answer = await call(
                        session,
                        "POST",
                        f"{stack.url}/api/v1/writes",
                        headers=bearer(token) | {"Idempotency-Key": key},
                        json={"payload": f"payload-{key}"},
                    )
                    by_route["write"].append(answer)
                    ledger.record_write(key, answer)
                    if answer.status == 200:
                        written.append((key, token))
                else:
                    key, owner = rng.choice(written)
                    answer = await call(
                        session, "GET", f"{stack.url}/api/v1/writes/{key}", headers=bearer(owner)
                    )
                    by_route["read"].append(answer)
                    ledger.record_read(key, f"payload-{key}", answer)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        elapsed = time.perf_counter() - started
    audit = await verify_writes(stack.cluster.dsn, ledger)
    statuses = ledger.statuses()

    report = section(4, "Load: a bounded burst on authenticated routes")
    report.add("burst", f"{REQUESTS} requests at concurrency {CONCURRENCY}, {CONCURRENCY} users")
    report.add(
        "mix",
        f"GET /me {len(by_route['me'])}, POST /writes {len(by_route['write'])}, "
        f"GET /writes/{{id}} {len(by_route['read'])}",
    )
    report.add("answers by status", dict(sorted(statuses.items())))
    report.add("wall time (s)", f"{elapsed:.2f}")
    report.add("throughput (requests/s)", f"{REQUESTS / elapsed:.0f}")
    report.add("latency, all (ms)", percentiles(ledger.latencies()))
    for route, answers in by_route.items():
        report.add(f"latency, {route} (ms)", percentiles([a.seconds for a in answers]))
    report.add(
        "lost",
        f"{len(audit.missing)} acknowledged writes missing, {len(audit.twice)} applied twice",
    )

    assert ledger.unexpected == [], ledger.unexpected[:5]
    assert ledger.bad_reads == []
    assert sum(statuses.values()) == REQUESTS
    assert statuses[200] >= REQUESTS * 0.95  # a burst the pool holds: refusals are the exception
    assert audit.missing == set()
    assert audit.twice == {}
    assert audit.applied_after_503 == set()
