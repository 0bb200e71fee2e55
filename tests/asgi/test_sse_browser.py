"""A real browser's own EventSource, cut off mid-stream, resumes and gets every event once.

Debian's Chromium runs headless, driven by playwright-core from npm (installed
by ``scripts/ensure-browser.sh`` into ``tests/browser/``; no browser download).
The page is served by our app through a TCP proxy that the test cuts (abort,
both sides) while events are in flight; the browser reconnects by itself after
the ``retry:`` hint, sends ``Last-Event-ID``, and the bus replays what it
missed. The page records every ``tick`` it dispatches: exactly 1..N, once
each, in order, and no ``reset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson

from ghar_core.asgi import Request, Response, create_app
from ghar_core.auth import SupabaseAuth
from ghar_core.http import HTTPClients
from ghar_core.sse import SSEEventBus
from tests.asgi.sse_support import sse_settings, token_for
from tests.asgi.test_e2e_uvicorn import serve
from tests.conftest import require

BROWSER_DIR = Path(__file__).resolve().parents[1] / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()
HAVE_DRIVER = (BROWSER_DIR / "node_modules" / "playwright-core").is_dir()

PAGE = """<!doctype html>
<meta charset="utf-8"><title>event stream</title>
<script>
window.received = []; window.resets = []; window.opens = 0; window.errors = 0;
const source = new EventSource(%s);
source.onopen = () => { window.opens += 1; fetch("/opened", {method: "POST"}); };
source.onerror = () => { window.errors += 1; };
source.addEventListener("tick", (e) => {
  const n = JSON.parse(e.data).n;
  window.received.push({id: e.lastEventId, n: n});
  if (n === 1) { fetch("/seen", {method: "POST"}); }  // it has a position now
});
source.addEventListener("reset", (e) => { window.resets.push(e.data); });
</script>
"""


class CutProxy:
    """A loopback TCP proxy whose open connections the test can cut at any moment."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.accepted = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CutProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)

    def cut(self) -> None:
        """Abort every open connection on both sides (what a dropped network looks like)."""
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _until(condition: Callable[[], bool], seconds: float = 30.0, why: str = "") -> None:
    try:
        async with asyncio.timeout(seconds):
            while not condition():  # noqa: ASYNC110 - polls state the server's tasks change
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds}s waiting: {why}") from None


@contextlib.asynccontextmanager
async def _browser(url: str, expected: int) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node",
        str(BROWSER_DIR / "eventsource.mjs"),
        url,
        str(expected),
        "60000",
        cwd=BROWSER_DIR,
        env={**os.environ, "CHROMIUM": CHROMIUM},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_chromium_eventsource_cut_mid_stream_receives_every_event_exactly_once() -> None:
    require(HAVE_CHROMIUM, f"Chromium at {CHROMIUM} (scripts/ensure-browser.sh)")
    require(shutil.which("node") is not None, "node (scripts/ensure-browser.sh)")
    require(HAVE_DRIVER, "playwright-core in tests/browser (scripts/ensure-browser.sh)")
    settings = sse_settings(SSE_RETRY_INTERVAL=0.2, SSE_HEARTBEAT_INTERVAL=1.0)
    bus = SSEEventBus(settings, handle_signals=False)
    app = create_app(
        settings, core_resources=False, resources=[HTTPClients(), SupabaseAuth(settings), bus]
    )
    user, token = token_for()
    stream_url = f"/api/v1/events/stream?access_token={token}"

    seen = asyncio.Event()

    @app.get("/page")
    async def page(request: Request) -> Response:
        return Response(PAGE % orjson.dumps(stream_url).decode(), media_type="text/html")

    @app.post("/seen")
    async def first_seen(request: Request) -> None:
        seen.set()

    opened = 0

    @app.post("/opened")
    async def browser_opened(request: Request) -> None:
        nonlocal opened
        opened += 1

    n = 0

    def tick(count: int) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            bus.emit(user, {"type": "tick", "n": n})

    total = 40
    async with (
        serve(app) as base,
        CutProxy(int(base.rsplit(":", 1)[1])) as proxy,
        _browser(f"http://127.0.0.1:{proxy.port}/page", total) as browser,
    ):
        connected = lambda: bus.stats()["subscribers"] == 1  # noqa: E731
        gone = lambda: bus.stats()["subscribers"] == 0  # noqa: E731
        await _until(connected, 60)  # Chromium started, the page's EventSource is open
        # A client's position starts with the first id it reads: from then on
        # nothing may be lost, however the connection is cut.
        tick(1)
        async with asyncio.timeout(30):
            await seen.wait()
        for cut in range(3):
            # Cut only a stream the browser has opened: a cut that lands before
            # the response head reaches it is a failed attempt, not an open.
            await _until(lambda: opened > cut, why=f"open {cut + 1}; {opened}")  # noqa: B023
            # A burst, cut while it is still on its way (some of it in the
            # proxy's or the browser's buffers), more while the browser is away.
            tick(5)
            await asyncio.sleep(0)
            tick(5)
            proxy.cut()
            await _until(
                gone, why=f"the cut; {bus.subscriptions()}, {proxy.accepted}, {proxy._pairs}"
            )
            tick(3)
            await _until(connected, why=f"reconnect; {bus.stats()}, {proxy.accepted}")
        tick(total - n)
        async with asyncio.timeout(60):
            out, err = await browser.communicate()
    assert browser.returncode == 0, err.decode()[-2000:]
    result = orjson.loads(out.splitlines()[-1])
    received = [item["n"] for item in result["received"]]
    assert received == list(range(1, total + 1)), (received, result, err.decode()[-3000:])
    epoch = bus.log.head(user)[0]
    assert [item["id"] for item in result["received"]] == [f"{epoch}:{i}" for i in received]
    assert result["resets"] == []
    assert result["opens"] >= 4  # the first connect and three reconnects, by the browser itself
    assert proxy.accepted >= 4
    assert bus.stats()["replayed"] >= 9  # at least the 3 x 3 sent while it was away


def test_the_browser_driver_is_pinned_and_downloads_no_browser() -> None:
    package = orjson.loads((BROWSER_DIR / "package.json").read_text())
    assert set(package["dependencies"]) == {"playwright-core"}
    assert (BROWSER_DIR / "package-lock.json").is_file()
    script = (BROWSER_DIR / "eventsource.mjs").read_text()
    assert "executablePath" in script
