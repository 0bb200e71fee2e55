"""``SSEEventBus``: per-user fan-out with bounded queues, a reaper and exact resume."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson

from ghar_core.broker import TOPIC_USER, Broker, check_event
from ghar_core.exceptions import ServiceUnavailableException
from ghar_core.sse.default import claim_default, release_default
from ghar_core.sse.log import (
    RESET_EVENT,
    Event,
    EventLog,
    MemoryEventLog,
    json_default,
)
from ghar_core.sse.outbox import BrokerEventLog, BrokerSink, event_of
from ghar_core.sse.signals import redact_server_logs, signal_hook
from ghar_core.sse.subscription import (
    REAPED_IDLE,
    REAPED_STALLED,
    SHUTDOWN,
    Record,
    Subscription,
)

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = ["Published", "SSEEventBus", "SSEUnavailableError"]

logger = logging.getLogger("ghar_core.sse")

_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_REAP_EVERY: Final = 10  # emits between two reaps of the full queues
_JSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS
_dumps: Final = orjson.dumps
_new_event: Final = object.__new__


class Published(NamedTuple):
    """What :meth:`SSEEventBus.publish` returns: the stored event and how many got it."""

    event: Event
    delivered: int


class SSEUnavailableError(ServiceUnavailableException):
    """No new subscription now: the subscriber cap is reached or the bus is stopping."""

    error_code = "SSE_UNAVAILABLE"
    message = "Too many open event streams; retry shortly."


class SSEEventBus:
    """Per-user fan-out with bounded queues, a reaper and exact resume (see the module doc).

    ``SSEEventBus(settings)`` takes its tunables from the ``SSE_*`` settings;
    keyword arguments override them (``log`` replaces the in-memory
    :class:`MemoryEventLog`, ``clock`` is for tests). As a resource of the
    app it is started and stopped by the lifespan; it also works unstarted
    (no reaper task, no signal hook), which is what the process default does
    before an app runs.

    ``broker``: with a remote one (``EVENT_BROKER=postgres``) ``emit`` hands
    each event to the broker and the bus delivers what the broker hands back
    (emitted here or on any other instance), with positions, epochs and the
    resume history from the outbox; the in-memory broker changes nothing.
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
        broker: Broker | None = None,
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
        self.broker = broker if broker is not None and broker.remote else None
        if self.broker is not None and log is None:
            log = BrokerEventLog(self.broker, clock)
            self.broker.attach(TOPIC_USER, BrokerSink(self))
        self.log: EventLog = log or MemoryEventLog(
            size=settings.SSE_HISTORY_SIZE, max_age=settings.SSE_HISTORY_MAX_AGE, clock=clock
        )
        # The log emit() positions events in itself (MemoryEventLog.append
        # inlined), or None: a broker, or a log of another kind, is called.
        self._memory: MemoryEventLog | None = None
        if self.broker is None and type(self.log).append is MemoryEventLog.append:
            self._memory = self.log  # type: ignore[assignment]  # checked just above
        self.handle_signals = handle_signals
        self._subs: dict[str, list[Subscription]] = {}
        self._subscribers = 0
        self._full: set[Subscription] = set()
        self._parts: dict[str, bytes] = {}  # checked type -> its frame part
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
        emitter, and uses no position. With a remote broker the event is queued
        for the outbox and returns 0: it reaches the streams (here and on every
        instance) when it comes back committed; an event over
        ``EVENT_MAX_PAYLOAD_BYTES`` is an :class:`~ghar_core.broker.EventTooLargeError`.
        """
        memory = self._memory
        if memory is None:
            return self._emit_elsewhere(user_id, event)
        # _store(), MemoryEventLog.append(), _deliver() and _tick() inlined:
        # this is the hottest path (keep it in step with those four).
        user = user_id if type(user_id) is str else str(user_id)
        kind = event.get("type", "message")
        part = self._parts.get(kind) or self._check_type(kind)
        payload = _dumps(event, json_default, _JSON_OPTIONS)
        entry = memory._users.get(user) or memory._entry(user)
        now = memory._clock()
        position = entry.head = entry.head + 1
        entry.touched = now
        frame = b"%b%d%b%b\n\n" % (entry.id_prefix, position, part, payload)
        frames = entry.frames
        if frames is not None:
            frames.append(frame)
            entry.stamps.append(now)  # type: ignore[union-attr]  # made with frames
        elif memory.size:
            memory._start_history(entry, frame, now)
        self.emitted = emitted = self.emitted + 1
        subs = self._subs.get(user)
        count = 0
        if subs:
            stored: Event | Record
            if len(subs) == 1:
                # One reader (the usual case): it gets a record, a tuple the GC
                # stops tracking at its first collection, and take() makes the
                # Event it hands over. An Event made here would stay queued,
                # tracked, until the reader takes it: on a busy bus the queued
                # Events were what pushed collections into the old generations.
                stored = (entry.epoch, position, kind, event, frame, now)
                subs[0].records = True
            else:  # one Event shared by every reader
                stored = _new_event(Event)  # its seven fields set here, as in append()
                stored.user = user
                stored.epoch = entry.epoch
                stored.position = position
                stored.type = kind
                stored.data = event
                stored.frame = frame
                stored.ts = now
            room = self.queue_size - 1  # shorter than this: not full after the append
            for sub in subs:
                queue = sub.queue
                if queue is not None and len(queue) < room:
                    queue.append(stored)
                else:
                    self._put_first_or_full(sub, stored)
                wake = sub._wake
                if wake is not None:
                    sub._wake = None
                    if not wake.done():  # cancelled with its reader's task
                        wake.set_result(True)
            count = len(subs)
            self.delivered += count
        if self._full and not emitted % _REAP_EVERY:
            self._reap_full()
        return count

    def _emit_elsewhere(self, user_id: Any, event: Mapping[str, Any]) -> int:
        # emit() through a remote broker, or with a log that is not a plain
        # MemoryEventLog: the log positions the event.
        if self.broker is not None:
            user, kind, payload = self._encode(user_id, event)
            self.broker.publish_nowait(TOPIC_USER, user, kind, payload)
            return 0
        stored = self._store(user_id, event)
        subs = self._subs.get(stored.user)
        count = self._deliver(stored, subs) if subs else 0
        self._tick()
        return count

    def publish(self, user_id: Any, event: Mapping[str, Any]) -> Published:
        """:meth:`emit`, returning the stored :class:`Event` (its ``id``) and the count.

        In-process log only: over a remote broker use ``await`` :meth:`send`.
        """
        if self.broker is not None:
            raise RuntimeError("the bus publishes through a remote broker: await bus.send(...)")
        stored = self._store(user_id, event)
        subs = self._subs.get(stored.user)
        count = self._deliver(stored, subs) if subs else 0
        self._tick()
        return Published(stored, count)

    async def send(self, user_id: Any, event: Mapping[str, Any]) -> Published:
        """:meth:`publish` that also works over a remote broker: returns once stored.

        With a remote broker the returned event carries the outbox position and
        ``delivered`` is 0 (delivery follows the commit, on every instance).
        """
        if self.broker is None:
            return self.publish(user_id, event)
        user, kind, payload = self._encode(user_id, event)
        record = await self.broker.publish(TOPIC_USER, user, kind, payload)
        return Published(event_of(record, self.clock()), 0)

    def _encode(self, user_id: Any, event: Mapping[str, Any]) -> tuple[str, str, bytes]:
        user = user_id if type(user_id) is str else str(user_id)
        kind = event.get("type", "message")
        if kind not in self._parts:
            self._check_type(kind)
        payload = orjson.dumps(event, json_default, _JSON_OPTIONS)
        check_event(TOPIC_USER, user, kind, payload, self.settings.EVENT_MAX_PAYLOAD_BYTES)
        self.emitted += 1
        return user, kind, payload

    def _tick(self) -> None:
        # Every 10th emit reaps the full queues (cheap: only those are looked at).
        if self._full and not self.emitted % _REAP_EVERY:
            self._reap_full()

    def _store(self, user_id: Any, event: Mapping[str, Any]) -> Event:
        user = user_id if type(user_id) is str else str(user_id)
        kind = event.get("type", "message")
        if kind not in self._parts:
            self._check_type(kind)
        payload = orjson.dumps(event, json_default, _JSON_OPTIONS)
        self.emitted += 1
        return self.log.append(user, kind, event, payload)

    def _check_type(self, kind: Any) -> bytes:
        # A type not seen yet: checked, then remembered with its frame part
        # ("\nevent: <type>\ndata: "), up to 1024 of them.
        if not isinstance(kind, str) or not _EVENT_TYPE.match(kind):
            raise ValueError(f"event type must be 1-64 of [A-Za-z0-9_.-], got {kind!r}")
        if kind == RESET_EVENT:
            raise ValueError("the event type 'reset' is reserved for the bus")
        part = b"\nevent: %b\ndata: " % kind.encode("ascii")
        if len(self._parts) < 1024:
            self._parts[kind] = part
        return part

    def deliver(self, event: Event) -> int:
        """Put an already-positioned event into its user's queues (a broker's entry point).

        A broker may deliver late, twice or out of order: its events are read
        one by one against each reader's cursor, never handed over in bulk.
        """
        subs = self._subs.get(event.user)
        if not subs:
            return 0
        for sub in subs:
            sub.ordered = False
        return self._deliver(event, subs)

    def _deliver(self, event: Event, subs: list[Subscription]) -> int:
        # The loop runs once per subscriber of every event (emit() has its own
        # copy): a queue with room takes the event in one append, and a blocked
        # reader is woken once (the first emit clears its _wake; later ones
        # test one attribute).
        room = self.queue_size - 1  # shorter than this: not full after the append
        for sub in subs:
            queue = sub.queue
            if queue is not None and len(queue) < room:
                queue.append(event)
            else:
                self._put_first_or_full(sub, event)
            wake = sub._wake
            if wake is not None:
                sub._wake = None
                if not wake.done():  # cancelled with its reader's task
                    wake.set_result(True)
        count = len(subs)
        self.delivered += count
        return count

    def _put_first_or_full(self, sub: Subscription, event: Event | Record) -> None:
        # A subscription's first event (its queue is made now), or a queue
        # that becomes full with this one or drops its oldest for it.
        size = self.queue_size
        queue = sub.queue
        if queue is None:
            queue = sub.queue = deque((event,), maxlen=size)
        else:
            if len(queue) == size:
                oldest = queue[0]
                if isinstance(oldest, Event):
                    sub.dropped_epoch, sub.dropped_position = oldest.epoch, oldest.position
                else:  # a Record
                    sub.dropped_epoch, sub.dropped_position = oldest[0], oldest[1]
                self.dropped += 1
            queue.append(event)
        if len(queue) == size:
            self._full.add(sub)

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
        self.log.trim(self._subs)
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
            signal_hook.add(self)
        redact_server_logs()
        claim_default(self)
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
        signal_hook.discard(self)
        reaper, self._reaper = self._reaper, None
        if reaper is not None and not reaper.done():
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        release_default(self)
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
