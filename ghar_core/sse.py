"""The per-user event bus behind ``GET {API_V1_STR}/events/stream`` (resource ``"sse"``).

``sse_bus.emit(user_id, event)`` after a commit: it never blocks and never
awaits, and returns how many open streams got the event. Each open stream is
one :class:`Subscription` with a bounded queue; a full queue drops its oldest
event and takes the new one. Subscriptions that stay full for
``SSE_FULL_CYCLES_LIMIT`` reap cycles (a reap runs every 10 emits and every
``SSE_REAPER_INTERVAL`` seconds) or go ``SSE_IDLE_TIMEOUT`` without being read
are removed; past ``SSE_MAX_SUBSCRIBERS`` a new subscription is refused (503).

Exact resume. Every event of a user has a *position* that only grows, under an
*epoch* that changes whenever positions could have been lost (a new process,
a user's log forgotten); the SSE ``id:`` is ``"<epoch>:<position>"``. A client
that comes back with ``Last-Event-ID`` is subscribed first (live events
buffer in its queue), then given what it missed from a small per-user history
(``SSE_HISTORY_SIZE`` events, ``SSE_HISTORY_MAX_AGE`` seconds), then the live
events, skipping any it already got: nothing lost, nothing twice. When the gap
cannot be filled -- another epoch, older than the history, a malformed id, or
this subscription's own queue dropped events -- the client gets an in-band
``reset`` event (its ``data`` names the reason) and must reload its state;
there is never a silent hole.

Positions, epochs and history come from an :class:`EventLog`; the default is
the in-process :class:`MemoryEventLog`. A broker that spans processes supplies
its own log (positions from an outbox) and hands events that were published
elsewhere to :meth:`SSEEventBus.deliver`.

Ownership: the app's lifespan owns the ``"sse"`` resource (``start`` runs the
reaper, ``stop`` ends every stream). ``sse_bus`` is the process default: it
forwards to the running app's bus (the first ``SSEEventBus`` started in the
process), else to one built from the settings on first use.

Shutdown: servers wait for open responses before they run the lifespan
shutdown, and an event stream never ends by itself. So ``start`` chains the
process's SIGINT/SIGTERM handlers (when it runs in the main thread): on the
signal every stream gets a final jittered ``retry:`` and ends, then the
server's own handler runs as before. A host that stops by other means calls
:meth:`SSEEventBus.begin_shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from decimal import Decimal
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, runtime_checkable

import orjson

from ghar_core.exceptions import ServiceUnavailableException
from ghar_core.logging import RedactingFilter

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = [
    "CLOSED_BY_CLIENT",
    "DISCONNECTED",
    "REAPED_IDLE",
    "REAPED_STALLED",
    "RESET_EVENT",
    "SHUTDOWN",
    "Event",
    "EventLog",
    "MemoryEventLog",
    "Published",
    "SSEEventBus",
    "SSEUnavailableError",
    "Subscription",
    "format_event_id",
    "get_sse_bus",
    "parse_event_id",
    "set_default_bus",
    "sse_bus",
]

logger = logging.getLogger("ghar_core.sse")

#: The type of the in-band event that tells a client to reload its state.
RESET_EVENT: Final = "reset"
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_REAP_EVERY: Final = 10  # emits between two reaps of the full queues
_JSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS


def _json_default(value: Any) -> Any:
    # The same extras as JSON responses: UUID subclasses (asyncpg's), Decimal, sets.
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def format_event_id(epoch: str, position: int) -> str:
    """The SSE ``id:`` of position ``position`` under ``epoch``."""
    return f"{epoch}:{position}"


def parse_event_id(text: str | None) -> tuple[str, int] | None:
    """``(epoch, position)`` from a ``Last-Event-ID``, or ``None`` when it is not one of ours."""
    if not text:
        return None
    epoch, sep, digits = text.strip().rpartition(":")
    if not sep or not _EPOCH.match(epoch) or not digits.isdigit() or len(digits) > 18:
        return None
    return epoch, int(digits)


class Event:
    """One event of one user's stream, encoded once and shared by every subscriber.

    ``frame`` is the complete SSE block (``id:``, ``event:``, ``data:``);
    ``data`` is the mapping that was emitted (do not mutate it afterwards).
    """

    __slots__ = ("data", "epoch", "frame", "position", "ts", "type", "user")

    def __init__(
        self,
        user: str,
        epoch: str,
        position: int,
        type: str,
        data: Any,
        payload: bytes,
        ts: float,
    ) -> None:
        self.user = user
        self.epoch = epoch
        self.position = position
        self.type = type
        self.data = data
        self.ts = ts
        self.frame = b"id: %s:%d\nevent: %s\ndata: %s\n\n" % (
            epoch.encode("ascii"),
            position,
            type.encode("ascii"),
            payload,
        )

    @property
    def id(self) -> str:
        """``"<epoch>:<position>"``, what the client sends back as ``Last-Event-ID``."""
        return format_event_id(self.epoch, self.position)

    def __repr__(self) -> str:
        return f"<Event {self.type} {self.id} for {self.user!r}>"


def _reset_event(user: str, epoch: str, position: int, reason: str, ts: float) -> Event:
    data = {"reason": reason, "epoch": epoch, "position": position}
    return Event(user, epoch, position, RESET_EVENT, data, orjson.dumps(data), ts)


@runtime_checkable
class EventLog(Protocol):
    """Where positions, epochs and the resume history come from (pluggable).

    ``head`` is the user's current epoch and last position (an epoch is made
    for a user seen for the first time); ``append`` gives the next position;
    ``read_since`` returns the events after ``position`` or, when they cannot
    all be given, the reason (``"epoch_changed"``, ``"history_expired"``,
    ``"unknown_position"``); ``trim`` forgets what is past the history's
    bounds and returns how many events it dropped.
    """

    def head(self, user: str) -> tuple[str, int]: ...

    def append(self, user: str, type: str, data: Any, payload: bytes) -> Event: ...

    async def read_since(self, user: str, epoch: str, position: int) -> list[Event] | str: ...

    def trim(self) -> int: ...

    def stats(self) -> dict[str, int]: ...


class _UserLog:
    __slots__ = ("epoch", "events", "head", "touched")

    def __init__(self, epoch: str, now: float) -> None:
        self.epoch = epoch
        self.head = 0
        self.events: deque[Event] | None = None  # made on the first event
        self.touched = now


class MemoryEventLog:
    """The in-process log: per-user positions from 1, a bounded history, a fresh epoch per run.

    The history keeps at most ``size`` events per user, none older than
    ``max_age`` seconds. A user whose history has emptied and who saw no event
    for ``max_age`` is forgotten (``trim``); if they come back they get a new
    epoch, so an id from before can never be mistaken for a position of the new
    log. Epochs are a random per-process prefix plus a counter.
    """

    def __init__(
        self,
        *,
        size: int = 100,
        max_age: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 0 or max_age < 0:
            raise ValueError("size and max_age must be >= 0")
        self.size = size
        self.max_age = max_age
        self._clock = clock
        self._prefix = secrets.token_hex(4)
        self._generation = itertools.count(1)
        self._users: dict[str, _UserLog] = {}

    def _entry(self, user: str) -> _UserLog:
        entry = self._users.get(user)
        if entry is None:
            entry = _UserLog(f"{self._prefix}{next(self._generation):x}", self._clock())
            self._users[user] = entry
        return entry

    def head(self, user: str) -> tuple[str, int]:
        entry = self._entry(user)
        return entry.epoch, entry.head

    def append(self, user: str, type: str, data: Any, payload: bytes) -> Event:
        entry = self._entry(user)
        now = self._clock()
        entry.head += 1
        entry.touched = now
        event = Event(user, entry.epoch, entry.head, type, data, payload, now)
        if self.size:
            events = entry.events
            if events is None:
                events = entry.events = deque(maxlen=self.size)
            events.append(event)
            limit = now - self.max_age
            while events[0].ts < limit:
                events.popleft()
        return event

    async def read_since(self, user: str, epoch: str, position: int) -> list[Event] | str:
        entry = self._users.get(user)
        if entry is None or entry.epoch != epoch:
            return "epoch_changed"
        if position > entry.head:
            return "unknown_position"
        if position == entry.head:
            return []
        events = entry.events
        if events:
            limit = self._clock() - self.max_age
            while events and events[0].ts < limit:
                events.popleft()
        if not events or events[0].position > position + 1:
            return "history_expired"
        return list(itertools.islice(events, position + 1 - events[0].position, None))

    def trim(self) -> int:
        now = self._clock()
        limit = now - self.max_age
        dropped = 0
        for user, entry in list(self._users.items()):
            events = entry.events
            while events and events[0].ts < limit:
                events.popleft()
                dropped += 1
            if not events and entry.touched < limit:
                del self._users[user]
        return dropped

    def stats(self) -> dict[str, int]:
        return {
            "history_users": len(self._users),
            "history_events": sum(len(e.events or ()) for e in self._users.values()),
        }


class Published(NamedTuple):
    """What :meth:`SSEEventBus.publish` returns: the stored event and how many got it."""

    event: Event
    delivered: int


class SSEUnavailableError(ServiceUnavailableException):
    """No new subscription now: the subscriber cap is reached or the bus is stopping."""

    error_code = "SSE_UNAVAILABLE"
    message = "Too many open event streams; retry shortly."


# Why a subscription ended (``Subscription.close_reason``).
CLOSED_BY_CLIENT: Final = "closed"
DISCONNECTED: Final = "disconnected"
REAPED_STALLED: Final = "stalled"
REAPED_IDLE: Final = "idle"
SHUTDOWN: Final = "shutdown"


class Subscription:
    """One open stream of one user: a bounded queue plus where its reader stands.

    Made by :meth:`SSEEventBus.subscribe`; use it as ``async with`` (always
    unsubscribes) and/or ``async for event in sub`` (leaving the loop, by
    ``break``, an error or cancellation, unsubscribes too). Iteration ends
    when the bus closes the subscription (reaped, shutdown); ``close_reason``
    says why. :meth:`take` and :meth:`wait` are the batch interface the stream
    route uses.
    """

    __slots__ = (
        "_backlog",
        "_bus",
        "_opened",
        "_waiter",
        "close_reason",
        "closed",
        "cursor",
        "dropped_epoch",
        "dropped_position",
        "epoch",
        "full_cycles",
        "last_event_id",
        "queue",
        "touched",
        "user",
    )

    def __init__(self, bus: SSEEventBus, user: str, last_event_id: str | None) -> None:
        self._bus = bus
        self.user = user
        self.last_event_id = last_event_id
        self.queue: deque[Event] | None = None  # made on the first event
        self._backlog: list[Event] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._opened = False
        self.closed = False
        self.close_reason: str | None = None
        self.epoch = ""
        self.cursor = 0  # last position handed to the reader, under ``epoch``
        self.dropped_epoch = ""
        self.dropped_position = 0
        self.full_cycles = 0
        self.touched = bus.clock()

    # --- opening -------------------------------------------------------------

    async def open(self) -> Subscription:
        """Register with the bus and compute the backlog (replay or reset); idempotent.

        Raises :class:`SSEUnavailableError` past the cap or while the bus stops.
        Cancelled half-way, it leaves nothing registered.
        """
        if self._opened:
            return self
        if self.closed:
            raise RuntimeError("this subscription is closed; subscribe again")
        bus = self._bus
        bus._register(self)
        self._opened = True
        try:
            epoch, head = bus.log.head(self.user)
            self.epoch, self.cursor = epoch, head
            if self.last_event_id is not None:
                await self._resume(epoch, head)
        except BaseException:
            self.close(CLOSED_BY_CLIENT)
            raise
        return self

    async def _resume(self, epoch: str, head: int) -> None:
        bus = self._bus
        parsed = parse_event_id(self.last_event_id)
        result: list[Event] | str = "unknown_position"
        if parsed is not None:
            result = await bus.log.read_since(self.user, *parsed)
        if parsed is None or isinstance(result, str):
            bus.resets += 1
            reason = result if isinstance(result, str) else "unknown_position"
            self._backlog = [_reset_event(self.user, epoch, head, reason, bus.clock())]
            return
        bus.replayed += len(result)
        # Start from the client's own position: what the replay covers is handed
        # over first, and live events it also covers are skipped by the cursor.
        self.epoch, self.cursor = parsed
        self._backlog = result

    async def __aenter__(self) -> Subscription:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(CLOSED_BY_CLIENT)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        # An async generator: when the loop is left early its finaliser runs
        # (at once under CPython), so the subscription never outlives its reader.
        try:
            await self.open()
            while True:
                batch = self.take()
                if batch is None:
                    return
                if not batch:
                    await self.wait()
                    continue
                for event in batch:
                    yield event
        finally:
            self.close(CLOSED_BY_CLIENT)

    # --- reading -------------------------------------------------------------

    def take(self, limit: int = 1024) -> list[Event] | None:
        """The events ready now, in order (``[]`` when none); ``None`` once closed and drained.

        A ``reset`` event comes first when this queue dropped events the reader
        had not had.
        """
        self.touched = self._bus.clock()
        out: list[Event] = []
        backlog = self._backlog
        if backlog:
            self._backlog = None
            for event in backlog:
                out.append(event)
                self.epoch, self.cursor = event.epoch, event.position
        queue = self.queue
        if queue:
            if self.full_cycles or len(queue) == queue.maxlen:
                self._bus._full.discard(self)
                self.full_cycles = 0
            if self.dropped_position and (
                self.dropped_epoch != self.epoch or self.dropped_position > self.cursor
            ):
                first = queue[0]
                self._bus.resets += 1
                reset = _reset_event(
                    self.user, first.epoch, first.position - 1, "overflow", self.touched
                )
                out.append(reset)
                self.epoch, self.cursor = reset.epoch, reset.position
            self.dropped_position = 0
            epoch, cursor = self.epoch, self.cursor
            while queue and len(out) < limit:
                event = queue.popleft()
                if event.epoch == epoch and event.position <= cursor:
                    continue  # already handed over by the replay
                out.append(event)
                epoch, cursor = event.epoch, event.position
            self.epoch, self.cursor = epoch, cursor
        if not out and self.closed:
            return None
        return out

    async def wait(self, seconds: float | None = None) -> bool:
        """Wait until :meth:`take` has something (or the subscription closed).

        Returns ``False`` when ``seconds`` passed first. Waiting counts as
        reading: a reader blocked here is never reaped as idle.
        """
        if self.closed or self._backlog or self.queue:
            return True
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            if seconds is None:
                await waiter
            else:
                async with asyncio.timeout(seconds):
                    await waiter
        except TimeoutError:
            return False
        finally:
            self._waiter = None
            self.touched = self._bus.clock()
        return True

    @property
    def waiting(self) -> bool:
        """A reader is blocked in :meth:`wait` right now."""
        return self._waiter is not None

    def pending(self) -> int:
        """Events queued (backlog included) and not yet taken."""
        return len(self._backlog or ()) + len(self.queue or ())

    # --- closing -------------------------------------------------------------

    def close(self, reason: str = CLOSED_BY_CLIENT) -> None:
        """Unsubscribe now (idempotent). Events still queued stay readable on shutdown only."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if reason != SHUTDOWN:
            self.queue = None
            self._backlog = None
        self._bus._unregister(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __repr__(self) -> str:
        state = f"closed ({self.close_reason})" if self.closed else "open"
        return f"<Subscription {self.user!r} at {self.epoch}:{self.cursor} {state}>"


class SSEEventBus:
    """Per-user fan-out with bounded queues, a reaper and exact resume (see the module doc).

    ``SSEEventBus(settings)`` takes its tunables from the ``SSE_*`` settings;
    keyword arguments override them (``log`` replaces the in-memory
    :class:`MemoryEventLog`, ``clock`` is for tests). As a resource of the
    app it is started and stopped by the lifespan; it also works unstarted
    (no reaper task, no signal hook), which is what the process default does
    before an app runs.
    """

    name = "sse"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        queue_size: int | None = None,
        max_subscribers: int | None = None,
        reaper_interval: float | None = None,
        idle_timeout: float | None = None,
        full_cycles_limit: int | None = None,
        log: EventLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        handle_signals: bool = True,
    ) -> None:
        if settings is None:
            from ghar_core.config import get_settings

            settings = get_settings()
        self.settings = settings
        self.queue_size = settings.SSE_QUEUE_MAX_SIZE if queue_size is None else queue_size
        self.max_subscribers = (
            settings.SSE_MAX_SUBSCRIBERS if max_subscribers is None else max_subscribers
        )
        self.reaper_interval = (
            settings.SSE_REAPER_INTERVAL if reaper_interval is None else reaper_interval
        )
        self.idle_timeout = settings.SSE_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self.full_cycles_limit = (
            settings.SSE_FULL_CYCLES_LIMIT if full_cycles_limit is None else full_cycles_limit
        )
        for option, value in (
            ("queue_size", self.queue_size),
            ("max_subscribers", self.max_subscribers),
            ("full_cycles_limit", self.full_cycles_limit),
        ):
            if value < 1:
                raise ValueError(f"{option} must be at least 1, got {value!r}")
        if self.reaper_interval <= 0 or self.idle_timeout <= 0:
            raise ValueError("reaper_interval and idle_timeout must be positive")
        self.clock = clock
        self.log: EventLog = log or MemoryEventLog(
            size=settings.SSE_HISTORY_SIZE, max_age=settings.SSE_HISTORY_MAX_AGE, clock=clock
        )
        self.handle_signals = handle_signals
        self._subs: dict[str, list[Subscription]] = {}
        self._subscribers = 0
        self._full: set[Subscription] = set()
        self._count = 0
        self._types: set[str] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self.started = False
        # Counters for stats(): plain attributes, bumped on the hot path.
        self.emitted = 0
        self.delivered = 0
        self.dropped = 0
        self.reaped = 0
        self.refused = 0
        self.replayed = 0
        self.resets = 0

    # --- publishing ------------------------------------------------------------

    def emit(self, user_id: Any, event: Mapping[str, Any]) -> int:
        """Send ``event`` to ``user_id``'s open streams; returns how many got it.

        ``event["type"]`` (default ``"message"``) becomes the SSE ``event:``
        name (1-64 of ``[A-Za-z0-9_.-]``; ``reset`` is the bus's own); the
        whole mapping, orjson-encoded, is the ``data:``. Never blocks or
        awaits; a value orjson cannot encode is a ``TypeError`` here, at the
        emitter, and uses no position.
        """
        return self.publish(user_id, event).delivered

    def publish(self, user_id: Any, event: Mapping[str, Any]) -> Published:
        """:meth:`emit`, returning the stored :class:`Event` (its ``id``) and the count."""
        user = user_id if type(user_id) is str else str(user_id)
        kind = event.get("type", "message")
        if kind not in self._types:
            self._check_type(kind)
        payload = orjson.dumps(event, default=_json_default, option=_JSON_OPTIONS)
        stored = self.log.append(user, kind, event, payload)
        self.emitted += 1
        count = self.deliver(stored)
        self._count += 1
        if self._count >= _REAP_EVERY:
            self._count = 0
            if self._full:
                self._reap_full()
        return Published(stored, count)

    def _check_type(self, kind: Any) -> None:
        if not isinstance(kind, str) or not _EVENT_TYPE.match(kind):
            raise ValueError(f"event type must be 1-64 of [A-Za-z0-9_.-], got {kind!r}")
        if kind == RESET_EVENT:
            raise ValueError("the event type 'reset' is reserved for the bus")
        if len(self._types) < 1024:
            self._types.add(kind)

    def deliver(self, event: Event) -> int:
        """Put an already-positioned event into its user's queues (a broker's entry point)."""
        subs = self._subs.get(event.user)
        if not subs:
            return 0
        size = self.queue_size
        full = self._full
        for sub in subs:
            queue = sub.queue
            if queue is None:
                queue = sub.queue = deque(maxlen=size)
            elif len(queue) == size:
                oldest = queue[0]
                sub.dropped_epoch, sub.dropped_position = oldest.epoch, oldest.position
                self.dropped += 1
            queue.append(event)
            if len(queue) == size:
                full.add(sub)
            waiter = sub._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        count = len(subs)
        self.delivered += count
        return count

    # --- subscribing -----------------------------------------------------------

    def subscribe(self, user_id: Any, *, last_event_id: str | None = None) -> Subscription:
        """A subscription to ``user_id``'s events (registered on ``async with`` / iteration).

        ``last_event_id``: resume after that id (replay, or a ``reset`` first
        when the gap cannot be filled); ``None`` starts at the live edge.
        """
        user = user_id if type(user_id) is str else str(user_id)
        return Subscription(self, user, last_event_id)

    def _register(self, sub: Subscription) -> None:
        if self._closing:
            self.refused += 1
            raise SSEUnavailableError(
                "The server is restarting; reconnect shortly.", headers={"Retry-After": "2"}
            )
        if self._subscribers >= self.max_subscribers:
            self.refused += 1
            raise SSEUnavailableError(details={"max_subscribers": self.max_subscribers})
        subs = self._subs.get(sub.user)
        if subs is None:
            self._subs[sub.user] = [sub]
        else:
            subs.append(sub)
        self._subscribers += 1

    def _unregister(self, sub: Subscription) -> None:
        self._full.discard(sub)
        subs = self._subs.get(sub.user)
        if subs is None:
            return
        for i, candidate in enumerate(subs):
            if candidate is sub:
                del subs[i]
                self._subscribers -= 1
                break
        if not subs:
            del self._subs[sub.user]  # never an empty entry left behind

    def subscriptions(self, user_id: Any | None = None) -> list[Subscription]:
        """The open subscriptions (of one user, or all)."""
        if user_id is not None:
            user = user_id if type(user_id) is str else str(user_id)
            return list(self._subs.get(user, ()))
        return [sub for subs in self._subs.values() for sub in subs]

    # --- reaping ---------------------------------------------------------------

    def _reap_full(self) -> int:
        reaped = 0
        for sub in list(self._full):
            queue = sub.queue
            if queue is None or len(queue) < self.queue_size:
                self._full.discard(sub)
                sub.full_cycles = 0
                continue
            sub.full_cycles += 1
            if sub.full_cycles >= self.full_cycles_limit:
                sub.close(REAPED_STALLED)
                reaped += 1
        self.reaped += reaped
        return reaped

    def reap(self) -> int:
        """One reaper cycle now: stalled and idle subscriptions, then the history's bounds.

        Returns how many subscriptions it removed. The reaper task calls this
        every ``reaper_interval`` seconds; emits run the stalled part every 10.
        """
        reaped = self._reap_full()
        limit = self.clock() - self.idle_timeout
        idle = [
            sub
            for subs in self._subs.values()
            for sub in subs
            if sub.touched < limit and sub._waiter is None
        ]
        for sub in idle:
            sub.close(REAPED_IDLE)
        self.reaped += len(idle)
        self.log.trim()
        if reaped or idle:
            logger.info(
                "sse reaper removed %d stalled and %d idle subscription(s); %d open",
                reaped,
                len(idle),
                self._subscribers,
            )
        return reaped + len(idle)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reaper_interval)
            try:
                self.reap()
            except Exception:  # a bug here must not stop future cycles
                logger.exception("sse reaper cycle failed")

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Run the reaper, chain the shutdown signals, become the process default."""
        self._closing = False
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap_forever(), name="ghar-sse-reaper"
            )
        if self.handle_signals:
            _signal_hook.add(self)
        _redact_server_logs()
        _claim_default(self)
        self.started = True

    def begin_shutdown(self) -> None:
        """End every open stream now (each reader drains what is queued) and refuse new ones.

        Called from the signal hook, by :meth:`stop`, or by a host that stops
        without signals; idempotent until the next :meth:`start`.
        """
        if self._closing:
            return
        self._closing = True
        open_subs = self.subscriptions()
        for sub in open_subs:
            sub.close(SHUTDOWN)
        if open_subs:
            logger.info("sse: ending %d open stream(s) for shutdown", len(open_subs))

    @property
    def closing(self) -> bool:
        """True from :meth:`begin_shutdown` until the next :meth:`start`."""
        return self._closing

    async def stop(self) -> None:
        """End every stream, stop the reaper, unhook the signals (idempotent)."""
        self.begin_shutdown()
        _signal_hook.discard(self)
        reaper, self._reaper = self._reaper, None
        if reaper is not None and not reaper.done():
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        _release_default(self)
        self.started = False

    async def check(self) -> None:
        """Ready while the reaper runs (a started bus) and the bus is not stopping."""
        if self._closing:
            raise RuntimeError("the event bus is shutting down")
        reaper = self._reaper
        if self.started and (reaper is None or reaper.done()):
            raise RuntimeError("the sse reaper task is not running")

    def stats(self) -> dict[str, int]:
        """Counters for ``/ready`` and the logs (cheap: no scan of the subscriptions)."""
        return {
            "users": len(self._subs),
            "subscribers": self._subscribers,
            "emitted": self.emitted,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "reaped": self.reaped,
            "refused": self.refused,
            "replayed": self.replayed,
            "resets": self.resets,
            **self.log.stats(),
        }

    def __repr__(self) -> str:
        return f"<SSEEventBus {self._subscribers} subscriber(s) of {len(self._subs)} user(s)>"


# --- shutdown signals ----------------------------------------------------------


class _SignalHook:
    """One chained SIGINT/SIGTERM handler per process, shared by every started bus.

    Servers (uvicorn included) install their handlers before the lifespan
    starts; the hook wraps whatever is installed, tells each bus's loop to
    end its streams (thread-safe: the signal may land at any bytecode), then
    calls the previous handler as if the hook were not there. When the last
    bus stops it puts the previous handlers back, unless someone replaced
    the hook meanwhile.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._buses: dict[SSEEventBus, asyncio.AbstractEventLoop] = {}
        self._previous: dict[int, Any] = {}

    def add(self, bus: SSEEventBus) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers can only be set from the main thread
        for sig in self.signals:
            current = signal.getsignal(sig)
            if current is not self.handle:
                self._previous[sig] = current
                signal.signal(sig, self.handle)
        self._buses[bus] = asyncio.get_running_loop()
        return True

    def discard(self, bus: SSEEventBus) -> None:
        if self._buses.pop(bus, None) is None or self._buses:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) is self.handle:
                signal.signal(sig, previous)
        self._previous.clear()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        for bus, loop in list(self._buses.items()):
            if not loop.is_closed():
                loop.call_soon_threadsafe(bus.begin_shutdown)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            # Nobody handled it before us: behave as the default would.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


_signal_hook = _SignalHook()


def _redact_server_logs() -> None:
    # The stream accepts ?access_token= (EventSource cannot send headers), and
    # servers log request lines with the query: redact them at the source even
    # when the host configured logging itself (plain uvicorn).
    for name in ("uvicorn.access", "uvicorn.error"):
        server_logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in server_logger.filters):
            server_logger.addFilter(RedactingFilter())


# --- the process default ---------------------------------------------------------

_default_bus: SSEEventBus | None = None
_default_is_fallback = False


def set_default_bus(bus: SSEEventBus | None) -> SSEEventBus | None:
    """Make ``bus`` what ``sse_bus`` forwards to (``None``: build one on next use).

    Returns the previous default (tests put it back).
    """
    global _default_bus, _default_is_fallback
    previous, _default_bus, _default_is_fallback = _default_bus, bus, False
    return previous


def _claim_default(bus: SSEEventBus) -> None:
    # A started bus takes over from nothing or from the unstarted fallback,
    # never from another running app's bus.
    global _default_bus, _default_is_fallback
    if _default_bus is None or (_default_is_fallback and not _default_bus.started):
        _default_bus, _default_is_fallback = bus, False


def _release_default(bus: SSEEventBus) -> None:
    global _default_bus
    if _default_bus is bus:
        _default_bus = None


def get_sse_bus() -> SSEEventBus:
    """The process default: the running app's bus, else one built from the settings."""
    global _default_bus, _default_is_fallback
    if _default_bus is None:
        _default_bus, _default_is_fallback = SSEEventBus(), True
    return _default_bus


class _DefaultBus:
    """``sse_bus``: forwards every call to :func:`get_sse_bus`, resolved at call time."""

    __slots__ = ()

    def emit(self, user_id: Any, event: Mapping[str, Any]) -> int:
        return get_sse_bus().emit(user_id, event)

    def publish(self, user_id: Any, event: Mapping[str, Any]) -> Published:
        return get_sse_bus().publish(user_id, event)

    def subscribe(self, user_id: Any, *, last_event_id: str | None = None) -> Subscription:
        return get_sse_bus().subscribe(user_id, last_event_id=last_event_id)

    def stats(self) -> dict[str, int]:
        return get_sse_bus().stats()

    def __getattr__(self, name: str) -> Any:
        return getattr(get_sse_bus(), name)

    def __repr__(self) -> str:
        return f"<sse_bus -> {get_sse_bus()!r}>"


#: ``from ghar_core.sse import sse_bus``: the process default bus (see the module doc).
sse_bus: Final = _DefaultBus()
