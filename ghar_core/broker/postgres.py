"""``PostgresBroker``: the outbox, the writer task, the direct LISTEN connection, the pruner.

See the package docstring for the design; this module is its implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import asyncpg

from ghar_core.broker.base import (
    NOTIFY_CHANNEL,
    TOPICS,
    BrokerBusyError,
    BrokerUnavailableError,
    PoolerAddressError,
    Record,
    Sink,
    check_event,
    split_stream,
    stream_of,
)
from ghar_core.broker.outbox import (
    _BACKEND_START_SQL,
    _BUMP_SQL,
    _BY_IDS_SQL,
    _END_BACKEND_SQL,
    _FILTER_LIMIT,
    _HEADS_SQL,
    _JOB_OWNER_SQL,
    _JOB_PRUNE_SQL,
    _JOB_REGISTER_SQL,
    _JOB_RELEASE_SQL,
    _LOOKUP_SQL,
    _NEW_HEADS_SQL,
    _OUTBOX_STATS_SQL,
    _PRUNE_LOCK,
    _PRUNE_SQL,
    _PRUNE_STREAMS_SQL,
    _RANGES_SQL,
    _REPLAY_LIMIT,
    _UNFILTERED_RANGE,
    LISTEN_APPLICATION_NAME,
    PUBLISH_SQL,
    WRITER_APPLICATION_NAME,
    _Backoff,
    _Batch,
    _Lane,
    _maybe_committed,
    _notified_rows,
    _Pending,
    _permanent,
    _record,
    connect_direct,
    publish_rows,
)
from ghar_core.db_resilience import CommitOutcomeUnknownException

if TYPE_CHECKING:
    from ghar_core.config import Settings
    from ghar_core.database import Database

__all__ = ["LISTEN_APPLICATION_NAME", "PostgresBroker", "connect_direct", "publish_rows"]

logger = logging.getLogger("ghar_core.broker")


class PostgresBroker:
    """The ``EVENT_BROKER=postgres`` broker (resource ``"broker"``); see the package doc.

    ``PostgresBroker(settings, database)``: events are written in batches by
    writer tasks, each on a connection of its own, and heard on one LISTEN
    connection; all are opened directly to ``direct_dsn`` (default
    ``DATABASE_DIRECT_URL``, else ``DATABASE_URL``) and checked not to be a
    pooler. ``database``'s pools (PgBouncer is fine there) serve resumes, job
    registrations and retention. ``keepalive``: seconds between liveness
    probes of an idle listener (a loss is noticed within twice that).
    ``prune``: run the retention task. ``queue_limit``: events that may wait
    for the outbox, per writer, before ``publish_nowait`` refuses (503).
    ``writers`` (default ``EVENT_OUTBOX_WRITERS``): writer tasks (one direct
    connection each) committing in parallel; a stream always goes to the
    same one, so one process's events of a stream are stored in the order
    emitted.
    ``EVENT_OUTBOX_SYNCHRONOUS_COMMIT=false`` lets the writers commit without
    waiting for the WAL flush. Owned by the app's lifespan: ``start`` runs the
    tasks, ``stop`` flushes what is queued (bounded) and closes the
    connections.
    """

    name = "broker"
    remote = True

    def __init__(
        self,
        settings: Settings,
        database: Database,
        *,
        direct_dsn: str | None = None,
        keepalive: float = 1.0,
        batch_size: int = 500,
        writers: int | None = None,
        queue_limit: int = 100_000,
        head_timeout: float = 5.0,
        prune: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if keepalive <= 0 or head_timeout <= 0:
            raise ValueError("keepalive and head_timeout must be > 0")
        writers = settings.EVENT_OUTBOX_WRITERS if writers is None else writers
        if batch_size < 1 or queue_limit < 1 or writers < 1:
            raise ValueError("batch_size, queue_limit and writers must be >= 1")
        self.settings = settings
        self.database = database
        self.direct_dsn = direct_dsn or settings.DATABASE_DIRECT_URL or settings.DATABASE_URL
        self.keepalive = keepalive
        self.batch_size = batch_size
        self.queue_limit = queue_limit
        self.head_timeout = head_timeout
        self.prune_enabled = prune
        self.max_payload = settings.EVENT_MAX_PAYLOAD_BYTES
        self.retention_age = settings.EVENT_OUTBOX_RETENTION_AGE
        self.retention_count = settings.EVENT_OUTBOX_RETENTION_COUNT
        self.prune_interval = settings.EVENT_OUTBOX_PRUNE_INTERVAL
        self.synchronous_commit = settings.EVENT_OUTBOX_SYNCHRONOUS_COMMIT
        self.notify_rows = settings.EVENT_OUTBOX_NOTIFY_ROWS
        self.clock = clock
        # Names this process in ghar_ws_jobs.instance (for an operator's eyes only).
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._sinks: dict[str, list[Sink]] = {topic: [] for topic in TOPICS}
        # Publishing: a stream always goes to the same lane, whose one writer task
        # writes in order; lanes commit in parallel (other streams, other rows).
        self._lanes = [_Lane() for _ in range(writers)]
        # Listening: what this process has delivered per stream, and the work waiting.
        self._known: dict[str, tuple[str, int]] = {}
        self._ranges: list[tuple[int, int]] = []
        # Rows carried by notifications that could not be delivered in the callback.
        self._rows: list[tuple[str, str, int, str, bytes, float]] = []
        # True while the listener task waits with nothing in hand: only then may a
        # notification's row be delivered in its callback (nothing can interleave).
        self._idle = False
        self._heads: dict[str, list[asyncio.Future[tuple[str, int]]]] = {}
        self._resolving = False  # the listener is reading heads for subscribers
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        # The read-back of a notification's rows, prepared on each LISTEN connection.
        self._by_ids: asyncpg.prepared_stmt.PreparedStatement | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.Task[None]] = []
        self._closing = False
        self.started = False
        # Counters for stats().
        self.published = 0
        self.failed = 0
        self.refused = 0
        self.received = 0
        self.delivered = 0
        self.carried = 0  # rows taken from a NOTIFY's copy instead of read back
        self.resets = 0
        self.connects = 0
        self.disconnects = 0
        self.pruned = 0
        self.outbox_rows: int | None = None
        self.outbox_oldest_age: float | None = None

    # --- sinks -------------------------------------------------------------------------

    def attach(self, topic: str, sink: Sink) -> None:
        """Hand the records of ``topic`` to ``sink`` (idempotent)."""
        sinks = self._sinks[topic]
        if sink not in sinks:
            sinks.append(sink)

    def detach(self, topic: str, sink: Sink) -> None:
        if sink in self._sinks[topic]:
            self._sinks[topic].remove(sink)

    def _wanting(self, topic: str, key: str) -> list[Sink]:
        return [sink for sink in self._sinks.get(topic, ()) if sink.wants(key)]

    # --- publishing ----------------------------------------------------------------------

    def publish_nowait(self, topic: str, key: str, type: str, payload: bytes) -> None:
        """Queue one event for the outbox; never blocks. Refused (503) past ``queue_limit``."""
        self._enqueue(topic, key, type, payload, None)

    async def publish(self, topic: str, key: str, type: str, payload: bytes) -> Record:
        """Queue one event and wait until its row is committed; its ``Record`` (position).

        Stopped first: :class:`BrokerUnavailableError` if the event was never
        sent, ``CommitOutcomeUnknownException`` if its write was cut off
        unanswered (it may be stored: check before publishing it again).
        """
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._enqueue(topic, key, type, payload, future)
        return await future

    def _enqueue(
        self,
        topic: str,
        key: str,
        type: str,
        payload: bytes,
        future: asyncio.Future[Record] | None,
    ) -> None:
        stream = check_event(topic, key, type, payload, self.max_payload)
        if self._closing:
            raise BrokerUnavailableError("The server is stopping; the event was not stored.")
        lanes = self._lanes
        lane = lanes[hash(stream) % len(lanes)] if len(lanes) > 1 else lanes[0]
        if len(lane.queue) >= self.queue_limit:
            self.refused += 1
            raise BrokerBusyError(details={"queued": len(lane.queue)})
        lane.queue.append(_Pending(stream, type, payload, future))
        lane.wake.set()

    def queued(self) -> int:
        """Events not yet committed to the outbox."""
        return sum(lane.pending() for lane in self._lanes)

    async def _write_forever(self, lane: _Lane) -> None:
        backoff = _Backoff(0.05, 1.0)
        warned = 0.0
        # Connected before the first event, so it does not wait for the connect;
        # a failure here is met again (and logged) by the first write.
        with contextlib.suppress(Exception):
            await self._writer_connection(lane)
        while True:
            batch = lane.retry
            if batch is None:
                if not lane.queue:
                    if self._closing:
                        return
                    lane.wake.clear()
                    await lane.wake.wait()
                    continue
                # Whatever queued while the previous batch was in flight goes in one
                # transaction (a group commit); an event that finds the writer idle
                # is written at once, alone. No timer ever holds an event back.
                count = min(len(lane.queue), self.batch_size)
                batch = _Batch([lane.queue.popleft() for _ in range(count)])
            lane.retry = batch
            try:
                rows = await self._write(lane, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _permanent(exc):
                    lane.retry = None
                    self._fail(batch, exc)
                    continue
                if _maybe_committed(exc):
                    # Lost, timed out or never there: a fresh connection next time.
                    batch.unknown = True
                    self._drop_writer_connection(lane)
                elif isinstance(exc, asyncpg.InvalidCachedStatementError):
                    # A migration changed what the statement returns: its kept plan
                    # can never run again, so prepare it anew on a new connection.
                    self._drop_writer_connection(lane)
                if time.monotonic() - warned > 5.0:
                    warned = time.monotonic()
                    logger.warning(
                        "event outbox write failed (%s: %s); %d event(s) wait, retrying",
                        type(exc).__name__,
                        exc,
                        lane.pending(),
                    )
                await asyncio.sleep(0.05 if self._closing else backoff.next())
                continue
            lane.retry = None
            backoff.reset()
            self._settle(batch, rows)

    async def _writer_connection(self, lane: _Lane) -> asyncpg.prepared_stmt.PreparedStatement:
        """The lane's own direct connection and its prepared publish statement.

        A connection of the writer's own rather than a pool lease, and a
        statement prepared once rather than parsed for each batch: a batch is
        then one round trip to Postgres (no lease, no Parse/Describe), which at
        one event per batch is a large part of what publishing costs.
        """
        if lane.publish is not None and lane.conn is not None and not lane.conn.is_closed():
            return lane.publish
        self._drop_writer_connection(lane)
        conn = await connect_direct(
            self.direct_dsn,
            connect_timeout=self.settings.DB_CONNECT_TIMEOUT,
            application_name=WRITER_APPLICATION_NAME,
        )
        timeout = self.settings.DB_CONNECT_TIMEOUT
        try:
            pid = conn.get_server_pid()  # Postgres's own: connect_direct refuses a pooler
            started = await conn.fetchval(_BACKEND_START_SQL, pid, timeout=timeout)
            statement = await conn.prepare(PUBLISH_SQL, name="ghar_event_publish", timeout=timeout)
        except BaseException:
            conn.terminate()
            raise
        lane.conn, lane.publish, lane.backend = conn, statement, (pid, started)
        return statement

    def _drop_writer_connection(self, lane: _Lane) -> None:
        conn, lane.conn, lane.publish, lane.backend = lane.conn, None, None, None
        if conn is not None:
            conn.terminate()

    async def _end_backend(self, conn: asyncpg.Connection, backend: tuple[int, Any]) -> None:
        """Return once ``backend`` has ended (terminated by ``conn``); TimeoutError if not.

        Closing our socket does not stop a backend: one waiting on a stream's
        row lock (another instance's batch, an app transaction) or still in
        its statement runs on and commits later. Only once it is gone does
        the lookup of its batch tell committed from not.
        """
        timeout = self.settings.DB_COMMAND_TIMEOUT
        async with asyncio.timeout(timeout):
            # Polled: the backend's end is state in Postgres, no local event says it.
            while await conn.fetchval(_END_BACKEND_SQL, *backend, timeout=timeout):  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def _write(self, lane: _Lane, batch: _Batch) -> list[Any]:
        publish = await self._writer_connection(lane)
        timeout = self.settings.DB_COMMAND_TIMEOUT
        conn = lane.conn
        assert conn is not None
        if batch.unknown:
            # The previous attempt died after sending: it may have committed, or
            # still be running on its backend and commit later; end it, then look.
            if batch.backend is not None and batch.backend != lane.backend:
                await self._end_backend(conn, batch.backend)
            found: list[Any] = await conn.fetch(_LOOKUP_SQL, batch.id, timeout=timeout)
            if found:
                return found
        batch.backend = lane.backend
        batch.unknown = True  # from here until Postgres answers, it may commit
        items = batch.items
        try:
            rows: list[Any] = await publish.fetch(
                [p.stream for p in items],
                [p.type for p in items],
                [p.payload for p in items],
                batch.id,
                NOTIFY_CHANNEL,
                self.synchronous_commit,
                self.notify_rows,
                timeout=timeout,
            )
        except Exception as exc:
            if not _maybe_committed(exc):
                batch.unknown = False  # Postgres refused the statement: nothing written
            raise
        return rows

    def _settle(self, batch: _Batch, rows: list[Any]) -> None:
        self.published += len(batch.items)
        by_stream: dict[str, deque[Any]] = {}
        for row in sorted(rows, key=lambda r: (r[1], r[3])):
            by_stream.setdefault(row[1], deque()).append(row)
        now = time.time()
        for item in batch.items:
            row = by_stream[item.stream].popleft()
            if item.future is not None and not item.future.done():
                topic, key = split_stream(item.stream)
                item.future.set_result(
                    Record(topic, key, row[2], row[3], item.type, item.payload, now)
                )

    def _fail(self, batch: _Batch, exc: BaseException) -> None:
        self.failed += len(batch.items)
        logger.error(
            "event outbox refused %d event(s): %s: %s", len(batch.items), type(exc).__name__, exc
        )
        for item in batch.items:
            if item.future is not None and not item.future.done():
                item.future.set_exception(exc)

    # --- subscribing ---------------------------------------------------------------------

    def known_head(self, topic: str, key: str) -> tuple[str, int] | None:
        """What this process has delivered of a stream, when it follows it (else ``None``)."""
        return self._known.get(stream_of(topic, key))

    async def head(self, topic: str, key: str) -> tuple[str, int]:
        """The epoch and position a new local subscriber starts from (call after registering).

        From then on every later position of the stream reaches the sinks.
        Resolved by the listener task, so it waits (``head_timeout``) while
        the listener reconnects; then :class:`BrokerUnavailableError` (503).
        """
        stream = stream_of(topic, key)
        state = self._known.get(stream)
        if state is not None:
            return state
        future: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._heads.setdefault(stream, []).append(future)
        self._wake.set()
        try:
            async with asyncio.timeout(self.head_timeout):
                return await future
        except TimeoutError:
            raise BrokerUnavailableError() from None

    async def read_since(
        self, topic: str, key: str, epoch: str, position: int
    ) -> list[Record] | str:
        """The records after ``epoch:position`` from the outbox, or why they cannot all be had."""
        stream = stream_of(topic, key)
        async with self.database.connection() as conn:
            state = await conn.fetchrow(
                "SELECT epoch, head FROM ghar_event_streams WHERE stream = $1", stream
            )
            if state is None or state[0] != epoch:
                return "epoch_changed"
            head = state[1]
            if position > head:
                return "unknown_position"
            if position == head:
                return []
            if head - position > _REPLAY_LIMIT:
                return "history_expired"
            rows = await conn.fetch(_RANGES_SQL, [stream], [epoch], [position], [head])
        if len(rows) != head - position or rows[0][2] != position + 1:
            return "history_expired"
        return [_record(row) for row in rows]

    # --- WebSocket job registrations --------------------------------------------------

    async def register_job(self, job: str, owner: str, ttl: float) -> None:
        """Store ``job``'s registration to ``owner`` for ``ttl`` seconds (renews; last wins)."""
        async with self.database.connection() as conn:
            await conn.execute(_JOB_REGISTER_SQL, job, owner, self.instance, float(ttl))

    async def release_job(self, job: str) -> None:
        """Forget ``job``'s registration on every instance (it completed, failed, was released)."""
        async with self.database.connection() as conn:
            await conn.execute(_JOB_RELEASE_SQL, job)

    async def job_owner(self, job: str) -> tuple[str, float] | None:
        """``(owner, seconds left)`` of ``job``'s live registration, by whichever instance."""
        async with self.database.connection() as conn:
            row = await conn.fetchrow(_JOB_OWNER_SQL, job)
        return None if row is None else (row[0], row[1])

    # --- the listener ------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        backoff = _Backoff(0.05, 2.0)
        while not self._closing:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await connect_direct(
                    self.direct_dsn, connect_timeout=self.settings.DB_CONNECT_TIMEOUT
                )
                self._watch(conn, lost)
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                async with asyncio.timeout(max(5.0, 2 * self.keepalive)):
                    # Prepared once: each notification's read-back is then one round
                    # trip with a kept plan (no Parse/Describe, no planning).
                    self._by_ids = await conn.prepare(_BY_IDS_SQL, name="ghar_event_by_ids")
                    # Whatever was committed while we were away is read back now.
                    await self._resync(conn, list(self._known))
                self._conn = conn
                self._connected.set()
                self.connects += 1
                backoff.reset()
                await self._serve(conn, lost)
            except asyncio.CancelledError:
                raise
            except PoolerAddressError as exc:
                logger.error("event listener: %s", exc)
                backoff.delay = backoff.cap
            except Exception as exc:
                if not self._closing:
                    logger.warning(
                        "event listener lost Postgres (%s: %s); reconnecting",
                        type(exc).__name__,
                        exc,
                    )
            finally:
                self._connected.clear()
                self._conn = self._by_ids = None
                if conn is not None:
                    self.disconnects += 1
                    conn.terminate()
            if not self._closing:
                await asyncio.sleep(backoff.next())

    def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        def terminated(_: Any) -> None:
            lost.set()
            self._wake.set()

        conn.add_termination_listener(terminated)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if not (self._known or self._heads or self._resolving):
            # Nobody here follows a stream, nor is about to: a later subscriber starts
            # from the head it reads then, so these rows are never wanted here.
            return
        rows = _notified_rows(payload)
        if rows is not None:
            for row in rows:
                self._take(row)
            return
        lo, _, hi = payload.partition(" ")
        if lo.isdigit() and hi.isdigit():
            self._ranges.append((int(lo), int(hi)))
            self._wake.set()

    def _take(self, row: tuple[str, str, int, str, bytes, float]) -> None:
        """One row a notification carried: delivered now if it is safe, else queued."""
        # Only while the listener task waits with nothing in hand can nothing interleave.
        now = self._idle and not (self._rows or self._ranges or self._heads)
        state = self._known.get(row[0])
        if now and state is None:
            return  # not followed here (and no subscriber is resolving a head)
        self.carried += 1
        if now and state is not None and row[1] == state[0]:
            if row[2] <= state[1]:
                self.received += 1
                return  # already delivered
            sinks = self._wanting(*split_stream(row[0])) if row[2] == state[1] + 1 else None
            if sinks:
                # The next position of a followed stream: delivered now, the
                # read-back and a task wake-up saved.
                self.received += 1
                self._known[row[0]] = (state[0], row[2])
                self._deliver(sinks, _record(row))
                return
        # Anything else (a gap, another epoch, the listener busy) goes the listener
        # task's way, in order after what it already holds.
        self._rows.append(row)
        self._wake.set()

    async def _serve(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        wake = self._wake
        # Every query here is bounded, so a connection that went half-open
        # while busy fails too; an idle one is probed every ``keepalive``.
        bound = max(5.0, 2 * self.keepalive)
        while True:
            if lost.is_set() or conn.is_closed():
                raise ConnectionError("the LISTEN connection was closed")
            if self._heads or self._ranges or self._rows:
                async with asyncio.timeout(bound):
                    await self._drain(conn)
                continue
            wake.clear()
            self._idle = True
            try:
                async with asyncio.timeout(self.keepalive):
                    await wake.wait()
            except TimeoutError:
                # Idle: prove the connection is alive (a half-open socket says nothing).
                async with asyncio.timeout(self.keepalive * 0.9):
                    await conn.fetchval("SELECT 1")
                self._sweep()
            finally:
                self._idle = False

    async def _drain(self, conn: asyncpg.Connection) -> None:
        if self._heads:
            heads, self._heads = self._heads, {}
            self._resolving = True
            try:
                missing = [stream for stream in heads if stream not in self._known]
                if missing:
                    for stream, epoch, head in await conn.fetch(_NEW_HEADS_SQL, missing):
                        self._known.setdefault(stream, (epoch, head))
            except BaseException:
                for stream, futures in heads.items():
                    self._heads.setdefault(stream, []).extend(futures)
                raise
            finally:
                self._resolving = False
            for stream, futures in heads.items():
                for future in futures:
                    if not future.done():
                        future.set_result(self._known[stream])
        if self._rows:
            # Carried rows, grouped by stream, each stream's in the order heard
            # (its commit order, which is its position order).
            rows, self._rows = self._rows, []
            rows.sort(key=lambda r: r[0])
            try:
                await self._apply(conn, rows)
            except BaseException:
                self._rows[:0] = rows  # delivered ones are skipped when applied again
                raise
        if self._ranges:
            ranges, self._ranges = self._ranges, []
            if not self._known:
                return  # nobody here follows any stream
            lo = min(r[0] for r in ranges)
            hi = max(r[1] for r in ranges)
            wide = hi - lo >= _UNFILTERED_RANGE
            streams = list(self._known) if wide and len(self._known) <= _FILTER_LIMIT else None
            try:
                by_ids = self._by_ids
                if by_ids is None:
                    raise ConnectionError("the LISTEN connection is being replaced")
                rows = await by_ids.fetch(lo, hi, streams)
            except BaseException:
                self._ranges[:0] = ranges
                raise
            await self._apply(conn, rows)

    async def _apply(self, conn: asyncpg.Connection, rows: Iterable[Any]) -> None:
        for stream, group in itertools.groupby(rows, key=lambda r: r[0]):
            state = self._known.get(stream)
            if state is None:
                continue
            topic, key = split_stream(stream)
            sinks = self._wanting(topic, key)
            if not sinks:
                del self._known[stream]
                continue
            epoch, position = state
            for row in group:
                self.received += 1
                if row[1] == epoch and row[2] <= position:
                    continue  # already delivered
                if row[1] != epoch or row[2] > position + 1:
                    # Another epoch, or a gap: read the stream back to its head,
                    # from what this group has delivered so far (never twice).
                    self._known[stream] = (epoch, position)
                    await self._resync(conn, [stream])
                    if stream not in self._known:
                        break
                    epoch, position = self._known[stream]
                    continue
                self._deliver(sinks, _record(row))
                position = row[2]
            if stream in self._known:
                self._known[stream] = (epoch, position)

    def _deliver(self, sinks: list[Sink], record: Record) -> None:
        for sink in sinks:
            sink.receive(record)
        self.delivered += 1

    def _reset(self, stream: str, epoch: str, head: int, reason: str) -> None:
        topic, key = split_stream(stream)
        self.resets += 1
        for sink in self._wanting(topic, key):
            sink.reset(key, epoch, head, reason)
        self._known[stream] = (epoch, head)

    async def _resync(self, conn: asyncpg.Connection, streams: list[str]) -> None:
        """Bring ``streams`` up to the outbox's head: the missed rows, or a reset."""
        if not streams:
            return
        found = {row[0]: (row[1], row[2]) for row in await conn.fetch(_HEADS_SQL, streams)}
        wanted: list[tuple[str, str, int, int]] = []
        for stream in streams:
            state = self._known.get(stream)
            if state is None:
                continue
            epoch, position = state
            current = found.get(stream)
            if current is None:
                # The stream's row is gone (outbox truncated): a new epoch.
                rows = await conn.fetch(_NEW_HEADS_SQL, [stream])
                self._reset(stream, rows[0][1], rows[0][2], "epoch_changed")
            elif current[0] != epoch:
                self._reset(stream, current[0], current[1], "epoch_changed")
            elif current[1] < position:
                # The head went back (a restored backup): never reuse positions.
                bumped = await conn.fetchrow(_BUMP_SQL, stream, epoch)
                if bumped is None:
                    bumped = (await conn.fetch(_HEADS_SQL, [stream]))[0][1:]
                self._reset(stream, bumped[0], bumped[1], "epoch_changed")
            elif current[1] - position > _REPLAY_LIMIT:
                self._reset(stream, epoch, current[1], "history_expired")
            elif current[1] > position:
                wanted.append((stream, epoch, position, current[1]))
        if not wanted:
            return
        rows = await conn.fetch(_RANGES_SQL, *map(list, zip(*wanted, strict=True)))
        by_stream: dict[str, list[Any]] = {}
        for row in rows:
            by_stream.setdefault(row[0], []).append(row)
        for stream, epoch, position, head in wanted:
            got = by_stream.get(stream, [])
            if len(got) != head - position or (got and got[0][2] != position + 1):
                self._reset(stream, epoch, head, "history_expired")
                continue
            topic, key = split_stream(stream)
            sinks = self._wanting(topic, key)
            for row in got:
                self._deliver(sinks, _record(row))
            self._known[stream] = (epoch, head)

    def _sweep(self) -> None:
        # Forget the streams nobody here follows any more.
        for stream in [s for s in self._known if not self._wanting(*split_stream(s))]:
            del self._known[stream]

    # --- retention -----------------------------------------------------------------------

    async def prune(self, *, batch: int = 5_000, max_batches: int = 20) -> int:
        """One retention pass; returns the rows deleted (0 when another instance prunes).

        Each batch is its own transaction holding ``pg_try_advisory_xact_lock``
        (a transaction lock works through PgBouncer), so one instance at a
        time deletes, in bounded steps that never hold locks for long.
        """
        deleted = 0
        for _ in range(max_batches):
            async with self.database.background_transaction() as conn:
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PRUNE_LOCK):
                    break
                status = await conn.execute(
                    _PRUNE_SQL, self.retention_age, self.retention_count, batch
                )
                count = int(status.rsplit(" ", 1)[-1])
                if count < batch:
                    await conn.execute(_PRUNE_STREAMS_SQL, self.retention_age, batch)
                    await conn.execute(_JOB_PRUNE_SQL, batch)  # expired job registrations
            deleted += count
            if count < batch:
                break
        self.pruned += deleted
        async with self.database.background_connection() as conn:
            rows, oldest = await conn.fetchrow(_OUTBOX_STATS_SQL)
        self.outbox_rows, self.outbox_oldest_age = rows, oldest
        return deleted

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("event outbox prune failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.prune_interval)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check the direct address, then run the writer, the listener and the pruner.

        A pooler address is refused here (:class:`PoolerAddressError`, the
        app does not start); Postgres being down is logged, and the listener
        connects when it comes back.
        """
        if self.started:
            return
        try:
            probe = await connect_direct(
                self.direct_dsn, connect_timeout=self.settings.DB_CONNECT_TIMEOUT
            )
        except PoolerAddressError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("event listener cannot reach Postgres yet (%s); will retry", exc)
        else:
            await probe.close(timeout=self.settings.DB_CONNECT_TIMEOUT)
        self._closing = False
        loop = asyncio.get_running_loop()
        self._writers = [
            loop.create_task(self._write_forever(lane), name=f"ghar-broker-writer-{i}")
            for i, lane in enumerate(self._lanes)
        ]
        self._tasks = [loop.create_task(self._listen_forever(), name="ghar-broker-listener")]
        if self.prune_enabled:
            self._tasks.append(loop.create_task(self._prune_forever(), name="ghar-broker-prune"))
        self.started = True
        # Serve subscribers at once when Postgres answers (bounded: never blocks start).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.DB_CONNECT_TIMEOUT):
                await self._connected.wait()

    async def wait_connected(self, seconds: float | None = None) -> bool:
        """Wait until the listener is connected (tests, benchmarks); False past ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self, grace: float | None = None) -> None:
        """Write what is queued (bounded by ``grace``), then stop every task (idempotent).

        What is left fails its publishers (see :meth:`publish`) and is logged.
        """
        if not self.started:
            return
        self._closing = True
        for lane in self._lanes:
            lane.wake.set()
        bound = self.settings.SHUTDOWN_STEP_TIMEOUT * 0.8 if grace is None else grace
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(bound):
                await asyncio.shield(asyncio.gather(*self._writers, return_exceptions=True))
        for task in self._writers:
            task.cancel()
        for task in self._writers + self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        left = self.queued()
        # A batch sent and not answered (cut off, or its connection lost with
        # Postgres unreachable since) may yet be committed: its publishers are
        # told the outcome is unknown, since a blind retry could store it twice.
        unsure = [
            lane.retry
            for lane in self._lanes
            if lane.retry is not None and lane.retry.unknown and lane.retry.backend is not None
        ]
        if left:
            unknown = sum(len(batch.items) for batch in unsure)
            logger.error(
                "event broker stopped with %d event(s) not stored and %d whose write may or "
                "may not have committed",
                left - unknown,
                unknown,
            )
            self.failed += left
        for lane in self._lanes:
            batch = lane.retry
            sent = (batch.items, batch in unsure) if batch is not None else ((), False)
            for items, maybe in (sent, (lane.queue, False)):
                for item in items:
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(
                            CommitOutcomeUnknownException()
                            if maybe
                            else BrokerUnavailableError("The server stopped first.")
                        )
            lane.queue.clear()
            lane.retry = None
            conn, lane.conn, lane.publish, lane.backend = lane.conn, None, None, None
            if conn is not None and not conn.is_closed():
                try:
                    await conn.close(timeout=min(bound, 2.0))
                except Exception:
                    conn.terminate()
        self._writers = []
        self._tasks = []
        self.started = False

    async def check(self) -> None:
        """Ready while the listener is connected (events would otherwise wait)."""
        if not self._connected.is_set():
            raise BrokerUnavailableError("The event listener is not connected to Postgres.")

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "postgres",
            "connected": self._connected.is_set(),
            "queued": self.queued(),
            "published": self.published,
            "failed": self.failed,
            "refused": self.refused,
            "received": self.received,
            "delivered": self.delivered,
            "carried": self.carried,
            "resets": self.resets,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "streams_followed": len(self._known),
            "pruned": self.pruned,
            "outbox_rows": self.outbox_rows,
            "outbox_oldest_age": self.outbox_oldest_age,
        }

    def __repr__(self) -> str:
        state = "connected" if self._connected.is_set() else "disconnected"
        return f"<PostgresBroker {state}, {len(self._known)} stream(s) followed>"
