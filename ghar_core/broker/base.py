"""What every broker shares: records, the ``Broker`` and ``Sink`` protocols, the checks."""

from __future__ import annotations

import re
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

import orjson

from ghar_core.exceptions import ServiceUnavailableException

__all__ = [
    "NOTIFY_CHANNEL",
    "TOPICS",
    "TOPIC_JOB",
    "TOPIC_SOCKET",
    "TOPIC_USER",
    "Broker",
    "BrokerBusyError",
    "BrokerError",
    "BrokerUnavailableError",
    "EventTooLargeError",
    "PoolerAddressError",
    "Record",
    "Sink",
    "check_event",
    "decode_socket_message",
    "encode_socket_message",
    "split_stream",
    "stream_of",
]

#: A user's stream: SSE events and WebSocket notifications of one user.
TOPIC_USER: Final = "u"
#: A job's stream: the WebSocket messages of one background job.
TOPIC_JOB: Final = "j"
#: A user's socket stream: WebSocket messages to one user that are not SSE events.
TOPIC_SOCKET: Final = "w"
TOPICS: Final = (TOPIC_USER, TOPIC_JOB, TOPIC_SOCKET)
#: The one NOTIFY channel of the Postgres broker (per database).
NOTIFY_CHANNEL: Final = "ghar_events"
_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_MAX_KEY: Final = 200


class Record(NamedTuple):
    """One event of one stream as a broker carries it: positioned, encoded once.

    ``payload`` is the orjson encoding of the whole event mapping (what the
    SSE ``data:`` carries); ``created`` is the commit's wall-clock time (Unix
    seconds) for the Postgres broker, the publish time for the memory one.
    """

    topic: str
    key: str
    epoch: str
    position: int
    type: str
    payload: bytes
    created: float


class BrokerError(RuntimeError):
    """The broker cannot be used as configured (the message says why and what to change)."""


class PoolerAddressError(BrokerError):
    """``DATABASE_DIRECT_URL`` reaches Postgres through a pooler, which cannot carry LISTEN."""


class EventTooLargeError(ValueError):
    """An encoded event over ``EVENT_MAX_PAYLOAD_BYTES``: refused at the emitter, never dropped."""


class BrokerBusyError(ServiceUnavailableException):
    """Too many events wait for the outbox (Postgres is down or slow): refused, not dropped."""

    error_code = "EVENTS_BUSY"
    message = "Too many events are waiting to be stored; retry shortly."
    default_headers = {"Retry-After": "2"}


class BrokerUnavailableError(ServiceUnavailableException):
    """The event listener is not connected to Postgres right now (it reconnects by itself)."""

    error_code = "EVENTS_UNAVAILABLE"
    message = "The event stream is reconnecting to the database; retry shortly."
    default_headers = {"Retry-After": "2"}


def stream_of(topic: str, key: str) -> str:
    """The outbox's stream name: ``"u:<user id>"`` or ``"j:<job id>"``."""
    return f"{topic}:{key}"


def split_stream(stream: str) -> tuple[str, str]:
    topic, _, key = stream.partition(":")
    return topic, key


def encode_socket_message(text: str, end: tuple[int, str] | None = None) -> bytes:
    """A WebSocket message as a record's payload: its text and, when it ends the sockets, how."""
    return orjson.dumps({"text": text, "end": list(end) if end is not None else None})


def decode_socket_message(payload: bytes) -> tuple[str, tuple[int, str] | None]:
    body = orjson.loads(payload)
    end = body.get("end")
    return body["text"], (int(end[0]), str(end[1])) if end else None


def check_event(topic: str, key: str, type: str, payload: bytes, max_bytes: int) -> str:
    """Validate one event for a broker and return its stream name (errors name the field)."""
    if topic not in TOPICS:
        raise ValueError(f"topic must be one of {TOPICS}, got {topic!r}")
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY or "\x00" in key:
        raise ValueError(f"the user or job id must be 1-{_MAX_KEY} characters, got {key!r}")
    if not isinstance(type, str) or not _TYPE.match(type):
        raise ValueError(f"event type must be 1-64 of [A-Za-z0-9_.-], got {type!r}")
    if type == "reset":
        raise ValueError("the event type 'reset' is reserved for the event stream")
    if len(payload) > max_bytes:
        raise EventTooLargeError(
            f"the event is {len(payload)} bytes encoded, over EVENT_MAX_PAYLOAD_BYTES="
            f"{max_bytes}: store the large part elsewhere and send its id"
        )
    return stream_of(topic, key)


class Sink(Protocol):
    """A local consumer of one topic (the SSE bus, the WebSocket manager).

    ``wants(key)``: whether this process has a subscriber for the key now
    (a broker reads nothing for keys nobody here wants). ``receive`` gets
    every record of a wanted key exactly once, in position order; ``reset``
    says positions were lost (the outbox was truncated or restored, or a gap
    is older than the retention) and the subscribers must reload their state.
    Both are called on the event loop and must not block.
    """

    def wants(self, key: str) -> bool: ...

    def receive(self, record: Record) -> None: ...

    def reset(self, key: str, epoch: str, position: int, reason: str) -> None: ...


@runtime_checkable
class Broker(Protocol):
    """Where events cross processes: the bus and the manager publish and subscribe here.

    ``remote`` is False for the in-memory broker (publishing delivers in this
    process, now) and True when events come back through the broker from
    storage (the Postgres outbox): then the bus takes positions and history
    from the broker (``head``, ``read_since``) and only delivers what
    ``receive`` hands it. ``publish_nowait`` never blocks (``emit``);
    ``publish`` returns once the event is stored. ``head`` is where a new
    local subscriber starts (every later position then reaches the sinks);
    ``known_head`` is what this process has delivered, without waiting.
    ``register_job`` / ``release_job`` / ``job_owner`` share WebSocket job
    registrations between instances (a remote broker stores them; ``job_owner``
    gives the owner and the seconds left); the in-memory broker keeps none,
    the manager's own registry is the whole truth there.
    """

    name: str
    remote: bool

    def attach(self, topic: str, sink: Sink) -> None: ...

    def detach(self, topic: str, sink: Sink) -> None: ...

    def publish_nowait(self, topic: str, key: str, type: str, payload: bytes) -> None: ...

    async def publish(self, topic: str, key: str, type: str, payload: bytes) -> Record: ...

    def known_head(self, topic: str, key: str) -> tuple[str, int] | None: ...

    async def head(self, topic: str, key: str) -> tuple[str, int]: ...

    async def read_since(
        self, topic: str, key: str, epoch: str, position: int
    ) -> list[Record] | str: ...

    async def register_job(self, job: str, owner: str, ttl: float) -> None: ...

    async def release_job(self, job: str) -> None: ...

    async def job_owner(self, job: str) -> tuple[str, float] | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def check(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...
