"""A bounded read/write load on the suite's app, and the ledger that judges it afterwards.

Each worker is one user with its own token. A write is ``POST /writes`` with
a fresh client-generated id as ``Idempotency-Key``; a read fetches one of
the worker's acknowledged writes back. Every answer goes in the
:class:`Ledger`: a 2xx write is *acknowledged*, a 503 write *refused*, and
anything else (a 500, a 4xx, no answer) is *unexpected*. :func:`verify_writes`
then reads the tables straight from Postgres: every acknowledged write is
there exactly once, no refused write is there, and the per-user counters
agree with the rows.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

from tests.reliability.stack import Answer, bearer, call

#: The 503 of a write whose COMMIT was sent but never answered (ghar_core.db_resilience).
COMMIT_OUTCOME_UNKNOWN = "DB_COMMIT_OUTCOME_UNKNOWN"


@dataclass
class Ledger:
    """Every request of a load and what it says about the writes."""

    answers: list[tuple[str, Answer]] = field(default_factory=list)
    writes: list[tuple[str, Answer]] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    unexpected: list[tuple[str, str, int, Any]] = field(default_factory=list)
    bad_reads: list[tuple[str, Any]] = field(default_factory=list)

    def statuses(self) -> Counter[int]:
        return Counter(answer.status for _, answer in self.answers)

    def latencies(self, kind: str | None = None) -> list[float]:
        return [a.seconds for k, a in self.answers if kind is None or k == kind]

    def record_write(self, key: str, answer: Answer) -> None:
        self.answers.append(("write", answer))
        self.writes.append((key, answer))
        if 200 <= answer.status < 300:
            self.acknowledged.add(key)
        elif answer.is_clean_503() and answer.body["error"]["code"] == COMMIT_OUTCOME_UNKNOWN:
            self.unknown.add(key)  # told neither yes nor no: either outcome is right
        elif answer.is_clean_503():
            self.refused.add(key)
        else:
            self.unexpected.append(("write", key, answer.status, answer.body or answer.error))

    def record_read(self, key: str, payload: str, answer: Answer) -> None:
        self.answers.append(("read", answer))
        if answer.status == 200:
            if not isinstance(answer.body, dict) or answer.body.get("payload") != payload:
                self.bad_reads.append((key, answer.body))
        elif not answer.is_clean_503():
            self.unexpected.append(("read", key, answer.status, answer.body or answer.error))


async def write(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    ledger: Ledger,
    *,
    hold: float = 0.0,
    within: float = 15.0,
    key: str | None = None,
) -> tuple[str, Answer]:
    """One write with a fresh id (or ``key``, to resend one), recorded in ``ledger``."""
    key = key or str(uuid.uuid4())
    target = f"{url}/api/v1/writes" + (f"?hold={hold}" if hold else "")
    answer = await call(
        session,
        "POST",
        target,
        within=within,
        headers=bearer(token) | {"Idempotency-Key": key},
        json={"payload": f"payload-{key}"},
    )
    ledger.record_write(key, answer)
    return key, answer


async def run_load(
    url: str,
    tokens: list[str],
    stop: asyncio.Event,
    ledger: Ledger,
    *,
    read_share: float = 0.3,
    pause: float = 0.01,
    limit: int | None = None,
) -> None:
    """One worker per token, writing and reading back until ``stop`` is set (or ``limit``)."""
    budget = [limit]

    async def worker(session: aiohttp.ClientSession, token: str, seed: int) -> None:
        rng = random.Random(seed)
        mine: list[str] = []
        while not stop.is_set():
            if budget[0] is not None:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            if mine and rng.random() < read_share:
                key = rng.choice(mine)
                answer = await call(
                    session, "GET", f"{url}/api/v1/writes/{key}", headers=bearer(token)
                )
                ledger.record_read(key, f"payload-{key}", answer)
            else:
                key, answer = await write(session, url, token, ledger)
                if 200 <= answer.status < 300:
                    mine.append(key)
            await asyncio.sleep(pause)

    connector = aiohttp.TCPConnector(limit=len(tokens) + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session, t, i) for i, t in enumerate(tokens)))


@dataclass
class WriteAudit:
    """What Postgres holds, compared with what the clients were told."""

    missing: set[str]
    twice: dict[str, int]
    applied_after_503: set[str]
    counter_mismatches: dict[str, tuple[int, int]]
    rows: int


async def verify_writes(dsn: str, ledger: Ledger) -> WriteAudit:
    """Read the writes straight from Postgres (not through the app) and judge the ledger."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT write_id::text AS id, count(*) AS n FROM reliability_writes GROUP BY write_id"
        )
        per_user = await conn.fetch(
            "SELECT w.user_id::text AS user_id, count(*) AS n, max(c.writes) AS counted "
            "FROM reliability_writes w JOIN reliability_counters c USING (user_id) "
            "GROUP BY w.user_id"
        )
        keys = {r["key"] for r in await conn.fetch("SELECT key::text AS key FROM reliability_keys")}
    finally:
        await conn.close()
    stored = {r["id"]: r["n"] for r in rows}
    return WriteAudit(
        missing={key for key in ledger.acknowledged if stored.get(key, 0) == 0 or key not in keys},
        twice={key: n for key, n in stored.items() if n > 1},
        applied_after_503={key for key in ledger.refused if key in stored},
        counter_mismatches={
            r["user_id"]: (r["n"], r["counted"]) for r in per_user if r["n"] != r["counted"]
        },
        rows=sum(stored.values()),
    )
