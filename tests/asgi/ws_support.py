"""Shared by the WebSocket tests over real sockets: the app, clients, a raw client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import time
from typing import Any

import aiohttp
import orjson

from benchmarks._ws_broadcast import open_stalled_client
from ghar_core.asgi import create_app
from ghar_core.asgi.app import App
from ghar_core.auth import SupabaseAuth
from ghar_core.http import HTTPClients
from ghar_core.sse import SSEEventBus
from ghar_core.websocket import ConnectionManager
from tests.asgi.sse_support import sse_settings

JOBS = "/api/v1/ws/jobs"
NOTIFICATIONS = "/api/v1/ws/notifications"


def ws_app(**changes: Any) -> tuple[App, ConnectionManager, SSEEventBus]:
    settings = sse_settings(**changes)
    bus = SSEEventBus(settings, handle_signals=False)
    manager = ConnectionManager(settings, sse=bus, handle_signals=False)
    app = create_app(
        settings,
        core_resources=False,
        resources=[HTTPClients(), SupabaseAuth(settings), bus, manager],
    )
    return app, manager, bus


class Client:
    """A real aiohttp WebSocket client that reads all the time and answers pings."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.closed = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                data = orjson.loads(msg.data)
                if data.get("type") == "ping":
                    await self.ws.send_str('{"type":"pong"}')
                    continue
                self.messages.append((time.monotonic(), data))
        finally:
            self.closed.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m.get("type") == kind]

    async def close(self) -> None:
        await self.ws.close()
        await self.task


async def connect(
    http: aiohttp.ClientSession, base: str, path: str, token: str, *, query: bool = False
) -> Client:
    url = base.replace("http://", "ws://") + path
    if query:
        ws = await http.ws_connect(url, params={"access_token": token}, autoping=True)
    else:
        ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
    return Client(ws)


async def refusal(
    http: aiohttp.ClientSession, base: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """The HTTP answer to an upgrade request that the app refuses (status, envelope)."""
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **headers,
    }
    async with http.get(base + path, headers=upgrade) as r:
        return r.status, orjson.loads(await r.read())


class RawClient:
    """A client that, after the handshake, does nothing (see ``open_stalled_client``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, base: str, path: str, token: str) -> RawClient:
        port = int(base.rsplit(":", 1)[1])
        auth = f"Authorization: Bearer {token}\r\n"
        return cls(await open_stalled_client(port, path, auth))

    async def close_code(self, seconds: float = 5.0) -> int | None:
        """Read everything now and return the code of the close frame, if one came."""
        loop = asyncio.get_running_loop()
        data = b""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(seconds):
                while chunk := await loop.sock_recv(self.sock, 65536):
                    data += chunk
        return _close_code(data)

    def close(self) -> None:
        self.sock.close()


def _close_code(data: bytes) -> int | None:
    # Walk the server's (unmasked) frames to the close frame.
    i = 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        if opcode == 0x8:
            return int(struct.unpack("!H", data[i : i + 2])[0]) if length >= 2 else 1005
        i += length
    return None


async def until(condition: Any, seconds: float = 5.0) -> float:
    """Wait until ``condition()`` holds; returns how long it took."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - polls state another task changes
            await asyncio.sleep(0.005)
    return time.monotonic() - started
