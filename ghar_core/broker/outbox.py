"""The outbox's SQL, the direct connection check and the writer's small parts.

Shared by :class:`~ghar_core.broker.PostgresBroker` and :func:`~ghar_core.broker.emit`.
"""

from __future__ import annotations

import asyncio
import binascii
import random
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import asyncpg
import orjson

from ghar_core.broker.base import NOTIFY_CHANNEL, PoolerAddressError, Record, split_stream

__all__ = [
    "LISTEN_APPLICATION_NAME",
    "PUBLISH_SQL",
    "WRITER_APPLICATION_NAME",
    "connect_direct",
    "publish_rows",
]

LISTEN_APPLICATION_NAME: Final = "ghar-core-listen"
WRITER_APPLICATION_NAME: Final = "ghar-core-outbox"
PUBLISH_SQL: Final = (
    "SELECT id, stream, epoch, position FROM ghar_event_publish($1, $2, $3, $4, $5, $6, $7)"
)
_LOOKUP_SQL: Final = "SELECT id, stream, epoch, position FROM ghar_event_outbox WHERE batch = $1"
# A writer connection's backend, named by its pid and start time (a pid alone may
# be another session's after a restart): signalled to end, and counted while it lives.
_BACKEND_START_SQL: Final = "SELECT backend_start FROM pg_stat_activity WHERE pid = $1"
_END_BACKEND_SQL: Final = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE pid = $1 AND backend_start = $2"
)
_ROW_COLUMNS: Final = (
    "o.stream, o.epoch, o.position, o.type, o.payload, extract(epoch FROM o.created_at)::float8"
)
# The id range first (the primary key), the streams filter on those rows only:
# left to the planner, a filter of one busy stream was an index scan of that
# stream's every row, ANDed with the range (2.3 ms at 25 000 rows, per notification).
_BY_IDS_SQL: Final = (
    "WITH r AS MATERIALIZED (SELECT * FROM ghar_event_outbox WHERE id BETWEEN $1 AND $2)"
    f" SELECT {_ROW_COLUMNS} FROM r o WHERE $3::text[] IS NULL OR o.stream = ANY($3::text[])"
    " ORDER BY o.stream, o.id"
)
_RANGES_SQL: Final = (
    f"SELECT {_ROW_COLUMNS} FROM ghar_event_outbox o"
    " JOIN unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])"
    " AS w(stream, epoch, after, upto)"
    " ON o.stream = w.stream AND o.epoch = w.epoch AND o.position > w.after"
    " AND o.position <= w.upto ORDER BY o.stream, o.position"
)
_HEADS_SQL: Final = (
    "SELECT stream, epoch, head FROM ghar_event_streams WHERE stream = ANY($1::text[])"
)
_NEW_HEADS_SQL: Final = "SELECT stream, epoch, head FROM ghar_event_head($1::text[])"
_BUMP_SQL: Final = (
    "UPDATE ghar_event_streams SET epoch = ghar_event_new_epoch(), touched_at = now()"
    " WHERE stream = $1 AND epoch = $2 RETURNING epoch, head"
)
# Oldest rows first, a bounded batch at a time: past the age, or beyond the count.
_PRUNE_SQL: Final = (
    "DELETE FROM ghar_event_outbox WHERE id IN"
    " (SELECT id FROM ghar_event_outbox ORDER BY id LIMIT $3)"
    " AND (created_at < now() - make_interval(secs => $1)"
    " OR id <= (SELECT max(id) FROM ghar_event_outbox) - $2)"
)
_PRUNE_STREAMS_SQL: Final = (
    "DELETE FROM ghar_event_streams s WHERE s.ctid = ANY(ARRAY("
    " SELECT t.ctid FROM ghar_event_streams t"
    " WHERE t.touched_at < now() - make_interval(secs => $1)"
    " AND NOT EXISTS (SELECT 1 FROM ghar_event_outbox o WHERE o.stream = t.stream) LIMIT $2))"
)
_OUTBOX_STATS_SQL: Final = (
    "SELECT (SELECT count(*) FROM ghar_event_outbox),"
    " (SELECT extract(epoch FROM now() - created_at)::float8 FROM ghar_event_outbox"
    " ORDER BY id LIMIT 1)"
)
_JOB_REGISTER_SQL: Final = (
    "INSERT INTO ghar_ws_jobs (job_id, owner_id, instance, expires_at)"
    " VALUES ($1, $2, $3, now() + make_interval(secs => $4))"
    " ON CONFLICT (job_id) DO UPDATE SET owner_id = EXCLUDED.owner_id,"
    " instance = EXCLUDED.instance, expires_at = EXCLUDED.expires_at"
)
_JOB_OWNER_SQL: Final = (
    "SELECT owner_id, extract(epoch FROM expires_at - now())::float8 FROM ghar_ws_jobs"
    " WHERE job_id = $1 AND expires_at > now()"
)
_JOB_RELEASE_SQL: Final = "DELETE FROM ghar_ws_jobs WHERE job_id = $1"
_JOB_PRUNE_SQL: Final = (
    "DELETE FROM ghar_ws_jobs j WHERE j.ctid = ANY(ARRAY("
    " SELECT t.ctid FROM ghar_ws_jobs t WHERE t.expires_at <= now() LIMIT $1))"
)
_PRUNE_LOCK: Final = 0x6768_6172_5052  # pg_try_advisory_xact_lock key of the pruner ("gharPR")
_REPLAY_LIMIT: Final = 10_000  # rows one resume or catch-up reads at most; more is a reset
_FILTER_LIMIT: Final = 2_000  # known streams passed as a filter; more reads every row
# A range of at most this many ids is read whole, its rows of other streams
# skipped here: sending the followed streams costs more than those few rows
# (2000 streams: 1.3 ms of this process's CPU per read-back, vs 0.1 ms unfiltered).
_UNFILTERED_RANGE: Final = 64


class _Pending(NamedTuple):
    stream: str
    type: str
    payload: bytes
    future: asyncio.Future[Record] | None


class _Batch:
    __slots__ = ("backend", "id", "items", "unknown")

    def __init__(self, items: list[_Pending]) -> None:
        self.items = items
        self.id = uuid.uuid4()
        self.unknown = False  # the last attempt may have committed: look it up first
        # The backend (pid, start) the last attempt was sent to: until it has ended,
        # it may still commit the batch (a lock wait outlives a closed socket).
        self.backend: tuple[int, Any] | None = None


class _Lane:
    """One writer's queue: the streams hashed to it, written in order, one batch in flight.

    ``conn`` is the writer's own direct connection, ``publish`` the publish
    statement prepared on it and ``backend`` its backend's pid and start
    time (``None`` until connected, and again once the connection is given
    up).
    """

    __slots__ = ("backend", "conn", "publish", "queue", "retry", "wake")

    def __init__(self) -> None:
        self.queue: deque[_Pending] = deque()
        self.retry: _Batch | None = None
        self.wake = asyncio.Event()
        self.conn: asyncpg.Connection | None = None
        self.publish: asyncpg.prepared_stmt.PreparedStatement | None = None
        self.backend: tuple[int, Any] | None = None  # conn's backend: pid, backend_start

    def pending(self) -> int:
        return len(self.queue) + (len(self.retry.items) if self.retry else 0)


class _Backoff:
    """Jittered exponential delays from ``first`` to ``cap`` seconds."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.cap, self.delay * 2)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.delay = self.first


def _notified_rows(payload: str) -> list[tuple[str, str, int, str, bytes, float]] | None:
    """The rows a NOTIFY carries (migration 0006), as the read-back gives them, by id.

    ``None`` for the id range form (``"<first> <last>"``), which is read back.
    """
    if payload[:1] != "[":
        return None
    return [
        (stream, epoch, position, type, binascii.a2b_base64(data), created)
        for _, stream, epoch, position, type, data, created in orjson.loads(payload)
    ]


def _record(row: Sequence[Any]) -> Record:
    topic, key = split_stream(row[0])
    return Record(topic, key, row[1], row[2], row[3], bytes(row[4]), row[5] or 0.0)


async def connect_direct(
    dsn: str, *, connect_timeout: float = 5.0, application_name: str = LISTEN_APPLICATION_NAME
) -> asyncpg.Connection:
    """A connection of its own to Postgres itself, refusing a pooler in between.

    The check: the backend pid Postgres gave in the connection's start-up
    (``BackendKeyData``) must be the pid of the session answering queries. A
    pooler (PgBouncer) invents the start-up pid and hands queries to server
    connections of its own, so the two differ; in transaction mode a LISTEN
    would stay on a server connection that other clients then use, and the
    notifications would never reach us. Raises :class:`PoolerAddressError`.
    """
    conn = await asyncpg.connect(
        dsn,
        timeout=connect_timeout,
        statement_cache_size=0,
        server_settings={"application_name": application_name},
    )
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()", timeout=connect_timeout)
    except BaseException:
        conn.terminate()
        raise
    given = conn.get_server_pid()
    if pid != given:
        conn.terminate()
        raise PoolerAddressError(
            "DATABASE_DIRECT_URL (default DATABASE_URL) reaches Postgres through a connection "
            f"pooler such as PgBouncer (the start-up backend pid {given} is not "
            f"the session's {pid}): LISTEN needs a session of its own, and in PgBouncer's "
            "transaction mode notifications go to whichever client holds the server "
            "connection, so events would be lost. Set DATABASE_DIRECT_URL to Postgres's own "
            "host and port (not PgBouncer's); the pools may keep using PgBouncer."
        )
    return conn


async def publish_rows(
    conn: Any,
    streams: list[str],
    types: list[str],
    payloads: list[bytes],
    batch: uuid.UUID,
    *,
    durable: bool = True,
    carry: bool = False,
) -> list[Any]:
    """Write events to the outbox on ``conn`` (the caller's transaction, if any) and NOTIFY.

    ``durable=False`` lets this transaction commit without waiting for the WAL
    flush (``EVENT_OUTBOX_SYNCHRONOUS_COMMIT``); inside a caller's transaction
    that applies to the whole transaction, so only the broker's writer uses it.
    ``carry=True`` sends a small batch's committed rows in the NOTIFY
    (``EVENT_OUTBOX_NOTIFY_ROWS``) instead of their id range.
    """
    rows: list[Any] = await conn.fetch(
        PUBLISH_SQL, streams, types, payloads, batch, NOTIFY_CHANNEL, durable, carry
    )
    return rows


def _maybe_committed(exc: BaseException) -> bool:
    # A server-side SQL error is a definite "not written"; anything else (lost
    # connection, timeout, the pool's 503) may have happened after the commit.
    return not (isinstance(exc, asyncpg.PostgresError) and exc.sqlstate[:2] not in ("08", "57"))


def _permanent(exc: BaseException) -> bool:
    # Bad data (class 22) or a constraint (23): retrying cannot help.
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in ("22", "23")
