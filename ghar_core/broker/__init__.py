"""Where events cross processes: the ``Broker`` seam, in memory or on a Postgres outbox.

The SSE bus and the WebSocket manager publish through a :class:`Broker` and
get what other processes published from it. ``EVENT_BROKER=memory`` (the
default) is :class:`MemoryBroker`: one process, nothing stored.
``EVENT_BROKER=postgres`` is :class:`PostgresBroker`: N servers on one
database deliver every event to the right user, wherever it was emitted.

The outbox. Each event is a row of ``ghar_event_outbox`` (migration
``0002_event_outbox`` of the core's set) with its stream (``u:<user>``: the
user's event stream; ``w:<user>``, ``j:<job>``: WebSocket messages to a
user's or a job's sockets), epoch and position; ``ghar_event_streams`` holds each stream's
epoch and head. The outbox is the source of truth: every event is committed
there first, its epoch and position allocated there. One NOTIFY per writing
transaction wakes every listener, sent with the commit (NOTIFY is
transactional: nobody hears of a row that is not stored). What it carries:
the range of the batch's new row ids (``"<first> <last>"``), whose rows the
listener reads back -- the smallest entry in Postgres's notification queue,
which all listening sessions of the cluster share and which fills while any
of them lags. With ``EVENT_OUTBOX_NOTIFY_ROWS=true`` (migration ``0006``), a
batch of up to 16 events whose payloads total under 5000 bytes
and whose text fits the NOTIFY limit
(``block_size - max_identifier_length - 129`` bytes, 8000 on a default
build) carries a copy of the committed rows
instead (a JSON array of [id, stream, epoch, position, type, base64 payload,
created at in exact decimal seconds] in id order), so a listener that
follows those streams delivers them without a read-back, one round trip less
between emit and delivery. Either way the payload stays under Postgres's
limit, so no event is refused for it (the limit is
``EVENT_MAX_PAYLOAD_BYTES``). Events are written by writer tasks in batches
(one transaction, one NOTIFY each), each writer on a connection of its own
opened directly to Postgres like the listener's, with the publish statement
prepared once, so a batch is one round trip. A writer never waits on a
timer: an event that finds it idle is written at once, and the events that
queued while a batch was in flight go together in the next one (a group
commit). A stream always goes to the same writer, so one process's events
of a stream are stored in the order they were emitted. A batch whose
connection died mid-statement is looked up by its batch id (on a fresh
connection, once the old connection's backend has been terminated and is
gone, since a backend waiting on a lock outlives its closed socket and may
still commit) before it is written again, so no event is stored twice.
:func:`emit` writes from scripts, optionally inside the caller's own
transaction.

Positions come from the outbox, so any instance can serve a
``Last-Event-ID`` resume for any user (``read_since``), and the epoch is the
stream's row: if the outbox loses data (the stream rows truncated, a backup
restored so a head went back) the epoch changes and subscribers get a
``reset``; a row pruned before a reader got it is a ``reset`` too, never a
silent hole.

The outbox gap, closed. Readers of an outbox by id miss a row whose
transaction took a smaller id but committed after a larger one was read.
Here a stream's position is allocated by an upsert of its
``ghar_event_streams`` row, whose row lock is held until the publishing
transaction ends: two transactions writing to one stream commit in position
order, so whoever sees position n of a stream also sees every position
before it. The listener never keeps a global id cursor: it keeps, per stream
it follows, the last position delivered, takes the row a notification
carries or reads back the rows it names, and when a row is not the next
position (a gap, another epoch) reads the stream back from that position to
its head. A carried row is delivered in the notification's own callback only
when it is the next position of a followed stream and the listener task is
idle; otherwise it waits for the task in arrival order, so it can never
overtake a read-back (rows already delivered are skipped by position). Streams are locked in sorted
order within a batch, so writers cannot deadlock.

The listener. Each process holds one LISTEN connection opened directly to
Postgres (``DATABASE_DIRECT_URL``, default ``DATABASE_URL``), never from a
pool: PgBouncer's transaction mode cannot carry LISTEN, and
:func:`connect_direct` refuses a pooler at start-up with a message saying
so. The rows of a notification that names ids are read back at once on
that connection, with one prepared statement for the whole id range. A drop is noticed at
once when the socket closes (asyncpg's termination listener) and within
``2 * keepalive`` (2 s) for a half-open connection (a ``SELECT 1`` probe
with a timeout on every idle second); it reconnects with
jittered backoff (50 ms to 2 s) and reads back from the outbox everything
committed meanwhile for the streams it follows (only streams with a local
subscriber: a ``Sink`` says which it wants).

Retention: a task deletes rows older than ``EVENT_OUTBOX_RETENTION_AGE`` or
beyond the newest ``EVENT_OUTBOX_RETENTION_COUNT``, oldest first in batches
of 5000, each batch a transaction holding an advisory transaction lock so
one instance prunes at a time. ``stats()`` has ``outbox_rows`` and
``outbox_oldest_age`` (seconds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ghar_core.broker.base import (
    NOTIFY_CHANNEL,
    TOPIC_JOB,
    TOPIC_SOCKET,
    TOPIC_USER,
    TOPICS,
    Broker,
    BrokerBusyError,
    BrokerError,
    BrokerUnavailableError,
    EventTooLargeError,
    PoolerAddressError,
    Record,
    Sink,
    check_event,
    decode_socket_message,
    encode_socket_message,
    split_stream,
    stream_of,
)
from ghar_core.broker.emit import emit, encode_event
from ghar_core.broker.memory import MemoryBroker
from ghar_core.broker.outbox import connect_direct
from ghar_core.broker.postgres import PostgresBroker

if TYPE_CHECKING:
    from ghar_core.config import Settings
    from ghar_core.database import Database

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
    "MemoryBroker",
    "PoolerAddressError",
    "PostgresBroker",
    "Record",
    "Sink",
    "build_broker",
    "check_event",
    "connect_direct",
    "decode_socket_message",
    "emit",
    "encode_event",
    "encode_socket_message",
    "split_stream",
    "stream_of",
]


def build_broker(settings: Settings, database: Database | None) -> Broker:
    """The broker ``EVENT_BROKER`` names (``postgres`` needs the app's ``database``)."""
    if settings.EVENT_BROKER == "postgres":
        if database is None:
            raise BrokerError("EVENT_BROKER=postgres needs the app's Database resource")
        return PostgresBroker(settings, database)
    return MemoryBroker(max_payload=settings.EVENT_MAX_PAYLOAD_BYTES)
