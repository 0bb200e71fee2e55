"""Case 3: event-stream subscribers at the cap, some stalled, on ``ghar-core serve``.

The server allows 60 streams (``SSE_MAX_SUBSCRIBERS``). 40 are read by
four users (ten streams each, bearer header); 20 belong to two users whose
clients open the stream (``?access_token=``) on a socket with a tiny
receive buffer and never read. The 61st is refused with 503 and
``Retry-After``. Then each reading user gets 40 events of 16 KB, each stalled one 12 of
512 KB: the stalled
streams fill their sockets and are dropped after ``SSE_SEND_TIMEOUT``, the
readers get every event of their user, in order, none twice; the server's
memory stays bounded and the freed places can be taken again.

WebSockets (``/api/v1/ws/notifications``): nine clients of three users read,
five of a fourth never read after the handshake; each user gets 30
notifications (256 KB each for the stalled one). The readers get all of
theirs in order; the stalled sockets are closed by the manager
(``WS_SEND_TIMEOUT`` = 1 s, or its queue bound) and leave its registry.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp
import orjson

from tests.reliability.report import section
from tests.reliability.stack import Stack, bearer, call

TITLE = "Realtime: streams at the cap, WebSockets not reading, events across instances"
READERS_PER_USER = 10
READER_USERS = 4
STALLED_USERS = 2
STALLED_PER_USER = 10
EVENTS = 40
EVENT_BYTES = 16 * 1024
# A stalled client's kernel buffers on loopback take up to 4 MiB: its events are
# big enough that the server's writes block, and SSE_SEND_TIMEOUT drops it.
STALLED_EVENTS = 12
STALLED_EVENT_BYTES = 512 * 1024
CAP = 60


@dataclass
class Reader:
    """One stream read to the end: the positions of the test events it got."""

    positions: list[int] = field(default_factory=list)
    reset: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def _read(
    session: aiohttp.ClientSession, url: str, token: str, reader: Reader, opened: asyncio.Event
) -> None:
    async with session.get(
        url, headers=bearer(token), timeout=aiohttp.ClientTimeout(total=60)
    ) as resp:
        assert resp.status == 200
        opened.set()
        event = None
        last_id = None
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                last_id = line[4:]
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "test":
                data = orjson.loads(line[6:])
                reader.positions.append(int(data["data"]["n"]))
                assert last_id is not None
            elif line == "" and event == "reset":
                reader.reset = True
            if line == "":
                event = None
            if len(reader.positions) >= EVENTS:
                reader.done.set()  # and keep the stream open until the test ends


def _stalled_stream(port: int, token: str) -> socket.socket:
    """A client that asks for its stream and never reads a byte of it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /api/v1/events/stream?access_token={quote(token)} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n\r\n".encode()
    )
    return sock


async def _stats(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    answer = await call(session, "GET", f"{url}/ready")
    assert answer.status == 200, answer
    stats: dict[str, int] = answer.body["stats"]["sse"]
    return stats


async def _until(
    done: Callable[[dict[str, int]], bool], session: aiohttp.ClientSession, url: str
) -> dict[str, int]:
    """The bus's counters once ``done`` holds for them (or as they are after 10 s)."""
    deadline = time.monotonic() + 10
    stats = await _stats(session, url)
    while not done(stats) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        stats = await _stats(session, url)
    return stats


async def test_subscribers_at_the_cap_with_some_stalled(stack: Stack) -> None:
    assert stack.server is not None
    url = f"{stack.url}/api/v1/events/stream"
    readers_tokens = [stack.provider.token() for _ in range(READER_USERS)]
    stalled_tokens = [stack.provider.token() for _ in range(STALLED_USERS)]
    rss_before = stack.server.rss_kib()
    stalled: list[socket.socket] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        baseline = await _stats(session, stack.url)
        readers: list[tuple[int, Reader]] = []
        tasks = []
        for user, token in enumerate(readers_tokens):
            for _ in range(READERS_PER_USER):
                reader, opened = Reader(), asyncio.Event()
                readers.append((user, reader))
                tasks.append(asyncio.create_task(_read(session, url, token, reader, opened)))
                await asyncio.wait_for(opened.wait(), 10)
        for token in stalled_tokens:
            for _ in range(STALLED_PER_USER):
                stalled.append(_stalled_stream(stack.server.port, token))
        await _until(lambda s: s["subscribers"] >= CAP, session, stack.url)
        at_cap = await _stats(session, stack.url)
        over = await call(session, "GET", url, headers=bearer(readers_tokens[0]))

        # Every user publishes, interleaved; the stalled users' events are big.
        for n in range(EVENTS):
            for token in readers_tokens + (stalled_tokens if n < STALLED_EVENTS else []):
                size = STALLED_EVENT_BYTES if token in stalled_tokens else EVENT_BYTES
                sent = await call(
                    session,
                    "POST",
                    f"{stack.url}/api/v1/events/test",
                    headers=bearer(token) | {"Content-Type": "application/json"},
                    data=orjson.dumps({"n": n, "pad": "x" * size}),
                )
                assert sent.status == 200, sent
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for _, r in readers)), 30)
        after = await _until(
            lambda s: s["subscribers"] <= READER_USERS * READERS_PER_USER, session, stack.url
        )
        rss_after = stack.server.rss_kib()
        # The places the stalled took are free again.
        again = await call(session, "GET", url, headers=bearer(readers_tokens[0]), within=2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for sock in stalled:
        sock.close()

    incomplete = [
        (user, len(r.positions)) for user, r in readers if r.positions != list(range(EVENTS))
    ]
    dropped = after["dropped"] - baseline["dropped"]
    report = section(3, TITLE)
    report.add(
        "streams",
        f"{READER_USERS * READERS_PER_USER} reading + "
        f"{STALLED_USERS * STALLED_PER_USER} never reading = cap {CAP}",
    )
    report.add("one more than the cap", f"{over.status} (Retry-After {over.retry_after})")
    report.add(
        "events published",
        f"{EVENTS} x {EVENT_BYTES // 1024} KB to each reading user, {STALLED_EVENTS} x "
        f"{STALLED_EVENT_BYTES // 1024} KB to each stalled one",
    )
    report.add(
        "readers that got every event of their user, in order, once",
        f"{len(readers) - len(incomplete)}/{len(readers)}",
    )
    report.add(
        "stalled streams dropped",
        f"{at_cap['subscribers'] - after['subscribers']} "
        f"(events dropped from their queues: {dropped})",
    )
    report.add(
        "server memory (RSS)", f"{rss_before // 1024} MiB before, {rss_after // 1024} MiB after"
    )
    report.add(
        "a new stream after the stalled were dropped",
        "timed out reading (open)" if again.error == "hang" else str(again.status),
    )
    report.add("lost", f"{len(incomplete)} readers missed events")

    assert at_cap["subscribers"] == CAP
    assert over.is_clean_503()
    assert over.body["error"]["code"] == "SSE_UNAVAILABLE"
    assert incomplete == []
    assert not any(r.reset for _, r in readers)
    assert after["subscribers"] == READER_USERS * READERS_PER_USER
    # Unbounded, 20 stalled streams would each hold their 6 MiB of events: 120 MiB.
    assert rss_after - rss_before < 64 * 1024
    assert again.status == 200 or again.error == "hang"  # admitted: the stream stays open


WS_READER_USERS = 3
WS_READERS_PER_USER = 3
WS_STALLED = 5
WS_MESSAGES = 30


def _stalled_websocket(port: int, token: str) -> socket.socket:
    """A client that completes a WebSocket handshake and never reads a byte after it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /api/v1/ws/notifications?access_token={quote(token)} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


async def test_websocket_clients_with_some_never_reading(stack: Stack) -> None:
    assert stack.server is not None
    url = f"{stack.url}/api/v1/ws/notifications"
    tokens = [stack.provider.token() for _ in range(WS_READER_USERS)]
    stalled_token = stack.provider.token()
    got: list[list[int]] = []
    stalled: list[socket.socket] = []

    async def read(ws: aiohttp.ClientWebSocketResponse, into: list[int]) -> None:
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            data = orjson.loads(message.data)
            if data.get("type") == "notification":
                into.append(int(data["data"]["n"]))
                if len(into) >= WS_MESSAGES:
                    return

    async with aiohttp.ClientSession() as session:
        sockets = []
        for token in tokens:
            for _ in range(WS_READERS_PER_USER):
                sockets.append(await session.ws_connect(url, headers=bearer(token)))
                got.append([])
        for _ in range(WS_STALLED):
            stalled.append(_stalled_websocket(stack.server.port, stalled_token))
        readers = [
            asyncio.create_task(read(ws, into)) for ws, into in zip(sockets, got, strict=True)
        ]
        await asyncio.sleep(0.5)
        started = time.monotonic()
        for n in range(WS_MESSAGES):
            for token in [*tokens, stalled_token]:
                size = 256 * 1024 if token == stalled_token else 4096
                answer = await call(
                    session,
                    "POST",
                    f"{stack.url}/api/v1/notify",
                    headers=bearer(token) | {"Content-Type": "application/json"},
                    data=orjson.dumps({"n": n, "pad": "x" * size}),
                )
                assert answer.status == 200, answer
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        delivered = time.monotonic() - started
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready = await call(session, "GET", f"{stack.url}/ready")
            ws_stats = ready.body["stats"]["websocket"]
            if ws_stats["sockets"] <= WS_READER_USERS * WS_READERS_PER_USER:
                break
            await asyncio.sleep(0.2)
        for ws in sockets:
            await ws.close()
    for sock in stalled:
        sock.close()
    complete = sum(1 for into in got if into == list(range(WS_MESSAGES)))
    report = section(3, TITLE)
    report.add(
        "WebSockets",
        f"{len(got)} reading ({WS_READER_USERS} users), {WS_STALLED} never reading (one user); "
        f"{WS_MESSAGES} notifications per user, 4 KB to readers, 256 KB to the stalled",
    )
    report.add(
        "WebSocket readers that got every notification, in order",
        f"{complete}/{len(got)} in {delivered:.1f} s",
    )
    report.add(
        "WebSockets of the stalled user left open",
        f"{ws_stats['sockets'] - WS_READER_USERS * WS_READERS_PER_USER} of {WS_STALLED}",
    )
    assert complete == len(got)
    assert ws_stats["sockets"] <= WS_READER_USERS * WS_READERS_PER_USER
