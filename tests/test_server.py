"""``ghar-core serve`` as a user runs it: real uvicorn subprocesses from the project's folder.

Each test writes a small app module into a temporary folder, starts
``python -m ghar_core serve`` there (no ``PYTHONPATH``: the current directory
is on the import path, as with uvicorn's CLI), talks to it over loopback
HTTP and reads its log after SIGTERM.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

USER_APP = """
from ghar_core.asgi import create_app

app = create_app(resources=[])
not_an_app = 42

@app.get("/api/v1/hello")
async def hello(request):
    return {"hello": request.query_params.get("name"), "version": VERSION}

@app.get("/api/v1/where")
async def where(request):
    return {
        "root": request.root_path,
        "client": request.client[0] if request.client else None,
        "scheme": request.scope["scheme"],
    }

@app.get("/api/v1/sink")
async def sink(request):
    return {"sink": type(request.app.access_log_sink).__name__}

def build():
    return app

def needs_arguments(settings):
    return app

VERSION = 1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    base: str
    proc: subprocess.Popen[bytes]
    log: str = ""
    lines: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serve_cli(cwd: Path, *argv: str, **env: str) -> AsyncIterator[Served]:
    """``ghar-core serve --port <free> *argv`` in ``cwd``, up before yield, SIGTERM after."""
    port = _free_port()
    environ = {**os.environ, "APP_ENV": "test", "LOG_LEVEL": "INFO", "LOG_FORMAT": "json", **env}
    environ.pop("PYTHONPATH", None)
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, reaped in a thread below
        [sys.executable, "-m", "ghar_core", "serve", "--port", str(port), *argv],
        cwd=cwd,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    served = Served(f"http://127.0.0.1:{port}", proc)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                if proc.poll() is not None:
                    break
                try:
                    async with http.get(served.base + "/health"):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        served.log = err.decode()
        for line in served.log.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                served.lines.append(orjson.loads(line))


async def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        return await r.json()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "userapp.py").write_text(USER_APP)
    return tmp_path


async def test_module_app_from_the_current_directory_gets_the_buffered_access_log(
    project: Path,
) -> None:
    """No PYTHONPATH; a module-level app (built at import) is switched to the buffered sink."""
    for argv in (["--app", "userapp:app"], ["--app", "userapp:build", "--factory"]):
        async with serve_cli(project, *argv) as served:
            assert await get_json(served.base + "/api/v1/sink") == {"sink": "BufferedAccessLog"}
            hello = await get_json(served.base + "/api/v1/hello?name=ada&access_token=zq9")
            assert hello == {"hello": "ada", "version": 1}
        assert served.proc.returncode in (0, -signal.SIGTERM), served.log
        paths = [
            line.get("path") for line in served.lines if line.get("logger") == "ghar_core.access"
        ]
        assert "/api/v1/hello?name=ada&access_token=[REDACTED]" in paths, served.log
        assert "zq9" not in served.log


async def test_json_lines_carry_no_color_message_and_access_lines_come_in_order(
    project: Path,
) -> None:
    """Every line is JSON without ANSI; access lines precede "Shutting down", in request order."""
    async with serve_cli(project, "--app", "userapp:app") as served:
        for i in range(5):
            await get_json(f"{served.base}/api/v1/hello?name=n{i}")
        # SIGTERM at once: the last lines are still in the buffer (flushed every 0.2 s).
    log_lines = served.log.splitlines()
    assert len(served.lines) == len(log_lines), served.log  # every line is JSON
    assert "color_message" not in served.log
    assert "\x1b[" not in served.log
    messages = [line["message"] for line in served.lines]
    shutting = next(i for i, m in enumerate(messages) if m.startswith("Shutting down"))
    hellos = [i for i, m in enumerate(messages) if m.startswith("GET /api/v1/hello")]
    assert len(hellos) == 5, served.log
    assert all(i < shutting for i in hellos), messages
    names = [served.lines[i]["path"].rsplit("=", 1)[1] for i in hellos]
    assert names == [f"n{i}" for i in range(5)]


async def test_root_path_and_proxy_headers(project: Path) -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    cases = [
        # (flags, expected client, expected scheme); uvicorn trusts 127.0.0.1 by default
        ([], "203.0.113.7", "https"),
        (["--no-proxy-headers"], "127.0.0.1", "http"),
        (["--proxy-headers", "--forwarded-allow-ips", "10.9.9.9"], "127.0.0.1", "http"),
        (["--forwarded-allow-ips", "*"], "203.0.113.7", "https"),
    ]
    for flags, client, scheme in cases:
        async with serve_cli(project, "--app", "userapp:app", "--root-path", "/core", *flags) as s:
            body = await get_json(s.base + "/api/v1/where", headers=forwarded)
        assert body == {"root": "/core", "client": client, "scheme": scheme}, (flags, s.log)


async def test_log_level_silences_info_lines(project: Path) -> None:
    async with serve_cli(project, "--app", "userapp:app", "--log-level", "warning") as served:
        assert (await get_json(served.base + "/api/v1/hello"))["version"] == 1
    assert served.proc.returncode in (0, -signal.SIGTERM), served.log
    assert "Application startup complete" not in served.log
    assert "GET /api/v1/hello" not in served.log


async def test_reload_serves_the_edited_module(project: Path) -> None:
    async with serve_cli(project, "--app", "userapp:app", "--reload") as served:
        assert (await get_json(served.base + "/api/v1/hello"))["version"] == 1
        source = project / "userapp.py"
        source.write_text(source.read_text().replace("VERSION = 1", "VERSION = 2"))
        version = 1
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                version = (await get_json(served.base + "/api/v1/hello"))["version"]
                if version == 2:
                    break
            await asyncio.sleep(0.1)
        assert version == 2, served.proc.poll()
    assert "Traceback" not in served.log, served.log


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--app", "userapp:app", "--factory"], "is an ASGI app already (drop --factory)"),
        (["--app", "userapp:not_an_app", "--factory"], "is not callable"),
        (["--app", "userapp:needs_arguments", "--factory"], "calling 'userapp:needs_arguments'"),
        (["--app", "userapp:build"], "if it builds the app, add --factory"),
        (["--app", "userapp:not_an_app"], "is not an ASGI application (got int)"),
        (["--app", "userapp:nowhere"], "module 'userapp' has no attribute 'nowhere'"),
        (["--app", "no_such_module_here:app"], "cannot import 'no_such_module_here'"),
        (["--app", "userapp"], "is not of the form 'package.module:attribute'"),
        (["--factory"], "--factory needs --app"),
    ],
)
def test_a_wrong_target_is_one_line_and_no_traceback(
    project: Path, argv: list[str], says: str
) -> None:
    environ = {**os.environ, "APP_ENV": "test"}
    environ.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-m", "ghar_core", "serve", "--port", "1", *argv],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert says in done.stderr


async def test_an_app_with_its_own_settings_is_served_from_its_folder(tmp_path: Path) -> None:
    """The app's schema reads its key from the project's env file; nothing warns about it."""
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / ".env.test").write_text(
        "GEOCODER_URL=http://geo.test:8081\nGEOCODER_KEY=geo-key-secret\nLOG_FORMAT=json\n"
    )
    (tmp_path / "listings.py").write_text(
        "import dataclasses\n"
        "from ghar_core.asgi import create_app\n"
        "from ghar_core.config import Secret, Settings, load_settings, setting\n"
        "@dataclasses.dataclass(frozen=True, slots=True, repr=False)\n"
        "class ListingsSettings(Settings):\n"
        "    GEOCODER_URL: str = setting('http://127.0.0.1:1', 'url', 'The geocoder.')\n"
        "    GEOCODER_KEY: Secret | None = setting(None, 'secret', 'Its key.', optional=True)\n"
        "app = create_app(load_settings(schema=ListingsSettings), resources=[])\n"
        "@app.get('/api/v1/geocoder')\n"
        "async def geocoder(request):\n"
        "    return {'url': request.settings.GEOCODER_URL}\n"
    )
    async with serve_cli(tmp_path, "--app", "listings:app", STRICT_SETTINGS="true") as served:
        body = await get_json(served.base + "/api/v1/geocoder")
    assert body == {"url": "http://geo.test:8081"}, served.log
    assert "unknown setting" not in served.log
    assert "geo-key-secret" not in served.log
