"""Case 5b: malformed HTTP, hostile request ids and bodies, slow and vanishing clients.

Each request is written byte for byte on a raw socket to ``ghar-core
serve``; what comes back must be a 4xx (with our envelope when the app
answered) or a closed connection: never a 5xx, never a hang. The request
targets are authenticated routes, so a request the server does parse
without a token is a 401, and a 2xx would mean something slipped through.
Afterwards the server is healthy: ``/ready`` is 200, the pool is idle, no
event-stream subscription is left behind and an authenticated write works.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
import uuid

import aiohttp
from hypothesis import HealthCheck, given, settings

from tests.reliability.rawhttp import clean, exchange
from tests.reliability.report import section
from tests.reliability.stack import Stack, bearer, call
from tests.strategies import mutated_http_requests

TITLE = "Hostile input"
_VALID_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def malformed_requests() -> list[tuple[str, bytes]]:
    host = b"Host: 127.0.0.1\r\n"
    target = b"POST /api/v1/writes HTTP/1.1\r\n" + host
    return [
        ("garbage request line", b"GARBAGE\r\n\r\n"),
        ("binary junk", bytes(range(256)) * 4),
        (
            "TLS hello on the plain port",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
        ),
        ("unknown HTTP version", b"POST /api/v1/writes HTTP/9.9\r\n" + host + b"\r\n"),
        ("no version", b"POST /api/v1/writes\r\n" + host + b"\r\n"),
        ("NUL in the target", b"POST /api/v1/wri\x00tes HTTP/1.1\r\n" + host + b"\r\n"),
        ("space in the target", b"POST /api/v1/wr ites HTTP/1.1\r\n" + host + b"\r\n"),
        (
            "absolute target elsewhere",
            b"POST http://evil.example/api/v1/writes HTTP/1.1\r\n" + host + b"\r\n",
        ),
        (
            "100 KB target",
            b"POST /api/v1/writes?" + b"a" * 100_000 + b" HTTP/1.1\r\n" + host + b"\r\n",
        ),
        ("header without a colon", target + b"BadHeader\r\n\r\n"),
        ("space in a header name", target + b"Bad Name: x\r\n\r\n"),
        ("obsolete line folding", target + b"X-A: a\r\n  folded\r\n\r\n"),
        ("bare LF line ends", b"POST /api/v1/writes HTTP/1.1\nHost: 127.0.0.1\n\n"),
        ("control characters in a value", target + b"X-A: a\x01\x02\x7f\r\n\r\n"),
        ("one 64 KB header", target + b"X-Big: " + b"x" * 65_536 + b"\r\n\r\n"),
        (
            "2 MB of headers",
            target + b"".join(b"X-H%d: %s\r\n" % (i, b"y" * 8000) for i in range(256)) + b"\r\n",
        ),
        (
            "10 000 tiny headers",
            target + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000)) + b"\r\n",
        ),
        ("negative Content-Length", target + b"Content-Length: -1\r\n\r\n"),
        ("non-numeric Content-Length", target + b"Content-Length: ten\r\n\r\n"),
        (
            "two different Content-Lengths",
            target + b"Content-Length: 2\r\nContent-Length: 20\r\n\r\n{}",
        ),
        (
            "Content-Length and chunked (smuggling)",
            target
            + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"0\r\n\r\nGET /ready HTTP/1.1\r\n\r\n",
        ),
        (
            "chunk size not hex",
            target + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "chunk size overflowing",
            target + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nab\r\n0\r\n\r\n",
        ),
        (
            "chunk longer than announced",
            target + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n",
        ),
        ("unknown transfer coding", target + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST /api/v1/writes HTTP/1.0\r\n"
            + host
            + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "Expect: 100-continue, then nothing",
            target + b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        ),
        (
            "upgrade to h2c",
            target
            + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            + b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        ),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("unknown method", b"BREW /api/v1/writes HTTP/1.1\r\n" + host + b"\r\n"),
        ("1 KB method", b"G" * 1024 + b" /api/v1/writes HTTP/1.1\r\n" + host + b"\r\n"),
    ]


async def test_malformed_http_over_raw_sockets(stack: Stack) -> None:
    assert stack.server is not None
    port = stack.server.port
    results = [(name, await exchange(port, data)) for name, data in malformed_requests()]
    unclean = [(name, r.status, r.hung, r.head[:80]) for name, r in results if not clean(r)]
    report = section(5, TITLE)
    seen: dict[str, int] = {}
    for _, r in results:
        label = "closed" if r.status is None else str(r.status)
        seen[label] = seen.get(label, 0) + 1
    report.add("malformed HTTP requests tried (raw sockets)", len(results))
    report.add("malformed HTTP answers", dict(sorted(seen.items())))
    report.note("malformed HTTP: " + "; ".join(name for name, _ in results))
    assert unclean == []
    await _healthy(stack)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=mutated_http_requests)
async def test_mutated_requests_get_a_clean_refusal(stack: Stack, data: bytes) -> None:
    assert stack.server is not None
    raw = await exchange(stack.server.port, data, half_close=True)
    # Unauthenticated: whatever the server makes of it, never a success, never a 5xx.
    assert clean(raw), (data, raw.status, raw.hung, raw.head[:120])


async def test_hostile_request_ids_are_never_echoed(stack: Stack) -> None:
    assert stack.server is not None
    hostile = [
        b"a" * 10_000,
        b"id with spaces",
        b"\x1b[31mred\x1b[0m",
        b"id\x7f\x01",
        b"<script>alert(1)</script>",
        b"../../etc/passwd",
        b"\xff\xfe\xfd",
        b"id%0d%0aSet-Cookie:%20x=1",
        b"",
    ]
    answers = []
    for value in hostile:
        raw = await exchange(
            stack.server.port,
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Request-ID: "
            + value
            + b"\r\n\r\n",
        )
        echoed = re.search(rb"(?im)^x-request-id:\s*(.*?)\r?$", raw.head)
        answers.append((value, raw.status, echoed.group(1) if echoed else None))
    report = section(5, TITLE)
    report.add("hostile X-Request-ID values tried", len(hostile))
    report.add(
        "request ids answered",
        f"{sum(1 for _, s, _ in answers if s == 200)} answered 200 with a fresh id, "
        f"{sum(1 for v, _, e in answers if e == v)} echoed",
    )
    for value, status, echoed in answers:
        assert status in (200, 400, 431, None), (value[:40], status)
        if status == 200:
            assert echoed is not None
            assert echoed != value
            assert _VALID_ID.fullmatch(echoed.decode()), echoed
    # None of them reached the log as it was sent (no terminal escapes, no forged lines).
    log = stack.server.log_path.read_bytes()
    assert b"\x1b[31mred" not in log
    assert b"<script>alert(1)</script>" not in log


async def test_oversize_and_malformed_bodies(stack: Stack) -> None:
    token = stack.provider.token(email="bodies@example.com")
    url = f"{stack.url}/api/v1/writes"
    cases: list[tuple[str, dict[str, str], bytes, set[int]]] = [
        (
            "2 MB JSON (over MAX_BODY_SIZE)",
            {"Content-Type": "application/json"},
            b'{"payload": "' + b"x" * 2_000_000 + b'"}',
            {413},
        ),
        ("invalid JSON", {"Content-Type": "application/json"}, b'{"payload": ', {400}),
        ("not JSON at all", {"Content-Type": "application/json"}, b"\x00\x01\x02", {400}),
        ("invalid UTF-8", {"Content-Type": "application/json"}, b'{"payload": "\xff\xfe"}', {400}),
        (
            "JSON nested 100 000 deep",
            {"Content-Type": "application/json"},
            b"[" * 100_000 + b"]" * 100_000,
            {400},
        ),
        (
            "a number past float range",
            {"Content-Type": "application/json"},
            b'{"payload": 1e999}',
            {400, 422},
        ),
        ("NaN", {"Content-Type": "application/json"}, b'{"payload": NaN}', {400}),
        ("a list, not an object", {"Content-Type": "application/json"}, b'["payload"]', {422}),
        (
            "payload of the wrong type",
            {"Content-Type": "application/json"},
            b'{"payload": {"a": 1}}',
            {422},
        ),
        ("empty body", {"Content-Type": "application/json"}, b"", {400, 422}),
        (
            "form-encoded",
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"payload=x",
            {415},
        ),
        ("no content type", {}, b'{"payload": "x"}', {200, 415}),
    ]
    results = []
    async with aiohttp.ClientSession() as session:
        for name, headers, body, allowed in cases:
            key = str(uuid.uuid4())
            answer = await call(
                session,
                "POST",
                url,
                headers=bearer(token) | {"Idempotency-Key": key} | headers,
                data=io.BytesIO(body) if len(body) > 100_000 else body,
            )
            results.append((name, answer.status, allowed, answer.body))

        # The same through chunked encoding, past the limit: refused while streaming.
        async def stream() -> object:
            for _ in range(40):
                yield b"x" * 65_536

        chunked = await call(
            session,
            "POST",
            url,
            headers=bearer(token)
            | {"Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"},
            data=stream(),
        )
    report = section(5, TITLE)
    report.add("malformed and oversize bodies tried", len(cases) + 1)
    report.add(
        "body answers",
        ", ".join(f"{name}: {status}" for name, status, _, _ in results)
        + f", 2.6 MB chunked: {chunked.status or chunked.error}",
    )
    wrong = [(n, s, b) for n, s, allowed, b in results if s not in allowed]
    assert wrong == []
    for _, status, _, body in results:
        if status >= 400:
            assert isinstance(body, dict)
            assert set(body["error"]) >= {"code", "message"}
    assert chunked.status == 413 or (chunked.status == 0 and chunked.error != "hang")
    await _healthy(stack)


async def test_slow_clients_and_early_disconnects(stack: Stack) -> None:
    assert stack.server is not None
    port = stack.server.port
    token = stack.provider.token(email="vanishing@example.com")

    async def half_and_close(data: bytes) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    auth = f"Authorization: Bearer {token}\r\n".encode()
    vanishing = [
        b"POST /api/v1/wri",
        b"POST /api/v1/writes HTTP/1.1\r\nHost: a\r\n"
        + auth
        + b'Content-Length: 1000\r\n\r\n{"pay',
        b"GET /api/v1/slow?seconds=1 HTTP/1.1\r\nHost: a\r\n" + auth + b"\r\n",
        b"GET /api/v1/events/stream HTTP/1.1\r\nHost: a\r\n" + auth + b"\r\n",
        b"POST /api/v1/writes HTTP/1.1\r\nHost: a\r\n"
        + auth
        + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"pa',
    ]
    for data in vanishing * 6:
        await half_and_close(data)

    # Slow clients: 20 connections dribbling a request one byte every 0.25 s.
    async def dribble(stop: asyncio.Event) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for byte in b"POST /api/v1/writes HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 200:
                if stop.is_set():
                    return
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.25)
        except OSError:
            return
        finally:
            writer.close()

    stop = asyncio.Event()
    slow = [asyncio.create_task(dribble(stop)) for _ in range(20)]
    await asyncio.sleep(0.5)
    latencies = []
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            answer = await call(
                session, "GET", f"{stack.url}/api/v1/me", headers=bearer(token), within=5
            )
            latencies.append(answer)
    stop.set()
    await asyncio.gather(*slow)
    report = section(5, TITLE)
    report.add("clients vanishing mid-request (5 kinds x 6)", len(vanishing) * 6)
    report.add(
        "requests served while 20 slow clients dribbled headers",
        f"{sum(a.status == 200 for a in latencies)}/20 answered 200, slowest "
        f"{max(a.seconds for a in latencies) * 1000:.0f} ms",
    )
    assert all(a.status == 200 for a in latencies)
    await _healthy(stack)


async def test_a_client_that_never_finishes_its_headers_is_cut_off(stack: Stack) -> None:
    assert stack.server is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.server.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: a\r\n")
    await writer.drain()
    started = time.monotonic()
    try:
        # HEAD_TIMEOUT is 3 s in the stack: a 408 (or a close) well within 8 s.
        data = await asyncio.wait_for(reader.read(), 8)
    except TimeoutError:
        data = None
    finally:
        writer.close()
    waited = time.monotonic() - started
    section(5, TITLE).add(
        "a client that never finishes its headers (HEAD_TIMEOUT=3)",
        "still open after 8 s" if data is None else f"{data[:12].decode()!r} after {waited:.1f} s",
    )
    assert data is not None
    assert data == b"" or data.startswith(b"HTTP/1.1 408")


async def test_a_header_block_past_any_production_limit_is_refused_before_the_app(
    stack: Stack,
) -> None:
    assert stack.server is not None
    target = b"GET /api/v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    many = target + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000)) + b"\r\n"
    big = target + b"".join(b"X-H%d: %s\r\n" % (i, b"y" * 8000) for i in range(256)) + b"\r\n"
    answers = [await exchange(stack.server.port, data) for data in (many, big)]
    section(5, TITLE).add(
        "10 000 headers / 2 MB of headers", " / ".join(str(a.status or "closed") for a in answers)
    )
    # Refused by the server itself (431 or 400, or the connection closed), not by the app's 401.
    assert all(a.status in (400, 431, None) for a in answers), [a.status for a in answers]
    await _healthy(stack)


async def test_http11_without_a_host_or_with_two_is_a_400(stack: Stack) -> None:
    assert stack.server is not None
    requests = [
        b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ]
    answers = [await exchange(stack.server.port, data) for data in requests]
    section(5, TITLE).add(
        "HTTP/1.1 without Host / with two", " / ".join(str(a.status) for a in answers)
    )
    assert [a.status for a in answers] == [400, 400]


async def _healthy(stack: Stack) -> None:
    """The server answers, its pool is idle and no stream subscription leaked."""
    token = stack.provider.token()
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            ready = await call(session, "GET", f"{stack.url}/ready")
            stats = ready.body["stats"] if ready.status == 200 else {}
            if (
                stats
                and stats["database"]["main"]["in_use"] <= 1
                and stats["sse"]["subscribers"] == 0
            ):
                break
            await asyncio.sleep(0.1)
        assert ready.status == 200, ready
        assert stats["database"]["main"]["in_use"] <= 1
        assert stats["sse"]["subscribers"] == 0
        write = await call(
            session,
            "POST",
            f"{stack.url}/api/v1/writes",
            headers=bearer(token) | {"Idempotency-Key": str(uuid.uuid4())},
            json={"payload": "after"},
        )
        assert write.status == 200, write
