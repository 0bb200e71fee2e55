"""The request a handler receives: a thin, lazy view over the ASGI scope.

Nothing is parsed until asked for: headers, query parameters and the body
are built on first access and cached. The body is read with the app's
``MAX_BODY_SIZE`` as a hard limit: a declared ``Content-Length`` over it is
refused before one byte is read, and a chunked body is abandoned as soon as
it crosses the limit (413), so a hostile client cannot make us buffer it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ghar_core.asgi.datastructures import Headers, QueryParams, State
from ghar_core.exceptions import (
    BadRequestException,
    PayloadTooLargeException,
    UnsupportedMediaTypeException,
)
from ghar_core.logging import get_request_id

if TYPE_CHECKING:
    from ghar_core.asgi.app import App
    from ghar_core.asgi.types import Receive, Scope
    from ghar_core.config import Settings
    from ghar_core.lifecycle import Resources

__all__ = ["ClientDisconnect", "Request", "is_json_media_type"]


class ClientDisconnect(Exception):
    """The client went away while its body was being read; nobody is left to answer."""


def is_json_media_type(content_type: str | None) -> bool:
    """True for ``application/json`` and any ``application/*+json`` (parameters ignored)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _too_large(limit: int) -> PayloadTooLargeException:
    # No "Connection: close": closing a socket with unread data makes the
    # kernel send RST, and the client may never see this 413. Servers discard
    # the unread rest of the body after the response (with bounded buffers).
    return PayloadTooLargeException(
        f"The request body exceeds the limit of {limit} bytes.",
        details={"max_body_size": limit},
    )


class Request:
    """One HTTP request, as handlers see it.

    ``path`` is the path inside this app (``root_path`` removed when the app
    is mounted under a prefix); ``path_params`` hold converted values
    (``int``, ``uuid.UUID`` or ``str``). ``app``, ``settings`` and
    ``resources`` reach the app's shared parts; ``state`` is per request.
    The request owns nothing that needs closing.
    """

    __slots__ = (
        "_body",
        "_headers",
        "_query",
        "_state",
        "_stream_consumed",
        "app",
        "path",
        "path_params",
        "receive",
        "scope",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        app: App,
        path: str | None = None,
        path_params: dict[str, Any] | None = None,
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.app = app
        self.path: str = scope["path"] if path is None else path
        self.path_params: dict[str, Any] = {} if path_params is None else path_params
        self._headers: Headers | None = None
        self._query: QueryParams | None = None
        self._state: State | None = None
        self._body: bytes | None = None
        self._stream_consumed = False

    @property
    def method(self) -> str:
        """Upper-case HTTP method."""
        method: str = self.scope["method"]
        return method

    @property
    def root_path(self) -> str:
        """The prefix this app is mounted under ("" at the top level)."""
        root: str = self.scope.get("root_path", "")
        return root

    @property
    def headers(self) -> Headers:
        """Case-insensitive request headers."""
        if self._headers is None:
            self._headers = Headers(self.scope["headers"])
        return self._headers

    @property
    def query_params(self) -> QueryParams:
        """Decoded query parameters (first value wins; ``getlist`` for all)."""
        if self._query is None:
            self._query = QueryParams(self.scope.get("query_string", b""))
        return self._query

    @property
    def client(self) -> tuple[str, int] | None:
        """``(host, port)`` of the peer, or ``None`` when the server does not know."""
        client = self.scope.get("client")
        return (client[0], client[1]) if client else None

    @property
    def state(self) -> State:
        """Per-request attributes, shared by middleware-free helpers and the handler."""
        if self._state is None:
            self._state = State()
        return self._state

    @property
    def settings(self) -> Settings:
        """The app's settings."""
        return self.app.settings

    @property
    def resources(self) -> Resources:
        """The app's resources (``request.resources.get("database")``)."""
        return self.app.resources

    @property
    def request_id(self) -> str | None:
        """The id the request-ID middleware bound for this request."""
        return get_request_id()

    @property
    def content_length(self) -> int | None:
        """The declared body length; a malformed value is a 400."""
        raw = self.headers.get("content-length")
        if raw is None:
            return None
        text = raw.strip()
        if not text.isdigit() or not text.isascii():
            raise BadRequestException(
                "The Content-Length header is not a number.", details={"content_length": raw[:64]}
            )
        return int(text)

    async def stream(self) -> AsyncIterator[bytes]:
        """Yield the body in chunks as they arrive, enforcing ``MAX_BODY_SIZE``.

        Use it for uploads that should not sit in memory; the body can be
        read only once (``body()`` after ``stream()`` is an error).
        """
        if self._body is not None:
            yield self._body
            return
        if self._stream_consumed:
            raise RuntimeError("the request body was already streamed; it can be read once")
        self._stream_consumed = True
        limit: int = self.app.settings.MAX_BODY_SIZE
        declared = self.content_length
        if declared is not None and declared > limit:
            raise _too_large(limit)
        total = 0
        receive = self.receive
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                chunk: bytes = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
            elif kind == "http.disconnect":
                raise ClientDisconnect("the client disconnected while sending the body")

    async def body(self) -> bytes:
        """The whole body (cached), at most ``MAX_BODY_SIZE`` bytes, else 413."""
        if self._body is None:
            chunks = [chunk async for chunk in self.stream()]
            self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        """The body parsed as JSON.

        Wrong or missing ``Content-Type``: 415; empty or invalid JSON: 400
        (the parser's reason in ``details``); too large: 413.
        """
        content_type = self.headers.get("content-type")
        if not is_json_media_type(content_type):
            raise UnsupportedMediaTypeException(
                "Send the body as JSON with Content-Type: application/json.",
                details={"content_type": (content_type or "")[:128]},
            )
        body = await self.body()
        if not body.strip():
            raise BadRequestException("The request body is empty; a JSON document was expected.")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequestException(
                "The request body is not valid JSON.", details={"reason": str(exc)[:200]}
            ) from None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path!r}>"
