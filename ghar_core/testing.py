"""An in-process ASGI test client that also drives the lifespan.

Users test their routes the way the core tests its own: no sockets, the
app called through its ASGI interface. Works with any ASGI 3 app::

    from ghar_core.testing import TestClient

    async def test_property(app):
        async with TestClient(app) as client:      # lifespan startup/shutdown
            r = await client.get("/api/v1/properties/1", headers={"X-Request-ID": "t-1"})
            assert r.status_code == 200 and r.json()["id"] == 1

        async with client.stream("GET", "/events") as r:   # streaming reads
            async for chunk in r.aiter_bytes(): ...        # leaving sends http.disconnect

        async with client.websocket_connect("/ws") as ws:
            await ws.send_json({"hi": 1}); await ws.receive_json()

Our own apps with resources (``create_app``'s defaults) must be entered with
``async with``: it starts their resources and stops them again; a request
through a client that was not entered raises at once, saying so, instead of
starting pools and sessions lazily that no one closes (which surfaced only
as ResourceWarnings at the end of the run). An app started by the test
itself (``async with app.lifespan():``) and any other ASGI app need no
``async with``. The client owns every task it starts: a request's app task is
awaited (or cancelled, bounded by ``timeout``) before the call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from ghar_core.asgi.datastructures import Headers
from ghar_core.asgi.types import ASGIApp, Message

__all__ = [
    "ASGIProtocolError",
    "TestClient",
    "TestResponse",
    "TestStreamResponse",
    "TestWebSocket",
    "WebSocketRejected",
]

HeaderInput = Mapping[str, str] | Sequence[tuple[str, str]] | None


class ASGIProtocolError(AssertionError):
    """The app broke the ASGI contract (no response, a second start, ...)."""


class WebSocketRejected(Exception):
    """The app refused the WebSocket handshake.

    A close before accept: ``code`` is its close code and ``status_code`` is
    403 (what servers answer). A denial response (the ``websocket.http.response``
    extension, which the client offers like uvicorn does): ``status_code``,
    ``headers`` and ``body`` are that HTTP answer and ``code`` is 1008.
    """

    def __init__(
        self,
        code: int,
        reason: str = "",
        *,
        status_code: int = 403,
        headers: Headers | None = None,
        body: bytes = b"",
    ) -> None:
        self.code = code
        self.reason = reason
        self.status_code = status_code
        self.headers = headers if headers is not None else Headers()
        self.body = body
        super().__init__(
            f"websocket rejected with code {code} (HTTP {status_code})"
            + (f": {reason}" if reason else "")
        )


class TestResponse:
    """A complete response: ``status_code``, ``headers`` (case-insensitive), ``content``."""

    __test__ = False

    def __init__(self, status_code: int, raw_headers: list[tuple[bytes, bytes]], content: bytes):
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.headers = Headers(raw_headers)
        self.content = content
        self.complete = True

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.content)

    def __repr__(self) -> str:
        return f"<TestResponse {self.status_code} {len(self.content)} bytes>"


class TestStreamResponse:
    """A response being streamed: read with :meth:`aiter_bytes` / :meth:`aiter_lines`."""

    __test__ = False

    def __init__(self, start: Message, messages: asyncio.Queue[Message]) -> None:
        self.status_code: int = start["status"]
        self.raw_headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        self.headers = Headers(self.raw_headers)
        self._messages = messages
        self.complete = False

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """Body chunks as the app sends them, until the last one."""
        while not self.complete:
            message = await self._messages.get()
            if message["type"] == "ghar.test.app-returned":
                return  # the app stopped mid-body: ``complete`` stays False
            if message["type"] != "http.response.body":
                raise ASGIProtocolError(f"expected a body message, got {message['type']!r}")
            if not message.get("more_body", False):
                self.complete = True
            chunk = message.get("body", b"")
            if chunk:
                yield chunk

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body split into lines (``\\n``), decoded as UTF-8."""
        pending = b""
        async for chunk in self.aiter_bytes():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8", errors="replace")
        if pending:
            yield pending.decode("utf-8", errors="replace")

    async def read(self) -> bytes:
        """The rest of the body."""
        return b"".join([chunk async for chunk in self.aiter_bytes()])


class TestWebSocket:
    """The client side of a WebSocket opened with :meth:`TestClient.websocket_connect`."""

    __test__ = False

    def __init__(self, to_app: asyncio.Queue[Message], from_app: asyncio.Queue[Message]) -> None:
        self._to_app = to_app
        self._from_app = from_app
        self.accepted: Message | None = None
        self.close_code: int | None = None

    async def send_text(self, text: str) -> None:
        """Send one text frame."""
        await self._to_app.put({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame."""
        await self._to_app.put({"type": "websocket.receive", "bytes": data})

    async def send_json(self, data: Any) -> None:
        """Send ``data`` as a JSON text frame."""
        await self.send_text(orjson.dumps(data).decode())

    async def receive(self) -> Message:
        """The next message from the app; a close raises ``ConnectionError``."""
        message = await self._from_app.get()
        if message["type"] == "websocket.close":
            self.close_code = message.get("code", 1000)
            raise ConnectionError(f"websocket closed by the app with code {self.close_code}")
        return message

    async def receive_text(self) -> str:
        """The next text frame."""
        message = await self.receive()
        return str(message.get("text") or (message.get("bytes") or b"").decode())

    async def receive_json(self) -> Any:
        """The next frame parsed as JSON."""
        message = await self.receive()
        return orjson.loads(message.get("text") or message.get("bytes") or b"")

    async def close(self, code: int = 1000) -> None:
        """Tell the app the client went away."""
        await self._to_app.put({"type": "websocket.disconnect", "code": code})


def _header_list(*groups: HeaderInput) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for group in groups:
        if not group:
            continue
        items = group.items() if isinstance(group, Mapping) else group
        for name, value in items:
            out.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    return out


class TestClient:
    """Call an ASGI app in process (see the module doc).

    ``root_path`` simulates mounting under a prefix (paths are then sent
    with the prefix, as servers do); ``chunk_size`` splits request bodies
    into several ``http.request`` messages, like a server would;
    ``timeout`` bounds every call so a hung app fails the test instead of
    hanging it. ``lifespan=False`` plays a host that sends no lifespan events
    (the app starts lazily; the test then stops it with ``await app.shutdown()``).
    """

    __test__ = False

    def __init__(
        self,
        app: ASGIApp,
        *,
        headers: HeaderInput = None,
        root_path: str = "",
        client: tuple[str, int] = ("127.0.0.1", 50000),
        scheme: str = "http",
        host: str = "testserver",
        chunk_size: int = 65536,
        timeout: float = 10.0,
        lifespan: bool = True,
    ) -> None:
        self.app = app
        self.lifespan = lifespan
        self.default_headers = headers
        self.root_path = root_path
        self.client = client
        self.scheme = scheme
        self.host = host
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._lifespan_task: asyncio.Task[None] | None = None
        self._lifespan_in: asyncio.Queue[Message] | None = None
        self._lifespan_out: asyncio.Queue[Message] | None = None

    # --- lifespan --------------------------------------------------------------

    async def __aenter__(self) -> TestClient:
        await self.start_lifespan()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_lifespan()

    async def start_lifespan(self) -> None:
        """Send ``lifespan.startup``; raise when the app reports a failure."""
        to_app: asyncio.Queue[Message] = asyncio.Queue()
        from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan_in, self._lifespan_out = to_app, from_app

        async def run() -> None:
            scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
            try:
                await self.app(scope, to_app.get, from_app.put)
            except Exception as exc:
                # Before startup completes this means "unsupported"; after it, it is
                # an error that stop_lifespan raises (a server would log it).
                await from_app.put(
                    {"type": "lifespan.unsupported", "message": str(exc), "exc": exc}
                )
            else:
                await from_app.put({"type": "ghar.test.app-returned"})

        self._lifespan_task = asyncio.create_task(run())
        await to_app.put({"type": "lifespan.startup"})
        async with asyncio.timeout(self.timeout):
            reply = await from_app.get()
        if reply["type"] == "lifespan.startup.failed":
            await self._lifespan_task
            self._lifespan_task = None
            raise RuntimeError(f"lifespan startup failed: {reply.get('message', '')}")
        if reply["type"] != "lifespan.startup.complete":
            # Unsupported (raised or returned at once): no shutdown to send later.
            await self._lifespan_task
            self._lifespan_task = None

    async def stop_lifespan(self) -> None:
        """Send ``lifespan.shutdown``; raise when the app reports a failure."""
        task, self._lifespan_task = self._lifespan_task, None
        if task is None or self._lifespan_in is None or self._lifespan_out is None:
            return
        if not task.done():
            await self._lifespan_in.put({"type": "lifespan.shutdown"})
        async with asyncio.timeout(self.timeout):
            reply = await self._lifespan_out.get()
            await task
        if reply["type"] == "lifespan.shutdown.failed":
            raise RuntimeError(f"lifespan shutdown failed: {reply.get('message', '')}")
        # After a completed startup, raising or returning without an answer is an
        # app bug; a test must see it rather than pass quietly.
        if reply["type"] == "lifespan.unsupported":
            raise RuntimeError(f"lifespan raised: {reply['message']}") from reply["exc"]
        if reply["type"] != "lifespan.shutdown.complete":
            raise ASGIProtocolError("the app ended the lifespan without answering shutdown")

    # --- HTTP ------------------------------------------------------------------

    def _check_entered(self) -> None:
        manager = getattr(self.app, "lifespan_manager", None)
        if (
            self.lifespan
            and manager is not None
            and self._lifespan_task is None
            and not manager.started
            and len(manager.resources) > 0  # nothing to leak without resources
        ):
            raise RuntimeError(
                "use `async with TestClient(app) as client:` — it starts the app's resources "
                "and stops them at the end; without it a request would start pools and "
                "sessions that nothing closes"
            )

    def _scope(
        self, kind: str, method: str, path: str, params: Any, headers: HeaderInput
    ) -> dict[str, Any]:
        self._check_entered()
        path, _, query = path.partition("?")
        if params:
            extra = urlencode(params, doseq=True)
            query = f"{query}&{extra}" if query else extra
        full = self.root_path + path
        raw_headers = [(b"host", self.host.encode("latin-1"))]
        raw_headers += _header_list(self.default_headers, headers)
        scope: dict[str, Any] = {
            "type": kind,
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": ("wss" if self.scheme == "https" else "ws")
            if kind == "websocket"
            else self.scheme,
            "path": full,
            "raw_path": quote(full, safe="/:@!$&'()*+,;=-._~").encode("latin-1", "replace"),
            "root_path": self.root_path,
            "query_string": query.encode("utf-8", "surrogateescape"),
            "headers": raw_headers,
            "client": self.client,
            "server": (self.host, 80),
            "state": {},
        }
        if kind == "http":
            scope["method"] = method.upper()
        return scope

    def _body(
        self, content: bytes | str | None, json: Any, headers: HeaderInput
    ) -> tuple[bytes, list[tuple[str, str]]]:
        extra: list[tuple[str, str]] = []
        given = {k.lower() for k, _ in _str_items(headers)}
        if json is not None:
            body = orjson.dumps(json)
            if "content-type" not in given:
                extra.append(("content-type", "application/json"))
        elif isinstance(content, str):
            body = content.encode("utf-8")
        else:
            body = content or b""
        if body and "content-length" not in given and "transfer-encoding" not in given:
            extra.append(("content-length", str(len(body))))
        return body, extra

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        headers: HeaderInput = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> AsyncIterator[TestStreamResponse]:
        """Start a request and yield once the response has started.

        Leaving the block sends ``http.disconnect`` (as a client closing the
        connection would) and waits for the app to finish.
        """
        body, extra = self._body(content, json, headers)
        scope = self._scope("http", method, path, params, [*_str_items(headers), *extra])
        messages: asyncio.Queue[Message] = asyncio.Queue()
        disconnect = asyncio.Event()
        chunks = [body[i : i + self.chunk_size] for i in range(0, len(body), self.chunk_size)]
        chunks = chunks or [b""]
        position = 0

        async def receive() -> Message:
            nonlocal position
            if position < len(chunks):
                position += 1
                more = position < len(chunks)
                return {"type": "http.request", "body": chunks[position - 1], "more_body": more}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await messages.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await messages.put({"type": "ghar.test.app-returned"})

        task = asyncio.create_task(run())
        try:
            async with asyncio.timeout(self.timeout):
                start = await messages.get()
            if start["type"] == "ghar.test.app-returned":
                await task  # re-raise what the app raised, if anything
                raise ASGIProtocolError("the app returned without starting a response")
            if start["type"] != "http.response.start":
                raise ASGIProtocolError(f"expected http.response.start, got {start['type']!r}")
            response = TestStreamResponse(start, messages)
            yield response
        finally:
            disconnect.set()
            try:
                async with asyncio.timeout(self.timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                raise

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        headers: HeaderInput = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> TestResponse:
        """Send one request and read the whole response.

        ``json`` sends a JSON body (with ``Content-Type: application/json``
        unless given); ``content`` sends bytes/str as is. An incomplete
        response (the app returned mid-body) has ``complete = False``.
        """
        async with self.stream(
            method, path, params=params, headers=headers, content=content, json=json
        ) as response:
            chunks: list[bytes] = []
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await response._messages.get()
                    if message["type"] == "ghar.test.app-returned":
                        break
                    if message["type"] != "http.response.body":
                        raise ASGIProtocolError(f"unexpected message {message['type']!r}")
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        response.complete = True
                        break
        result = TestResponse(response.status_code, response.raw_headers, b"".join(chunks))
        result.complete = response.complete
        return result

    async def get(self, path: str, **kwargs: Any) -> TestResponse:
        """``GET``; see :meth:`request`."""
        return await self.request("GET", path, **kwargs)

    async def head(self, path: str, **kwargs: Any) -> TestResponse:
        """``HEAD``; see :meth:`request`."""
        return await self.request("HEAD", path, **kwargs)

    async def options(self, path: str, **kwargs: Any) -> TestResponse:
        """``OPTIONS``; see :meth:`request`."""
        return await self.request("OPTIONS", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> TestResponse:
        """``POST``; see :meth:`request`."""
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> TestResponse:
        """``PUT``; see :meth:`request`."""
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> TestResponse:
        """``PATCH``; see :meth:`request`."""
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> TestResponse:
        """``DELETE``; see :meth:`request`."""
        return await self.request("DELETE", path, **kwargs)

    # --- WebSocket ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def websocket_connect(
        self,
        path: str,
        *,
        params: Any = None,
        headers: HeaderInput = None,
        subprotocols: Sequence[str] = (),
    ) -> AsyncIterator[TestWebSocket]:
        """Open a WebSocket; :class:`WebSocketRejected` if the app refuses it.

        Leaving the block sends ``websocket.disconnect`` and waits for the app.
        """
        scope = self._scope("websocket", "GET", path, params, headers)
        scope["subprotocols"] = list(subprotocols)
        scope["extensions"] = {"websocket.http.response": {}}  # as uvicorn offers
        to_app: asyncio.Queue[Message] = asyncio.Queue()
        from_app: asyncio.Queue[Message] = asyncio.Queue()
        await to_app.put({"type": "websocket.connect"})

        async def run() -> None:
            await self.app(scope, to_app.get, from_app.put)

        task = asyncio.create_task(run())
        try:
            async with asyncio.timeout(self.timeout):
                first = await from_app.get()
            if first["type"] == "websocket.close":
                raise WebSocketRejected(first.get("code", 1000), first.get("reason") or "")
            if first["type"] == "websocket.http.response.start":
                body = b""
                async with asyncio.timeout(self.timeout):
                    while True:
                        part = await from_app.get()
                        if part["type"] != "websocket.http.response.body":
                            raise ASGIProtocolError(f"expected a denial body, got {part['type']!r}")
                        body += part.get("body", b"")
                        if not part.get("more_body", False):
                            break
                raise WebSocketRejected(
                    1008,
                    status_code=first["status"],
                    headers=Headers(list(first.get("headers", []))),
                    body=body,
                )
            if first["type"] != "websocket.accept":
                raise ASGIProtocolError(f"expected websocket.accept, got {first['type']!r}")
            ws = TestWebSocket(to_app, from_app)
            ws.accepted = first
            yield ws
            await ws.close()
        finally:
            async with asyncio.timeout(self.timeout):
                if not task.done():
                    await to_app.put({"type": "websocket.disconnect", "code": 1000})
                await task


def _str_items(headers: HeaderInput) -> list[tuple[str, str]]:
    if not headers:
        return []
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)
