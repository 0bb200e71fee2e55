"""Pure ASGI middleware: the request ID and the error envelope.

Each class wraps an ASGI app, computes what it can in ``__init__``, keeps no
per-request state on ``self`` (per-request values live in the call's local
variables and closures) and passes through scope types it does not handle.
The app stacks the middleware outermost first: request ID (here), access log
(:mod:`ghar_core.asgi.accesslog`), error envelope (here), CORS
(:mod:`ghar_core.asgi.cors`), then the app's own; lifespan events never
enter the stack (the app answers them itself).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from collections.abc import Callable
from itertools import count
from types import CodeType
from typing import TYPE_CHECKING, Any

from ghar_core.asgi.requests import ClientDisconnect
from ghar_core.exceptions import BaseAPIException, render_error
from ghar_core.logging import request_id_var

if TYPE_CHECKING:
    from ghar_core.asgi.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CORS_SCOPE_KEY",
    "ErrorEnvelopeMiddleware",
    "RequestIDMiddleware",
    "body_send",
    "forwards_bodies",
    "is_valid_request_id",
    "new_request_id",
    "safe_for_log",
    "send_error",
]

_REQUEST_ID_HEADER = b"x-request-id"
#: Where the CORS middleware leaves the headers an allowed origin gets, so the
#: last-resort 500 (sent from outside CORS) is readable by the browser too.
CORS_SCOPE_KEY = "ghar.cors_headers"
_VALID_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


# Code of the send wrappers that only look at the response start and hand every
# http.response.body message to their closure's ``send`` unchanged -> the index
# of that ``send`` in the closure.
_BODY_FORWARDERS: dict[CodeType, int] = {}


def forwards_bodies(outer: Callable[..., Any], name: str) -> None:
    """Declare ``outer``'s nested send wrapper ``name`` transparent to response bodies.

    For :func:`body_send`: the wrapper must pass every ``http.response.body``
    message to the ``send`` it closes over, unchanged and at once. Registered
    by code object at import, so a request pays nothing for it.
    """
    for const in outer.__code__.co_consts:
        if isinstance(const, CodeType) and const.co_name == name:
            _BODY_FORWARDERS[const] = const.co_freevars.index("send")
            return
    raise LookupError(f"{outer.__qualname__} defines no {name}")


def body_send(send: Send) -> Send:
    """The send that ``http.response.body`` messages reach unchanged through ``send``.

    A long response (an event stream) writes one body message per event per
    connection; each layer that only watches the response start costs a
    coroutine per write. This skips the layers declared with
    :func:`forwards_bodies` (request id, error envelope, CORS, access log)
    and stops at the first one that is not (an app's own middleware, or the
    server's send), so nothing that wants to see bodies is bypassed.
    """
    while True:
        code: Any = getattr(send, "__code__", None)
        index = _BODY_FORWARDERS.get(code)
        closure = getattr(send, "__closure__", None)
        if index is None or closure is None:
            return send
        send = closure[index].cell_contents


def is_valid_request_id(value: bytes) -> bool:
    """The rule for a client's ``X-Request-ID``: 1-128 of ``[A-Za-z0-9._-]``."""
    return _VALID_ID.fullmatch(value) is not None


class _IdSource:
    """Process-unique ids: a random 12-hex prefix plus a counter.

    Cheaper than ``uuid4()`` (no syscall per request) and still unique
    across processes: a forked child (uvicorn or gunicorn workers) draws a
    new prefix, so preloaded apps do not repeat each other's ids.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(6) + "-"
        self.counter = count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_ids = _IdSource()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reseed)


def new_request_id() -> str:
    """A fresh request id (what the middleware uses when the client sent none)."""
    return _ids.next()


_ID_MESSAGES = frozenset(
    {"http.response.start", "websocket.accept", "websocket.http.response.start"}
)


class RequestIDMiddleware:
    """Bind a request id for HTTP and WebSocket scopes and echo it to the client.

    A client's ``X-Request-ID`` is kept only when it passes
    :func:`is_valid_request_id`; otherwise (missing, too long, CR/LF, any
    other byte) a new id is made. The id is bound to the logging ContextVar
    for the whole call, reset with its token in ``finally``, and appended to
    ``http.response.start`` and ``websocket.accept`` headers -- so every
    response, the 500 of an unhandled error included, carries it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        raw: bytes | None = None
        for name, value in scope["headers"]:
            if name == _REQUEST_ID_HEADER:
                if _VALID_ID.fullmatch(value) is not None:
                    raw = value
                break
        if raw is None:
            rid = _ids.next()
            raw = rid.encode("ascii")
        else:
            rid = raw.decode("ascii")
        header = (_REQUEST_ID_HEADER, raw)

        async def send_with_id(message: Message) -> None:
            if message["type"] in _ID_MESSAGES:
                headers = message.get("headers")
                message["headers"] = [*headers, header] if headers else [header]
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


forwards_bodies(RequestIDMiddleware.__call__, "send_with_id")


def safe_for_log(text: str, limit: int = 2048) -> str:
    """``text`` with control characters escaped and length capped (no log injection)."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


class ErrorEnvelopeMiddleware:
    """Turn every exception of an HTTP request into the error envelope.

    "Every" includes a ``CancelledError`` or other ``BaseException`` that is
    not a shutdown (see :func:`_is_shutdown`): left to the server, it would
    answer ``text/plain`` without the request id.

    A :class:`BaseAPIException` becomes its status, headers and envelope.
    Anything else becomes a 500 ``INTERNAL_ERROR`` that reveals nothing,
    logged once here with its traceback (the request id rides along in the
    log record). If the response had already started, a second one cannot
    be sent: the error is logged and the call returns without finishing the
    body, so the server closes the connection and the client sees a
    truncated response rather than a complete-looking wrong one. A client
    that disconnected while sending its body gets no answer. ``report`` (the
    app's :class:`~ghar_core.error_reporting.ErrorReporter`) is handed every
    unhandled exception, with the request id still bound.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        logger: logging.Logger | None = None,
        report: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.app = app
        self.logger = logger or logging.getLogger("ghar_core.errors")
        self.report = report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except ClientDisconnect:
            self.logger.debug("client disconnected before the request was read")
        except BaseException as exc:
            if _is_shutdown(exc):
                raise
            # Escaped: method and path come from the client (no log injection).
            method = safe_for_log(str(scope.get("method")), 32)
            where = f"{method} {safe_for_log(scope.get('path', ''))}"
            unhandled = not isinstance(exc, BaseAPIException)
            if unhandled and self.report is not None:
                self.report(exc)
            if started:
                self.logger.error(
                    "error after the response started for %s; closing the connection",
                    where,
                    exc_info=exc,
                )
                return
            if not isinstance(exc, BaseAPIException):
                self.logger.error("unhandled error in %s", where, exc_info=exc)
            elif exc.status_code >= 500:
                self.logger.warning("%s answered %d: %s", where, exc.status_code, exc.message)
            await send_error(scope, send, exc, extra_headers=scope.get(CORS_SCOPE_KEY, ()))


forwards_bodies(ErrorEnvelopeMiddleware.__call__, "send_noting_start")


def _is_shutdown(exc: BaseException) -> bool:
    """Whether ``exc`` ends more than this request and must propagate.

    ``KeyboardInterrupt``/``SystemExit`` stop the process; a ``CancelledError``
    is the server's own only when this task is being cancelled (shutdown, a
    timeout around the call). One raised by awaiting a future that someone
    else cancelled (a shared task stopped at shutdown) is this request's
    error, and ends as the 500 envelope like any other.
    """
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is None or task.cancelling() > 0
    return not isinstance(exc, Exception) and isinstance(
        exc, KeyboardInterrupt | SystemExit | GeneratorExit
    )


async def send_error(
    scope: Scope,
    send: Send,
    exc: BaseException,
    *,
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """Send ``exc`` rendered as the envelope (headers only for HEAD)."""
    rendered = render_error(exc)
    headers = [*rendered.headers, *extra_headers] if extra_headers else rendered.headers
    await send({"type": "http.response.start", "status": rendered.status_code, "headers": headers})
    body = b"" if scope.get("method") == "HEAD" else rendered.body
    await send({"type": "http.response.body", "body": body})
