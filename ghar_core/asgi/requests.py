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

from ghar_core.asgi.connection import HTTPConnection
from ghar_core.exceptions import (
    BadRequestException,
    PayloadTooLargeException,
    UnsupportedMediaTypeException,
)

if TYPE_CHECKING:
    from ghar_core.asgi.app import App
    from ghar_core.asgi.types import Receive, Scope

__all__ = ["JSON_MAX_DEPTH", "ClientDisconnect", "Request", "is_json_media_type"]

#: The deepest JSON body :meth:`Request.json` accepts (arrays and objects nested).
#: orjson parses up to 1024 levels but writes at most 254, so a handler that
#: answers with what it was sent -- wrapped in up to 126 levels of its own --
#: can always encode it; deeper is the client's error (400), never our 500.
JSON_MAX_DEPTH = 128
_OPENERS = b"[{"


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


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests arrays and objects deeper than ``JSON_MAX_DEPTH``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if type(node) is not dict and type(node) is not list:
            continue
        if depth > JSON_MAX_DEPTH:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


class Request(HTTPConnection):
    """One HTTP request, as handlers see it (see :class:`HTTPConnection`).

    The request owns nothing that needs closing; its body can be read once
    (``body()`` caches it).
    """

    __slots__ = ("_body", "_stream_consumed", "receive")

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        app: App,
        path: str | None = None,
        path_params: dict[str, Any] | None = None,
    ) -> None:
        # The attributes are set here rather than through super().__init__():
        # a request is built on every call and this is the hot path.
        self.scope = scope
        self.receive = receive
        self.app = app
        self.path = scope["path"] if path is None else path
        self.path_params = {} if path_params is None else path_params
        self._headers = None
        self._query = None
        self._state = None
        self._body: bytes | None = None
        self._stream_consumed = False

    @property
    def method(self) -> str:
        """Upper-case HTTP method."""
        method: str = self.scope["method"]
        return method

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
        # int() refuses more than 4300 digits (ValueError, a 500); no real length has
        # more than 18 significant ones, so anything longer is over every limit.
        digits = text.lstrip("0") or "0"
        if len(digits) > 18:
            raise _too_large(self.app.settings.MAX_BODY_SIZE)
        return int(digits)

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
        (the parser's reason in ``details``); nested deeper than
        ``JSON_MAX_DEPTH``: 400 ``JSON_TOO_DEEP``; too large: 413.
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
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequestException(
                "The request body is not valid JSON.", details={"reason": str(exc)[:200]}
            ) from None
        # Fewer openers than the limit cannot nest past it: the walk below runs
        # only for bodies with many containers (two C-speed counts otherwise).
        if body.count(b"[") + body.count(b"{") > JSON_MAX_DEPTH and _too_deep(value):
            raise BadRequestException(
                f"The JSON body is nested more than {JSON_MAX_DEPTH} levels deep.",
                error_code="JSON_TOO_DEEP",
                details={"max_depth": JSON_MAX_DEPTH},
            )
        return value

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path!r}>"
