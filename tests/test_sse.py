"""The per-user event bus (``ghar_core.sse``) in process: queues, reaping, resume, shutdown.

The streams over real sockets are in ``tests/asgi/test_sse_uvicorn.py``; the
real browser in ``tests/asgi/test_sse_browser.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from ghar_core.config import Settings, load_settings
from ghar_core.logging import RedactingFilter
from ghar_core.sse import (
    REAPED_IDLE,
    REAPED_STALLED,
    RESET_EVENT,
    SHUTDOWN,
    Event,
    MemoryEventLog,
    SSEEventBus,
    SSEUnavailableError,
    Subscription,
    format_event_id,
    get_sse_bus,
    parse_event_id,
    set_default_bus,
    sse_bus,
)
from tests.strategies import event_ids


def _settings(**changes: Any) -> Settings:
    return dataclasses.replace(load_settings(app_env="test", environ={}), **changes)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_bus(clock: Clock | None = None, **options: Any) -> SSEEventBus:
    names = ("SSE_HISTORY_SIZE", "SSE_HISTORY_MAX_AGE")
    history = {k: options.pop(k) for k in names if k in options}
    kwargs: dict[str, Any] = {"handle_signals": False, **options}
    if clock is not None:
        kwargs["clock"] = clock
    return SSEEventBus(_settings(**history), **kwargs)


def positions(events: list[Event] | None) -> list[int]:
    assert events is not None
    return [e.position for e in events if e.type != RESET_EVENT]


class SlowLog(MemoryEventLog):
    """A log whose replay suspends until released: the window where live events buffer."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.release = asyncio.Event()
        self.reading = asyncio.Event()

    async def read_since(self, user: str, epoch: str, position: int) -> list[Event] | str:
        self.reading.set()
        await self.release.wait()
        return await super().read_since(user, epoch, position)


@pytest.fixture(autouse=True)
def _own_default_bus() -> Iterator[None]:
    previous = set_default_bus(None)
    yield
    set_default_bus(previous)


# --- ids ---------------------------------------------------------------------------


def test_event_ids_round_trip() -> None:
    assert parse_event_id(format_event_id("ab12", 7)) == ("ab12", 7)
    for bad in (None, "", "7", "ab:", ":3", "a b:1", "ab:-1", "ab:1.5", "ab:" + "9" * 19):
        assert parse_event_id(bad) is None, bad


# --- emit and fan-out --------------------------------------------------------------


async def test_emit_reaches_only_that_users_streams_and_counts_them() -> None:
    bus = make_bus()
    user = uuid.uuid4()
    async with bus.subscribe(user) as a, bus.subscribe(str(user)) as b, bus.subscribe("x") as c:
        assert bus.emit(user, {"type": "booking.updated", "id": 7}) == 2
        assert bus.emit("nobody", {"type": "t"}) == 0
        (ea,) = a.take() or []
        (eb,) = b.take() or []
        assert ea is eb  # encoded once, shared
        assert c.take() == []
        assert ea.type == "booking.updated"
        assert ea.frame == (
            f"id: {ea.epoch}:1\nevent: booking.updated\n".encode()
            + b'data: {"type":"booking.updated","id":7}\n\n'
        )
    assert bus.stats()["subscribers"] == 0
    assert bus.stats()["users"] == 0


async def test_emit_without_a_type_is_a_message_and_data_is_the_whole_mapping() -> None:
    bus = make_bus()
    async with bus.subscribe("u") as sub:
        bus.emit("u", {"id": uuid.UUID(int=1), "tags": {"a"}})
        (event,) = sub.take() or []
    assert event.type == "message"
    assert orjson.loads(event.frame.split(b"data: ")[1]) == {
        "id": "00000000-0000-0000-0000-000000000001",
        "tags": ["a"],
    }


@pytest.mark.parametrize("kind", ["", "a b", "x\nid: 1", "reset", 7, "é", "a" * 65])
def test_bad_event_types_are_refused_at_the_emitter(kind: Any) -> None:
    bus = make_bus()
    with pytest.raises(ValueError, match="event type"):
        bus.emit("u", {"type": kind})
    assert bus.log.head("u")[1] == 0


def test_a_value_orjson_cannot_encode_uses_no_position() -> None:
    bus = make_bus()
    with pytest.raises(TypeError):
        bus.emit("u", {"type": "t", "when": object()})
    assert bus.log.head("u")[1] == 0
    assert bus.publish("u", {"type": "t"}).event.position == 1


# --- bounds, cap, no leaks -------------------------------------------------------------


async def test_a_full_queue_drops_the_oldest_and_the_reader_is_told_with_a_reset() -> None:
    bus = make_bus(queue_size=3)
    async with bus.subscribe("u") as sub:
        for i in range(5):
            bus.emit("u", {"type": "t", "i": i})
        assert len(sub.queue or ()) == 3
        batch = sub.take() or []
        assert batch[0].type == RESET_EVENT
        assert orjson.loads(batch[0].frame.split(b"data: ")[1])["reason"] == "overflow"
        assert batch[0].position == 2  # the client now stands just before what it gets
        assert positions(batch) == [3, 4, 5]
        bus.emit("u", {"type": "t"})
        assert positions(sub.take()) == [6]  # one reset per gap, not forever
    assert bus.stats()["dropped"] == 2
    assert bus.stats()["resets"] == 1


async def test_the_cap_refuses_with_503_and_frees_up_again() -> None:
    bus = make_bus(max_subscribers=2)
    first = await bus.subscribe("a").open()
    await bus.subscribe("b").open()
    with pytest.raises(SSEUnavailableError) as info:
        await bus.subscribe("c").open()
    assert info.value.status_code == 503
    assert info.value.headers["Retry-After"]
    assert bus.stats()["refused"] == 1
    assert bus.stats()["subscribers"] == 2
    assert "c" not in {s.user for s in bus.subscriptions()}
    first.close()
    await bus.subscribe("c").open()
    assert bus.stats()["subscribers"] == 2


async def test_a_subscription_cancelled_mid_subscribe_leaks_nothing() -> None:
    log = SlowLog()
    bus = make_bus(log=log)
    bus.emit("u", {"type": "t"})
    task = asyncio.ensure_future(bus.subscribe("u", last_event_id=f"{log.head('u')[0]}:0").open())
    await log.reading.wait()
    assert bus.stats()["subscribers"] == 1  # registered first, so live events buffer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bus.stats()["subscribers"] == 0
    assert bus.stats()["users"] == 0
    assert bus.subscriptions() == []


async def test_leaving_an_async_for_early_unsubscribes() -> None:
    bus = make_bus()
    bus.emit("u", {"type": "t"})
    async for _event in bus.subscribe("u", last_event_id=f"{bus.log.head('u')[0]}:0"):
        assert bus.stats()["subscribers"] == 1
        break
    for _ in range(3):  # the generator's aclose() is scheduled by the loop's finaliser
        await asyncio.sleep(0)
    assert bus.stats()["subscribers"] == 0


async def test_a_closed_subscription_cannot_be_reopened() -> None:
    bus = make_bus()
    sub = await bus.subscribe("u").open()
    sub.close()
    with pytest.raises(RuntimeError, match="closed"):
        await sub.open()


# --- exact resume ------------------------------------------------------------------------


async def test_resume_replays_exactly_what_was_missed_then_continues_live() -> None:
    bus = make_bus()
    for i in range(5):
        bus.emit("u", {"type": "t", "i": i})
    epoch = bus.log.head("u")[0]
    async with bus.subscribe("u", last_event_id=f"{epoch}:2") as sub:
        assert positions(sub.take()) == [3, 4, 5]
        bus.emit("u", {"type": "t"})
        assert positions(sub.take()) == [6]
    assert bus.stats()["replayed"] == 3


async def test_live_events_during_a_slow_replay_are_neither_lost_nor_repeated() -> None:
    log = SlowLog()
    bus = make_bus(log=log)
    for _ in range(3):
        bus.emit("u", {"type": "t"})
    sub = bus.subscribe("u", last_event_id=f"{log.head('u')[0]}:1")
    opening = asyncio.ensure_future(sub.open())
    await log.reading.wait()
    for _ in range(2):
        bus.emit("u", {"type": "t"})  # 4, 5: buffered live, and also in the replay
    log.release.set()
    await opening
    assert positions(sub.take()) == [2, 3, 4, 5]
    bus.emit("u", {"type": "t"})
    assert positions(sub.take()) == [6]
    sub.close()


@pytest.mark.parametrize(
    ("last_id", "reason"),
    [
        ("otherepoch:3", "epoch_changed"),
        ("garbage", "unknown_position"),
        ("{epoch}:99", "unknown_position"),
        ("{epoch}:1", "history_expired"),
    ],
)
async def test_an_unfillable_gap_is_a_reset_at_the_live_edge(last_id: str, reason: str) -> None:
    bus = make_bus(SSE_HISTORY_SIZE=3)
    for _ in range(6):
        bus.emit("u", {"type": "t"})
    epoch = bus.log.head("u")[0]
    async with bus.subscribe("u", last_event_id=last_id.format(epoch=epoch)) as sub:
        (reset,) = sub.take() or []
        assert reset.type == RESET_EVENT
        assert reset.id == f"{epoch}:6"
        assert orjson.loads(reset.frame.split(b"data: ")[1]) == {
            "reason": reason,
            "epoch": epoch,
            "position": 6,
        }
        bus.emit("u", {"type": "t"})
        assert positions(sub.take()) == [7]


async def test_history_is_bounded_by_age_and_a_forgotten_user_gets_a_new_epoch() -> None:
    clock = Clock()
    bus = make_bus(clock, SSE_HISTORY_MAX_AGE=60.0)
    bus.emit("u", {"type": "t"})
    epoch = bus.log.head("u")[0]
    clock.now += 61
    async with bus.subscribe("u", last_event_id=f"{epoch}:0") as sub:
        (reset,) = sub.take() or []
        assert "history_expired" in reset.frame.decode()
        clock.now += 61
        bus.log.trim(["u"])  # an open stream keeps its user's epoch
        assert bus.stats()["history_users"] == 1
    clock.now += 61
    bus.log.trim()
    assert bus.stats()["history_users"] == 0
    assert bus.log.head("u")[0] != epoch  # the old positions can never be mistaken


async def test_history_age_holds_on_resume_and_after_a_reaper_cycle() -> None:
    clock = Clock()
    bus = make_bus(clock, SSE_HISTORY_MAX_AGE=60.0)
    bus.emit("u", {"type": "t", "n": 1})
    bus.emit("u", {"type": "t", "n": 2})
    epoch = bus.log.head("u")[0]
    clock.now += 61
    bus.emit("u", {"type": "later", "n": [3]})
    async with bus.subscribe("u", last_event_id=f"{epoch}:2") as sub:
        (event,) = sub.take() or []
        assert (event.position, event.type, event.data) == (3, "later", {"type": "later", "n": [3]})
        assert event.id == f"{epoch}:3"
        assert event.ts == clock.now
    async with bus.subscribe("u", last_event_id=f"{epoch}:1") as sub:
        (reset,) = sub.take() or []
        assert reset.type == RESET_EVENT
        assert "history_expired" in reset.frame.decode()
    bus.reap()
    assert bus.stats()["history_events"] == 1
    clock.now += 61
    bus.reap()
    assert bus.stats()["history_events"] == 0


async def test_emit_goes_through_a_log_that_positions_events_its_own_way() -> None:
    class CountingLog(MemoryEventLog):
        appended = 0

        def append(self, user: str, type: str, data: Any, payload: bytes) -> Event:
            self.appended += 1
            return super().append(user, type, data, payload)

    log = CountingLog()
    bus = SSEEventBus(_settings(), log=log, handle_signals=False)
    async with bus.subscribe("u") as sub, bus.subscribe("u") as other:
        assert bus.emit("u", {"type": "t", "n": 1}) == 2
        assert bus.emit("v", {"type": "t"}) == 0
        (event,) = sub.take() or []
        assert other.take() == [event]
    assert log.appended == 2
    assert (event.position, event.data) == (1, {"type": "t", "n": 1})
    assert bus.stats()["delivered"] == 2
    with pytest.raises(ValueError, match="reserved"):
        bus.emit("u", {"type": RESET_EVENT})
    assert log.appended == 2


async def test_a_lone_readers_records_and_shared_events_keep_one_order() -> None:
    bus = make_bus(queue_size=4)
    async with bus.subscribe("u") as a:
        bus.emit("u", {"type": "t", "n": 1})  # a alone: queued as a record
        async with bus.subscribe("u") as b:
            bus.emit("u", {"type": "t", "n": 2})  # two readers: one shared Event
            (shared,) = b.take() or []
        bus.emit("u", {"type": "t", "n": 3})
        events = a.take() or []
        assert positions(events) == [1, 2, 3]
        assert events[1] is shared
        assert [e.data for e in events] == [{"type": "t", "n": n} for n in (1, 2, 3)]
        for e in events:
            assert e.user == "u"
            assert e.frame.startswith(f"id: {e.id}\nevent: t\ndata: ".encode())
        for n in range(4, 10):  # six records into a queue of four: the oldest two dropped
            bus.emit("u", {"type": "t", "n": n})
        events = a.take() or []
        assert events[0].type == RESET_EVENT
        assert positions(events) == [6, 7, 8, 9]
        assert bus.stats()["dropped"] == 2


async def test_deliver_takes_events_positioned_elsewhere() -> None:
    bus = make_bus()
    other = MemoryEventLog()
    async with bus.subscribe("u") as sub:
        event = other.append("u", "t", {}, b"{}")
        assert bus.deliver(event) == 1
        assert sub.take() == [event]


async def test_a_broker_delivering_twice_and_out_of_order_is_read_against_the_cursor() -> None:
    # Positions 1, 2, 2, 4 span exactly as many as they count: only the cursor
    # tells the duplicate apart (a bulk hand-over would repeat position 2).
    bus = make_bus()
    other = MemoryEventLog()
    events = [other.append("u", "t", {}, b"{}") for _ in range(4)]
    async with bus.subscribe("u") as sub:
        for event in (events[0], events[1], events[1], events[3]):
            bus.deliver(event)
        assert positions(sub.take()) == [1, 2, 4]
        bus.deliver(events[2])  # late: already past it
        assert sub.take() == []
        bus.emit("u", {"type": "t"})  # the bus's own events again: read in bulk
        assert positions(sub.take()) == [1]
        assert sub.ordered


async def test_wait_returns_false_when_its_time_is_up_and_true_on_an_event_or_a_close() -> None:
    bus = make_bus()
    async with bus.subscribe("u") as sub:
        assert await sub.wait(0.01) is False
        assert not sub.waiting
        asyncio.get_running_loop().call_later(0.01, bus.emit, "u", {"type": "t"})
        assert await sub.wait(5) is True
        assert positions(sub.take()) == [1]
        asyncio.get_running_loop().call_later(0.01, sub.close)
        assert await sub.wait(5) is True
        assert sub.take() is None


# --- reaping -----------------------------------------------------------------------------


async def test_a_queue_full_for_three_cycles_is_reaped_by_the_emits() -> None:
    bus = make_bus(queue_size=2, full_cycles_limit=3)
    sub = await bus.subscribe("u").open()
    reader = await bus.subscribe("u").open()
    emits = 0
    while not sub.closed and emits < 40:
        bus.emit("u", {"type": "t"})
        emits += 1
        reader.take()
    assert sub.close_reason == REAPED_STALLED
    assert emits == 30  # full from emit 2; full at the reaps of emits 10, 20 and 30
    assert sub.take() is None
    bus.emit("u", {"type": "t"})
    assert sub.take() is None  # a reaped subscription gets nothing more
    assert not reader.closed
    assert bus.stats()["reaped"] == 1


async def test_idle_subscriptions_are_reaped_but_a_waiting_reader_is_not() -> None:
    clock = Clock()
    bus = make_bus(clock, idle_timeout=60.0)
    idle = await bus.subscribe("a").open()
    waiting = await bus.subscribe("b").open()
    waiter = asyncio.ensure_future(waiting.wait())
    await asyncio.sleep(0)
    clock.now += 61
    assert bus.reap() == 1
    assert idle.close_reason == REAPED_IDLE
    assert not waiting.closed
    assert not waiter.done()
    bus.emit("b", {"type": "t"})
    assert await waiter is True
    waiting.close()


async def test_the_reaper_task_runs_cycles_and_stops_with_the_bus() -> None:
    clock = Clock()
    bus = make_bus(clock, reaper_interval=0.01, idle_timeout=5.0)
    await bus.start()
    try:
        await bus.check()
        sub = await bus.subscribe("u").open()
        clock.now += 6
        async with asyncio.timeout(5):
            while not sub.closed:  # noqa: ASYNC110 - the reaper task closes it
                await asyncio.sleep(0.01)
        assert sub.close_reason == REAPED_IDLE
    finally:
        await bus.stop()
    assert bus._reaper is None


# --- lifecycle and shutdown ----------------------------------------------------------------


async def test_stop_ends_every_stream_after_what_is_queued_and_refuses_new_ones() -> None:
    bus = make_bus()
    await bus.start()
    sub = await bus.subscribe("u").open()
    bus.emit("u", {"type": "t"})
    await bus.stop()
    assert sub.close_reason == SHUTDOWN
    assert positions(sub.take()) == [1]  # drained before the end
    assert sub.take() is None
    with pytest.raises(SSEUnavailableError):
        await bus.subscribe("u").open()
    with pytest.raises(RuntimeError, match="shutting down"):
        await bus.check()
    await bus.start()  # a stopped bus can start again
    try:
        async with bus.subscribe("u"):
            pass
    finally:
        await bus.stop()
    await bus.stop()  # idempotent


async def test_sigterm_ends_the_streams_and_still_reaches_the_previous_handler() -> None:
    calls: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        bus = SSEEventBus(_settings())
        await bus.start()
        sub = await bus.subscribe("u").open()
        waiter = asyncio.ensure_future(sub.wait())
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(5):
            assert await waiter is True
        assert sub.close_reason == SHUTDOWN
        assert calls == [signal.SIGTERM]
        assert bus.closing
        await bus.stop()
        assert signal.getsignal(signal.SIGTERM) is not None
        os.kill(os.getpid(), signal.SIGTERM)  # the hook is gone: only the previous handler
        await asyncio.sleep(0.05)
        assert calls == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)


async def test_two_buses_share_one_hook_and_the_last_stop_removes_it() -> None:
    before = signal.getsignal(signal.SIGINT)
    a, b = SSEEventBus(_settings()), SSEEventBus(_settings())
    await a.start()
    await b.start()
    hooked = signal.getsignal(signal.SIGINT)
    assert hooked is not before
    await a.stop()
    assert signal.getsignal(signal.SIGINT) is hooked
    await b.stop()
    assert signal.getsignal(signal.SIGINT) is before


async def test_start_redacts_the_servers_own_log_lines() -> None:
    bus = make_bus()
    await bus.start()
    await bus.stop()
    for name in ("uvicorn.access", "uvicorn.error"):
        assert any(isinstance(f, RedactingFilter) for f in logging.getLogger(name).filters)


async def test_sse_bus_forwards_to_the_running_apps_bus() -> None:
    fallback = get_sse_bus()
    assert sse_bus.emit("u", {"type": "t"}) == 0
    bus = make_bus()
    await bus.start()  # replaces the unstarted fallback
    try:
        assert get_sse_bus() is bus
        other = make_bus()
        await other.start()  # never steals from a running bus
        assert get_sse_bus() is bus
        await other.stop()
        async with bus.subscribe("u") as sub:
            assert sse_bus.emit("u", {"type": "t"}) == 1
            assert sse_bus.publish("u", {"type": "t"}).delivered == 1
            assert positions(sub.take()) == [1, 2]
        assert sse_bus.stats()["emitted"] == 2
        assert sse_bus.queue_size == bus.queue_size
    finally:
        await bus.stop()
    assert get_sse_bus() is not bus
    assert get_sse_bus() is not fallback


async def test_stats_count_everything() -> None:
    bus = make_bus(queue_size=1)
    async with bus.subscribe("u"):
        bus.emit("u", {"type": "t"})
        bus.emit("u", {"type": "t"})
        stats = bus.stats()
    assert stats == {
        "users": 1,
        "subscribers": 1,
        "emitted": 2,
        "delivered": 2,
        "dropped": 1,
        "reaped": 0,
        "refused": 0,
        "replayed": 0,
        "resets": 0,
        "history_users": 1,
        "history_events": 2,
    }


def test_options_are_checked() -> None:
    for bad in ({"queue_size": 0}, {"max_subscribers": 0}, {"reaper_interval": 0}):
        with pytest.raises(ValueError, match=r"must be (at least 1|positive)"):
            make_bus(**bad)


# --- the state machine ----------------------------------------------------------------------

USERS = ("a", "b")
QUEUE = 3
CAP = 4
HISTORY = 5
HISTORY_AGE = 150.0
IDLE = 100.0


class YieldingLog(MemoryEventLog):
    """Replay suspends once, so a cancel can land in the middle of a subscribe."""

    async def read_since(self, user: str, epoch: str, position: int) -> list[Event] | str:
        await asyncio.sleep(0)
        return await super().read_since(user, epoch, position)


@dataclasses.dataclass
class Model:
    """What one subscription must have seen: its cursor, and what is owed to it."""

    sub: Subscription
    epoch: str
    cursor: int
    live_since_take: int = 0
    last_take: float = 0.0
    seen_closed: bool = False


class BusMachine(RuleBasedStateMachine):
    """subscribe, emit, consume, stall, reap, unsubscribe, cancel mid-subscribe, resume.

    The core invariant: each reader sees every position exactly once and in
    order -- each event is its cursor + 1 -- except right after a ``reset``,
    which must be justified (its queue overflowed, or its resume point is
    outside the history).
    """

    subs = Bundle("subs")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.bus = make_bus(
            self.clock,
            queue_size=QUEUE,
            max_subscribers=CAP,
            idle_timeout=IDLE,
            full_cycles_limit=3,
            log=YieldingLog(size=HISTORY, max_age=HISTORY_AGE, clock=self.clock),
        )
        self.models: dict[int, Model] = {}
        self.heads = dict.fromkeys(USERS, 0)
        self.emitted_at: dict[str, dict[int, float]] = {user: {} for user in USERS}

    def teardown(self) -> None:
        self.loop.close()

    def _model(self, sub: Subscription) -> Model:
        return self.models[id(sub)]

    def _open(self, sub: Subscription) -> bool:
        before = self.bus.stats()["subscribers"]
        try:
            self.loop.run_until_complete(sub.open())
        except SSEUnavailableError:
            assert before == CAP
            return False
        return True

    def _oldest_retained(self, user: str) -> int:
        """The first position the history still holds (``head + 1`` when none)."""
        head = self.heads[user]
        limit = self.clock.now - HISTORY_AGE
        for position in range(max(1, head - HISTORY + 1), head + 1):
            if self.emitted_at[user][position] >= limit:
                return position
        return head + 1

    def _sync_forgotten_users(self) -> None:
        for user in USERS:
            if user not in self.bus.log._users:  # type: ignore[attr-defined]
                assert not self.bus.subscriptions(user), "forgot a user with open streams"
                self.heads[user] = 0  # a new epoch starts from 0 when the user returns
                self.emitted_at[user] = {}

    @rule(target=subs, user=st.sampled_from(USERS))
    def subscribe(self, user: str) -> Any:
        sub = self.bus.subscribe(user)
        if not self._open(sub):
            return multiple()
        epoch = self.bus.log.head(user)[0]
        assert (sub.epoch, sub.cursor) == (epoch, self.heads[user])
        self.models[id(sub)] = Model(sub, epoch, self.heads[user], last_take=self.clock.now)
        return sub

    @rule(user=st.sampled_from(USERS))
    def emit(self, user: str) -> None:
        live = [m for m in self.models.values() if m.sub.user == user and not m.sub.closed]
        delivered = self.bus.emit(user, {"type": "t"})
        self.heads[user] += 1
        self.emitted_at[user][self.heads[user]] = self.clock.now
        assert delivered == len(live)
        for model in live:
            model.live_since_take += 1
        self._check_reaped()

    def _check_reaped(self) -> None:
        for model in self.models.values():
            sub = model.sub
            if not sub.closed or model.seen_closed:
                continue
            model.seen_closed = True  # judged once, with the state it was reaped in
            if sub.close_reason == REAPED_STALLED:
                assert model.live_since_take >= QUEUE
            elif sub.close_reason == REAPED_IDLE:
                assert self.clock.now - model.last_take >= IDLE

    @rule(sub=subs)
    def consume(self, sub: Subscription) -> None:
        self._check_reaped()
        model = self._model(sub)
        batch = sub.take()
        if sub.closed:
            assert batch is None or batch == []
            assert sub not in self.bus.subscriptions()
            return
        model.last_take = self.clock.now
        assert batch is not None
        expect_overflow = model.live_since_take > QUEUE
        events = list(batch)
        if events and events[0].type == RESET_EVENT:
            reason = orjson.loads(events[0].frame.split(b"data: ")[1])["reason"]
            assert reason == "overflow"
            assert expect_overflow
            model.epoch, model.cursor = events[0].epoch, events[0].position
            events = events[1:]
            assert len(events) == QUEUE  # the newest are kept
        else:
            assert not expect_overflow
        for event in events:
            assert event.type != RESET_EVENT
            if event.epoch != model.epoch:
                # The log forgot this quiet user and started a new epoch: nothing was
                # owed (its history had emptied), so the stream carries on from 1.
                assert event.position == 1
                model.epoch, model.cursor = event.epoch, 0
            assert (event.epoch, event.position) == (model.epoch, model.cursor + 1)
            model.cursor += 1
        assert model.cursor == self.heads[sub.user]
        model.live_since_take = 0

    @rule(seconds=st.sampled_from([1.0, 30.0, IDLE + 1]))
    def stall(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def reap(self) -> None:
        self.bus.reap()
        self._check_reaped()
        self._sync_forgotten_users()

    @rule(sub=consumes(subs))
    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        assert sub not in self.bus.subscriptions()
        assert sub.take() is None

    @rule(user=st.sampled_from(USERS), steps=st.integers(0, 2))
    def cancel_mid_subscribe(self, user: str, steps: int) -> None:
        before = self.bus.subscriptions()
        users = self.bus.stats()["users"]
        epoch = self.bus.log.head(user)[0]
        task = self.loop.create_task(self.bus.subscribe(user, last_event_id=f"{epoch}:0").open())
        for _ in range(steps):
            self.loop.run_until_complete(asyncio.sleep(0))
        task.cancel()
        self.loop.run_until_complete(asyncio.wait([task]))
        if not task.cancelled() and task.exception() is None:
            task.result().close()  # it finished before the cancel landed
        assert self.bus.subscriptions() == before
        assert self.bus.stats()["users"] == users

    @rule(
        target=subs,
        sub=consumes(subs),
        where=st.one_of(st.none(), st.integers(0, 30), event_ids),
    )
    def resume(self, sub: Subscription, where: int | str | None) -> Any:
        """Reconnect from where the reader stands, any position of its epoch, or any id."""
        model = self._model(sub)
        sub.close()
        user = sub.user
        epoch, head = self.bus.log.head(user)
        own = where is None
        if where is None:
            last_id = format_event_id(model.epoch, model.cursor)
        elif isinstance(where, int):
            last_id = format_event_id(epoch, where)
        else:
            last_id = where
        new = self.bus.subscribe(user, last_event_id=last_id)
        if not self._open(new):
            return multiple()
        batch = new.take() or []
        parsed = parse_event_id(last_id)
        oldest = self._oldest_retained(user)
        fillable = (
            parsed is not None
            and parsed[0] == epoch
            and parsed[1] <= head
            and (parsed[1] == head or parsed[1] + 1 >= oldest)
        )
        if own and model.epoch == epoch:
            # Its own position is always inside the live edge: only age can lose it.
            assert fillable or model.cursor + 1 < oldest
        if fillable:
            assert parsed is not None
            assert positions(batch) == list(range(parsed[1] + 1, head + 1))
            assert all(e.type != RESET_EVENT for e in batch)
        else:
            assert [e.type for e in batch] == [RESET_EVENT]
            assert batch[0].id == format_event_id(epoch, head)
        self.models[id(new)] = Model(new, epoch, head, last_take=self.clock.now)
        return new

    @invariant()
    def bounded_and_tidy(self) -> None:
        bus = self.bus
        registered = bus.subscriptions()
        assert len(registered) <= CAP
        assert bus.stats()["subscribers"] == len(registered)
        assert all(bus._subs.values()), "an empty per-user entry was left behind"
        for sub in registered:
            assert not sub.closed
            assert len(sub.queue or ()) <= QUEUE


BusMachine.TestCase.settings = hsettings(max_examples=60, stateful_step_count=40, deadline=None)
test_bus_state_machine = BusMachine.TestCase
