"""The event stream over real sockets: uvicorn on loopback, real HTTP clients.

Framing, keepalive, the send timeout (a client that stops reading), a client
that goes away, resume across a real reconnect, and shutdown: ``ghar-core
serve`` and plain uvicorn holding 500 open streams exit promptly on SIGTERM,
each stream ending with a final ``retry:``, with no traceback in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time

import aiohttp
import orjson
import pytest

from ghar_core.asgi import create_app
from ghar_core.auth import SupabaseAuth
from ghar_core.http import HTTPClients
from ghar_core.sse import SSEEventBus
from tests.asgi.sse_support import parse_blocks, sse_settings, start_served, token_for
from tests.asgi.test_e2e_uvicorn import serve

STREAM = "/api/v1/events/stream"


def _app(**changes: object) -> tuple[object, SSEEventBus]:
    settings = sse_settings(**{"SSE_HEARTBEAT_INTERVAL": 0.1, **changes})
    bus = SSEEventBus(settings, handle_signals=False)
    return create_app(
        settings, core_resources=False, resources=[HTTPClients(), SupabaseAuth(settings), bus]
    ), bus


async def _blocks(response: aiohttp.ClientResponse, count: int) -> list[dict[str, str]]:
    """Read until ``count`` complete blocks (keepalives included) have arrived."""
    text = ""
    async with asyncio.timeout(5):
        while len(parse_blocks(text[: text.rfind("\n\n") + 2])) < count:
            text += (await response.content.readany()).decode()
    return parse_blocks(text[: text.rfind("\n\n") + 2])[:count]


async def _until(condition, seconds: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    """Wait until ``condition()`` holds; returns how long it took."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - polls state another task changes
            await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_frames_keepalive_and_a_client_that_goes_away() -> None:
    app, bus = _app()
    user, token = token_for()
    async with serve(app) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}{STREAM}", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert r.headers["Cache-Control"] == "no-cache"
            assert r.headers["X-Accel-Buffering"] == "no"
            (opening,) = await _blocks(r, 1)
            epoch = bus.log.head(user)[0]
            assert opening == {"retry": "3000", "id": f"{epoch}:0"}
            assert bus.emit(user, {"type": "visit.booked", "at": "10:00"}) == 1
            blocks = await _blocks(r, 2)
            event = next(b for b in blocks if "event" in b)
            assert event["id"] == f"{epoch}:1"
            assert orjson.loads(event["data"]) == {"type": "visit.booked", "at": "10:00"}
            assert {":": "keepalive"} in await _blocks(r, 3)
        # The client closed its connection: unsubscribed within a second.
        assert await _until(lambda: bus.stats()["subscribers"] == 0, 1.0) < 1.0
        assert bus.stats()["users"] == 0


async def test_resume_across_a_real_reconnect_gets_exactly_the_missed_events() -> None:
    app, bus = _app()
    user, token = token_for()
    async with serve(app) as base, aiohttp.ClientSession() as http:
        url = f"{base}{STREAM}"
        auth = {"Authorization": f"Bearer {token}"}
        async with http.get(url, headers=auth) as r:
            await _blocks(r, 1)
            for i in range(3):
                bus.emit(user, {"type": "tick", "i": i})
            blocks = [b for b in await _blocks(r, 4) if "event" in b]
        last = blocks[-1]["id"]
        await _until(lambda: bus.stats()["subscribers"] == 0)
        for i in range(3, 6):
            bus.emit(user, {"type": "tick", "i": i})  # missed while away
        async with http.get(url, headers={**auth, "Last-Event-ID": last}) as r:
            await _until(lambda: bus.stats()["subscribers"] == 1)
            bus.emit(user, {"type": "tick", "i": 6})  # live after the replay
            got = [b for b in await _blocks(r, 5) if "event" in b]
        assert [orjson.loads(b["data"])["i"] for b in got] == [3, 4, 5, 6]


async def test_a_client_that_stops_reading_is_dropped_by_the_send_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, bus = _app(SSE_SEND_TIMEOUT=0.3, SSE_HEARTBEAT_INTERVAL=30.0)
    user, token = token_for()
    big = "x" * 65536
    async with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET {STREAM} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        try:
            await _until(lambda: bus.stats()["subscribers"] == 1)
            (sub,) = bus.subscriptions()
            # Never read again: the socket fills, the server's write blocks, the timeout
            # drops it (emits slow enough that the queue is not reaped as stalled first).
            sent = 0
            async with asyncio.timeout(20):
                while not sub.closed:
                    bus.emit(user, {"type": "bulk", "payload": big})
                    sent += 1
                    await asyncio.sleep(0.01)
            assert sub.close_reason == "send_timeout"
            assert sent > 10
            await _until(lambda: "whose client stopped reading" in caplog.text)
        finally:
            sock.close()
    assert bus.stats()["users"] == 0


async def test_shutdown_of_an_in_process_server_ends_streams_via_begin_shutdown() -> None:
    """A host that stops without signals calls begin_shutdown(); streams end properly."""
    app, bus = _app()
    _, token = token_for()
    async with serve(app) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}{STREAM}", params={"access_token": token}) as r:
            await _blocks(r, 1)
            bus.begin_shutdown()
            rest = (await r.content.read()).decode()  # to the end of the response
        assert re.fullmatch(r"(: keepalive\n\n)*retry: \d+\n\n", rest), rest


# --- shutdown of a real server process ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]


async def _open_stream(port: int, token: str, *, query: bool) -> Stream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if query:
        request = f"GET {STREAM}?access_token={token} HTTP/1.1\r\nHost: t\r\n\r\n"
    else:
        request = f"GET {STREAM} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n"
    writer.write(request.encode())
    data = b""
    while b"retry: 3000\n" not in data:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError(f"stream closed early: {data!r}")
        data += chunk
    return reader, writer, data


async def _read_to_end(stream: Stream) -> bytes:
    reader, writer, data = stream
    try:
        while chunk := await reader.read(65536):
            data += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return data


SERVERS = {
    "ghar-core serve": ["-m", "ghar_core", "serve", "--app", "tests.asgi.sse_app:app"],
    "plain uvicorn": ["-m", "uvicorn", "tests.asgi.sse_app:app", "--http", "httptools"],
}


@pytest.mark.parametrize("server", list(SERVERS))
async def test_sigterm_with_500_open_streams_exits_within_3s(server: str) -> None:
    port = _free_port()
    _, token = token_for()
    env = {"LOG_LEVEL": "INFO", "LOG_FORMAT": "json", "SSE_MAX_SUBSCRIBERS": "500"}
    proc, log_task = await start_served(SERVERS[server], port, env)
    opened: list[Stream] = []
    try:
        async with aiohttp.ClientSession() as http:
            opened = await asyncio.gather(
                *(_open_stream(port, token, query=i % 2 == 0) for i in range(500))
            )
            async with http.post(
                f"http://127.0.0.1:{port}/api/v1/events/test",
                headers={"Authorization": f"Bearer {token}"},
            ) as r:
                answer = await r.json()
            assert answer["delivered"] == 500, answer
        readers = [asyncio.ensure_future(_read_to_end(stream)) for stream in opened]
        await asyncio.sleep(0.2)  # let the test event reach every socket
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await proc.wait()
        elapsed = time.monotonic() - started
        bodies = await asyncio.gather(*readers)
    finally:
        for _, writer, _ in opened:
            writer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = (await log_task).decode(errors="replace")
    assert elapsed < 3.0, f"{server} took {elapsed:.2f}s to exit\n{log[-3000:]}"
    assert proc.returncode in (0, -signal.SIGTERM), log[-3000:]
    retries = set()
    for body in bodies:
        assert body.endswith(b"0\r\n\r\n"), body[-200:]  # a complete chunked response
        assert f'"id":"{answer["id"]}"'.encode() not in body  # the id is in `id:`, not data
        assert f"id: {answer['id']}\nevent: test\n".encode() in body
        final = re.findall(rb"retry: (\d+)\n\n", body)[-1]
        retries.add(int(final))
    assert all(3000 <= r <= 12000 for r in retries)
    assert len(retries) > 50  # jittered: clients come back spread out
    assert "Traceback" not in log, log[-3000:]
    # Half the streams sent ?access_token=: the access lines (ours under serve,
    # uvicorn's own under plain uvicorn) show it redacted, never in clear.
    assert token not in log
    assert "access_token=[REDACTED]" in log
    if server == "plain uvicorn":
        assert '"GET /api/v1/events/stream?access_token=[REDACTED] HTTP/1.1" 200' in log
    print(f"{server}: exited {elapsed:.2f}s after SIGTERM with 500 open streams")
