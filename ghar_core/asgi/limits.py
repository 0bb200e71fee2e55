"""What one client can make a server hold: limits enforced where requests are parsed.

uvicorn's httptools protocol reads a request head of any size (one 64 MiB
header is read whole), any number of headers, and waits forever for a head
or a body that never comes; it takes HTTP/1.1 without ``Host``, and its
``limit_concurrency`` answers ``text/plain`` without ``Retry-After``.
:class:`LimitedHttpToolsProtocol` is the same protocol with those holes
closed, every refusal the error envelope with an ``X-Request-ID``:

- the request head (request line and headers) over ``MAX_HEADER_BYTES``, or
  more than ``MAX_HEADERS`` fields: 431, refused while it is still arriving
  (at most one read chunk past the limit is ever held; a head pipelined in
  the read where the request before it ended is measured exactly once
  complete);
- a chunked body's framing and trailer fields over ``MAX_HEADER_BYTES``
  between two body bytes, or more than ``MAX_HEADERS`` trailer fields: 431
  (``TRAILERS_TOO_LARGE``/``TOO_MANY_TRAILERS``), refused while they arrive;
  if the app's answer has started, the connection is closed instead;
- a request target over ``MAX_URL_BYTES``: 414;
- HTTP/1.1 (or a later version in the request line) without ``Host``, or
  any request with two: 400 (RFC 9112 §3.2);
- a head not complete ``HEAD_TIMEOUT`` seconds after the connection opened
  (or after its first byte, between keep-alive requests): 408; a connection
  that never sent a byte is closed without an answer;
- a body not complete ``BODY_TIMEOUT`` seconds after its head: 408 (time
  the app spends not reading -- flow control, ``Expect: 100-continue`` --
  is not counted against the client);
- ``MAX_CONCURRENCY`` requests in flight in this worker: 503 with
  ``Retry-After``; ``MAX_CONNECTIONS`` open connections: a new one gets 503.

An idle keep-alive connection is closed by uvicorn's own
``timeout_keep_alive`` (``KEEP_ALIVE_TIMEOUT``, passed by
:func:`uvicorn_options`). Deadlines cover only the head and the body: once a
request is read, nothing here limits how long its answer takes, so event
streams and WebSockets (which leave this protocol) live as long as they
need. One timer per connection, re-armed lazily: a request that arrives in
one read costs no timer work at all.

``ghar-core serve`` uses it with the limits of the settings it serves with
(:func:`uvicorn_options`); under plain uvicorn pass ``--http
ghar_core.asgi.limits:LimitedHttpToolsProtocol``, and the limits are read
from the process settings (``ghar_core.config.get_settings()``).
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ghar_core.asgi.middleware import new_request_id
from ghar_core.exceptions import BaseAPIException, ServiceUnavailableException, render_error
from ghar_core.logging import request_id_var

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from ghar_core.config import Settings

__all__ = [
    "PROTOCOL",
    "LimitedHttpToolsProtocol",
    "ServerLimits",
    "uvicorn_options",
]

logger = logging.getLogger("ghar_core.limits")

#: The import string of the protocol, for uvicorn's ``http=`` (or ``--http``).
PROTOCOL = "ghar_core.asgi.limits:LimitedHttpToolsProtocol"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The limits of one worker; ``0`` turns a count limit off. See the module doc."""

    max_header_bytes: int = 16_384
    max_headers: int = 100
    max_url_bytes: int = 8_192
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    max_concurrency: int = 1_000
    max_connections: int = 2_000

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerLimits:
        """The limits the ``MAX_*``/``*_TIMEOUT`` settings describe."""
        return cls(
            max_header_bytes=settings.MAX_HEADER_BYTES,
            max_headers=settings.MAX_HEADERS,
            max_url_bytes=settings.MAX_URL_BYTES,
            head_timeout=settings.HEAD_TIMEOUT,
            body_timeout=settings.BODY_TIMEOUT,
            max_concurrency=settings.MAX_CONCURRENCY,
            max_connections=settings.MAX_CONNECTIONS,
        )


def _settings_limits() -> ServerLimits:
    from ghar_core.config import get_settings

    return ServerLimits.from_settings(get_settings())


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing and answer ``error``."""

    def __init__(self, error: BaseAPIException) -> None:
        super().__init__(error.message)
        self.error = error


def _refusal(status: int, code: str, message: str, **details: Any) -> _Refusal:
    return _Refusal(
        BaseAPIException(message, status_code=status, error_code=code, details=details or None)
    )


# Parser phases: between requests, inside a head, inside a body, refused or
# handed to the WebSocket protocol (nothing of ours applies any more).
_IDLE, _HEAD, _BODY, _DONE = range(4)
# The versions llhttp parses that predate Host (RFC 9112, section 3.2; RFC 9110, 7.2).
_NO_HOST_NEEDED = frozenset({"0.9", "1.0"})
# uvicorn's callback that ours extends, called as a plain function: looking it
# up on the class each time (``HttpToolsProtocol.on_headers_complete``) is an
# unspecialised attribute lookup on a type per request (CPython 3.11).
_on_headers_complete = HttpToolsProtocol.on_headers_complete
# After a refusal the read side stays open this long, discarding, so the
# client reads the answer instead of a reset (closing with unread data sends RST).
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`ServerLimits`.

    ``limits`` defaults to the process settings (``ghar_core.config``);
    tests and embedders pass their own with ``functools.partial``.
    """

    # uvicorn's protocol keeps 28 attributes in its instance dict; ours there
    # too would pass CPython's 30-key limit for dicts that share their keys
    # with the class (3.11), and every attribute access, uvicorn's own too,
    # would be a plain dict lookup instead of a specialised one. Ours live in slots.
    __slots__ = (
        "_chunk_len",
        "_deadline",
        "_deadline_for",
        "_discarded",
        "_framing",
        "_head_bytes",
        "_hosts",
        "_max_fields",
        "_max_head_fast",
        "_max_tasks",
        "_phase",
        "_slack",
        "_timer",
        "limits",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ServerLimits | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits if limits is not None else _settings_limits()
        # The limits the hot path compares with, each one attribute away; a
        # MAX_CONCURRENCY of 0 (no limit) as a count never reached.
        self._max_fields = self.limits.max_headers
        self._max_head_fast = min(self.limits.max_header_bytes, self.limits.max_url_bytes)
        self._max_tasks = self.limits.max_concurrency or sys.maxsize
        self._phase = _IDLE
        self._head_bytes = 0
        # Host fields of the message being parsed, counted by on_header.
        self._hosts = 0
        self._deadline: float | None = None
        self._deadline_for = _IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._discarded = 0
        self._framing = 0
        # Bytes of the read in which the last request ended: a head pipelined
        # behind it started somewhere in there, uncounted by _head_bytes.
        self._chunk_len = 0
        self._slack = 0

    # --- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.limits.max_connections
        if cap and len(self.connections) > cap:
            self._refuse(
                ServiceUnavailableException(
                    "Too many open connections; retry shortly.",
                    error_code="TOO_MANY_CONNECTIONS",
                    headers={"Retry-After": "1"},
                    details={"max_connections": cap},
                )
            )
            return
        # The first head is due HEAD_TIMEOUT after the connection opened.
        self._set_deadline(_HEAD, self.limits.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._phase
        self._chunk_len = size = len(data)
        if before < _BODY:
            # Bytes outside a body are (part of) a head: counted, checked below.
            # (No on_message_begin hook: one call less per request.)
            self._phase = _HEAD
            self._head_bytes += size
        elif before == _BODY:
            # Inside a body, what the parser takes without handing the app a byte
            # is framing: chunk sizes, extensions, trailer fields (checked below).
            body_before = len(self.cycle.body)
        else:
            self._discard(data)
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except _Refusal as refusal:  # pragma: no cover - httptools wraps them
            self._refuse(refusal.error)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._phase = _DONE
                self._deadline = None
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause.error)
            else:
                self._refuse(
                    BaseAPIException(
                        "The request is not valid HTTP/1.1.",
                        status_code=400,
                        error_code="BAD_HTTP_REQUEST",
                        details={"reason": str(exc)[:120]},
                    )
                )
            return
        phase = self._phase
        if not phase:  # _IDLE: every request in the read was complete
            return
        if phase == _HEAD:
            limit = self.limits.max_header_bytes
            if self._head_bytes > limit:
                self._refuse(_head_too_large(limit).error)
            elif self._deadline_for != _HEAD or self._deadline is None:
                self._set_deadline(_HEAD, self.limits.head_timeout)
        elif phase == _BODY:
            if before == _BODY:  # not the read in which the body began
                self._count_framing(size, body_before)
            if self._phase == _BODY and (self._deadline_for != _BODY or self._deadline is None):
                self._set_deadline(_BODY, self.limits.body_timeout)

    def _count_framing(self, size: int, body_before: int) -> None:
        """Refuse trailer fields (or chunk framing) past the head's limits while they arrive.

        httptools concatenates one field piece by piece before its callback sees
        it (quadratic in the field's size), so the bytes are counted here, per
        read: a read that carries a body byte resets the count, one that does
        not adds to it. At most one read past ``MAX_HEADER_BYTES`` is held.
        """
        cycle = self.cycle
        if len(cycle.body) != body_before or cycle.response_complete:
            # (The app answered already: uvicorn drops the body, so nothing tells.)
            self._framing = 0
        else:
            self._framing += size
        limits = self.limits
        if self._framing > limits.max_header_bytes:
            self._refuse(_trailers_too_large(limits.max_header_bytes).error)
        elif limits.max_headers and len(self.headers) > limits.max_headers:
            self._refuse(_too_many_trailers(limits.max_headers).error)

    # --- parser callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # What uvicorn's on_header does (the same field kept, the same Expect
        # test), and Host fields counted: a test in the callback the parser makes
        # anyway costs half what a loop over the headers after would, and calling
        # uvicorn's from here would cost a frame per field. The two are compared
        # in tests/asgi/test_server_limits.py.
        name = name.lower()
        # RFC 9110, 5.5: trailing whitespace is not part of the value (llhttp keeps it).
        value = value.rstrip(b" \t")
        if name == b"host":
            self._hosts += 1
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers = self.headers
        hosts = self._hosts
        # One combined test on the hot path; which limit it was is worked out after.
        # The target is part of the head, so a head within _max_head_fast (the
        # smaller of MAX_HEADER_BYTES and MAX_URL_BYTES) has a target within both.
        if (
            hosts != 1
            or self._head_bytes + self._slack > self._max_head_fast
            or len(headers) > self._max_fields
            or len(self.tasks) >= self._max_tasks
        ):
            self._check_head(hosts)
        self._head_bytes = self._slack = self._framing = 0
        _on_headers_complete(self)
        # uvicorn appends trailer fields to this list, which the scope shares: a
        # fresh one keeps a trailer from becoming a header after the head was
        # checked (a second Host, an Authorization) and counts the trailers.
        # Trailers are discarded (RFC 9110, 6.5.1).
        self.headers = []
        self._phase = _BODY

    def _get_upgrade(self) -> bytes | None:
        # uvicorn's reads self.headers, which holds only trailers once the head is done.
        connection: list[bytes] = []
        upgrade = None
        for name, value in self.scope["headers"]:
            if name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
            elif name == b"upgrade":
                upgrade = value.lower()
        return upgrade if b"upgrade" in connection else None

    def _check_head(self, hosts: int) -> None:
        """Raise the refusal for the limit a complete head broke, if it broke one."""
        limits = self.limits
        headers = self.headers
        if self._head_bytes + self._slack > limits.max_header_bytes and (
            _head_size(self.url, headers) > limits.max_header_bytes
        ):
            raise _head_too_large(limits.max_header_bytes)
        if len(headers) > limits.max_headers:
            raise _refusal(
                431,
                "TOO_MANY_HEADERS",
                f"The request has more than {limits.max_headers} header fields.",
                max_headers=limits.max_headers,
            )
        if len(self.url) > limits.max_url_bytes:
            raise _refusal(
                414,
                "URI_TOO_LONG",
                f"The request target is longer than {limits.max_url_bytes} bytes.",
                max_url_bytes=limits.max_url_bytes,
            )
        # Only requests older than HTTP/1.1 may go without Host; llhttp also takes
        # "HTTP/2.0" in a request line, which has no :authority to stand in for it.
        if hosts != 1 and (hosts > 1 or self.parser.get_http_version() not in _NO_HOST_NEEDED):
            raise _refusal(
                400,
                "BAD_HOST_HEADER",
                "An HTTP/1.1 (or later) request needs exactly one Host header "
                "(RFC 9112, section 3.2).",
                host_headers=hosts,
            )
        cap = limits.max_concurrency
        if cap and len(self.tasks) >= cap:
            raise _Refusal(
                ServiceUnavailableException(
                    "The server is at its concurrency limit; retry shortly.",
                    error_code="TOO_MANY_REQUESTS_IN_FLIGHT",
                    headers={"Retry-After": "1"},
                    details={"max_concurrency": cap},
                )
            )

    def on_message_complete(self) -> None:
        # Trailer fields that arrived with the read that ended the message.
        if self.headers and 0 < self.limits.max_headers < len(self.headers):
            raise _too_many_trailers(self.limits.max_headers)
        # What uvicorn's on_message_complete does, inline (a frame less per
        # request; compared with uvicorn's in tests/asgi/test_server_limits.py):
        # the body is complete, unless the connection is being upgraded or the
        # app has answered already.
        cycle = self.cycle
        if not (
            (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete
        ):
            cycle.more_body = False
            cycle.message_event.set()
        # Read whole: from here the app has all the time it needs (streams, SSE).
        # Host fields among the trailers do not count towards the next head.
        self._hosts = 0
        self._slack = self._chunk_len
        self._phase = _IDLE
        self._deadline = None

    # --- deadlines ---------------------------------------------------------------------

    def _set_deadline(self, kind: int, seconds: float) -> None:
        when = self.loop.time() + seconds
        self._deadline = when
        self._deadline_for = kind
        if self._timer is None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        when = self._deadline
        if when is None or self._phase == _DONE or self.transport.is_closing():
            return
        now = self.loop.time()
        if now < when:  # the deadline moved on since this timer was armed
            self._timer = self.loop.call_at(when, self._on_timer)
            return
        cycle = self.cycle
        if self._deadline_for == _BODY and (
            self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue)
        ):
            # The app is not reading yet: not the client's delay.
            self._set_deadline(_BODY, self.limits.body_timeout)
            return
        self._timed_out()

    def _timed_out(self) -> None:
        if self._phase == _IDLE and self.cycle is None:
            logger.info("closing a connection that sent nothing in %gs", self.limits.head_timeout)
            self._close()
            return
        cycle = self.cycle
        if self._phase == _BODY:
            pass  # _refuse tells the handler, or closes if its answer started
        elif cycle is not None and cycle.response_started and not cycle.response_complete:
            # A slow head pipelined behind a response in progress: no room for a 408.
            self._close()
            return
        which = "head" if self._deadline_for == _HEAD else "body"
        seconds = self.limits.head_timeout if which == "head" else self.limits.body_timeout
        self._refuse(
            BaseAPIException(
                f"The request {which} did not arrive within {seconds:g} seconds.",
                status_code=408,
                error_code="REQUEST_TIMEOUT",
                details={f"{which}_timeout": seconds},
            )
        )

    # --- refusing ----------------------------------------------------------------------

    def _refuse(self, error: BaseAPIException) -> None:
        """Answer ``error`` as the envelope, close after a short linger, log once.

        A request refused while earlier ones on the connection are still being
        answered (pipelining) is answered in its turn: the refusal joins uvicorn's
        queue of requests (:class:`_QueuedRefusal`), so answers go out in request
        order and the earlier ones are not cut. A queued request whose body is
        refused never reaches the app: the refusal takes its place in the queue.
        """
        cycle = self.cycle
        if self._phase == _BODY and cycle is not None and not cycle.response_complete:
            # The handler may be waiting on receive(): tell it the client is gone,
            # and make sure nothing it sends later follows our answer.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                logger.warning("refused a request whose answer had started: %s", error.error_code)
                self._close()
                return
            if self.pipeline:  # queued behind the answers before it
                if self.pipeline[0][0] is cycle:  # (newest first) never run, then
                    self.pipeline.popleft()
                self._queue_refusal(error)
                return
        elif self._phase != _BODY and (
            self.pipeline or (cycle is not None and not cycle.response_complete)
        ):
            self._queue_refusal(error)
            return
        self._answer_refusal(error)

    def _queue_refusal(self, error: BaseAPIException) -> None:
        self._phase = _DONE
        self._deadline = None
        # uvicorn starts the next entry when an answer completes: it only calls
        # run_asgi(app) on the cycle, which is all _QueuedRefusal has.
        entry = (_QueuedRefusal(self, error), self.app)
        self.pipeline.appendleft(entry)  # type: ignore[arg-type]

    def _answer_queued(self, error: BaseAPIException) -> None:
        if not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self._answer_refusal(error)

    def _answer_refusal(self, error: BaseAPIException) -> None:
        rid = new_request_id()
        rendered = render_error(error)
        status = rendered.status_code
        try:
            phrase = http.HTTPStatus(status).phrase.encode()
        except ValueError:  # pragma: no cover - our statuses are all standard
            phrase = b""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        for name, value in [*self.server_state.default_headers, *rendered.headers]:
            lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"x-request-id: %s\r\nconnection: close\r\n\r\n" % rid.encode())
        lines.append(rendered.body)
        self.transport.write(b"".join(lines))
        token = request_id_var.set(rid)
        try:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            logger.warning("refused %s: %d %s", client, status, error.error_code)
        finally:
            request_id_var.reset(token)
        self._phase = _DONE
        self._deadline = None
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(_LINGER_SECONDS, transport.close)
        else:  # pragma: no cover - TCP transports can
            transport.close()

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > _LINGER_BYTES:
            self.transport.close()

    def _close(self) -> None:
        self._phase = _DONE
        self._deadline = None
        self.transport.close()


class _QueuedRefusal:
    """A refusal waiting in uvicorn's pipeline for the answers ahead of it.

    uvicorn runs the next queued request when an answer completes, by calling
    ``run_asgi(app)`` on its cycle; run in its turn like that, this one writes
    the refusal (our protocol then needs no hook on every completed answer).
    """

    __slots__ = ("error", "protocol")

    def __init__(self, protocol: LimitedHttpToolsProtocol, error: BaseAPIException) -> None:
        self.protocol = protocol
        self.error = error

    async def run_asgi(self, app: object) -> None:
        self.protocol._answer_queued(self.error)


def _head_too_large(limit: int) -> _Refusal:
    return _refusal(
        431,
        "HEADERS_TOO_LARGE",
        f"The request line and headers exceed {limit} bytes.",
        max_header_bytes=limit,
    )


def _trailers_too_large(limit: int) -> _Refusal:
    return _refusal(
        431,
        "TRAILERS_TOO_LARGE",
        f"The chunked body's framing and trailer fields exceed {limit} bytes.",
        max_header_bytes=limit,
    )


def _too_many_trailers(limit: int) -> _Refusal:
    return _refusal(
        431,
        "TOO_MANY_TRAILERS",
        f"The chunked body has more than {limit} trailer fields.",
        max_headers=limit,
    )


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """The head's size as sent, near enough: the target, each ``name: value\\r\\n``."""
    return len(url) + 16 + sum(len(name) + len(value) + 4 for name, value in headers)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What ``uvicorn.run``/``uvicorn.Config`` need to enforce the limits of ``settings``.

    Our protocol bound to these limits (a ``functools.partial``, which pickles
    into every worker process), uvicorn's own keep-alive timeout, and no
    ``limit_concurrency`` (ours answers the envelope).
    """
    return {
        "http": functools.partial(
            LimitedHttpToolsProtocol, limits=ServerLimits.from_settings(settings)
        ),
        "timeout_keep_alive": settings.KEEP_ALIVE_TIMEOUT,
        "limit_concurrency": None,
    }
