"""``ghar-core dev`` as a newcomer runs it: ``./scripts/run``, a real subprocess.

Nothing configured: it starts its own PostgreSQL and the local identity
provider, serves the app, prints a token that ``/me`` accepts, and on SIGTERM
(or a terminal's Ctrl-C, SIGINT to its process group) stops everything it
started: no process and no ``postmaster.pid`` left. A second run reuses the
data folder. The error paths answer in one paragraph without starting anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from ghar_core.devtools.dev import DevSession, _embedded, example_lines
from ghar_core.devtools.postgres import find_binaries
from tests.conftest import require
from tests.pg import free_port, run_sync, with_database

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 120.0  # a first run on a loaded 2-core box: initdb, migrations, uvicorn


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a newcomer's shell: nothing of ours configured."""
    drop = ("DATABASE_URL", "SUPABASE_", "GHAR_", "PYTEST_", "DB_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["APP_ENV"] = "dev"
    env.update(extra)
    return env


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Running:
    process: subprocess.Popen[str]
    lines: list[str]
    started: set[int]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def value(self, pattern: str) -> str:
        found = re.search(pattern, self.text, re.MULTILINE)
        assert found, self.text
        return found.group(1)


def _start(command: list[str], env: dict[str, str], log: Path) -> Running:
    """Start ``command`` and read its stdout until the printout is complete."""
    with log.open("w") as err:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # its own process group, like a shell job
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if not line and "Try:" in seen:  # the blank line that ends the printout
            return Running(process, seen, _descendants(process.pid))
    process.kill()
    process.wait(10)
    raise AssertionError(f"no printout; stdout: {seen}; stderr: {log.read_text()}")


def _stop(running: Running, signum: int, *, group: bool = False) -> None:
    """Signal it, wait, and check that nothing it started is left."""
    process = running.process
    if group:
        os.killpg(process.pid, signum)  # what a terminal's Ctrl-C does
    else:
        process.send_signal(signum)
    assert process.wait(60) == 0
    if process.stdout is not None:
        process.stdout.close()
    assert running.started, "it started no process of its own?"
    deadline = time.monotonic() + 10  # a postgres backend may take a moment to exit
    while any(_alive(pid) for pid in running.started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in running.started if _alive(pid)] == []


def _printed_stream_gets_the_printed_test_event(running: Running, token: str) -> None:
    """The two event lines of the printout, pasted into two shells: the stream shows the event."""
    stream = running.value(r"^  (curl -sN .*/events/stream)$")
    post = running.value(r"^  (curl -s -X POST .*/events/test)$")
    env = {**_clean_env(), "GHAR_TOKEN": token}
    reader = subprocess.Popen(
        ["sh", "-c", f"exec {stream}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert reader.stdout is not None
        first = reader.stdout.readline()  # the stream is open once its first frame arrives
        assert first.startswith(("retry:", ":", "id:", "event:")), first
        posted = subprocess.run(
            ["sh", "-c", post], env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert posted.returncode == 0, posted.stderr
        got: list[str] = [first]
        deadline = time.monotonic() + 15
        while "event: test" not in "".join(got) and time.monotonic() < deadline:
            got.append(reader.stdout.readline())
        assert "event: test" in "".join(got), got
        # The WebSocket line's URL and the emit line, as a script would run it:
        # the event reaches the socket and the stream through the outbox.
        ws_url = running.value(r'new WebSocket\("([^"]+)"\)')
        emit = running.value(r"^  (\S*ghar\S* emit .*)$")
        message = run_sync(_socket_gets_what_emit_sends(ws_url, emit, env))
        assert message["type"] == "hello", message
        assert message["data"] == {"text": "hi"}, message
        while "event: hello" not in "".join(got) and time.monotonic() < deadline + 15:
            got.append(reader.stdout.readline())
        assert "event: hello" in "".join(got), got
    finally:
        reader.kill()
        reader.wait(10)
        if reader.stdout is not None:
            reader.stdout.close()


async def _socket_gets_what_emit_sends(
    ws_url: str, emit: str, env: dict[str, str]
) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url, timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws,
    ):
        process = await asyncio.create_subprocess_exec(
            "sh", "-c", emit, cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err
        message = await ws.receive_json(timeout=15)
        assert isinstance(message, dict)
        return message


async def _get(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.get(url, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    require(find_binaries() is not None, "PostgreSQL server binaries")
    parent = Path(tempfile.mkdtemp(prefix="ghar-test-dev-"))
    parent.chmod(0o755)  # as root the embedded server runs as postgres and must enter it
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_scripts_run_serves_me_with_the_printed_token_and_stops_clean(
    data_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    command = ["./scripts/run", "--port", str(port), "--data-dir", str(data_dir)]
    first = _start(command, _clean_env(), tmp_path / "first.log")
    try:
        assert "(created)" in first.text
        token = first.value(r"export GHAR_TOKEN='([^']+)'")
        me = first.value(r"curl .*Bearer \$GHAR_TOKEN\S* (http://\S+)")
        assert me == f"http://127.0.0.1:{port}/api/v1/me"
        status, body = run_sync(_get(f"http://127.0.0.1:{port}/health"))
        assert status == 200
        status, body = run_sync(_get(f"http://127.0.0.1:{port}/ready"))
        assert status == 200, body
        status, body = run_sync(_get(me, token))
        assert status == 200, body
        assert body["email"] == "dev@example.com"
        assert (data_dir / "pg" / "postmaster.pid").exists()
        _printed_stream_gets_the_printed_test_event(first, token)
        # The printed command for another token works as pasted into a new shell.
        another = first.value(r"^  (\S*ghar\S* token .*--email someone@example.com)$")
        minted = subprocess.run(
            ["sh", "-c", another],
            cwd=ROOT,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert minted.returncode == 0, minted.stderr
        assert minted.stdout.strip().count(".") == 2  # a JWT
    finally:
        _stop(first, signal.SIGTERM)
    assert not (data_dir / "pg" / "postmaster.pid").exists()
    assert not (data_dir / "pg.owner").exists()

    # Again, on the same folder; stopped the way a terminal's Ctrl-C does it.
    second = _start(command, _clean_env(), tmp_path / "second.log")
    try:
        assert "(reused)" in second.text
        token = second.value(r"export GHAR_TOKEN='([^']+)'")
        status, body = run_sync(_get(f"http://127.0.0.1:{port}/api/v1/me", token))
        assert status == 200, body
    finally:
        _stop(second, signal.SIGINT, group=True)
    assert not (data_dir / "pg" / "postmaster.pid").exists()


def test_a_reachable_database_url_is_used_and_its_database_created(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    name = f"ghar_test_dev_{uuid.uuid4().hex[:12]}"
    dsn = with_database(pg_admin_dsn, name)
    port = free_port()
    env = _clean_env(DATABASE_URL=dsn, GHAR_DEV_DIR=str(tmp_path / "unused"))
    command = [sys.executable, "-m", "ghar_core", "dev", "--port", str(port)]
    running = _start(command, env, tmp_path / "dev.log")
    try:
        assert f"created database {name!r}" in running.text
        assert "(DATABASE_URL)" in running.text
        status, body = run_sync(_get(f"http://127.0.0.1:{port}/ready"))
        assert status == 200, body
    finally:
        _stop(running, signal.SIGTERM)
        run_sync(_drop(pg_admin_dsn, name))
    assert not (tmp_path / "unused").exists()  # no embedded server was started


async def _drop(admin: str, name: str) -> None:
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def test_no_database_and_no_binaries_is_one_paragraph_with_the_fix(tmp_path: Path) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/ghar_dev"
    env = _clean_env(DATABASE_URL=closed, GHAR_PG_BIN="/nonexistent/bin")
    result = subprocess.run(
        [sys.executable, "-m", "ghar_core", "dev", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message  # one paragraph, no traceback
    assert message.startswith("ghar-core dev: no database to use: DATABASE_URL (")
    assert "is unreachable" in message
    assert "GHAR_PG_BIN=/nonexistent/bin has no working initdb and postgres" in message
    assert "apt-get install postgresql" in message
    assert "set DATABASE_URL to a PostgreSQL server you can reach" in message
    assert not (tmp_path / ".ghar").exists()


def test_a_taken_port_is_said_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "ghar_core", "dev", "--port", str(port)],
            cwd=tmp_path,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is in use" in result.stderr
    assert not (tmp_path / ".ghar").exists()


def test_the_examples_use_the_token_and_the_served_urls() -> None:
    session = DevSession(
        app_url="http://127.0.0.1:8000",
        api_prefix="/api/v1",
        database_url="postgresql://postgres@127.0.0.1:54322/ghar_dev",
        database_note="embedded",
        provider_url="http://127.0.0.1:40000",
        email="dev@example.com",
        user_id=str(uuid.uuid4()),
        token="header.payload.signature",
    )
    text = "\n".join(example_lines(session))
    events = "http://127.0.0.1:8000/api/v1/events"
    assert f'curl -sN -H "Authorization: Bearer $GHAR_TOKEN" {events}/stream' in text
    assert f'curl -s -X POST -H "Authorization: Bearer $GHAR_TOKEN" {events}/test' in text
    no_sse = "\n".join(example_lines(dataclasses.replace(session, sse=False)))
    assert "/events/" not in no_sse
    ws = "ws://127.0.0.1:8000/api/v1/ws/notifications?access_token=header.payload.signature"
    assert f'new WebSocket("{ws}")' in text
    assert "WebSocket" not in "\n".join(
        example_lines(dataclasses.replace(session, websockets=False))
    )
    assert " emit " not in text  # the in-memory broker: a shell cannot reach it
    embedded = "\n".join(example_lines(dataclasses.replace(session, emit_dsn="postgresql://x/d")))
    assert (
        f"ghar-core emit --dsn postgresql://x/d --user {session.user_id} --type hello" in embedded
    )
    configured = "\n".join(example_lines(dataclasses.replace(session, emit_dsn="")))
    assert f"ghar-core emit --user {session.user_id} --type hello" in configured
    assert "export GHAR_TOKEN='header.payload.signature'" in text
    assert 'curl -s -H "Authorization: Bearer $GHAR_TOKEN" http://127.0.0.1:8000/api/v1/me' in text
    assert "--provider-url http://127.0.0.1:40000" in text  # not the default port
    without = example_lines(dataclasses.replace(session, token=None, provider_url=None))
    assert not any("GHAR_TOKEN" in line for line in without)
    assert "curl -s http://127.0.0.1:8000/health" in without


def test_the_dev_command_is_registered() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ghar_core", "dev", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--data-dir" in result.stdout


def test_as_root_a_project_out_of_the_servers_reach_keeps_its_data_where_it_can(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")  # not a missing service
    project = data_dir / "private" / "project"
    project.mkdir(parents=True)
    (data_dir / "private").chmod(0o700)  # like /root
    monkeypatch.chdir(project)
    monkeypatch.delenv("GHAR_DEV_DIR", raising=False)
    server = _embedded(None, "ghar_dev")
    assert server.data_dir.parent.parent == Path("/var/tmp/ghar-dev")
    assert server.unreachable_parent() is None
    assert "cannot enter" in capsys.readouterr().out
    # A folder asked for by name is not moved: its start says why it cannot be used.
    asked = _embedded(project / "data", "ghar_dev")
    assert asked.unreachable_parent() == data_dir / "private"
    assert not (project / "data").exists()
