"""Part 5 of ``benchmarks/realtime.py``: WebSocket broadcast with and without a stalled client.

One uvicorn worker (uvloop, httptools, websockets-sansio) serves both managers:
ours (``ConnectionManager`` behind the real job route, token auth included)
and the naive one the usual hand-written manager is: a list of sockets and a
broadcast that awaits each send in turn, each bounded by the same send timeout
as ours and the socket dropped when it fails. A client process opens N
sockets to one job and measures, for every delivery, the time from the
server's stamp (``time.monotonic()``, system-wide) to its arrival.

*stalled*: before each broadcast a fresh client connects with a tiny receive
buffer and never reads; the server fills its socket until a write blocks (the
TCP window and the write buffer full), then broadcasts. The stalled client is
first in the naive manager's order (it connected first), so every other
socket waits behind it for the send timeout; ours queues to it like to any
other and drops it after the timeout without anyone waiting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
JOB = "bench-job"
OWNER = "00000000-0000-4000-8000-0000000000aa"
_tasks: set[asyncio.Future[Any]] = set()


@dataclass
class Broadcast:
    variant: str
    sockets: int
    stalled: bool
    p50_ms: float
    p99_ms: float
    deliveries: int


class NaiveManager:
    """The baseline: awaits each send in turn (bounded), drops a socket whose send fails."""

    def __init__(self, send_timeout: float) -> None:
        self.sockets: list[Any] = []
        self.send_timeout = send_timeout

    async def broadcast(self, text: str) -> None:
        for ws in list(self.sockets):
            try:
                await asyncio.wait_for(ws.send_text(text), self.send_timeout)
            except Exception:
                with contextlib.suppress(ValueError):
                    self.sockets.remove(ws)


def ws_app(send_timeout: float) -> Any:
    from benchmarks.realtime import _settings
    from ghar_core.asgi import Request, WebSocket, WebSocketDisconnect, create_app
    from ghar_core.auth import SupabaseAuth
    from ghar_core.http import HTTPClients
    from ghar_core.websocket import ConnectionManager

    settings = _settings(
        WS_SEND_TIMEOUT=send_timeout,
        WS_MAX_CONNECTIONS_PER_USER=5000,
        WS_PING_INTERVAL=3600.0,
        WS_PONG_TIMEOUT=3600.0,
        WS_QUEUE_MAX_SIZE=10_000,
    )
    manager = ConnectionManager(settings)
    app = create_app(
        settings,
        core_resources=False,
        resources=[HTTPClients(), SupabaseAuth(settings), manager],
    )
    naive = NaiveManager(send_timeout)
    stalled: list[WebSocket] = []
    fillers: list[asyncio.Task[None]] = []
    blocked_since: dict[int, float] = {}

    async def naive_socket(ws: WebSocket) -> None:
        await ws.accept()
        if ws.query_params.get("stall"):
            stalled.append(ws)
            naive.sockets.insert(0, ws)
        else:
            naive.sockets.append(ws)
        try:
            while True:
                await ws.receive()
        except WebSocketDisconnect:
            with contextlib.suppress(ValueError):
                naive.sockets.remove(ws)

    app.add_websocket_route("/bench/ws/naive", naive_socket)

    async def fill_forever(ws: Any, key: int) -> None:
        junk = "x" * 65536
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            while True:
                blocked_since[key] = loop.time()
                await ws.send_text(junk)
                blocked_since.pop(key, None)

    @app.post("/bench/ws/fill")
    async def fill(request: Request) -> dict[str, Any]:
        # The newest stalled socket of either manager: write junk until a write blocks.
        loop = asyncio.get_running_loop()
        if request.query_params.get("variant") == "ours":
            targets = [c.ws for c in manager.job_connections.get(JOB, ()) if c.sent == 0]
            target = targets[-1] if targets else None
        else:
            target = stalled[-1] if stalled else None
        if target is None:
            return {"blocked": False}
        key = id(target)
        fillers.append(asyncio.ensure_future(fill_forever(target, key)))
        async with asyncio.timeout(30):
            while not (key in blocked_since and loop.time() - blocked_since[key] > 0.2):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return {"blocked": True}

    @app.post("/bench/ws/fire")
    async def fire(request: Request) -> dict[str, Any]:
        variant = request.query_params.get("variant")
        if variant == "ours":
            await manager.register_job(JOB, OWNER)
            count = len(manager.job_connections.get(JOB, ()))
            coro: Any = manager.send_job_update(JOB, {"t": time.monotonic()})
        else:
            count = len(naive.sockets)
            text = orjson.dumps({"type": "job_update", "data": {"t": time.monotonic()}}).decode()
            coro = naive.broadcast(text)
        _tasks.add(asyncio.ensure_future(coro))
        return {"sockets": count}

    @app.post("/bench/ws/register")
    async def register(request: Request) -> dict[str, Any]:
        await manager.register_job(JOB, OWNER)
        for task in fillers:
            task.cancel()
        fillers.clear()
        stalled.clear()
        return {"ok": True}

    return app


def serve_ws(port: int, send_timeout: float) -> None:
    import uvicorn

    uvicorn.run(
        ws_app(send_timeout),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


async def _post(port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
    writer.close()
    return dict(orjson.loads(data.split(b"\r\n\r\n", 1)[1]))


async def open_stalled_client(port: int, path: str, headers: str = "") -> socket.socket:
    """A WebSocket handshake on a bare socket with a 4 KB receive buffer, frames left unread.

    Nobody reads the socket afterwards: the server's writes to it block once
    the buffers fill (a client that stopped reading), and it never answers a
    ping (a client that vanished without a close). ``headers``: extra
    request header lines, each ending in CRLF.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)  # byte by byte: leave the frames unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def _read(ws: Any, arrived: list[float]) -> None:
    # One reader per socket stamps each arrival as it lands (not when a loop gets to it).
    async for msg in ws:
        now = time.monotonic()
        arrived.append((now - orjson.loads(msg.data)["data"]["t"]) * 1000)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_broadcast(sizes: list[int], rounds: int, send_timeout: float) -> list[Broadcast]:
    """Every (variant, N, stalled) row, one server process for all of them."""
    import aiohttp

    from benchmarks.realtime import token

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "APP_ENV": "test", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "benchmarks" / "realtime.py")
    proc = subprocess.Popen(  # noqa: ASYNC220 - one server for the part, reaped below
        [sys.executable, script, "--serve", "ws", str(port), str(send_timeout)], env=env, cwd=ROOT
    )
    rows: list[Broadcast] = []
    paths = {
        "ours (ConnectionManager)": f"/api/v1/ws/jobs/{JOB}?access_token={token(OWNER)}",
        "naive (await each send)": "/bench/ws/naive?x=1",
    }
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for _ in range(200):
                try:
                    await _post(port, "/bench/ws/register")
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            for n in sizes:
                for label, path in paths.items():
                    variant = "ours" if label.startswith("ours") else "naive"
                    await _post(port, "/bench/ws/register")
                    url = f"ws://127.0.0.1:{port}{path}"
                    clients = [await http.ws_connect(url, max_msg_size=0) for _ in range(n)]
                    arrived: list[float] = []
                    readers = [asyncio.ensure_future(_read(ws, arrived)) for ws in clients]
                    await _post(port, f"/bench/ws/fire?variant={variant}")  # warm-up, unmeasured
                    async with asyncio.timeout(60):
                        while len(arrived) < n:  # noqa: ASYNC110
                            await asyncio.sleep(0.005)
                    await asyncio.sleep(0.05)
                    # Rounds alternate calm and stalled, so both see the same machine.
                    got: dict[bool, list[float]] = {False: [], True: []}
                    for _ in range(rounds):
                        for stalled in (False, True):
                            arrived.clear()
                            sock = None
                            if stalled:
                                sock = await open_stalled_client(port, path + "&stall=1")
                                await asyncio.sleep(0.05)
                                filled = await _post(port, f"/bench/ws/fill?variant={variant}")
                                assert filled["blocked"], filled
                            await _post(port, f"/bench/ws/fire?variant={variant}")
                            async with asyncio.timeout(60):
                                while len(arrived) < n:  # noqa: ASYNC110
                                    await asyncio.sleep(0.005)
                            got[stalled] += arrived
                            if sock is not None:
                                sock.close()
                                await asyncio.sleep(send_timeout + 0.2)  # both dropped it
                            await _post(port, "/bench/ws/register")
                    for stalled, values in got.items():
                        rows.append(
                            Broadcast(
                                label,
                                n,
                                stalled,
                                _pct(values, 0.5),
                                _pct(values, 0.99),
                                len(values),
                            )
                        )
                    print(f"  websocket: {label} N={n} done", file=sys.stderr)
                    for task in readers:
                        task.cancel()
                    for ws in clients:
                        await ws.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rows
