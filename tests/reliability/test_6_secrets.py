"""Case 6: no secret in any log written during the whole reliability suite.

Runs last (marker ``last``): by then every server of the suite has logged
its faults, refusals, outages and shutdowns. It adds traffic of its own that
carries secrets where logs like to look (a token in the ``access_token``
query of the stream and of other routes, refused and accepted tokens), then
reads every server log, PgBouncer's and Postgres's, and looks for every
bearer token, ``access_token`` value, the service-role key, the database
password and the JWT secret handed out (and for the signature part of each
token on its own, a partial leak).
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp
import pytest

from tests.reliability.report import section
from tests.reliability.stack import LOG_FILES, SECRETS, Stack, bearer, call, note_secret


async def _traffic(stack: Stack) -> None:
    token = stack.provider.token()
    query_token = note_secret("access_token value", stack.provider.token())
    async with aiohttp.ClientSession() as session:
        await call(session, "GET", f"{stack.url}/api/v1/me", headers=bearer(token))
        await call(session, "GET", f"{stack.url}/api/v1/me?access_token={quote(query_token)}")
        await call(session, "GET", f"{stack.url}/nowhere?access_token={quote(query_token)}&x=1")
        await call(session, "GET", f"{stack.url}/api/v1/me", headers=bearer(token[:-3] + "abc"))
        await call(
            session,
            "GET",
            f"{stack.url}/api/v1/me",
            headers=bearer(query_token) | {"Cookie": f"sb-access-token={token}"},
        )
        await call(
            session,
            "GET",
            f"{stack.url}/api/v1/events/stream?access_token={quote(query_token)}",
            headers=bearer(token),  # ambiguous credentials: a 400 that must not log either
        )
        try:
            async with (
                asyncio.timeout(1.0),
                session.get(
                    f"{stack.url}/api/v1/events/stream?access_token={quote(query_token)}"
                ) as resp,
            ):
                await resp.content.readline()
        except TimeoutError:
            pass


def _logs(stack: Stack) -> dict[str, bytes]:
    logs = {path.name: path.read_bytes() for path in LOG_FILES if path.exists()}
    for extra in (
        stack.bouncer.directory / "pgbouncer.log",
        stack.cluster.server.log_path,
    ):
        if extra.exists():
            logs[extra.name] = extra.read_bytes()
    return logs


@pytest.mark.last
async def test_no_secret_in_any_log_of_the_suite(stack: Stack) -> None:
    await _traffic(stack)
    await asyncio.sleep(0.5)  # the buffered access log flushes on its own
    logs = _logs(stack)
    needles: list[tuple[str, bytes]] = []
    for kind, values in SECRETS.items():
        for value in values:
            needles.append((kind, value.encode()))
            if kind in ("bearer token", "access_token value") and value.count(".") == 2:
                needles.append((f"{kind} (signature only)", value.rsplit(".", 1)[1].encode()))
    found = [
        (kind, name) for kind, needle in needles for name, text in logs.items() if needle in text
    ]
    lines = sum(text.count(b"\n") for text in logs.values())
    report = section(6, "Secrets in the logs of the whole suite")
    report.add("log files read", f"{len(logs)} ({', '.join(sorted(logs))})")
    report.add("lines read", lines)
    report.add(
        "secrets looked for",
        ", ".join(f"{kind}: {len(values)}" for kind, values in sorted(SECRETS.items())),
    )
    report.add("lost", f"{len(found)} secrets found in the logs")
    assert lines > 20  # the suite did log: an empty log would prove nothing
    # ...and logged the very requests that carried a token in the query, redacted.
    assert any(b"access_token=[REDACTED]" in text for text in logs.values())
    assert {"bearer token", "service-role key", "database password", "JWT secret"} <= set(SECRETS)
    assert found == []
