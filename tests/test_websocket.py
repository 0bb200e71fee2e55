"""ConnectionManager's registries under a state machine, and its options.

The sockets here are in-process stand-ins for the protocol the manager
drives (accept, send_text, close, and the receive callable): one can be made
to stall (every send blocks, as a full TCP window does) or to go away. The
real-socket behaviour is tested against uvicorn in
``tests/asgi/test_websocket_uvicorn.py``; this file checks the bookkeeping
over every interleaving hypothesis finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule

from ghar_core.exceptions import BaseAPIException
from ghar_core.sse.signals import HOLD_TIMEOUT
from ghar_core.websocket import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_QUEUE_OVERFLOW,
    Connection,
    ConnectionManager,
    get_manager,
    manager,
)
from tests.asgi.sse_support import sse_settings
from tests.asgi.ws_support import until

USERS = ("u0", "u1", "u2")
JOBS = ("j0", "j1", "j2")
CAP = 3
SEND_TIMEOUT = 0.01


class Socket:
    """A socket the manager can accept, write and close; it may stall or go away."""

    def __init__(self) -> None:
        self.accepted = False
        self.received: list[dict[str, Any]] = []
        self.closed_with: tuple[int, str] | None = None
        self.stalled = False
        self.inbox: asyncio.Queue[str | None] = asyncio.Queue()

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        self.accepted = True

    async def send_text(self, text: str) -> None:
        if self.stalled:
            await asyncio.Event().wait()  # a full TCP window: never drains
        self.received.append(orjson.loads(text))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.stalled:
            await asyncio.Event().wait()
        self.closed_with = (code, reason)

    async def receive(self) -> str | None:
        return await self.inbox.get()


class Held:
    def __init__(self, conn: Connection, socket: Socket, task: asyncio.Task[None]) -> None:
        self.conn, self.socket, self.task = conn, socket, task


class ManagerMachine(RuleBasedStateMachine):
    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.manager = ConnectionManager(
            sse_settings(),
            max_per_user=CAP,
            send_timeout=SEND_TIMEOUT,
            queue_size=5,
            ping_interval=3600,
            pong_timeout=3600,
            handle_signals=False,
        )
        self.owners: dict[str, str] = {}
        self.all: list[Held] = []
        self.ended: dict[str, str] = {}  # job -> "job completed" / "job failed"

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def spin(self) -> None:
        self.run(asyncio.sleep(0.001))

    def open_count(self, user: str) -> int:
        return sum(1 for h in self.all if h.conn.user_id == user and not h.conn.closed)

    def _serve(self, conn: Connection, sock: Socket) -> Held:
        task = self.loop.create_task(self.manager.serve(conn, sock.receive))
        held = Held(conn, sock, task)
        self.all.append(held)
        return held

    @rule(job=st.sampled_from(JOBS), user=st.sampled_from(USERS))
    def register(self, job: str, user: str) -> None:
        others = [h for h in self.all if h.conn.job_id == job and not h.conn.closed]
        if job in self.owners and self.owners[job] != user and others:
            with pytest.raises(ValueError, match="another user"):
                self.manager.register_job(job, user)
            return
        self.manager.register_job(job, user)
        self.owners[job] = user
        self.ended.pop(job, None)

    @rule(target=held, user=st.sampled_from(USERS), job=st.sampled_from((*JOBS, None)))
    def connect(self, user: str, job: str | None) -> Any:
        sock = Socket()
        expected: int | None = None
        if job is not None and job not in self.owners:
            expected = 404
        elif job is not None and self.owners[job] != user:
            expected = 403
        elif self.open_count(user) >= CAP:
            expected = 429
        try:
            if job is None:
                conn = self.run(self.manager.connect_user(sock, user))
            else:
                conn = self.run(self.manager.connect_job(sock, job, user))
        except BaseAPIException as exc:
            assert exc.status_code == expected
            assert not sock.accepted  # refused before accept
            return multiple()
        assert expected is None
        assert sock.accepted
        return self._serve(conn, sock)

    @rule(h=held)
    def client_closes(self, h: Held) -> None:
        h.socket.inbox.put_nowait(None)
        self.spin()

    @rule(h=held)
    def stall(self, h: Held) -> None:
        h.socket.stalled = True

    @rule(job=st.sampled_from(JOBS))
    def send_update(self, job: str) -> None:
        self.run(self.manager.send_job_update(job, {"for": job}))
        self.spin()

    @rule(user=st.sampled_from(USERS))
    def notify(self, user: str) -> None:
        self.run(self.manager.send_user_notification(user, {"to": user}))
        self.spin()

    @rule(job=st.sampled_from(JOBS), ok=st.booleans())
    def end_job(self, job: str, ok: bool) -> None:
        if ok:
            self.run(self.manager.broadcast_job_completion(job, {"done": job}))
        else:
            self.run(self.manager.broadcast_job_error(job, "boom"))
        if job in self.owners:
            del self.owners[job]
            self.ended[job] = "job completed" if ok else "job failed"
        self.spin()

    @rule()
    def wait_past_the_send_timeout(self) -> None:
        self.run(asyncio.sleep(SEND_TIMEOUT * 3))
        # A stalled socket that had something to send is closed and removed by now.
        for h in self.all:
            if h.socket.stalled and not h.conn.closed:
                assert h.conn._scope is None
                assert not h.conn.queue

    @invariant()
    def registries_hold_only_live_sockets_and_no_empty_entry(self) -> None:
        m = self.manager
        counted: dict[str, int] = {}
        for registry in (m.job_connections, m.user_connections):
            for key, conns in registry.items():
                assert conns, f"empty entry {key!r} left behind"
                for conn in conns:
                    assert not conn.closed  # no dead socket kept
                    counted[conn.user_id] = counted.get(conn.user_id, 0) + 1
                    assert key == (conn.job_id if registry is m.job_connections else conn.user_id)
        assert counted == m._per_user
        assert all(n <= CAP for n in counted.values())

    @invariant()
    def nobody_hears_anything_not_theirs(self) -> None:
        for h in self.all:
            for message in h.socket.received:
                if h.conn.job_id is None:
                    assert message["type"] == "notification"
                    assert message["data"] == {"to": h.conn.user_id}
                else:
                    assert message["job_id"] == h.conn.job_id

    @invariant()
    def an_ended_job_has_no_sockets(self) -> None:
        for job in self.ended:
            assert job not in self.manager.job_connections

    def teardown(self) -> None:
        try:
            self.run(self.manager.stop())
            self.run(asyncio.sleep(SEND_TIMEOUT * 3))
            for h in self.all:
                h.socket.inbox.put_nowait(None)
            self.run(asyncio.wait([h.task for h in self.all], timeout=2) if self.all else _noop())
            for h in self.all:
                assert h.task.done(), "a connection outlived stop()"
                assert h.conn.closed
                reason = h.conn.close_reason
                if reason in ("job completed", "job failed") and not h.socket.stalled:
                    # A completed job's sockets got the last message, then a 1000 close.
                    assert h.socket.closed_with == (CLOSE_NORMAL, reason)
                    last = "job_completed" if reason == "job completed" else "job_error"
                    assert h.socket.received[-1]["type"] == last
            assert self.manager.job_connections == {}
            assert self.manager.user_connections == {}
        finally:
            for h in self.all:
                h.task.cancel()
            with contextlib.suppress(Exception):
                self.run(asyncio.sleep(0))
            self.loop.close()


async def _noop() -> None:
    return None


ManagerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestManagerRegistries = ManagerMachine.TestCase


async def test_an_overflowing_queue_closes_that_socket_only() -> None:
    m = ConnectionManager(sse_settings(), queue_size=2, handle_signals=False)
    slow, fast = Socket(), Socket()
    slow.stalled = True
    a = await m.connect_user(slow, "u")
    b = await m.connect_user(fast, "u")
    tasks = [asyncio.ensure_future(m.serve(c, s.receive)) for c, s in ((a, slow), (b, fast))]
    for i in range(5):
        await m.send_user_notification("u", {"i": i})
        await asyncio.sleep(0.001)
    assert a.close_code == CLOSE_QUEUE_OVERFLOW
    assert m.user_connections["u"] == {b}
    assert [x["data"]["i"] for x in fast.received] == list(range(5))
    await m.stop()
    fast.inbox.put_nowait(None)
    slow.inbox.put_nowait(None)
    await asyncio.wait(tasks, timeout=3)
    assert all(t.done() for t in tasks)
    assert fast.closed_with == (1001, "server shutting down")


async def test_a_client_ping_is_answered_and_counts_as_liveness() -> None:
    clock = [0.0]
    m = ConnectionManager(
        sse_settings(),
        ping_interval=10,
        pong_timeout=5,
        clock=lambda: clock[0],
        handle_signals=False,
    )
    sock = Socket()
    conn = await m.connect_user(sock, "u")
    task = asyncio.ensure_future(m.serve(conn, sock.receive))
    clock[0] = 11
    m.tick()  # silent for 11 s: pinged
    await asyncio.sleep(0.01)
    assert sock.received == [{"type": "ping"}]
    sock.inbox.put_nowait('{"type":"ping"}')  # the client's own ping answers ours
    await asyncio.sleep(0.01)
    assert sock.received[-1] == {"type": "pong"}
    clock[0] = 17
    m.tick()
    assert not conn.closed
    assert conn.ping_sent is None
    clock[0] = 28
    m.tick()  # pinged again
    clock[0] = 33.5
    m.tick()  # unanswered for 5.5 s: dropped
    assert conn.close_code == 4003
    await asyncio.wait_for(task, 2)
    assert sock.closed_with == (4003, "pong timeout")


def test_options_are_validated_and_the_default_manager_forwards() -> None:
    with pytest.raises(ValueError, match="send_timeout"):
        ConnectionManager(sse_settings(), send_timeout=0, handle_signals=False)
    with pytest.raises(ValueError, match="max_per_user"):
        ConnectionManager(sse_settings(), max_per_user=0, handle_signals=False)
    assert manager.stats() == get_manager().stats()
    assert "ConnectionManager" in repr(manager)


class SlowClose(Socket):
    """A socket whose close waits for ``gate`` (a client slow to take the close)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.gate.wait()
        self.closed_with = (code, reason)


async def test_sigterm_reaches_the_server_only_after_every_socket_closed() -> None:
    # uvicorn fails every socket still open with 1012 once its handler has run:
    # the hook hands the signal on only after the 1001s are out, a second signal
    # at once (replaying the held one: Ctrl-C twice still forces the exit), and
    # a socket that never takes its close holds the signal for HOLD_TIMEOUT at most.
    calls: list[tuple[int, list[tuple[int, str] | None]]] = []
    sockets: list[SlowClose] = []
    original = signal.signal(
        signal.SIGTERM,
        lambda signum, frame: calls.append((signum, [s.closed_with for s in sockets])),
    )
    try:
        for case in ("drained", "twice", "stuck"):
            m = ConnectionManager(sse_settings(), ping_interval=3600, pong_timeout=3600)
            await m.start()
            sockets[:] = [SlowClose() for _ in range(3)]
            conns = [await m.connect_user(s, f"u{i}") for i, s in enumerate(sockets)]
            pairs = zip(conns, sockets, strict=True)
            tasks = [asyncio.ensure_future(m.serve(c, s.receive)) for c, s in pairs]
            calls.clear()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.2)
            assert all(c.close_code == CLOSE_GOING_AWAY for c in conns)
            assert calls == []  # held: every close is still pending
            if case == "drained":
                for s in sockets:
                    s.gate.set()
                await until(lambda: calls)
                assert calls == [(signal.SIGTERM, [(CLOSE_GOING_AWAY, "server shutting down")] * 3)]
            elif case == "twice":
                os.kill(os.getpid(), signal.SIGTERM)
                await until(lambda: calls)
                assert calls == [(signal.SIGTERM, [None] * 3)] * 2
            else:
                took = await until(lambda: calls, HOLD_TIMEOUT + 2)
                assert took < HOLD_TIMEOUT + 1.0
                assert calls == [(signal.SIGTERM, [None] * 3)]  # bounded: handed on anyway
            await asyncio.sleep(0.05)
            assert len(calls) == (2 if case == "twice" else 1)  # never handed on twice
            for s in sockets:
                s.gate.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 3)
            await m.drained()
            await m.stop()
        assert signal.getsignal(signal.SIGTERM) is not None
    finally:
        signal.signal(signal.SIGTERM, original)
