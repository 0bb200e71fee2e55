"""A small WebSocket wrapper over the ASGI ``websocket`` scope.

Handlers are ``async def handler(ws)``; they call :meth:`WebSocket.accept`
(or :meth:`WebSocket.close` to refuse), then exchange text, bytes or JSON.
A client that goes away surfaces as :class:`WebSocketDisconnect` from the
receive methods; the app swallows it quietly when a handler lets it
propagate. The socket is owned by the handler's call: when the handler
returns, the app closes the socket if the handler did not.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import orjson

from ghar_core.asgi.connection import HTTPConnection
from ghar_core.asgi.responses import dump_json

if TYPE_CHECKING:
    from ghar_core.asgi.app import App
    from ghar_core.asgi.types import Message, Receive, Scope, Send

__all__ = ["WebSocket", "WebSocketDisconnect", "WebSocketState"]


class WebSocketDisconnect(Exception):
    """The peer closed (or the connection dropped); ``code`` is the close code."""

    def __init__(self, code: int = 1000, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"websocket closed with code {code}" + (f": {reason}" if reason else ""))


class WebSocketState(enum.Enum):
    """Where the handshake and the connection stand."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class WebSocket(HTTPConnection):
    """One WebSocket connection, as handlers see it (see :class:`HTTPConnection`)."""

    __slots__ = ("_receive", "_send", "application_state", "client_state")

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        app: App,
        path: str | None = None,
        path_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(scope, app, path, path_params)
        self._receive = receive
        self._send = send
        self.client_state = WebSocketState.CONNECTING
        self.application_state = WebSocketState.CONNECTING

    async def accept(
        self, subprotocol: str | None = None, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Complete the handshake (waiting for ``websocket.connect`` first if needed)."""
        if self.client_state is WebSocketState.CONNECTING:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                self.client_state = WebSocketState.CLOSED
                raise WebSocketDisconnect(message.get("code", 1000))
            self.client_state = WebSocketState.CONNECTED
        await self._send(
            {"type": "websocket.accept", "subprotocol": subprotocol, "headers": headers or []}
        )
        self.application_state = WebSocketState.CONNECTED

    async def receive(self) -> Message:
        """The next raw ASGI message; a disconnect raises :class:`WebSocketDisconnect`."""
        if self.application_state is not WebSocketState.CONNECTED:
            raise RuntimeError("call accept() before receiving")
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self.client_state = WebSocketState.CLOSED
            self.application_state = WebSocketState.CLOSED
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason") or "")
        return message

    async def receive_text(self) -> str:
        """The next text frame (a bytes frame is decoded as UTF-8)."""
        message = await self.receive()
        text = message.get("text")
        if text is None:
            return bytes(message.get("bytes") or b"").decode("utf-8", errors="replace")
        return str(text)

    async def receive_bytes(self) -> bytes:
        """The next binary frame (a text frame is encoded as UTF-8)."""
        message = await self.receive()
        data = message.get("bytes")
        if data is None:
            return str(message.get("text") or "").encode("utf-8")
        return bytes(data)

    async def receive_json(self) -> Any:
        """The next frame parsed as JSON; invalid JSON raises ``ValueError``."""
        message = await self.receive()
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        return orjson.loads(raw)

    async def send_text(self, text: str) -> None:
        """Send one text frame."""
        await self._send({"type": "websocket.send", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame."""
        await self._send({"type": "websocket.send", "bytes": data})

    async def send_json(self, data: Any) -> None:
        """Send ``data`` as one JSON text frame (same serialiser as JSON responses)."""
        await self._send({"type": "websocket.send", "text": dump_json(data).decode("utf-8")})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close (or, before ``accept``, refuse) the connection; idempotent."""
        if self.application_state is WebSocketState.CLOSED:
            return
        self.application_state = WebSocketState.CLOSED
        await self._send({"type": "websocket.close", "code": code, "reason": reason})
