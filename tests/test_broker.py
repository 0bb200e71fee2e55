"""The brokers against a real Postgres: outbox positions, the gap, the listener, retention.

Two ``PostgresBroker`` instances over one database stand for two servers.
Faults are real: listener backends terminated with ``pg_terminate_backend``,
a half-open connection made by a loopback TCP relay that stops relaying,
the outbox truncated or its heads moved back, PgBouncer in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghar_core.broker import (
    TOPIC_JOB,
    TOPIC_SOCKET,
    TOPIC_USER,
    BrokerUnavailableError,
    EventTooLargeError,
    MemoryBroker,
    PoolerAddressError,
    PostgresBroker,
    build_broker,
    connect_direct,
    decode_socket_message,
    emit,
)
from ghar_core.broker.base import NOTIFY_CHANNEL
from ghar_core.broker.outbox import publish_rows
from ghar_core.database import Database
from ghar_core.migrate import migrate_dsn
from tests.broker_support import Recorder, broker_settings, instance, kill_listeners, until
from tests.pg import PgBouncer, run_sync

NOTIFY_ROWS = {"EVENT_OUTBOX_NOTIFY_ROWS": True}


def _latest_publish_function() -> str:
    """The newest migration's text that creates ghar_event_publish (re-runnable)."""
    from ghar_core.migrate import load_migrations

    return [m.sql for m in load_migrations() if "FUNCTION ghar_event_publish(" in m.sql][-1]


@pytest.fixture
def outbox_dsn(fresh_database: str) -> str:
    run_sync(migrate_dsn(fresh_database))
    return fresh_database


def _payload(n: int) -> bytes:
    return orjson.dumps({"type": "t", "n": n})


# --- the memory broker ------------------------------------------------------------------


async def test_memory_broker_delivers_in_process_to_the_sinks_that_want_the_key() -> None:
    broker = MemoryBroker(max_payload=100)
    sink = Recorder("job-1")
    broker.attach(TOPIC_JOB, sink)
    broker.publish_nowait(TOPIC_JOB, "job-1", "progress", b'{"p":1}')
    broker.publish_nowait(TOPIC_JOB, "job-2", "progress", b'{"p":2}')
    record = await broker.publish(TOPIC_JOB, "job-1", "done", b"{}")
    assert [r.type for r in sink.records["job-1"]] == ["progress", "done"]
    assert record.position == 3
    assert "job-2" not in sink.records
    with pytest.raises(EventTooLargeError, match="EVENT_MAX_PAYLOAD_BYTES=100"):
        broker.publish_nowait(TOPIC_JOB, "job-1", "big", b"x" * 101)
    assert await broker.read_since(TOPIC_JOB, "job-1", broker.epoch, 3) == []
    assert await broker.read_since(TOPIC_JOB, "job-1", "other", 3) == "epoch_changed"


def test_build_broker_follows_event_broker() -> None:
    settings = broker_settings("postgresql://postgres@127.0.0.1:1/x")
    database = Database(settings)
    assert isinstance(build_broker(settings, database), PostgresBroker)
    memory = build_broker(broker_settings("postgresql://x@h/d", EVENT_BROKER="memory"), None)
    assert isinstance(memory, MemoryBroker)


# --- publishing and delivery across instances ------------------------------------------


async def test_an_event_published_on_one_instance_reaches_the_other_in_order(
    outbox_dsn: str,
) -> None:
    async with instance(outbox_dsn) as a, instance(outbox_dsn) as b:
        sink_a, sink_b = Recorder("u1"), Recorder("u1", "u2")
        a.attach(TOPIC_USER, sink_a)
        b.attach(TOPIC_USER, sink_b)
        epoch, head = await b.head(TOPIC_USER, "u1")
        assert head == 0
        assert await b.head(TOPIC_USER, "u2") != (epoch, 0)
        await a.head(TOPIC_USER, "u1")
        for n in range(50):
            a.publish_nowait(TOPIC_USER, "u1", "t", _payload(n))
            b.publish_nowait(TOPIC_USER, "u2", "t", _payload(n))
        stored = await a.publish(TOPIC_USER, "u1", "last", b"{}")
        assert (stored.epoch, stored.position) == (epoch, 51)
        await until(lambda: len(sink_b.records["u1"]) == 51 and len(sink_b.records["u2"]) == 50)
        await until(lambda: len(sink_a.records["u1"]) == 51)
        assert sink_b.positions("u1") == list(range(1, 52))
        assert [orjson.loads(r.payload)["n"] for r in sink_b.records["u1"][:50]] == list(range(50))
        assert sink_a.positions("u1") == sink_b.positions("u1")
        assert "u2" not in sink_a.records  # nobody on A wanted u2: nothing delivered of it
        # Any instance answers a resume from the outbox.
        missed = await a.read_since(TOPIC_USER, "u1", epoch, 48)
        assert isinstance(missed, list)
        assert [r.position for r in missed] == [49, 50, 51]
        assert await a.read_since(TOPIC_USER, "u1", epoch, 99) == "unknown_position"
        assert await a.read_since(TOPIC_USER, "u1", "0000", 1) == "epoch_changed"
        assert a.stats()["published"] == 51
        assert b.stats()["connected"] is True


async def test_emit_from_a_script_reaches_a_running_instance(outbox_dsn: str) -> None:
    settings = broker_settings(outbox_dsn, EVENT_MAX_PAYLOAD_BYTES=1000)
    async with instance(outbox_dsn) as b:
        sink, sockets = Recorder("7", "job-9"), Recorder("7")
        b.attach(TOPIC_USER, sink)
        b.attach(TOPIC_JOB, sink)
        b.attach(TOPIC_SOCKET, sockets)
        await b.head(TOPIC_USER, "7")
        await b.head(TOPIC_JOB, "job-9")
        await b.head(TOPIC_SOCKET, "7")
        record = await emit(user="7", type="note", data={"x": 1}, settings=settings)
        await emit(job="job-9", type="progress", data=50, settings=settings)
        # Inside the caller's transaction: published exactly when it commits.
        conn = await asyncpg.connect(outbox_dsn)
        try:
            async with conn.transaction():
                await emit(user="7", type="in.tx", data=None, conn=conn, settings=settings)
                await asyncio.sleep(0.3)
                assert [r.type for r in sink.records["7"]] == ["note"]
        finally:
            await conn.close()
        await until(lambda: len(sink.records["7"]) == 2 and len(sink.records["job-9"]) == 1)
        assert orjson.loads(sink.records["7"][0].payload) == {"type": "note", "data": {"x": 1}}
        # The user's sockets get the same event with its id; the job's get a job message.
        await until(lambda: len(sockets.records["7"]) == 2)
        text, end = decode_socket_message(sockets.records["7"][0].payload)
        assert orjson.loads(text) == {"type": "note", "data": {"x": 1}, "id": f"{record.epoch}:1"}
        assert end is None
        text, _ = decode_socket_message(sink.records["job-9"][0].payload)
        assert orjson.loads(text) == {"type": "progress", "job_id": "job-9", "data": 50}
        assert record.position == 1
        assert sink.positions("7") == [1, 2]
        with pytest.raises(EventTooLargeError, match="over EVENT_MAX_PAYLOAD_BYTES=1000"):
            await emit(user="7", type="big", data="x" * 2000, settings=settings)
        with pytest.raises(ValueError, match="exactly one"):
            await emit(type="t", settings=settings)
        assert await b.read_since(TOPIC_USER, "7", record.epoch, 0) != "history_expired"


async def test_oversize_and_bad_events_are_refused_at_the_emitter(outbox_dsn: str) -> None:
    async with instance(outbox_dsn) as a:
        with pytest.raises(EventTooLargeError):
            a.publish_nowait(TOPIC_USER, "u", "t", b"x" * (a.max_payload + 1))
        with pytest.raises(ValueError, match="reserved"):
            a.publish_nowait(TOPIC_USER, "u", "reset", b"{}")
        with pytest.raises(ValueError, match="user or job id"):
            a.publish_nowait(TOPIC_USER, "", "t", b"{}")
        assert a.stats()["queued"] == 0


# --- the outbox gap --------------------------------------------------------------------


async def test_transactions_committing_out_of_id_order_are_delivered_in_position_order(
    outbox_dsn: str,
) -> None:
    settings = broker_settings(outbox_dsn)
    async with instance(outbox_dsn) as b:
        sink = Recorder("x", "y")
        b.attach(TOPIC_USER, sink)
        await b.head(TOPIC_USER, "x")
        await b.head(TOPIC_USER, "y")
        first, second, third = [await asyncpg.connect(outbox_dsn) for _ in range(3)]
        try:
            tx1 = first.transaction()
            await tx1.start()
            r1 = await emit(user="x", type="t", data=1, conn=first, settings=settings)
            # A later id on another stream commits first: delivered, nothing skipped.
            r2 = await emit(user="y", type="t", data=2, conn=second, settings=settings)
            await until(lambda: sink.positions("y") == [1])
            # A second writer of stream x waits for the first one's row lock ...
            tx3 = third.transaction()
            await tx3.start()
            blocked = asyncio.ensure_future(
                emit(user="x", type="t", data=3, conn=third, settings=settings)
            )
            await asyncio.sleep(0.3)
            assert not blocked.done()
            await tx1.commit()
            r3 = await blocked
            await tx3.commit()
        finally:
            for conn in (first, second, third):
                await conn.close()
        # ... so x's positions commit in order, though ids were 1, 2, 3 across x, y, x.
        await until(lambda: sink.positions("x") == [1, 2])
        assert (r1.position, r2.position, r3.position) == (1, 1, 2)
        assert [orjson.loads(r.payload)["data"] for r in sink.records["x"]] == [1, 3]


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=8),
        min_size=1,
        max_size=6,
    )
)
def test_positions_are_gapless_per_stream_under_concurrent_batches(
    outbox_dsn: str, batches: list[list[str]]
) -> None:
    async def scenario() -> None:
        conns = [await asyncpg.connect(outbox_dsn) for _ in batches]
        try:
            await conns[0].execute("TRUNCATE ghar_event_outbox, ghar_event_streams")
            results = await asyncio.gather(
                *(
                    publish_rows(c, b, ["t"] * len(b), [b"{}"] * len(b), uuid.uuid4())
                    for c, b in zip(conns, batches, strict=True)
                )
            )
            rows = await conns[0].fetch(
                "SELECT stream, position, id FROM ghar_event_outbox ORDER BY stream, position"
            )
        finally:
            for c in conns:
                await c.close()
        for stream in {s for b in batches for s in b}:
            mine = [r for r in rows if r["stream"] == stream]
            count = sum(b.count(stream) for b in batches)
            assert [r["position"] for r in mine] == list(range(1, count + 1))
            # Within a stream, id order is position order (the lock is taken first).
            assert [r["id"] for r in mine] == sorted(r["id"] for r in mine)
        assert sum(len(r) for r in results) == sum(len(b) for b in batches)

    run_sync(scenario())


# --- the listener: loss, catch-up, epochs ---------------------------------------------------


async def test_a_killed_listener_reconnects_and_reads_back_what_it_missed(
    outbox_dsn: str,
) -> None:
    settings = broker_settings(outbox_dsn)
    async with instance(outbox_dsn) as b:
        sink = Recorder("u")
        b.attach(TOPIC_USER, sink)
        await b.head(TOPIC_USER, "u")
        for round_ in range(5):
            assert await kill_listeners(outbox_dsn) == 1
            # Committed while nobody listens: the NOTIFY is lost, the row is not.
            for n in range(3):
                await emit(user="u", type="t", data=round_ * 3 + n, settings=settings)
            await until(lambda r=round_: len(sink.records["u"]) == (r + 1) * 3)
        assert sink.positions("u") == list(range(1, 16))
        assert b.stats()["connects"] >= 6
        assert sink.resets == []


async def test_killed_writer_connections_reconnect_and_store_each_event_once(
    outbox_dsn: str,
) -> None:
    async with instance(outbox_dsn) as a, instance(outbox_dsn) as b:
        sink = Recorder("u")
        b.attach(TOPIC_USER, sink)
        await b.head(TOPIC_USER, "u")
        killed = 0
        for round_ in range(10):
            for n in range(20):
                a.publish_nowait(TOPIC_USER, "u", "t", _payload(round_ * 20 + n))
                if n % 5 == 4:
                    await asyncio.sleep(0)  # some batches in flight when the kill lands
            killed += await kill_listeners(outbox_dsn, "ghar-core-outbox")
        await until(lambda: len(sink.records["u"]) == 200, 20)
        conn = await asyncpg.connect(outbox_dsn)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM ghar_event_outbox")
        finally:
            await conn.close()
    assert killed >= 3  # a writer reconnects on its next batch, so some rounds find none
    assert stored == 200  # a batch cut off after it committed was not written again
    assert sink.positions("u") == list(range(1, 201))
    assert [orjson.loads(r.payload)["n"] for r in sink.records["u"]] == list(range(200))
    assert sink.resets == []


@contextlib.asynccontextmanager
async def _relay(port: int) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A loopback TCP relay to ``port``; setting the event freezes it (a half-open link)."""
    frozen = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # swallow everything from now on
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            writers.extend((writer, up_writer))
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], frozen
    finally:
        server.close()
        for w in writers:
            w.close()


async def test_a_half_open_listener_is_noticed_within_two_seconds(outbox_dsn: str) -> None:
    from urllib.parse import urlsplit

    from tests.pg import with_database

    parts = urlsplit(outbox_dsn)
    async with _relay(parts.port or 5432) as (port, frozen):
        relayed = with_database(outbox_dsn, parts.path.lstrip("/"), port=port)
        async with instance(outbox_dsn, direct_dsn=relayed) as b:
            before = b.stats()["disconnects"]
            frozen.set()  # nothing more gets through, and no socket closes
            started = time.monotonic()
            await until(lambda: b.stats()["disconnects"] > before, 5)
            assert time.monotonic() - started < 2.0 + 0.1  # the poll's granularity


async def test_a_truncated_outbox_changes_the_epoch_and_resets_the_subscribers(
    outbox_dsn: str,
) -> None:
    settings = broker_settings(outbox_dsn)
    async with instance(outbox_dsn) as b:
        sink = Recorder("u")
        b.attach(TOPIC_USER, sink)
        epoch, _ = await b.head(TOPIC_USER, "u")
        await emit(user="u", type="t", data=1, settings=settings)
        await until(lambda: len(sink.records["u"]) == 1)
        conn = await asyncpg.connect(outbox_dsn)
        try:
            await conn.execute("TRUNCATE ghar_event_outbox, ghar_event_streams")
        finally:
            await conn.close()
        after = await emit(user="u", type="t", data=2, settings=settings)
        assert after.epoch != epoch
        assert after.position == 1
        await until(lambda: len(sink.resets) == 1)
        key, new_epoch, _, reason = sink.resets[0]
        assert (key, new_epoch, reason) == ("u", after.epoch, "epoch_changed")
        assert await b.read_since(TOPIC_USER, "u", epoch, 1) == "epoch_changed"


async def test_a_head_that_went_back_gets_a_new_epoch_never_reused_positions(
    outbox_dsn: str,
) -> None:
    settings = broker_settings(outbox_dsn)
    async with instance(outbox_dsn) as b:
        sink = Recorder("u")
        b.attach(TOPIC_USER, sink)
        epoch, _ = await b.head(TOPIC_USER, "u")
        for n in range(3):
            await emit(user="u", type="t", data=n, settings=settings)
        await until(lambda: len(sink.records["u"]) == 3)
        conn = await asyncpg.connect(outbox_dsn)
        try:
            # A restored backup: the head and the rows of the last two events are gone.
            await conn.execute("DELETE FROM ghar_event_outbox WHERE position > 1")
            await conn.execute("UPDATE ghar_event_streams SET head = 1")
        finally:
            await conn.close()
        await kill_listeners(outbox_dsn)  # the catch-up on reconnect sees it
        await until(lambda: len(sink.resets) == 1)
        _, new_epoch, head, reason = sink.resets[0]
        assert new_epoch != epoch
        assert head == 1
        assert reason == "epoch_changed"
        later = await emit(user="u", type="t", data=9, settings=settings)
        assert (later.epoch, later.position) == (new_epoch, 2)
        await until(lambda: sink.records["u"][-1].epoch == new_epoch)


# --- PgBouncer ------------------------------------------------------------------------------


async def test_a_pgbouncer_address_for_the_listener_is_refused_saying_why(
    outbox_dsn: str, pgbouncer: PgBouncer
) -> None:
    bounced = pgbouncer.dsn(outbox_dsn)
    with pytest.raises(PoolerAddressError, match=r"DATABASE_DIRECT_URL.*PgBouncer.*transaction"):
        await connect_direct(bounced)
    settings = broker_settings(bounced)
    database = Database(settings)
    await database.start()
    try:
        broker = PostgresBroker(settings, database)  # DATABASE_DIRECT_URL unset: DATABASE_URL
        with pytest.raises(PoolerAddressError):
            await broker.start()
        assert not broker.started
    finally:
        await database.stop(grace=2)


async def test_the_pools_through_pgbouncer_and_the_listener_direct(
    outbox_dsn: str, pgbouncer: PgBouncer
) -> None:
    bounced = pgbouncer.dsn(outbox_dsn)
    async with (
        instance(bounced, direct_dsn=outbox_dsn) as a,
        instance(bounced, direct_dsn=outbox_dsn) as b,
    ):
        sink = Recorder("u")
        b.attach(TOPIC_USER, sink)
        epoch, _ = await b.head(TOPIC_USER, "u")
        for n in range(100):
            a.publish_nowait(TOPIC_USER, "u", "t", _payload(n))
        await until(lambda: len(sink.records["u"]) == 100)
        assert sink.positions("u") == list(range(1, 101))
        replay = await a.read_since(TOPIC_USER, "u", epoch, 90)
        assert isinstance(replay, list)
        assert len(replay) == 10
        assert await a.prune() == 0  # the advisory xact lock works through PgBouncer


# --- retention ------------------------------------------------------------------------------


@pytest.fixture
def aged_outbox(outbox_dsn: str) -> Iterator[str]:
    async def fill() -> None:
        conn = await asyncpg.connect(outbox_dsn)
        try:
            await conn.execute(
                "INSERT INTO ghar_event_streams (stream, epoch, head) VALUES ('u:old', 'e1', 120)"
            )
            await conn.execute(
                "INSERT INTO ghar_event_outbox (stream, epoch, position, type, payload, batch,"
                " created_at) SELECT 'u:old', 'e1', g, 't', '\\x7b7d', gen_random_uuid(),"
                " now() - make_interval(secs => CASE WHEN g <= 70 THEN 7200 ELSE 0 END)"
                " FROM generate_series(1, 120) g"
            )
        finally:
            await conn.close()

    run_sync(fill())
    return outbox_dsn


async def test_retention_prunes_by_age_and_count_in_batches_one_instance_at_a_time(
    aged_outbox: str,
) -> None:
    settings = broker_settings(
        aged_outbox, EVENT_OUTBOX_RETENTION_AGE=3600.0, EVENT_OUTBOX_RETENTION_COUNT=40
    )
    database = Database(settings)
    await database.start()
    broker = PostgresBroker(settings, database, prune=False)
    try:
        holder = await asyncpg.connect(aged_outbox)
        try:
            async with holder.transaction():
                await holder.fetchval("SELECT pg_advisory_xact_lock($1)", 0x6768_6172_5052)
                assert await broker.prune(batch=10) == 0  # another instance prunes now
        finally:
            await holder.close()
        assert broker.stats()["outbox_rows"] == 120
        assert broker.stats()["outbox_oldest_age"] > 7000
        # 70 rows are past the age; of the other 50, the 10 oldest are beyond the count.
        assert await broker.prune(batch=10, max_batches=100) == 80
        stats = broker.stats()
        assert stats["outbox_rows"] == 40
        assert stats["outbox_oldest_age"] < 60
        assert await broker.read_since(TOPIC_USER, "old", "e1", 10) == "history_expired"
        replay = await broker.read_since(TOPIC_USER, "old", "e1", 100)
        assert isinstance(replay, list)
        assert len(replay) == 20
    finally:
        await database.stop(grace=2)


async def test_a_bounded_pass_deletes_at_most_its_batches(aged_outbox: str) -> None:
    settings = broker_settings(aged_outbox, EVENT_OUTBOX_RETENTION_AGE=3600.0)
    database = Database(settings)
    await database.start()
    try:
        broker = PostgresBroker(settings, database, prune=False)
        assert await broker.prune(batch=20, max_batches=2) == 40
        assert await broker.prune(batch=20, max_batches=2) == 30
        assert broker.stats()["outbox_rows"] == 50
    finally:
        await database.stop(grace=2)


async def test_a_timed_out_write_whose_backend_still_runs_is_not_written_again(
    outbox_dsn: str,
) -> None:
    # The writer gives its connection up (DB_COMMAND_TIMEOUT) while its backend
    # waits on the stream's row lock; that backend commits once the lock is
    # free, so the batch must not have been written again meanwhile.
    settings = broker_settings(outbox_dsn, DB_COMMAND_TIMEOUT=0.3)
    database = Database(settings)
    await database.start()
    broker = PostgresBroker(settings, database)
    holder = await asyncpg.connect(outbox_dsn)
    try:
        await broker.start()
        first = await broker.publish(TOPIC_USER, "u", "t", _payload(0))
        assert first.position == 1
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM ghar_event_streams WHERE stream = 'u:u' FOR UPDATE")
        pending = asyncio.ensure_future(broker.publish(TOPIC_USER, "u", "t", _payload(1)))
        await asyncio.sleep(1.5)  # several timed-out attempts
        await lock.commit()
        record = await asyncio.wait_for(pending, 10)
        await asyncio.sleep(0.5)  # any backend still waiting has committed by now
        rows = await holder.fetch("SELECT position, payload FROM ghar_event_outbox ORDER BY id")
    finally:
        await holder.close()
        await broker.stop(grace=5)
        await database.stop(grace=2)
    assert [(r[0], orjson.loads(r[1])["n"]) for r in rows] == [(1, 0), (2, 1)]
    assert record.position == 2


async def test_a_subscriber_after_dropped_notifications_resumes_and_follows_every_row(
    outbox_dsn: str,
) -> None:
    # B follows no stream while A publishes (B drops those notifications unread);
    # then B's subscriber resumes from the outbox and follows live rows of u among
    # other streams' rows, in ranges both under and over the unfiltered width.
    async with instance(outbox_dsn) as a, instance(outbox_dsn) as b:
        records = [await a.publish(TOPIC_USER, "u", "t", _payload(n)) for n in range(5)]
        sink = Recorder("u")
        b.attach(TOPIC_USER, sink)
        epoch, head = await b.head(TOPIC_USER, "u")
        assert (epoch, head) == (records[0].epoch, 5)
        replay = await b.read_since(TOPIC_USER, "u", epoch, 2)
        assert isinstance(replay, list)
        assert [r.position for r in replay] == [3, 4, 5]
        sent = 5
        for width in (1, 3, 63, 64, 65, 200):
            for n in range(width):
                a.publish_nowait(TOPIC_USER, f"other-{n}", "t", _payload(n))
            sent += 1
            a.publish_nowait(TOPIC_USER, "u", "t", _payload(sent))
            await until(lambda s=sent: len(sink.records["u"]) == s - 5)
        assert sink.positions("u") == list(range(6, sent + 1))
        assert b.known_head(TOPIC_USER, "u") == (epoch, sent)
        assert sink.resets == []


async def test_by_default_a_notify_carries_the_id_range_and_listeners_read_back(
    outbox_dsn: str,
) -> None:
    # EVENT_OUTBOX_NOTIFY_ROWS=false (the default, DESIGN.md: "a small NOTIFY (ids
    # only)"): every NOTIFY is "<first> <last>", small events included, and B
    # reads the rows back; nothing is carried.
    notes: list[str] = []
    listener = await asyncpg.connect(outbox_dsn)
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: notes.append(args[3]))
    try:
        async with instance(outbox_dsn) as a, instance(outbox_dsn) as b:
            sink = Recorder("u")
            b.attach(TOPIC_USER, sink)
            await b.head(TOPIC_USER, "u")
            stored = [await a.publish(TOPIC_USER, "u", "t", _payload(n)) for n in range(3)]
            await until(lambda: len(sink.records["u"]) == 3)
            ids = [
                r["id"]
                for r in await listener.fetch("SELECT id FROM ghar_event_outbox ORDER BY id")
            ]
            await until(lambda: len(notes) == 3)
            assert notes == [f"{i} {i}" for i in ids]
            assert sink.positions("u") == [r.position for r in stored] == [1, 2, 3]
            assert b.stats()["carried"] == 0
    finally:
        await listener.close()


async def test_a_small_event_travels_in_its_notify_and_equals_its_outbox_row(
    outbox_dsn: str,
) -> None:
    # With EVENT_OUTBOX_NOTIFY_ROWS a one-event batch under the NOTIFY limit carries
    # its committed row: B delivers it without reading the outbox, and what B
    # delivers is exactly the stored row (any payload bytes, any key text); a
    # larger event is read back.
    key = 'ü "k" \\ \n'
    async with instance(outbox_dsn, changes=NOTIFY_ROWS) as a, instance(outbox_dsn) as b:
        sink = Recorder(key)
        b.attach(TOPIC_USER, sink)
        epoch, _ = await b.head(TOPIC_USER, key)
        odd = bytes(range(256)) + 'ü " \n'.encode()
        await a.publish(TOPIC_USER, key, "first", odd)
        await until(lambda: len(sink.records[key]) == 1)
        assert b.stats()["carried"] == 1
        await a.publish(TOPIC_USER, key, "big", b"x" * 20_000)
        await a.publish(TOPIC_USER, key, "small", _payload(2))
        await until(lambda: len(sink.records[key]) == 3)
        assert b.stats()["carried"] == 2
        conn = await asyncpg.connect(outbox_dsn)
        try:  # a batch of several small events (here from a script) is carried too
            await publish_rows(
                conn, [f"u:{key}"] * 3, ["t"] * 3, [b"{}"] * 3, uuid.uuid4(), carry=True
            )
        finally:
            await conn.close()
        await until(lambda: len(sink.records[key]) == 6)
        assert b.stats()["carried"] == 5
        stored = await b.read_since(TOPIC_USER, key, epoch, 0)
        assert sink.records[key] == stored
        assert [r.position for r in stored] == [1, 2, 3, 4, 5, 6]
        assert [r.payload for r in stored[:2]] == [odd, b"x" * 20_000]
        assert sink.resets == []


async def test_carried_and_read_back_events_heard_while_the_listener_is_busy_come_once(
    outbox_dsn: str,
) -> None:
    # B's listener is held in a query (its head lookup for a stream whose row
    # another transaction is inserting) while A publishes small events (their
    # rows carried by the NOTIFY) and a large one (its ids only): B then
    # delivers each position exactly once, in order.
    async with instance(outbox_dsn, changes=NOTIFY_ROWS) as a, instance(outbox_dsn) as b:
        sink = Recorder("u", "held")
        b.attach(TOPIC_USER, sink)
        await b.head(TOPIC_USER, "u")
        holder = await asyncpg.connect(outbox_dsn)
        try:
            lock = holder.transaction()
            await lock.start()
            await holder.execute(
                "INSERT INTO ghar_event_streams (stream, epoch) VALUES ('u:held', 'e')"
            )
            held = asyncio.ensure_future(b.head(TOPIC_USER, "held"))
            await asyncio.sleep(0.2)
            for n, size in enumerate((10, 10, 20_000, 10, 10, 20_000, 10)):
                await a.publish(TOPIC_USER, "u", "t", orjson.dumps({"n": n, "p": "x" * size}))
            await asyncio.sleep(0.2)
            assert sink.records["u"] == []  # all heard while the listener was held
            await lock.rollback()
            await held
        finally:
            await holder.close()
        await until(lambda: len(sink.records["u"]) >= 7)
        await asyncio.sleep(0.2)
        assert sink.positions("u") == [1, 2, 3, 4, 5, 6, 7]
        assert [orjson.loads(r.payload)["n"] for r in sink.records["u"]] == list(range(7))
        assert sink.resets == []


async def test_an_instance_holds_one_listen_and_one_connection_per_writer_closed_at_stop(
    outbox_dsn: str,
) -> None:
    count = (
        "SELECT application_name, count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'ghar-core-%'"
        " GROUP BY 1 ORDER BY 1"
    )
    watcher = await asyncpg.connect(outbox_dsn)
    try:
        async with instance(outbox_dsn, writers=3) as a:
            a.publish_nowait(TOPIC_USER, "u", "t", _payload(0))
            await until(lambda: a.queued() == 0)
            running = [tuple(r) for r in await watcher.fetch(count)]
        await asyncio.sleep(0.2)  # a closed backend leaves pg_stat_activity shortly after
        after = [tuple(r) for r in await watcher.fetch(count)]
    finally:
        await watcher.close()
    assert running == [("ghar-core-listen", 1), ("ghar-core-outbox", 3)]
    assert after == []


async def test_the_writer_count_comes_from_event_outbox_writers(outbox_dsn: str) -> None:
    settings = broker_settings(outbox_dsn, EVENT_OUTBOX_WRITERS=1)
    database = Database(settings)
    await database.start()
    broker = PostgresBroker(settings, database, prune=False)
    try:
        await broker.start()
        assert await broker.wait_connected(10)
        for i in range(20):  # streams spread over every writer there is: here one
            broker.publish_nowait(TOPIC_USER, f"u{i}", "t", _payload(i))
        await until(lambda: broker.queued() == 0)
        async with database.connection() as conn:
            writers = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'ghar-core-outbox'"
            )
        assert writers == 1
        assert broker.published == 20
    finally:
        await broker.stop(grace=5)
        await database.stop(grace=2)


async def test_publishing_and_reading_survive_the_function_and_table_being_replaced(
    outbox_dsn: str,
) -> None:
    # A later migration replacing ghar_event_publish (CREATE OR REPLACE, or DROP and
    # CREATE) or adding an outbox column while instances run: their prepared
    # statements are planned again, nothing is refused or lost.
    body = _latest_publish_function()
    async with instance(outbox_dsn) as a, instance(outbox_dsn) as b:
        sink = Recorder("u")
        b.attach(TOPIC_USER, sink)
        await b.head(TOPIC_USER, "u")
        await a.publish(TOPIC_USER, "u", "t", _payload(0))
        conn = await asyncpg.connect(outbox_dsn)
        try:
            await conn.execute(body)
            await a.publish(TOPIC_USER, "u", "t", _payload(1))
            async with conn.transaction():
                await conn.execute("DROP FUNCTION ghar_event_publish")
                await conn.execute(body)
            await a.publish(TOPIC_USER, "u", "t", _payload(2))
            await conn.execute("ALTER TABLE ghar_event_outbox ADD COLUMN extra int")
            await a.publish(TOPIC_USER, "u", "t", _payload(3))
        finally:
            await conn.close()
        await until(lambda: len(sink.records["u"]) == 4)
        assert sink.positions("u") == [1, 2, 3, 4]
        assert a.stats()["failed"] == 0


async def test_stopping_mid_write_says_the_outcome_is_unknown_not_that_nothing_was_stored(
    outbox_dsn: str,
) -> None:
    # Stopped while a batch's statement runs (here: waiting on the stream's row
    # lock), the server cannot say whether that batch commits: its publisher is
    # told so (retrying blindly could store it twice); an event still queued
    # behind it was never sent and is "not stored".
    from ghar_core.db_resilience import CommitOutcomeUnknownException

    settings = broker_settings(outbox_dsn)
    database = Database(settings)
    await database.start()
    broker = PostgresBroker(settings, database, writers=1)
    holder = await asyncpg.connect(outbox_dsn)
    try:
        await broker.start()
        await broker.publish(TOPIC_USER, "u", "t", _payload(0))
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM ghar_event_streams WHERE stream = 'u:u' FOR UPDATE")
        in_flight = asyncio.ensure_future(broker.publish(TOPIC_USER, "u", "t", _payload(1)))
        await asyncio.sleep(0.3)
        queued = asyncio.ensure_future(broker.publish(TOPIC_USER, "u", "t", _payload(2)))
        await asyncio.sleep(0.05)
        await broker.stop(grace=0.3)
        await lock.rollback()
    finally:
        await holder.close()
        await broker.stop(grace=1)
        await database.stop(grace=2)
    with pytest.raises(CommitOutcomeUnknownException):
        await in_flight
    with pytest.raises(BrokerUnavailableError, match="stopped first"):
        await queued


async def test_a_publish_statement_whose_result_type_changed_is_prepared_again(
    outbox_dsn: str,
) -> None:
    # A migration that changes what ghar_event_publish returns (DROP and CREATE,
    # here "position" as numeric) makes the writers' prepared statement invalid
    # ("cached plan must not change result type"): the writer prepares it again
    # on a new connection instead of retrying the dead plan for ever.
    body = _latest_publish_function()
    changed = body.replace('"position" bigint)', '"position" numeric)').replace(
        "v_head bigint;", "v_head numeric;"
    )
    assert changed != body
    async with instance(outbox_dsn, writers=1) as a:
        await a.publish(TOPIC_USER, "u", "t", _payload(0))
        conn = await asyncpg.connect(outbox_dsn)
        try:
            async with conn.transaction():
                await conn.execute("DROP FUNCTION ghar_event_publish")
                await conn.execute(changed)
        finally:
            await conn.close()
        record = await asyncio.wait_for(a.publish(TOPIC_USER, "u", "t", _payload(1)), 5)
        assert record.position == 2
