"""The event bus, stream and WebSocket manager: ours vs naive ones vs Litestar / sse-starlette.

What it compares, and why: ``ghar_core.sse`` promises bounded memory, an emit
that never waits, and streams that cost little per open connection. So one run
measures, side by side:

1. **Deliveries per second, end to end** (emitted and consumed), in process, at
   1, 100, 500 and 10 000 subscribers, in two shapes: *per user* (each
   subscriber its own user, events round-robin, the common case) and *fan-out*
   (every subscriber on one user: a broadcast). Variants: ours read through
   ``take()``/``wait()`` (what the stream route does), ours read with ``async
   for``, the naive bus (one unbounded ``asyncio.Queue`` per subscriber, a dict
   of lists), and Litestar's ``ChannelsPlugin`` on its memory backend
   (``dropleft`` backlog of the same size as ours). The emitter publishes in
   bursts no queue can overflow, then yields; the clock stops when every
   delivery has been consumed.
2. **Bus state per idle subscriber** (tracemalloc, 10 000 subscribers), with no
   reader and with one reader task blocked on each.
3. **RSS per idle SSE connection over real sockets**: a server process
   (uvicorn, uvloop, httptools) holding 2 000 open streams from a client
   process; ours (the real route: token auth, the bus; the startup heap
   frozen after the lifespan started, as ``ghar-core serve`` does), sse-starlette +
   broadcaster's memory backend on Starlette, and a bare asyncio server that
   only holds the sockets (the floor).
4. **Emit-to-socket latency** with those 2 000 streams open on one worker:
   events stamped with ``time.monotonic()`` in the server (the clock is
   system-wide) and read by the client; *single* sends 2 000 events one at a
   time (1 ms apart) to one stream each, *broadcast* sends one event to every
   stream at once, 5 times. The floor writes the same frames to the same
   sockets from a bare loop. Each server repeats both ``--rounds`` times; the
   table shows the median of each percentile.
5. **WebSocket broadcast** to N = 10, 100, 1 000 sockets of one job over
   loopback, with and without one stalled client: ``ConnectionManager`` vs a
   naive manager that awaits each send in turn (see ``benchmarks/_ws_broadcast.py``).
6. **Across instances over one Postgres** (``EVENT_BROKER=postgres``): emit
   on instance A, delivered to a subscriber of instance B -- latency p50/p99
   at 1 000 publishes/s and the publish rate one instance sustains -- ours
   (the outbox broker, durable, with ``EVENT_OUTBOX_SYNCHRONOUS_COMMIT``
   off, and off with ``EVENT_OUTBOX_NOTIFY_ROWS`` on) beside
   encode/broadcaster's Postgres backend and the floor, a bare asyncpg
   NOTIFY -> LISTEN round trip, and a reference: what one WAL flush costs on
   this disk (see ``benchmarks/_realtime_broker.py``).

    .venv/bin/python benchmarks/realtime.py            # writes benchmarks/results/
    .venv/bin/python benchmarks/realtime.py --quick    # smoke run, no files
    .venv/bin/python benchmarks/realtime.py --only-cross   # part 6 alone, no files
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jwt
import orjson

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._realtime_broker import (
    CrossInstance,
    measure_cross_instance,
    render_cross,
    summary_cross,
    targets_cross,
)
from benchmarks._ws_broadcast import Broadcast, measure_broadcast

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
_running: set[asyncio.Future[None]] = set()  # emit drivers started by /bench/fire
QUEUE = 100  # our SSE_QUEUE_MAX_SIZE default, and the peer's backlog
SECRET = "realtime-benchmark-secret-of-32-bytes"
PROVIDER = "http://127.0.0.1:9"


def _settings(**changes: Any) -> Any:
    from ghar_core.config import Secret, load_settings

    base = load_settings(app_env="test", environ={})
    return replace(
        base,
        SUPABASE_URL=PROVIDER,
        SUPABASE_JWT_SECRET=Secret(SECRET),
        SSE_MAX_SUBSCRIBERS=50_000,
        SSE_HEARTBEAT_INTERVAL=60.0,
        ACCESS_LOG=False,
        **changes,
    )


# -- 1. deliveries per second, in process --------------------------------------------


class NaiveBus:
    """The baseline: one unbounded asyncio.Queue per subscriber, no reaping, no ids."""

    def __init__(self) -> None:
        self.subs: dict[str, list[asyncio.Queue[bytes]]] = {}

    def subscribe(self, user: str) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.subs.setdefault(user, []).append(queue)
        return queue

    def emit(self, user: str, event: dict[str, Any]) -> int:
        data = orjson.dumps(event)
        queues = self.subs.get(user, ())
        for queue in queues:
            queue.put_nowait(data)
        return len(queues)


# A scenario: build subscribers and consumers, return (emit, count consumed, close).
Setup = Callable[
    [list[str]], Awaitable[tuple[Callable[[str, dict[str, Any]], Any], list[int], Any]]
]


async def _ours_take(users: list[str]) -> tuple[Any, list[int], Any]:
    from ghar_core.sse import SSEEventBus

    bus = SSEEventBus(_settings(), handle_signals=False)
    done = [0]
    subs = [await bus.subscribe(u).open() for u in users]

    async def consume(sub: Any) -> None:
        while True:  # the route's loop: wait for the first event, take all queued
            await sub.wait()
            batch = sub.take()
            if batch is None:
                return
            done[0] += len(batch)

    tasks = [asyncio.ensure_future(consume(s)) for s in subs]

    async def close() -> None:
        await bus.stop()
        await asyncio.gather(*tasks)
        assert bus.dropped == 0

    return bus.emit, done, close


async def _ours_iter(users: list[str]) -> tuple[Any, list[int], Any]:
    from ghar_core.sse import SSEEventBus

    bus = SSEEventBus(_settings(), handle_signals=False)
    done = [0]
    subs = [await bus.subscribe(u).open() for u in users]

    async def consume(sub: Any) -> None:
        async for _event in sub:
            done[0] += 1

    tasks = [asyncio.ensure_future(consume(s)) for s in subs]

    async def close() -> None:
        await bus.stop()
        await asyncio.gather(*tasks)

    return bus.emit, done, close


async def _naive(users: list[str]) -> tuple[Any, list[int], Any]:
    bus = NaiveBus()
    done = [0]
    queues = [bus.subscribe(u) for u in users]

    async def consume(queue: asyncio.Queue[bytes]) -> None:
        while True:
            await queue.get()
            done[0] += 1

    tasks = [asyncio.ensure_future(consume(q)) for q in queues]

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return bus.emit, done, close


async def _litestar(users: list[str]) -> tuple[Any, list[int], Any]:
    from litestar.channels import ChannelsPlugin
    from litestar.channels.backends.memory import MemoryChannelsBackend

    plugin = ChannelsPlugin(
        backend=MemoryChannelsBackend(),
        arbitrary_channels_allowed=True,
        subscriber_max_backlog=QUEUE,
        subscriber_backlog_strategy="dropleft",
    )
    await plugin.__aenter__()
    done = [0]
    subs = [await plugin.subscribe(u) for u in users]

    async def consume(sub: Any) -> None:
        async for _event in sub.iter_events():
            done[0] += 1

    tasks = [asyncio.ensure_future(consume(s)) for s in subs]

    def emit(user: str, event: dict[str, Any]) -> None:
        plugin.publish(event, user)

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await plugin.__aexit__(None, None, None)

    return emit, done, close


BUSES: dict[str, Setup] = {
    "ours (take/wait, as the route)": _ours_take,
    "ours (async for)": _ours_iter,
    "naive asyncio.Queue bus": _naive,
    "litestar channels (memory)": _litestar,
}


@dataclass
class Throughput:
    shape: str
    subscribers: int
    variant: str
    deliveries: int
    seconds: float
    runs: int

    @property
    def per_second(self) -> float:
        return self.deliveries / self.seconds


async def _deliveries(setup: Setup, shape: str, n: int, total: int) -> tuple[int, float]:
    users = [f"u{i}" for i in range(n)] if shape == "per user" else ["u0"] * n
    emit, done, close = await setup(users)
    await asyncio.sleep(0)
    if shape == "per user":
        per_burst = n * 10 if n < 1000 else n  # at most 10 in flight per subscriber
        events, deliveries_per_event = total, 1
    else:
        per_burst = 10
        events, deliveries_per_event = max(10, total // n), n
    expected = events * deliveries_per_event
    event = {"type": "tick", "payload": "x" * 64}
    gc.collect()
    started = time.perf_counter()
    async with asyncio.timeout(300):  # a variant that loses deliveries must not hang the run
        await _pump(emit, users, event, events, per_burst, deliveries_per_event, done, n)
    elapsed = time.perf_counter() - started
    await close()
    return expected, elapsed


async def _pump(
    emit: Any,
    users: list[str],
    event: dict[str, Any],
    events: int,
    per_burst: int,
    deliveries_per_event: int,
    done: list[int],
    n: int,
) -> None:
    sent = 0
    while sent < events:
        for _ in range(min(per_burst, events - sent)):
            emit(users[sent % len(users)], event)
            sent += 1
        await asyncio.sleep(0)
        # Peers that publish through a task need a few turns of the loop.
        while done[0] < sent * deliveries_per_event - QUEUE * n // 2:  # noqa: ASYNC110
            await asyncio.sleep(0)
    while done[0] < events * deliveries_per_event:  # noqa: ASYNC110 - consumers count
        await asyncio.sleep(0)


async def measure_throughput(sizes: list[int], total: int, rounds: int) -> list[Throughput]:
    rows: list[Throughput] = []
    for shape in ("per user", "fan-out"):
        for n in sizes:
            samples: dict[str, list[float]] = {name: [] for name in BUSES}
            counts: dict[str, int] = {}
            for _ in range(rounds):
                for name, setup in BUSES.items():  # interleaved: noise hits all alike
                    count, seconds = await _deliveries(setup, shape, n, total)
                    samples[name].append(seconds)
                    counts[name] = count
            for name in BUSES:
                rows.append(
                    Throughput(
                        shape, n, name, counts[name], statistics.median(samples[name]), rounds
                    )
                )
            print(f"  deliveries: {shape} n={n} done", file=sys.stderr)
    return rows


# -- 2. memory per idle subscriber ------------------------------------------------------


@dataclass
class Memory:
    variant: str
    reader: bool
    bytes_per_subscriber: float


async def _memory(name: str, n: int, reader: bool) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    keep: list[Any] = []
    tasks: list[asyncio.Future[Any]] = []
    if name.startswith("ours"):
        from ghar_core.sse import SSEEventBus

        bus = SSEEventBus(_settings(), handle_signals=False)
        bus.log.head("warm")  # the per-process parts, not per subscriber
        subs = [await bus.subscribe(f"user-{i:06d}").open() for i in range(n)]
        keep.append(bus)
        if reader:
            tasks = [asyncio.ensure_future(s.wait()) for s in subs]
    elif name.startswith("naive"):
        naive = NaiveBus()
        queues = [naive.subscribe(f"user-{i:06d}") for i in range(n)]
        keep.append(naive)
        if reader:
            tasks = [asyncio.ensure_future(q.get()) for q in queues]
    else:
        from litestar.channels import ChannelsPlugin
        from litestar.channels.backends.memory import MemoryChannelsBackend

        plugin = ChannelsPlugin(
            backend=MemoryChannelsBackend(),
            arbitrary_channels_allowed=True,
            subscriber_max_backlog=QUEUE,
            subscriber_backlog_strategy="dropleft",
        )
        await plugin.__aenter__()
        lsubs = [await plugin.subscribe(f"user-{i:06d}") for i in range(n)]
        keep.append(plugin)
        if reader:
            tasks = [asyncio.ensure_future(s._queue.get()) for s in lsubs]
    await asyncio.sleep(0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if name.startswith("litestar"):
        await keep[0].__aexit__(None, None, None)
    return size / n


async def measure_memory(n: int) -> list[Memory]:
    rows = []
    for name in ("ours", "naive asyncio.Queue bus", "litestar channels (memory)"):
        for reader in (False, True):
            rows.append(Memory(name, reader, await _memory(name, n, reader)))
    return rows


# -- 3 and 4. real sockets: servers in their own process ---------------------------------------


def token(user: str) -> str:
    now = int(time.time())
    claims = {
        "sub": user,
        "aud": "authenticated",
        "role": "authenticated",
        "iss": f"{PROVIDER}/auth/v1",
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _fire_params(query: str) -> tuple[str, int, float]:
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    return params.get("mode", "single"), int(params.get("n", "1")), float(params.get("gap", "0"))


async def _driver(
    mode: str,
    n: int,
    gap: float,
    users: list[str],
    emit: Callable[[str, bytes], Any],
) -> None:
    """Emit ``n`` stamped events: to one stream each (``single``) or to all (``broadcast``)."""
    await asyncio.sleep(0.05)
    for i in range(n):
        if mode == "single":
            await _maybe(emit(users[i % len(users)], b'{"t":%r}' % time.monotonic()))
            await asyncio.sleep(gap)
        else:
            stamp = b'{"t":%r}' % time.monotonic()
            for user in list(users):
                await _maybe(emit(user, stamp))
            await asyncio.sleep(gap)


async def _maybe(result: Any) -> None:
    if asyncio.iscoroutine(result):
        await result


def ours_app() -> Any:
    from ghar_core.asgi import Request, create_app
    from ghar_core.auth import SupabaseAuth
    from ghar_core.http import HTTPClients
    from ghar_core.server import freeze_startup_heap
    from ghar_core.sse import SSEEventBus

    settings = _settings()
    bus = SSEEventBus(settings)
    app = create_app(
        settings, core_resources=False, resources=[HTTPClients(), SupabaseAuth(settings), bus]
    )
    # As `ghar-core serve` sets up every worker (ghar_core.server.create_app_for_server):
    # the startup heap frozen once the lifespan has started.
    app.lifespan_manager.after_startup = freeze_startup_heap

    @app.post("/bench/fire")
    async def fire(request: Request) -> dict[str, Any]:
        mode, n, gap = _fire_params(request.scope["query_string"].decode())
        users = list(bus._subs)
        last: list[Any] = [b"", None]

        def emit(user: str, stamp: bytes) -> None:
            # One event object per stamp, shared by every recipient of a broadcast
            # (the peer and the floor also build each message once).
            if stamp is not last[0]:
                last[:] = stamp, {"type": "t", "t": orjson.loads(stamp)["t"]}
            bus.emit(user, last[1])

        _running.add(asyncio.ensure_future(_driver(mode, n, gap, users, emit)))
        return {"streams": bus.stats()["subscribers"]}

    return app


def peer_app() -> Any:
    from broadcaster import Broadcast
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    broadcast = Broadcast("memory://")
    users: set[str] = set()

    async def stream(request: Request) -> EventSourceResponse:
        user = request.query_params["user"]

        async def events() -> Any:
            users.add(user)
            try:
                async with broadcast.subscribe(channel=user) as subscriber:
                    async for event in subscriber:
                        yield {"event": "t", "data": event.message}
            finally:
                users.discard(user)

        return EventSourceResponse(events(), ping=60)

    async def fire(request: Request) -> JSONResponse:
        mode, n, gap = _fire_params(request.scope["query_string"].decode())

        async def emit(user: str, stamp: bytes) -> None:
            await broadcast.publish(channel=user, message=stamp.decode())

        _running.add(asyncio.ensure_future(_driver(mode, n, gap, sorted(users), emit)))
        return JSONResponse({"streams": len(users)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        async with broadcast:
            yield

    return Starlette(
        routes=[Route("/stream", stream), Route("/bench/fire", fire, methods=["POST"])],
        lifespan=lifespan,
    )


_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


async def serve_floor(port: int) -> None:
    """The floor: a bare asyncio server that holds the sockets and writes frames itself."""
    streams: list[asyncio.Transport] = []

    class Stream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if b"\r\n\r\n" not in self.buffer:
                return
            line = self.buffer.split(b"\r\n", 1)[0].decode()
            if line.startswith("POST /bench/fire"):
                mode, n, gap = _fire_params(line.split("?", 1)[1].split(" ")[0])
                body = b'{"streams":%d}' % len(streams)
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                )
                self.transport.close()

                def emit(transport: asyncio.Transport, stamp: bytes) -> None:
                    frame = b"event: t\ndata: %s\n\n" % stamp
                    transport.write(b"%x\r\n%s\r\n" % (len(frame), frame))

                driver = _driver(mode, n, gap, list(streams), emit)  # type: ignore[arg-type]
                _running.add(asyncio.ensure_future(driver))
            else:
                self.transport.write(_HEAD)
                streams.append(self.transport)

        def connection_lost(self, exc: Exception | None) -> None:
            with contextlib.suppress(ValueError):
                streams.remove(self.transport)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Stream, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def _serve(variant: str, port: int) -> None:
    if variant == "floor":
        import uvloop

        uvloop.run(serve_floor(port))
        return
    import uvicorn

    app = ours_app() if variant == "ours" else peer_app()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


SERVERS = {
    "ours (ghar_core stream route)": "ours",
    "sse-starlette + broadcaster": "peer",
    "bare loop (floor)": "floor",
}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@dataclass
class Socketed:
    variant: str
    connections: int
    rss_kb_per_connection: float
    single_p50_ms: float
    single_p99_ms: float
    broadcast_p50_ms: float
    broadcast_p99_ms: float
    error_lines: int = 0  # ERROR lines the server logged, its shutdown included


_STAMP = re.compile(rb'"t":([0-9.]+)\}')


class Client:
    """One open stream read by the client process; records the latency of each stamped event."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.latencies: list[float] = []
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        buffer = b""
        while chunk := await self.reader.read(65536):
            now = time.monotonic()
            buffer += chunk
            end = 0
            for match in _STAMP.finditer(buffer):
                self.latencies.append((now - float(match.group(1))) * 1000)
                end = match.end()
            buffer = buffer[end:][-256:]  # a stamp cut by the read stays for the next one


async def _open(port: int, variant: str, i: int) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    user = f"00000000-0000-4000-8000-{i:012d}"
    if variant == "ours":
        path = f"/api/v1/events/stream?access_token={token(user)}"
    else:
        path = f"/stream?user={user}"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return Client(reader, writer)


async def _fire(port: int, query: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /bench/fire?{query} HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n".encode()
    )
    data = b""
    while not (match := re.search(rb'"streams":(\d+)', data)):
        chunk = await reader.read(65536)
        if not chunk:
            raise RuntimeError(f"/bench/fire answered {data[:300]!r}")
        data += chunk
    writer.close()
    return int(match.group(1))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_sockets(connections: int, repeats: int = 3) -> list[Socketed]:
    """RSS per stream, then the latencies: ``repeats`` runs of each mode, the median p50/p99.

    One p99 of one run swings several-fold on a shared box; the median of a
    few runs of the same measurement is steadier (each run is unchanged).
    """
    rows = []
    for label, variant in SERVERS.items():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "APP_ENV": "test", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(  # noqa: ASYNC220 - one server per variant, reaped below
            [sys.executable, __file__, "--serve", variant, str(port)],
            env=env,
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        clients: list[Client] = []
        try:
            for _ in range(200):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            # Warm up (imports, first requests), then measure the growth for N streams.
            warm = [await _open(port, variant, 10**9 + i) for i in range(20)]
            for c in warm:
                c.writer.close()
            await asyncio.sleep(0.5)
            before = _rss_kb(proc.pid)
            for start in range(0, connections, 200):
                clients += await asyncio.gather(
                    *(_open(port, variant, i) for i in range(start, min(connections, start + 200)))
                )
            await asyncio.sleep(1.0)
            after = _rss_kb(proc.pid)
            assert await _fire(port, "mode=single&n=0") >= connections
            pcts: list[tuple[float, float, float, float]] = []
            for _ in range(repeats):
                await _fire(port, f"mode=single&n={connections}&gap=0.001")
                await _wait_events(clients, connections, 60)
                single = [x for c in clients for x in c.latencies]
                for c in clients:
                    c.latencies.clear()
                await _fire(port, "mode=broadcast&n=5&gap=0.5")
                await _wait_events(clients, 5 * connections, 60)
                broadcast = [x for c in clients for x in c.latencies]
                for c in clients:
                    c.latencies.clear()
                pcts.append(
                    (
                        _pct(single, 0.5),
                        _pct(single, 0.99),
                        _pct(broadcast, 0.5),
                        _pct(broadcast, 0.99),
                    )
                )
            medians = [statistics.median(run[i] for run in pcts) for i in range(4)]
            rows.append(Socketed(label, connections, (after - before) / connections, *medians))
            print(f"  sockets: {label} done", file=sys.stderr)
        finally:
            for c in clients:
                c.writer.close()
                c.task.cancel()
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = await asyncio.to_thread(proc.communicate, timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if rows and rows[-1].variant == label:
                rows[-1].error_lines = err.decode(errors="replace").count("ERROR")
    return rows


async def _wait_events(clients: list[Client], expected: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while sum(len(c.latencies) for c in clients) < expected:
        if time.monotonic() > deadline:
            got = sum(len(c.latencies) for c in clients)
            raise RuntimeError(f"only {got} of {expected} events arrived")
        await asyncio.sleep(0.05)


# -- the report -------------------------------------------------------------------------------


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def render(
    throughput: list[Throughput],
    memory: list[Memory],
    sockets: list[Socketed],
    args: argparse.Namespace,
    load: tuple[str, str],
    broadcasts: list[Broadcast] = (),  # type: ignore[assignment]
    cross: list[CrossInstance] = (),  # type: ignore[assignment]
) -> tuple[str, list[tuple[str, str, bool]]]:
    from importlib.metadata import version

    out = [
        "# Realtime: the per-user event bus and stream, and the WebSocket manager",
        "",
        "Generated by `.venv/bin/python benchmarks/realtime.py` (see its docstring for what "
        "each part measures).",
        "",
        f"Python {platform.python_version()}, uvicorn {version('uvicorn')}, litestar "
        f"{version('litestar')}, broadcaster {version('broadcaster')}, sse-starlette "
        f"{version('sse-starlette')}, {os.cpu_count()} CPUs. Load average "
        f"before / after: {load[0]} / {load[1]}.",
        "",
        "**These numbers come from a shared, noisy 2-core machine**; read the ratios, not the "
        f"absolute values. In-process parts: median of {args.rounds} interleaved rounds; "
        f"socket latencies: median of {args.rounds} runs per server.",
        "",
        "## Deliveries per second, end to end (emitted and consumed)",
        "",
        "| shape | subscribers | variant | deliveries | deliveries/s | x naive |",
        "|---|---:|---|---:|---:|---:|",
    ]
    naive = {
        (r.shape, r.subscribers): r.per_second for r in throughput if r.variant.startswith("naive")
    }
    for r in throughput:
        ratio = r.per_second / naive[(r.shape, r.subscribers)]
        out.append(
            f"| {r.shape} | {r.subscribers:,} | {r.variant} | {r.deliveries:,} | "
            f"{_fmt(r.per_second)} | {ratio:.2f} |"
        )
    out += [
        "",
        "`x naive` = deliveries/s of the variant / the naive bus's (above 1: faster).",
        "",
        f"## Bus state per idle subscriber (tracemalloc, {args.subscribers:,} subscribers)",
        "",
        "| variant | reader task blocked on it | bytes per subscriber |",
        "|---|---|---:|",
    ]
    for m in memory:
        out.append(
            f"| {m.variant} | {'yes' if m.reader else 'no'} | {_fmt(m.bytes_per_subscriber)} |"
        )
    out += [
        "",
        "Without a reader: what the bus keeps per subscription (registry, queue, "
        "subscription object). With one: plus the task and its wait (the stream route's "
        "task is the request's own, so it is not the bus's cost).",
        "",
        f"## Real sockets: {args.connections:,} open SSE connections on one uvicorn worker",
        "",
        "| server | RSS per idle connection (KB) | single p50 ms | single p99 ms | "
        "broadcast p50 ms | broadcast p99 ms | ERROR lines |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sockets:
        out.append(
            f"| {s.variant} | {s.rss_kb_per_connection:.1f} | {s.single_p50_ms:.2f} | "
            f"{s.single_p99_ms:.2f} | {s.broadcast_p50_ms:.2f} | {s.broadcast_p99_ms:.2f} | "
            f"{s.error_lines} |"
        )
    out += [
        "",
        "RSS growth of the server process from 20 warm connections to "
        f"{args.connections:,} open streams, divided by the count. Ours pays for the "
        "real route: token verification (and its cache entry), the access-log-free stack, "
        "a subscription and a disconnect watcher per stream. *single*: each event to one "
        "stream, 1 ms apart; *broadcast*: one event to every stream, 5 times. *ERROR "
        "lines*: what the server logged at ERROR from start to exit (the client closes "
        "its streams, then SIGTERM).",
        "",
    ]
    if broadcasts:
        out += [
            "## WebSocket broadcast to N sockets of one job, with and without a stalled client",
            "",
            f"Send timeout {args.ws_send_timeout:g} s for both managers; {args.ws_rounds} "
            "broadcasts per row (after one unmeasured), every delivery timed from the "
            "server's stamp to its arrival at the client.",
            "",
            "| sockets | manager | stalled client | p50 ms | p99 ms | p99 x without stall |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for b in broadcasts:
            calm = next(
                x
                for x in broadcasts
                if x.variant == b.variant and x.sockets == b.sockets and not x.stalled
            )
            out.append(
                f"| {b.sockets:,} | {b.variant} | {'yes' if b.stalled else 'no'} | "
                f"{b.p50_ms:.2f} | {b.p99_ms:.2f} | {b.p99_ms / calm.p99_ms:.2f} |"
            )
        out += [
            "",
            "*stalled*: a fresh client that never reads (4 KB receive buffer), its socket "
            "filled by the server until a write blocks, connected before the others (first "
            "in the naive manager's order). The naive manager makes everyone wait the whole "
            "send timeout; ours queues to each socket and drops the stalled one alone.",
            "",
        ]
    if cross:
        out += render_cross(cross)
    targets = _targets(throughput, memory, sockets) + _ws_targets(broadcasts)
    if cross:
        targets += targets_cross(cross)
    out += ["## Targets (issues 13, 14, 15)", "", "| target | measured | met |", "|---|---:|:---:|"]
    for name, measured, met in targets:
        out.append(f"| {name} | {measured} | {'yes' if met else '**no**'} |")
    return "\n".join(out) + "\n", targets


def _targets(
    throughput: list[Throughput], memory: list[Memory], sockets: list[Socketed]
) -> list[tuple[str, str, bool]]:
    found: list[tuple[str, str, bool]] = []
    for shape in ("per user", "fan-out"):
        rows = {r.variant: r for r in throughput if r.shape == shape and r.subscribers == 500}
        if rows:
            ours = rows["ours (take/wait, as the route)"].per_second
            base = rows["naive asyncio.Queue bus"].per_second
            found.append(
                (
                    f">= 2x the naive bus end to end at 500 subscribers ({shape})",
                    f"{ours / base:.2f}x",
                    ours / base >= 2,
                )
            )
    idle = next((m for m in memory if m.variant == "ours" and not m.reader), None)
    if idle:
        found.append(
            (
                "<= 2 KB bus state per idle subscriber",
                f"{idle.bytes_per_subscriber:,.0f} B",
                idle.bytes_per_subscriber <= 2048,
            )
        )
    by = {s.variant: s for s in sockets}
    ours_s = by.get("ours (ghar_core stream route)")
    floor = by.get("bare loop (floor)")
    if ours_s:
        found.append(
            (
                "<= 30 KB RSS per idle SSE connection",
                f"{ours_s.rss_kb_per_connection:.1f} KB",
                ours_s.rss_kb_per_connection <= 30,
            )
        )
    if ours_s and floor:
        for kind in ("single", "broadcast"):
            mine = getattr(ours_s, f"{kind}_p99_ms")
            base = getattr(floor, f"{kind}_p99_ms")
            found.append(
                (
                    f"emit-to-socket p99 within 2x of the bare loop ({kind})",
                    f"{mine / base:.2f}x",
                    mine <= 2 * base,
                )
            )
    return found


def _ws_targets(broadcasts: list[Broadcast]) -> list[tuple[str, str, bool]]:
    found = []
    for b in broadcasts:
        if b.stalled and b.variant.startswith("ours"):
            calm = next(
                x
                for x in broadcasts
                if x.variant == b.variant and x.sockets == b.sockets and not x.stalled
            )
            ratio = b.p99_ms / calm.p99_ms
            found.append(
                (
                    f"WebSocket p99 with a stalled client within 1.2x of without (N={b.sockets:,})",
                    f"{ratio:.2f}x",
                    ratio <= 1.2,
                )
            )
    return found


def summary(
    throughput: list[Throughput],
    memory: list[Memory],
    sockets: list[Socketed],
    broadcasts: list[Broadcast] = (),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """The figures ``python -m benchmarks`` charts: each part against its baseline."""
    out: list[dict[str, Any]] = []

    def figure(
        group: str, label: str, role: str, value: float, unit: str, base: float, better: str
    ) -> None:
        out.append(
            {
                "group": group,
                "label": label,
                "role": role,
                "value": value,
                "unit": unit,
                "ratio": value / base if base else 0.0,
                "better": better,
            }
        )

    for r in throughput:
        if r.subscribers != 500:
            continue
        base = next(
            x.per_second
            for x in throughput
            if x.shape == r.shape and x.subscribers == 500 and x.variant.startswith("naive")
        )
        role = (
            "baseline"
            if r.variant.startswith("naive")
            else "ours"
            if r.variant.startswith("ours")
            else "peer"
        )
        figure(
            f"deliveries/s at 500 subscribers ({r.shape})",
            r.variant,
            role,
            r.per_second,
            "deliveries/s",
            base,
            "higher",
        )
    idle = [m for m in memory if not m.reader]
    naive_idle = next((m for m in idle if m.variant.startswith("naive")), None)
    for m in idle:
        if naive_idle is None:
            break
        role = "baseline" if m is naive_idle else "ours" if m.variant.startswith("ours") else "peer"
        figure(
            "bytes per idle subscriber",
            m.variant,
            role,
            m.bytes_per_subscriber,
            "B",
            naive_idle.bytes_per_subscriber,
            "lower",
        )
    floor = next((s for s in sockets if s.variant.startswith("bare")), None)
    for s in sockets:
        if floor is None:
            break
        role = "baseline" if s is floor else "ours" if s.variant.startswith("ours") else "peer"
        figure(
            "emit-to-socket p99, one stream per event",
            s.variant,
            role,
            s.single_p99_ms,
            "ms",
            floor.single_p99_ms,
            "lower",
        )
    largest = max((b.sockets for b in broadcasts), default=0)
    stalled = [b for b in broadcasts if b.stalled and b.sockets == largest]
    naive_stalled = next((b for b in stalled if b.variant.startswith("naive")), None)
    for b in stalled:
        if naive_stalled is None:
            break
        figure(
            f"WebSocket broadcast p99 to {largest:,} sockets, one stalled client",
            b.variant,
            "baseline" if b is naive_stalled else "ours",
            b.p99_ms,
            "ms",
            naive_stalled.p99_ms,
            "lower",
        )
    return out


def _only_cross(
    args: argparse.Namespace, latency_events: int, rate_events: int, rounds: int
) -> None:
    before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cross = asyncio.run(measure_cross_instance(latency_events, rate_events, rounds))
    after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = [f"Load average before / after: {before} / {after}; {rounds} round(s).", ""]
    out += render_cross(cross)
    out += ["| target | measured | met |", "|---|---:|:---:|"]
    targets = targets_cross(cross)
    out += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets]
    table = "\n".join(out) + "\n"
    print(table)
    if args.results_dir is not None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "realtime_cross.md").write_text(table)
        payload = {
            "cross_instance": [asdict(c) for c in cross],
            "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
            "summary": summary_cross(cross),
        }
        (args.results_dir / "realtime_cross.json").write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--subscribers", type=int, default=10_000, help="for the memory part")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--ws-rounds", type=int, default=10, help="broadcasts per WebSocket row")
    parser.add_argument("--ws-send-timeout", type=float, default=1.0)
    parser.add_argument(
        "--cross-rounds", type=int, default=3, help="rounds of every across-instance variant"
    )
    parser.add_argument(
        "--only-cross",
        action="store_true",
        help="run only part 6 (across instances); writes files only with --results-dir",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run; writes no files")
    parser.add_argument("--results-dir", type=Path, help="write here (with --quick too)")
    parser.add_argument("--serve", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        if args.serve[0] == "ws":
            from benchmarks._ws_broadcast import serve_ws

            serve_ws(int(args.serve[1]), float(args.serve[2]))
            return
        _serve(args.serve[0], int(args.serve[1]))
        return
    sizes = [1, 100, 500, 10_000]
    if args.quick:
        args.deliveries, args.rounds, args.subscribers, args.connections = 5000, 1, 500, 100
        sizes = [1, 100, 500]
        args.ws_rounds, args.ws_send_timeout = 1, 0.3
    ws_sizes = [10, 100] if args.quick else [10, 100, 1000]
    before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    latency_events, rate_events = (300, 2000) if args.quick else (3000, 20_000)
    cross_rounds = 1 if args.quick else args.cross_rounds
    if args.only_cross:
        _only_cross(args, latency_events, rate_events, cross_rounds)
        return

    async def run() -> tuple[
        list[Throughput], list[Memory], list[Socketed], list[Broadcast], list[CrossInstance]
    ]:
        throughput = await measure_throughput(sizes, args.deliveries, args.rounds)
        memory = await measure_memory(args.subscribers)
        sockets = await measure_sockets(args.connections, 1 if args.quick else args.rounds)
        broadcasts = await measure_broadcast(ws_sizes, args.ws_rounds, args.ws_send_timeout)
        cross = await measure_cross_instance(latency_events, rate_events, cross_rounds)
        return throughput, memory, sockets, broadcasts, cross

    throughput, memory, sockets, broadcasts, cross = asyncio.run(run())
    after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table, targets = render(throughput, memory, sockets, args, (before, after), broadcasts, cross)
    print(table)
    out_dir = args.results_dir or (None if args.quick else RESULTS)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "realtime.md").write_text(table)
        payload = {
            "throughput": [asdict(r) | {"per_second": r.per_second} for r in throughput],
            "memory": [asdict(m) for m in memory],
            "sockets": [asdict(s) for s in sockets],
            "websocket_broadcast": [asdict(b) for b in broadcasts],
            "cross_instance": [asdict(c) for c in cross],
            "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
            "summary": summary(throughput, memory, sockets, broadcasts) + summary_cross(cross),
        }
        (out_dir / "realtime.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
