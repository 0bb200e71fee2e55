"""One open stream of one user: :class:`Subscription` (made by ``SSEEventBus.subscribe``)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, cast

from ghar_core.sse.log import Event, parse_event_id, reset_event

if TYPE_CHECKING:
    from ghar_core.sse.bus import SSEEventBus

__all__ = [
    "CLOSED_BY_CLIENT",
    "DISCONNECTED",
    "REAPED_IDLE",
    "REAPED_STALLED",
    "SHUTDOWN",
    "Record",
    "Subscription",
]

# Why a subscription ended (``Subscription.close_reason``).
CLOSED_BY_CLIENT: Final = "closed"
DISCONNECTED: Final = "disconnected"
REAPED_STALLED: Final = "stalled"
REAPED_IDLE: Final = "idle"
SHUTDOWN: Final = "shutdown"

#: An event queued for a user's only reader: (epoch, position, type, data,
#: frame, ts), the fields of its :class:`Event` but ``user``. A tuple, so the
#: GC stops tracking it at its first collection (when data holds no
#: container); :meth:`Subscription.take` makes the Event.
Record = tuple[str, int, str, Any, bytes, float]
_new_event: Final = object.__new__


def _event_of(user: str, item: Event | Record) -> Event:
    if isinstance(item, Event):
        return item
    event = _new_event(Event)
    event.user = user
    event.epoch, event.position, event.type, event.data, event.frame, event.ts = item
    return event


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
        "_wake",
        "close_reason",
        "closed",
        "cursor",
        "dropped_epoch",
        "dropped_position",
        "epoch",
        "full_cycles",
        "last_event_id",
        "ordered",
        "queue",
        "records",
        "touched",
        "user",
    )

    def __init__(self, bus: SSEEventBus, user: str, last_event_id: str | None) -> None:
        self._bus = bus
        self.user = user
        self.last_event_id = last_event_id
        self.queue: deque[Event | Record] | None = None  # made on the first event
        self.records = False  # the queue may hold records (see Record)
        # Everything queued came from the bus's own log (in order, one apart);
        # False once a broker delivered into the queue, until it is drained.
        self.ordered = True
        self._backlog: list[Event] | None = None
        # The future a reader in wait() is blocked on; _wake is the same future
        # until someone resolves it (then None), so an emit wakes a reader once
        # and every later emit skips it with one attribute test.
        self._waiter: asyncio.Future[bool] | None = None
        self._wake: asyncio.Future[bool] | None = None
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
        if self.closed:
            raise RuntimeError("this subscription is closed; subscribe again")
        if self._opened:
            return self
        bus = self._bus
        bus._register(self)
        self._opened = True
        try:
            epoch, head = await bus.log.open_head(self.user)
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
            self._backlog = [reset_event(self.user, epoch, head, reason, bus.clock())]
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
            if not self._opened:
                await self.open()
            while True:
                # Wait for the first event, then take everything queued in one
                # hand-over (no empty take per wake-up).
                await self.wait()
                batch = self.take()
                if batch is None:
                    return
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
        queue = self.queue
        if queue and self.ordered and not self._backlog and not self.dropped_position:
            # The usual case, decided in a few tests: our own log's events, one
            # run of consecutive positions after the cursor, nothing dropped and
            # the queue not full (so none was replayed and no reset is due).
            first = queue[0]
            count = len(queue)
            if self.records:
                # Records (this user's only reader): the same tests on the
                # tuples, then an Event made for each (a queue that mixes them
                # with Events, a reader having joined or left, may start or end
                # with an Event: the general path).
                last = queue[-1]
                if (
                    not isinstance(first, Event)
                    and not isinstance(last, Event)
                    and count < queue.maxlen  # type: ignore[operator]  # always bounded
                    and count <= limit
                    and (first[0] != self.epoch or first[1] > self.cursor)
                    and last[0] == first[0]
                    and last[1] - first[1] == count - 1
                ):
                    user = self.user
                    out: list[Event] = []
                    # _event_of(user, item) for each, inlined (a call per event
                    # saved on the route's hot path): keep the two in step.
                    for item in queue:
                        if type(item) is not tuple:  # an Event (cheaper than isinstance)
                            out.append(item)  # type: ignore[arg-type]
                            continue
                        event = _new_event(Event)
                        event.user = user
                        (
                            event.epoch,
                            event.position,
                            event.type,
                            event.data,
                            event.frame,
                            event.ts,
                        ) = item
                        out.append(event)
                    queue.clear()
                    self.records = False
                    self.epoch, self.cursor = last[0], last[1]
                    return out
            # No record in the queue: every item is an Event (unions narrowed
            # by hand, a cast() would be a call on the hot path).
            elif (
                count < queue.maxlen  # type: ignore[operator]  # always bounded
                and count <= limit
                and (first.epoch != self.epoch or first.position > self.cursor)  # type: ignore[union-attr]
            ):
                if count == 1:
                    queue.clear()
                    self.epoch, self.cursor = first.epoch, first.position  # type: ignore[union-attr]
                    return [first]  # type: ignore[list-item]
                last = queue[-1]
                if (
                    last.epoch == first.epoch  # type: ignore[union-attr]
                    and last.position - first.position == count - 1  # type: ignore[union-attr]
                ):
                    out = list(queue)  # type: ignore[arg-type]
                    queue.clear()
                    self.epoch, self.cursor = last.epoch, last.position  # type: ignore[union-attr]
                    return out
        return self._take_slow(limit)

    def _take_slow(self, limit: int) -> list[Event] | None:
        # Everything else: a backlog, a drop (reset first), a full queue (off the
        # reaper's list), or events a broker delivered (read one by one).
        out: list[Event] = []
        backlog = self._backlog
        if backlog:
            self._backlog = None
            for event in backlog:
                out.append(event)
                self.epoch, self.cursor = event.epoch, event.position
        if self.records:
            # Records become Events first; everything below reads Events.
            self.records = False
            if self.queue:
                events = [_event_of(self.user, item) for item in self.queue]
                self.queue.clear()
                self.queue.extend(events)
        queue = cast("deque[Event] | None", self.queue)  # no record left in it
        if queue:
            if self.full_cycles or len(queue) == queue.maxlen:
                self._bus._full.discard(self)
                self.full_cycles = 0
            if self.dropped_position and (
                self.dropped_epoch != self.epoch or self.dropped_position > self.cursor
            ):
                first = queue[0]
                self._bus.resets += 1
                reset = reset_event(
                    self.user, first.epoch, first.position - 1, "overflow", self.touched
                )
                out.append(reset)
                self.epoch, self.cursor = reset.epoch, reset.position
            self.dropped_position = 0
            epoch, cursor = self.epoch, self.cursor
            first, last, count = queue[0], queue[-1], len(queue)
            if (
                self.ordered
                and count <= limit - len(out)
                and (first.epoch != epoch or first.position > cursor)
                and last.epoch == first.epoch
                and last.position - first.position == count - 1
            ):
                # One run of consecutive positions after the cursor (so none was
                # replayed): all at once.
                out.extend(queue)
                queue.clear()
                self.epoch, self.cursor = last.epoch, last.position
                return out
            while queue and len(out) < limit:
                event = queue.popleft()
                if event.epoch == epoch and event.position <= cursor:
                    continue  # already handed over by the replay
                out.append(event)
                epoch, cursor = event.epoch, event.position
            self.epoch, self.cursor = epoch, cursor
            if not queue:
                self.ordered = True
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
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = self._wake = waiter
        # A timer that resolves the waiter, not asyncio.timeout(): every stream
        # waits once per event, and a timeout context (its object, and a task
        # cancellation when it fires) costs more than the wake it bounds.
        timer = None if seconds is None else loop.call_later(seconds, self.nudge)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = self._wake = None
            self.touched = self._bus.clock()

    def nudge(self) -> None:
        """End a :meth:`wait` now as if its time had passed (it returns ``False``).

        The stream route's one shared timer uses it for keepalives, instead of
        a timer per wait.
        """
        self._resolve(False)

    def _resolve(self, result: bool) -> None:
        # Wake the reader blocked in wait(), if one is and nobody woke it yet
        # (its future may also have been cancelled with its task).
        wake = self._wake
        if wake is not None:
            self._wake = None
            if not wake.done():
                wake.set_result(result)

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
        self._resolve(True)

    def __repr__(self) -> str:
        state = f"closed ({self.close_reason})" if self.closed else "open"
        return f"<Subscription {self.user!r} at {self.epoch}:{self.cursor} {state}>"
