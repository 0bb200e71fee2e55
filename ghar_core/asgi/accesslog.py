"""The access log: one line per HTTP request, cheap enough for the hot path.

:class:`AccessLogMiddleware` measures the request and hands ``(method,
path, status, duration_ms)`` to a *sink*; the request id comes from the
logging ContextVar (the middleware runs inside the request-ID one). Secret
query values are redacted (:func:`redact_query`) and control characters
escaped before any sink sees the path. The middleware is a no-op when the
``ghar_core.access`` logger is not enabled for INFO, whatever the sink.

Two sinks:

- :class:`LoggingAccessSink` (the default) emits a normal ``LogRecord`` so
  every handler, formatter and ``caplog`` sees it -- about 5-8 us a line;
- :class:`BufferedAccessLog` formats the line itself (plain or JSON, the
  same fields as ``ghar_core.logging``'s formatters) into a buffer that is
  written at most every ``flush_interval`` seconds or ``max_lines`` lines --
  under 1 us a line. ``ghar-core serve`` gives it to the served app
  (:meth:`App.use_access_sink`) and flushes it before any other log line
  is written, so the stream stays in order; the app flushes it on shutdown
  (and an ``atexit`` hook flushes what is left if the process ends without
  a shutdown).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import orjson

from ghar_core.asgi.middleware import forwards_bodies, safe_for_log
from ghar_core.logging import REDACTED, redact_query, request_id_var

if TYPE_CHECKING:
    from ghar_core.asgi.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "REDACTED",
    "AccessLogMiddleware",
    "AccessSink",
    "BufferedAccessLog",
    "LoggingAccessSink",
    "redact_query",
]

AccessSink = Callable[[str, str, int, float], None]
"""``sink(method, path, status, duration_ms)``; must not raise or block."""


class LoggingAccessSink:
    """Emit each access line as an INFO record on ``logger`` (``extra``: the fields)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("ghar_core.access")

    def __call__(self, method: str, path: str, status: int, duration_ms: float) -> None:
        self.logger.info(
            "%s %s %d %.2fms",
            method,
            path,
            status,
            duration_ms,
            extra={
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round(duration_ms, 3),
                "request_id": request_id_var.get() or "-",
            },
        )


_open_buffers: weakref.WeakSet[BufferedAccessLog] = weakref.WeakSet()


@atexit.register
def _flush_open_buffers() -> None:
    for buffer in list(_open_buffers):
        buffer.flush()


class BufferedAccessLog:
    """A fast access-log sink: format now, write in batches (see the module doc).

    ``stream`` defaults to ``sys.stderr`` (where ``configure_logging``
    writes); ``json=True`` writes one JSON object per line with the fields
    of ``JSONFormatter`` (ts, level, logger, message, request_id, method,
    path, status, duration_ms). :meth:`close` flushes and stops; it is
    idempotent. A write error is reported once to stderr and the lines are
    dropped: the access log never fails a request.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        json: bool = False,
        flush_interval: float = 0.2,
        max_lines: int = 256,
        logger_name: str = "ghar_core.access",
    ) -> None:
        if flush_interval <= 0 or max_lines < 1:
            raise ValueError("flush_interval must be > 0 and max_lines >= 1")
        self.stream = stream
        self.json = json
        self.flush_interval = flush_interval
        self.max_lines = max_lines
        self.logger_name = logger_name
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._plain_infix = f"Z INFO     {logger_name} ["
        self._closed = False
        self._reported = False
        _open_buffers.add(self)

    def __call__(self, method: str, path: str, status: int, duration_ms: float) -> None:
        if self._closed:
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            # The date part changes once a second; format it only then.
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        millis = int((now - second) * 1000)
        rid = request_id_var.get() or "-"
        if self.json:
            line = orjson.dumps(
                {
                    "ts": f"{self._stamp}{millis:03d}Z",
                    "level": "INFO",
                    "logger": self.logger_name,
                    "message": f"{method} {path} {status} {duration_ms:.2f}ms",
                    "request_id": rid,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round(duration_ms, 3),
                }
            ).decode()
        else:
            line = (
                f"{self._stamp}{millis:03d}{self._plain_infix}{rid}] "
                f"{method} {path} {status} {duration_ms:.2f}ms"
            )
        lines = self._lines
        lines.append(line)
        if len(lines) >= self.max_lines:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
            else:
                self._timer = loop.call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write the buffered lines now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "\n".join(self._lines) + "\n"
        self._lines.clear()
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError) as exc:
            if not self._reported:
                self._reported = True
                print(f"ghar_core access log: cannot write: {exc}", file=sys.__stderr__)

    def close(self) -> None:
        """Flush what is buffered and stop accepting lines."""
        self.flush()
        self._closed = True
        _open_buffers.discard(self)


class AccessLogMiddleware:
    """Measure each HTTP request (and WebSocket) and hand one line to the sink.

    Status ``0`` means the app never started a response (the client went
    away first). A WebSocket is logged when its call ends, with method
    ``WS``, status ``101`` when it was accepted, the denial's status when it
    was refused with a response, ``403`` when closed before accepting, and
    the whole connection's duration. See the module doc for the sinks and
    what is redacted.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        sink: AccessSink | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.logger = logger or logging.getLogger("ghar_core.access")
        self.sink: AccessSink = sink if sink is not None else LoggingAccessSink(self.logger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (kind != "http" and kind != "websocket") or not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                status = message["status"]
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and status == 0:
                status = 403  # closed before accepting: servers answer 403
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            duration_ms = (time.perf_counter() - start) * 1000.0
            path: str = scope["path"]
            root = scope.get("root_path")
            if root and not path.startswith(root):
                path = root + path  # a host that stripped the prefix itself
            if not path.isprintable() or len(path) > 2048:
                path = safe_for_log(path)
            query = scope.get("query_string")
            if query:
                # WebSocket clients pass ?access_token=: redacted like every secret.
                path += "?" + safe_for_log(redact_query(query.decode("latin-1")))
            method: str = scope["method"] if kind == "http" else "WS"
            if len(method) > 16 or not method.isalpha():
                # Servers validate the method; a host that does not could pass CR/LF.
                method = safe_for_log(method, 32)
            self.sink(method, path, status, duration_ms)


forwards_bodies(AccessLogMiddleware.__call__, "send_noting_status")
