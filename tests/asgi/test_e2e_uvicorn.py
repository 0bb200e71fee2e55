"""End to end: the app under a real uvicorn on a free loopback port, an aiohttp client.

Also ``ghar-core serve`` as a subprocess: it binds, answers, logs access lines
and shuts down cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import uvicorn

from ghar_core.asgi import StreamingResponse, create_app
from ghar_core.asgi.types import ASGIApp
from tests.asgi.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, **options) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # No WebSockets unless a test asks: the legacy websockets implementation
    # warns, and warnings are errors here; the sans-I/O one does not.
    options = {"ws": "none", **options}
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,  # leave the process's logging alone (other tests rely on it)
        log_level="warning",
        access_log=False,
        http="httptools",
        **options,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn exited during startup")
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        sock.close()


class Tracked:
    name = "tracked"

    def __init__(self) -> None:
        self.events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")

    async def check(self) -> None:
        pass


def _app(resource: Tracked):
    app = create_app(make_settings(MAX_BODY_SIZE=1024), core_resources=False, resources=[resource])
    closed = asyncio.Event()
    app.state.closed = closed

    @app.get("/items/{id:int}")
    async def item(request):
        return {"id": request.path_params["id"], "root": request.root_path}

    @app.post("/upload")
    async def upload(request):
        return {"size": len(await request.body())}

    @app.get("/sse")
    async def sse(request):
        async def events():
            try:
                n = 0
                while True:
                    n += 1
                    yield f"data: {n}\n\n"
                    await asyncio.sleep(0.02)
            finally:
                closed.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def test_http_through_uvicorn() -> None:
    res = Tracked()
    app = _app(res)
    async with serve(app) as base, aiohttp.ClientSession() as http:
        assert res.events == ["start"]
        async with http.get(f"{base}/items/7", headers={"X-Request-ID": "e2e-1"}) as r:
            assert r.status == 200
            assert await r.json() == {"id": 7, "root": ""}
            assert r.headers["X-Request-ID"] == "e2e-1"
        async with http.get(f"{base}/items/x", headers={"X-Request-ID": "bad id!"}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "NOT_FOUND"
            assert r.headers["X-Request-ID"] != "bad id!"
        async with http.head(f"{base}/items/7") as r:
            assert r.status == 200
            assert await r.read() == b""
        async with http.post(
            f"{base}/upload", data=b"x" * 100_000, headers={"content-type": "application/json"}
        ) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
        async with http.get(f"{base}/sse") as r:
            assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert (await r.content.readline()) == b"data: 1\n"
        # The client went away: the server notices and the generator is closed.
        async with asyncio.timeout(5):
            await app.state.closed.wait()
    assert res.events == ["start", "stop"]


async def test_root_path_under_uvicorn() -> None:
    """``--root-path /core``: a proxy stripped /core; uvicorn puts it back into path."""
    app = _app(Tracked())
    async with (
        serve(app, root_path="/core") as base,
        aiohttp.ClientSession() as http,
        http.get(f"{base}/items/3") as r,
    ):
        assert r.status == 200
        assert await r.json() == {"id": 3, "root": "/core"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve_cli_and_get(
    argv: list[str], url_path: str, headers: dict[str, str] | None = None, **env: str
) -> tuple[object, str, int | None]:
    """Run ``ghar-core serve`` on a free port, GET ``url_path`` once it is up, stop it.

    Returns the JSON body, the process's log (stderr) and its exit code.
    """
    port = _free_port()
    environ = {**os.environ, "APP_ENV": "test", "LOG_LEVEL": "INFO", "LOG_FORMAT": "json", **env}
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, reaped in a thread below
        [sys.executable, "-m", "ghar_core", "serve", "--port", str(port), *argv],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    body = None
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    url = f"http://127.0.0.1:{port}{url_path}"
                    async with http.get(url, headers=headers) as r:
                        body = await r.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return body, err.decode(), proc.returncode


async def test_cli_serve_subprocess() -> None:
    body, log, code = await _serve_cli_and_get(
        [], "/health?token=s3cret", headers={"X-Request-ID": "cli-1"}
    )
    assert isinstance(body, dict), "ghar-core serve did not come up"
    assert body["status"] == "ok"
    # uvicorn re-raises the signal after its graceful shutdown (exit -15).
    assert code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete." in log
    assert '"path":"/health?token=[REDACTED]"' in log
    assert '"request_id":"cli-1"' in log
    assert "s3cret" not in log


async def test_cli_serve_your_own_app(tmp_path: Path) -> None:
    """``ghar-core serve --app module:attr`` serves the user's app, with our logging."""
    (tmp_path / "userapp.py").write_text(
        "from ghar_core.asgi import create_app\n"
        "app = create_app(core_resources=False, resources=[])\n"
        "@app.get('/api/v1/hello')\n"
        "async def hello(request):\n"
        "    return {'hello': request.query_params.get('name')}\n"
        "def build():\n"
        "    return app\n"
    )
    for argv in (["--app", "userapp:app"], ["--app", "userapp:build", "--factory"]):
        body, log, _ = await _serve_cli_and_get(
            argv, "/api/v1/hello?name=ada&access_token=zq9", PYTHONPATH=str(tmp_path)
        )
        assert body == {"hello": "ada"}, log
        assert '"path":"/api/v1/hello?name=ada&access_token=[REDACTED]"' in log, log
        assert "zq9" not in log


def test_cli_serve_refuses_an_app_it_cannot_load(capsys: pytest.CaptureFixture[str]) -> None:
    from ghar_core.cli import main

    assert main(["serve", "--app", "no_such_module_here:app"]) == 2
    err = capsys.readouterr().err
    assert "cannot load --app no_such_module_here:app" in err
    assert "cannot import 'no_such_module_here'" in err


@pytest.mark.parametrize("argv", [["serve", "--help"]])
def test_serve_help(argv, capsys) -> None:
    from ghar_core.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "--workers" in capsys.readouterr().out


async def test_websocket_through_uvicorn() -> None:
    """A real WebSocket handshake and echo through uvicorn (the sans-I/O websockets impl)."""
    from ghar_core.logging import get_request_id

    app = create_app(make_settings(), core_resources=False, resources=[])

    @app.websocket_route("/ws/echo")
    async def echo(ws) -> None:
        await ws.accept()
        message = await ws.receive_json()
        await ws.send_json({"echo": message, "rid": get_request_id()})
        await ws.close()

    async with (
        serve(app, ws="websockets-sansio") as base,
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{base.replace('http', 'ws', 1)}/ws/echo", headers={"X-Request-ID": "ws-e2e-1"}
        ) as ws,
    ):
        await ws.send_json({"hello": "world"})
        reply = await ws.receive_json(timeout=5)
        assert reply == {"echo": {"hello": "world"}, "rid": "ws-e2e-1"}
        closing = await ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_websocket_denial_through_uvicorn_is_an_envelope_with_request_id() -> None:
    """uvicorn offers websocket.http.response: an unknown route is a real 404 envelope."""
    app = create_app(make_settings(), core_resources=False, resources=[])
    async with (
        serve(app, ws="websockets-sansio") as base,
        aiohttp.ClientSession() as http,
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            async with http.ws_connect(
                f"{base.replace('http', 'ws', 1)}/ws/nowhere",
                headers={"X-Request-ID": "ws-e2e-404"},
            ):
                pass
        assert info.value.status == 404
        assert info.value.headers is not None
        assert info.value.headers["X-Request-ID"] == "ws-e2e-404"
