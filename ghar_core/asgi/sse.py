"""The event-stream routes: ``GET {API_V1_STR}/events/stream`` and ``POST .../events/test``.

The stream authenticates by ``Authorization: Bearer`` or the ``access_token``
query parameter (``EventSource`` cannot send headers; every log line redacts
it), subscribes to the caller's events on the app's ``"sse"`` resource and
writes them as SSE frames. Resume: the browser's own ``Last-Event-ID`` header
(or ``?last_event_id=`` for a first connect that knows where it stood).

:class:`EventStreamResponse` writes the frames itself rather than through
``StreamingResponse``, because every write must be bounded: a client that
stops reading fills its socket and the write blocks, so each ``send`` --
keepalives included -- is limited to ``SSE_SEND_TIMEOUT`` and the client is
dropped past it. A disconnect is noticed at once (a task waits on
``http.disconnect``) and unsubscribes. At shutdown each stream gets the events
still queued, a final jittered ``retry:`` and a proper end of the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any, Final

from ghar_core.asgi.auth import current_user
from ghar_core.asgi.middleware import body_send
from ghar_core.lifecycle import ResourceNotFound
from ghar_core.sse import DISCONNECTED, SHUTDOWN, SSEEventBus, Subscription, get_sse_bus

if TYPE_CHECKING:
    from ghar_core.asgi.app import App
    from ghar_core.asgi.requests import Request
    from ghar_core.asgi.types import Message, Receive, Scope, Send

__all__ = ["EventStreamResponse", "emit_test_event", "event_stream", "register_sse_routes"]

logger = logging.getLogger("ghar_core.sse")

_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_KEEPALIVE: Final = b": keepalive\n\n"
_MAX_ID_LENGTH: Final = 200


def _bus_of(app: App) -> SSEEventBus:
    try:
        return app.resources.get("sse", SSEEventBus)
    except ResourceNotFound:
        return get_sse_bus()


def _chunk(body: bytes) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": True}


class _Ticker:
    """One timer for every open stream of a loop: keepalives due and sends past their time.

    A timer per write (``asyncio.timeout``) and one per wait cost more than
    the write they bound, with thousands of streams each writing every event.
    Instead each stream counts its writes; this ticker looks at every stream a
    few times per interval and acts on those whose count stood still: one
    blocked in a send for ``send_timeout`` is cancelled (and dropped), one
    waiting idle for ``heartbeat`` gets its keepalive. Both fire within a
    quarter of their interval after it is due.
    """

    __slots__ = ("loop", "period", "streams", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.streams: set[EventStreamResponse] = set()
        self.period = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, stream: EventStreamResponse) -> None:
        self.streams.add(stream)
        period = max(0.005, min(stream.heartbeat, stream.send_timeout) / 4)
        if self.timer is None or period < self.period:
            self.period = period
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(period, self._tick)

    def discard(self, stream: EventStreamResponse) -> None:
        self.streams.discard(stream)
        if not self.streams:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if _tickers.get(self.loop) is self:
                del _tickers[self.loop]

    def _tick(self) -> None:
        period = self.period
        for stream in list(self.streams):
            if stream.writes != stream.seen:
                stream.seen, stream.still = stream.writes, 0.0
                continue
            stream.still += period
            if stream.sending:
                if stream.still >= stream.send_timeout:
                    stream.expire()
            elif stream.still >= stream.heartbeat:
                stream.still = 0.0
                stream.subscription.nudge()
        self.timer = self.loop.call_later(period, self._tick) if self.streams else None


_tickers: dict[asyncio.AbstractEventLoop, _Ticker] = {}


def _ticker() -> _Ticker:
    loop = asyncio.get_running_loop()
    ticker = _tickers.get(loop)
    if ticker is None:
        ticker = _tickers[loop] = _Ticker(loop)
    return ticker


class EventStreamResponse:
    """Stream one :class:`~ghar_core.sse.Subscription` as ``text/event-stream``.

    The response owns the subscription from the moment it is built: every
    way out of :meth:`__call__` closes it. ``retry`` is the reconnect hint in
    seconds; at shutdown the final hint is drawn uniformly from 1 to 4 times
    it, so clients do not all come back in the same instant.
    """

    __slots__ = (
        "expired",
        "heartbeat",
        "retry",
        "seen",
        "send_timeout",
        "sending",
        "still",
        "subscription",
        "task",
        "writes",
    )

    def __init__(
        self,
        subscription: Subscription,
        *,
        heartbeat: float,
        send_timeout: float,
        retry: float,
    ) -> None:
        self.subscription = subscription
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.retry = retry
        # Read by the loop's _Ticker: writes done, and whether one is under way.
        self.writes = self.seen = 0
        self.still = 0.0
        self.sending = self.expired = False
        self.task: asyncio.Task[Any] | None = None

    async def _send(self, send: Send, message: Message) -> None:
        # Bounded by the shared ticker, which cancels a send that stands still
        # for send_timeout; a write that does not block costs two assignments.
        self.sending = True
        try:
            await send(message)
        except asyncio.CancelledError:
            self._timed_out()
            raise
        finally:
            self.sending = False
        self.writes += 1

    def _timed_out(self) -> None:
        # A send was cancelled: by the ticker for send_timeout (a TimeoutError,
        # raised from here), or by someone else (the caller re-raises).
        task = self.task
        if self.expired and task is not None and task.uncancel() == 0:
            raise TimeoutError from None

    def expire(self) -> None:
        """The ticker's verdict: this stream's send blocked past ``send_timeout``."""
        task = self.task
        if not self.expired and task is not None and not task.done():
            self.expired = True
            task.cancel()

    def _opening(self) -> bytes:
        sub = self.subscription
        first = b"retry: %d\n" % round(self.retry * 1000)
        if sub.last_event_id is None:
            # A fresh client learns where it starts, so a reconnect before its
            # first event still resumes exactly (EventSource keeps an id-only block).
            first += b"id: %s:%d\n" % (sub.epoch.encode("ascii"), sub.cursor)
        return first + b"\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.subscription
        watcher: asyncio.Task[None] | None = None
        self.task = asyncio.current_task()
        ticker = _ticker()
        ticker.add(self)
        try:
            start = {"type": "http.response.start", "status": 200, "headers": _HEADERS}
            await self._send(send, start)
            if scope.get("method") == "HEAD":
                await self._send(send, {"type": "http.response.body", "body": b""})
                return
            watcher = asyncio.ensure_future(_watch_disconnect(receive, sub))
            # Past the start, the layers that only watch it are skipped.
            send = body_send(send)
            await self._send(send, _chunk(self._opening()))
            while True:
                # Wait for the first event (the ticker ends the wait with False
                # when a keepalive is due), then take everything queued at once.
                if not await sub.wait():
                    await self._send(send, _chunk(_KEEPALIVE))
                    continue
                batch = sub.take()
                if batch is None:
                    break
                if batch:
                    # _send(), inlined: this write happens once per event per stream.
                    body = batch[0].frame if len(batch) == 1 else b"".join(e.frame for e in batch)
                    self.sending = True
                    try:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    except asyncio.CancelledError:
                        self._timed_out()
                        raise
                    finally:
                        self.sending = False
                    self.writes += 1
            if sub.close_reason == DISCONNECTED:
                return  # nobody to tell
            retry = round(self.retry * 1000 * random.uniform(1.0, 4.0))
            final = b"retry: %d\n\n" % retry
            await self._send(send, {"type": "http.response.body", "body": final})
            if sub.close_reason != SHUTDOWN:
                logger.info("sse stream of %s ended: %s", sub.user, sub.close_reason)
        except TimeoutError:
            # The client stopped reading and its socket is full: drop it. Returning
            # without ending the response makes the server close the connection.
            sub.close("send_timeout")
            logger.warning(
                "sse: dropped a stream of %s whose client stopped reading (no write in %gs)",
                sub.user,
                self.send_timeout,
            )
        finally:
            ticker.discard(self)
            sub.close()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher


async def _watch_disconnect(receive: Receive, sub: Subscription) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.close(DISCONNECTED)
            return


async def event_stream(request: Request) -> EventStreamResponse:
    """``GET {API_V1_STR}/events/stream``: the caller's events (401, or 503 past the cap)."""
    user = await current_user(request, allow_query_token=True)
    headers = request.headers
    last_id = headers.get("last-event-id") or request.query_params.get("last_event_id")
    if last_id is not None:
        last_id = last_id[:_MAX_ID_LENGTH]
    settings = request.app.settings
    bus = _bus_of(request.app)
    sub = bus.subscribe(user.id, last_event_id=last_id or None)
    if request.method != "HEAD":
        await sub.open()  # SSEUnavailableError (503 + Retry-After) past the cap
    return EventStreamResponse(
        sub,
        heartbeat=settings.SSE_HEARTBEAT_INTERVAL,
        send_timeout=settings.SSE_SEND_TIMEOUT,
        retry=settings.SSE_RETRY_INTERVAL,
    )


async def emit_test_event(request: Request) -> dict[str, Any]:
    """``POST {API_V1_STR}/events/test``: a ``test`` event to the caller's own streams.

    An optional JSON body becomes the event's ``data``. Answers the event's id
    and how many open streams got it.
    """
    user = await current_user(request)
    body = await request.body()
    data: Any = await request.json() if body.strip() else {"message": "test event"}
    published = await _bus_of(request.app).send(user.id, {"type": "test", "data": data})
    return {"id": published.event.id, "delivered": published.delivered}


def register_sse_routes(app: App) -> None:
    """Add both routes to ``app`` unless ``ENABLE_SSE`` is off (``create_app`` does this)."""
    if not app.settings.ENABLE_SSE:
        return
    prefix = app.settings.API_V1_STR
    app.add_route(f"{prefix}/events/stream", event_stream, ("GET",))
    app.add_route(f"{prefix}/events/test", emit_test_event, ("POST",))
