"""Response objects: bytes, plain text, JSON on orjson, and streaming bodies.

A response is built once (body rendered, raw headers computed in
``__init__``) and then called as an ASGI app that sends it. Handlers may
also return a ``dict`` or ``list``; the router sends that as 200 JSON
without building an object at all (the hot path).

JSON: orjson serialises ``str``/numbers/``bool``/``None``, ``dict``/``list``,
``uuid.UUID``, ``datetime``/``date``/``time`` (ISO 8601), dataclasses and
enums natively; :func:`json_default` adds ``Decimal`` (as a string, so money
keeps its digits), ``set``/``frozenset`` (as lists) and ``UUID`` subclasses
such as asyncpg's (orjson only knows the exact ``uuid.UUID`` type). Anything else is a
``TypeError`` -- a programming error, so it becomes a 500.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterable, Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from ghar_core.asgi.types import Receive, Scope, Send

__all__ = [
    "JSONResponse",
    "PlainTextResponse",
    "Response",
    "StreamingResponse",
    "dump_json",
    "json_default",
]

logger = logging.getLogger("ghar_core.asgi")

_CONTENT_TYPE = b"content-type"
_CONTENT_LENGTH = b"content-length"
_JSON_TYPE = b"application/json"
# Statuses that must not carry a body (RFC 9110): no Content-Length either.
_NO_BODY = frozenset({204, 304}) | frozenset(range(100, 200))
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def json_default(value: Any) -> Any:
    """orjson ``default``: ``Decimal`` as a string, sets as lists, UUID subclasses as text."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dump_json(content: Any) -> bytes:
    """Serialise ``content`` the way every JSON response does."""
    return orjson.dumps(content, default=json_default, option=_JSON_OPTIONS)


def _encode_header(name: str, value: str) -> tuple[bytes, bytes]:
    if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
        raise ValueError(f"header {name!r} contains CR, LF or ':'; refusing to split the response")
    return name.lower().encode("latin-1"), value.encode("latin-1")


class Response:
    """A complete response with a ``bytes`` (or ``str``) body.

    ``headers`` are added after ``Content-Type``/``Content-Length``, which
    the response computes itself; 204, 304 and 1xx are sent without a body.
    A ``HEAD`` request gets the headers only.
    """

    __slots__ = ("body", "raw_headers", "status_code")
    media_type: str | None = None
    charset = "utf-8"

    def __init__(
        self,
        content: bytes | str | None = b"",
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.body = self.render(content)
        self.raw_headers = self._build_headers(headers, media_type or self.media_type)

    def render(self, content: Any) -> bytes:
        """Turn the content into body bytes (subclasses override)."""
        if content is None:
            return b""
        if isinstance(content, bytes):
            return content
        if isinstance(content, str):
            return content.encode(self.charset)
        raise TypeError(f"{type(self).__name__} needs bytes or str, got {type(content).__name__}")

    def _build_headers(
        self, headers: Mapping[str, str] | None, media_type: str | None
    ) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = []
        if self.status_code in _NO_BODY:
            self.body = b""
        else:
            if media_type is not None:
                if media_type.startswith("text/") and "charset=" not in media_type:
                    media_type += f"; charset={self.charset}"
                raw.append((_CONTENT_TYPE, media_type.encode("latin-1")))
            raw.append((_CONTENT_LENGTH, str(len(self.body)).encode("ascii")))
        if headers:
            raw.extend(_encode_header(k, v) for k, v in headers.items())
        return raw

    def append_header(self, name: str, value: str) -> None:
        """Add a header (repeats allowed, e.g. ``Set-Cookie``); CR/LF is refused."""
        self.raw_headers.append(_encode_header(name, value))

    @property
    def headers(self) -> dict[str, str]:
        """The headers as a plain dict (last value wins), for inspection."""
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.raw_headers}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        body = b"" if scope.get("method") == "HEAD" else self.body
        await send({"type": "http.response.body", "body": body})


class PlainTextResponse(Response):
    """``text/plain; charset=utf-8``."""

    __slots__ = ()
    media_type = "text/plain"


class JSONResponse(Response):
    """JSON on orjson (see the module doc for the types it serialises).

    ``JSONResponse({"id": 7}, status_code=201)``: ``content`` is any value
    orjson can serialise, not bytes.
    """

    __slots__ = ()
    media_type = "application/json"

    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        super().__init__(content, status_code, headers, media_type)

    def render(self, content: Any) -> bytes:
        return dump_json(content)


class StreamingResponse:
    """A body produced chunk by chunk, sent as it is produced (no buffering).

    ``content`` is an async (or plain) iterable of ``bytes`` or ``str``.
    No ``Content-Length`` is sent, so HTTP/1.1 uses chunked encoding. While
    streaming, the response also listens for ``http.disconnect``: when the
    client goes away the producing task is cancelled and the iterator's
    ``aclose()`` runs, so a generator's ``finally`` (unsubscribe from a bus,
    release a connection) always executes. The response owns the iterator
    and closes it in every case, HEAD included (it is then never iterated).
    For Server-Sent Events pass ``media_type="text/event-stream"``.
    """

    __slots__ = ("content", "raw_headers", "status_code")

    def __init__(
        self,
        content: AsyncIterable[bytes | str] | Iterable[bytes | str],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        self.content = content
        self.status_code = status_code
        raw: list[tuple[bytes, bytes]] = []
        if media_type is not None:
            if media_type.startswith("text/") and "charset=" not in media_type:
                media_type += "; charset=utf-8"
            raw.append((_CONTENT_TYPE, media_type.encode("latin-1")))
        if headers:
            raw.extend(_encode_header(k, v) for k, v in headers.items())
        self.raw_headers = raw

    async def _close(self) -> None:
        aclose = getattr(self.content, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            close = getattr(self.content, "close", None)
            if close is not None:
                close()

    async def _produce(self, send: Send) -> None:
        try:
            if isinstance(self.content, AsyncIterable):
                async for chunk in self.content:
                    await send(_chunk(chunk))
            else:
                for chunk in self.content:
                    await send(_chunk(chunk))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError as exc:
            # The server could not write: the client is gone. Nothing to tell it.
            logger.debug("streaming stopped, client unreachable: %s", exc)
        finally:
            await self._close()

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
        except BaseException:
            # The client is gone before the first byte: the iterator is ours to close
            # all the same (it may hold a subscription or a connection).
            await self._close()
            raise
        if scope.get("method") == "HEAD":
            await self._close()
            await send({"type": "http.response.body", "body": b""})
            return
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(self._wait_disconnect(receive))
        stopped_producer = False
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped_producer = not producer.done()
            for task in (producer, watcher):
                if not task.done():
                    task.cancel()
            # Let both unwind (the producer closes the iterator) before returning.
            await asyncio.wait((producer, watcher))
        if not producer.cancelled():
            producer.result()  # re-raise an error from the iterator
        elif not stopped_producer:
            # Nobody here cancelled it: the iterator awaited something cancelled
            # elsewhere. An error of this response, to be logged, not a silent cut.
            raise RuntimeError("the streaming body was cancelled by something it awaited")


def _chunk(chunk: bytes | str) -> dict[str, Any]:
    body = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
    return {"type": "http.response.body", "body": body, "more_body": True}
