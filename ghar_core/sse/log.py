"""Positions, epochs and the resume history: the pluggable part of the bus.

An :class:`Event` is encoded once (its whole SSE frame) and shared by every
subscriber and the history. :class:`EventLog` is what a broker implements to
supply positions from elsewhere (an outbox); :class:`MemoryEventLog` is the
in-process default.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Container
from decimal import Decimal
from typing import Any, Final, Protocol, runtime_checkable

import orjson

__all__ = [
    "RESET_EVENT",
    "Event",
    "EventLog",
    "MemoryEventLog",
    "encode_frame",
    "format_event_id",
    "json_default",
    "parse_event_id",
    "reset_event",
]

#: The type of the in-band event that tells a client to reload its state.
RESET_EVENT: Final = "reset"
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def json_default(value: Any) -> Any:
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
    An event replayed from a log's history is rebuilt from its frame, so its
    ``data`` is the decoded JSON of that mapping (what a broker's log gives too).
    """

    __slots__ = ("data", "epoch", "frame", "position", "ts", "type", "user")

    def __init__(
        self,
        user: str,
        epoch: str,
        position: int,
        type: str,
        data: Any,
        frame: bytes,
        ts: float,
    ) -> None:
        self.user = user
        self.epoch = epoch
        self.position = position
        self.type = type
        self.data = data
        self.frame = frame
        self.ts = ts

    @property
    def id(self) -> str:
        """``"<epoch>:<position>"``, what the client sends back as ``Last-Event-ID``."""
        return format_event_id(self.epoch, self.position)

    def __repr__(self) -> str:
        return f"<Event {self.type} {self.id} for {self.user!r}>"


_new_event: Final = object.__new__


def encode_frame(epoch: str, position: int, type: str, payload: bytes) -> bytes:
    """The SSE block of one event: ``id: <epoch>:<position>``, ``event:``, ``data:``."""
    return b"id: %b:%d\nevent: %b\ndata: %b\n\n" % (
        epoch.encode("ascii"),
        position,
        type.encode("ascii"),
        payload,
    )


def reset_event(user: str, epoch: str, position: int, reason: str, ts: float) -> Event:
    data = {"reason": reason, "epoch": epoch, "position": position}
    frame = encode_frame(epoch, position, RESET_EVENT, orjson.dumps(data))
    return Event(user, epoch, position, RESET_EVENT, data, frame, ts)


@runtime_checkable
class EventLog(Protocol):
    """Where positions, epochs and the resume history come from (pluggable).

    ``head`` is the user's current epoch and last position (an epoch is made
    for a user seen for the first time); ``open_head`` is the same for a
    subscription being opened (after it registered: a log backed by storage
    may have to ask it); ``append`` gives the next position;
    ``read_since`` returns the events after ``position`` or, when they cannot
    all be given, the reason (``"epoch_changed"``, ``"history_expired"``,
    ``"unknown_position"``); ``trim`` forgets what is past the history's
    bounds and returns how many events it dropped; it never forgets the
    epoch of a user in ``active`` (users with open streams), so they can
    always resume.
    """

    def head(self, user: str) -> tuple[str, int]: ...

    async def open_head(self, user: str) -> tuple[str, int]: ...

    def append(self, user: str, type: str, data: Any, payload: bytes) -> Event: ...

    async def read_since(self, user: str, epoch: str, position: int) -> list[Event] | str: ...

    def trim(self, active: Container[str] = ()) -> int: ...

    def stats(self) -> dict[str, int]: ...


class _UserLog:
    # The history is two parallel deques of atomic values, the frames and the
    # times they were stored, rather than a record object per event: an emit
    # allocates nothing for it (the frame and the clock reading already exist),
    # and nothing in it is tracked by the cyclic GC, so a history of 100 events
    # for each of thousands of users never makes collections come sooner or
    # cost more. Positions need no storage: the history is always the run of
    # consecutive positions that ends at ``head``.
    __slots__ = ("epoch", "frames", "head", "id_prefix", "stamps", "touched")

    def __init__(self, epoch: str, now: float) -> None:
        self.epoch = epoch
        self.id_prefix = b"id: %b:" % epoch.encode("ascii")  # encoded once per user
        self.head = 0
        self.frames: deque[bytes] | None = None  # both made on the first event
        self.stamps: deque[float] | None = None
        self.touched = now

    def expire(self, limit: float) -> int:
        """Forget the events stored before ``limit``; returns how many."""
        frames, stamps = self.frames, self.stamps
        dropped = 0
        while stamps and stamps[0] < limit:
            stamps.popleft()
            frames.popleft()  # type: ignore[union-attr]  # made with stamps
            dropped += 1
        return dropped


def _event_of_frame(user: str, epoch: str, position: int, frame: bytes, ts: float) -> Event:
    # A replayed event, rebuilt from the frame append() formatted: the type is
    # between "\nevent: " and "\ndata: " (neither an epoch nor a type has a
    # newline), the data between "\ndata: " and the closing blank line.
    start = frame.index(b"\nevent: ") + 8
    end = frame.index(b"\ndata: ", start)
    data = orjson.loads(memoryview(frame)[end + 7 : -2])
    return Event(user, epoch, position, frame[start:end].decode("ascii"), data, frame, ts)


class MemoryEventLog:
    """The in-process log: per-user positions from 1, a bounded history, a fresh epoch per run.

    The history keeps at most ``size`` events per user (checked on every
    append) and replays none older than ``max_age`` seconds (checked on every
    replay; ``trim``, run by each reaper cycle, forgets them). A user whose
    history has emptied, who has had no open stream and no event for
    ``max_age`` is forgotten (``trim``); if they come back they get a new
    epoch, so an id from before can never be mistaken for a position of the
    new log. Epochs are a random per-process prefix plus
    a counter. The history holds only frames and times, which the garbage
    collector does not track; a replay builds its :class:`Event` objects from
    the frames.
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
        self._type_parts: dict[str, bytes] = {}  # "\nevent: <type>\ndata: ", per type

    def _entry(self, user: str) -> _UserLog:
        entry = self._users.get(user)
        if entry is None:
            entry = _UserLog(f"{self._prefix}{next(self._generation):x}", self._clock())
            self._users[user] = entry
        return entry

    def head(self, user: str) -> tuple[str, int]:
        entry = self._entry(user)
        entry.touched = self._clock()
        return entry.epoch, entry.head

    async def open_head(self, user: str) -> tuple[str, int]:
        return self.head(user)

    def append(self, user: str, type: str, data: Any, payload: bytes) -> Event:
        # The hot path of every emit: one dict lookup, one clock read, one
        # format, two appends. The history's age is not checked here: it is
        # bounded in count on every append, and in age by read_since (nothing
        # older than max_age is ever replayed) and by trim (the reaper's cycle).
        entry = self._users.get(user) or self._entry(user)
        now = self._clock()
        position = entry.head = entry.head + 1
        entry.touched = now
        part = self._type_parts.get(type) or self._type_part(type)
        frame = b"%b%d%b%b\n\n" % (entry.id_prefix, position, part, payload)
        frames = entry.frames
        if frames is not None:
            frames.append(frame)
            entry.stamps.append(now)  # type: ignore[union-attr]  # made with frames
        elif self.size:
            self._start_history(entry, frame, now)
        # Event's fields set here rather than by calling the class: a Python
        # __init__ behind a class call costs more than the seven stores.
        event = _new_event(Event)
        event.user = user
        event.epoch = entry.epoch
        event.position = position
        event.type = type
        event.data = data
        event.frame = frame
        event.ts = now
        return event

    def _start_history(self, entry: _UserLog, frame: bytes, now: float) -> None:
        entry.frames = deque((frame,), maxlen=self.size)
        entry.stamps = deque((now,), maxlen=self.size)

    def _type_part(self, type: str) -> bytes:
        part = b"\nevent: %b\ndata: " % type.encode("ascii")
        if len(self._type_parts) < 1024:
            self._type_parts[type] = part
        return part

    async def read_since(self, user: str, epoch: str, position: int) -> list[Event] | str:
        entry = self._users.get(user)
        if entry is None or entry.epoch != epoch:
            return "epoch_changed"
        if position > entry.head:
            return "unknown_position"
        if position == entry.head:
            return []
        if entry.stamps:
            entry.expire(self._clock() - self.max_age)
        frames, stamps = entry.frames, entry.stamps
        if not frames or not stamps:
            return "history_expired"
        oldest = entry.head - len(frames) + 1
        if oldest > position + 1:
            return "history_expired"
        skip = position + 1 - oldest
        missed = zip(
            itertools.islice(frames, skip, None), itertools.islice(stamps, skip, None), strict=True
        )
        return [
            _event_of_frame(user, epoch, position + i, frame, ts)
            for i, (frame, ts) in enumerate(missed, 1)
        ]

    def trim(self, active: Container[str] = ()) -> int:
        now = self._clock()
        limit = now - self.max_age
        dropped = 0
        for user, entry in list(self._users.items()):
            dropped += entry.expire(limit)
            if user in active:
                entry.touched = now  # resumable for max_age after its last stream
            elif not entry.frames and entry.touched < limit:
                del self._users[user]
        return dropped

    def stats(self) -> dict[str, int]:
        return {
            "history_users": len(self._users),
            "history_events": sum(len(e.frames or ()) for e in self._users.values()),
        }
