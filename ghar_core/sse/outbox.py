"""The bus over a remote broker: positions and history from the outbox, deliveries from it.

With ``EVENT_BROKER=postgres`` the bus stores nothing itself: ``emit`` hands
the event to the broker, and every event -- emitted here or on another
instance -- comes back through :class:`BrokerSink` in position order, from
the one place positions are allocated. :class:`BrokerEventLog` answers
``head`` and ``read_since`` from the broker, so a ``Last-Event-ID`` issued by
any instance resumes on this one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ghar_core.broker import TOPIC_USER, Broker, Record
from ghar_core.sse.log import Event, encode_frame, reset_event

if TYPE_CHECKING:
    from collections.abc import Callable, Container

    from ghar_core.sse.bus import SSEEventBus

__all__ = ["BrokerEventLog", "BrokerSink", "event_of"]


def event_of(record: Record, ts: float) -> Event:
    """The bus's :class:`Event` of a broker record (the frame encoded once, here)."""
    frame = encode_frame(record.epoch, record.position, record.type, record.payload)
    data = orjson.loads(record.payload)
    return Event(record.key, record.epoch, record.position, record.type, data, frame, ts)


class BrokerEventLog:
    """An :class:`~ghar_core.sse.EventLog` whose positions and history are the broker's."""

    def __init__(self, broker: Broker, clock: Callable[[], float]) -> None:
        self.broker = broker
        self.clock = clock

    def head(self, user: str) -> tuple[str, int]:
        # What this process has delivered of the user's stream ("", 0 if it follows none).
        return self.broker.known_head(TOPIC_USER, user) or ("", 0)

    async def open_head(self, user: str) -> tuple[str, int]:
        return await self.broker.head(TOPIC_USER, user)

    def append(self, user: str, type: str, data: Any, payload: bytes) -> Event:
        raise RuntimeError("positions come from the broker: the bus publishes through it")

    async def read_since(self, user: str, epoch: str, position: int) -> list[Event] | str:
        result = await self.broker.read_since(TOPIC_USER, user, epoch, position)
        if isinstance(result, str):
            return result
        now = self.clock()
        return [event_of(record, now) for record in result]

    def trim(self, active: Container[str] = ()) -> int:
        return 0  # the outbox's retention bounds the history

    def stats(self) -> dict[str, int]:
        return {}


class BrokerSink:
    """Hands the broker's records for users with open streams here to the bus's queues."""

    __slots__ = ("bus",)

    def __init__(self, bus: SSEEventBus) -> None:
        self.bus = bus

    def wants(self, key: str) -> bool:
        return key in self.bus._subs

    def receive(self, record: Record) -> None:
        self.bus.deliver(event_of(record, self.bus.clock()))

    def reset(self, key: str, epoch: str, position: int, reason: str) -> None:
        bus = self.bus
        bus.resets += 1
        bus.deliver(reset_event(key, epoch, position, reason, bus.clock()))
