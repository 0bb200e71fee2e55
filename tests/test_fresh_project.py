"""A new project outside this repository, on the installed package, as a newcomer makes it.

The test builds a wheel of this checkout, installs it into a new virtual
environment in a temporary folder (its dependencies borrowed from the running
interpreter's site-packages, without this checkout, so nothing downloads),
writes the README's service (``myservice/main.py``: a setting, a resource, a
client and a migration set of its own), its env file and pyproject, copies
the README's test examples verbatim, adds a test of its own that geocodes
through a loopback geocoder, runs them with the plugin's fixtures and real
tokens, then serves the project with ``ghar-core serve --app`` from its
folder. Nothing of the library is touched.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require
from tests.pg import admin_dsn

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def _block(lang: str, marker: str) -> str:
    (found,) = [b for b in re.findall(rf"```{lang}\n(.*?)```", README, re.DOTALL) if marker in b]
    return found


OWN_TEST = """
import asyncio
import contextlib
import dataclasses

from aiohttp import web

from ghar_core.testing import TestClient
from myservice.main import build


@contextlib.asynccontextmanager
async def geocoder():
    async def search(request):
        return web.json_response({"lat": 28.6, "lon": 77.2, "q": request.query["q"]})

    app = web.Application()
    app.router.add_get("/v1/search", search)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def test_the_app_setting_is_read_from_the_env_file(ghar_settings):
    assert type(ghar_settings).__name__ == "ServiceSettings"
    assert ghar_settings.GEOCODER_URL == "http://127.0.0.1:9"


async def test_create_and_read_a_property(ghar_settings, ghar_token):
    async with geocoder() as url:
        app = build(dataclasses.replace(ghar_settings, GEOCODER_URL=url))
        token = ghar_token(email="ravi@example.com")
        auth = {"Authorization": f"Bearer {token}"}
        async with TestClient(app) as client:
            r = await client.post(
                "/api/v1/properties", json={"title": "2BHK", "address": "Sector 21"}, headers=auth
            )
            assert r.status_code == 200, r.text
            assert r.json()["lat"] == 28.6
            r = await client.get(f"/api/v1/properties/{r.json()['id']}", headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["property"]["title"] == "2BHK"
            r = await client.post("/api/v1/properties", json={"title": 1}, headers=auth)
            assert r.status_code == 422 or r.status_code == 400, r.text
            clients = app.resources.get("http_clients")
        assert clients.open_sessions() == 0  # the lifespan closed the app's own client
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(venv: Path, project: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST", "GHAR_", "APP_ENV", "DATABASE_URL", "SUPABASE"))
        and k not in {"PYTHONPATH", "VIRTUAL_ENV", "COV_CORE_SOURCE"}
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(project.parent)
    return env


def _install(tmp: Path) -> Path:
    """A venv with the package installed from a wheel; its dependencies borrowed."""
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = dist.glob("ghar_core-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies: every entry of our site-packages except this checkout's
    # own install, linked into one folder the new venv puts on its path.
    ours = Path(sysconfig.get_paths()["purelib"])
    deps = tmp / "deps"
    deps.mkdir()
    for entry in ours.iterdir():
        if entry.name.startswith(("ghar_core", "__editable__", "_ghar")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "_borrowed_deps.pth").write_text(f"{deps}\n")
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return venv


def _project(tmp: Path) -> Path:
    project = tmp / "listings"
    (project / "myservice" / "migrations").mkdir(parents=True)
    (project / "myservice" / "__init__.py").write_text("")
    (project / "myservice" / "main.py").write_text(_block("python", "def build("))
    (project / "myservice" / "migrations" / "0001_properties.sql").write_text(
        _block("sql", "CREATE TABLE properties")
    )
    (project / "env").mkdir()
    env_file = _block("sh", "GHAR_SETTINGS=")
    (project / "env" / ".env.test").write_text(
        env_file.replace("GEOCODER_URL=http://127.0.0.1:8081", "GEOCODER_URL=http://127.0.0.1:9")
    )
    (project / "env" / ".env.dev").write_text(env_file)
    pyproject = _block("toml", "ghar_app")
    (project / "pyproject.toml").write_text(
        pyproject.replace(
            "[tool.pytest.ini_options]\n", '[tool.pytest.ini_options]\npythonpath = ["."]\n'
        )
    )
    (project / "tests").mkdir()
    (project / "tests" / "test_readme.py").write_text(
        _block("python", "def test_me_with_a_real_token")
    )
    (project / "tests" / "test_own.py").write_text(OWN_TEST)
    return project


@pytest.mark.postgres
def test_a_new_project_installs_tests_and_serves_without_touching_the_library(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    admin = admin_dsn()
    require(admin is not None, "PostgreSQL")
    assert admin is not None
    tmp = tmp_path_factory.mktemp("fresh")
    assert REPO not in tmp.parents
    venv = _install(tmp)
    project = _project(tmp)
    env = _environment(venv, project)
    python = str(venv / "bin" / "python")

    # The installed copy is the one imported, not this checkout.
    where = subprocess.run(
        [python, "-c", "import ghar_core; print(ghar_core.__file__)"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert str(venv) in where
    assert str(REPO) not in where

    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=project,
        env={**env, "GHAR_TEST_DATABASE_URL": admin},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "4 passed" in run.stdout, run.stdout[-2000:]
    assert "skipped" not in run.stdout

    # Served from its own folder: the module is found without PYTHONPATH.
    port = _free_port()
    serve = [str(venv / "bin" / "ghar-core"), "serve", "--app", "myservice.main:build"]
    server = subprocess.Popen(
        [*serve, "--factory", "--host", "127.0.0.1", "--port", str(port)],
        cwd=project,
        env={**env, "APP_ENV": "dev", "DATABASE_URL": admin},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        body = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = r.read()
                    break
            except OSError:
                time.sleep(0.2)
        assert b"ok" in body, server.stdout.read().decode() if server.poll() is not None else ""
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/properties/1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        refused.value.close()
        assert refused.value.code == 401  # the app's own route, served
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        finally:
            if server.poll() is None:
                server.kill()
            assert server.stdout is not None
            server.stdout.close()
    assert server.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
