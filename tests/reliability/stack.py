"""The whole stack of the reliability suite, each part a real process or server of its own.

- :class:`Cluster`: a throwaway PostgreSQL (``EmbeddedPostgres``, as root run
  as ``postgres``) on a fixed loopback port, so it can be stopped and started
  again where PgBouncer expects it;
- :class:`Bouncer`: Debian's PgBouncer in transaction mode on a fixed free
  port in front of it, killed with SIGKILL and restarted on the same port;
- :class:`Provider`: the local identity provider in a thread with its own
  event loop, so it outlives every test's loop; it can be taken down, and
  :attr:`Provider.faults` makes one route slow, answer a status or garbage;
- :class:`Server`: ``ghar-core serve --app tests.reliability.app:build
  --factory`` as a subprocess on a free port, its output captured in a file
  (the secrets case reads every such file).

Every secret the suite hands out (tokens, keys, the database password, the
JWT secret) is noted in :data:`SECRETS`, so the secrets case knows what must
never appear in a log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from ghar_core.devtools import LocalIdentityProvider
from ghar_core.devtools.identity_provider import build_app
from ghar_core.devtools.postgres import EmbeddedPostgres
from ghar_core.migrate import migrate_dsn
from tests.pg import PgBouncer, free_port, run_sync, start_pgbouncer, stop_pgbouncer
from tests.reliability.app import MIGRATIONS

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

#: Every secret value handed to a server or a client during the suite.
SECRETS: dict[str, set[str]] = {}
#: Every server log file written during the suite.
LOG_FILES: list[Path] = []


def note_secret(kind: str, value: str) -> str:
    """Remember ``value`` as a secret of ``kind`` (the secrets case looks for it); return it."""
    SECRETS.setdefault(kind, set()).add(value)
    return value


def _wait_port(port: int, seconds: float, alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive():
            return False
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.02)
    return False


class Cluster:
    """A PostgreSQL of the suite's own on one port for its whole life.

    Starts, stops and restarts run on one thread of the cluster's own, so
    they never overlap and never block a test's event loop. (Which thread
    starts it no longer matters for its lifetime: ``EmbeddedPostgres`` forks
    from a thread that lives as long as the process.)
    """

    database = "reliability"

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.server = EmbeddedPostgres(
            directory / "pg", database=self.database, port=self.port, durable=False
        )
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cluster")

    def start(self) -> None:
        self._thread.submit(self.server.start).result()

    def stop(self) -> None:
        """A fast shutdown: every backend is terminated, open transactions roll back."""
        self._thread.submit(self.server.stop).result()

    def close(self) -> None:
        self.stop()
        self._thread.shutdown()

    @property
    def dsn(self) -> str:
        return self.server.dsn


class Bouncer:
    """PgBouncer in transaction mode in front of :class:`Cluster`, on a port of its own."""

    # Reconnect to a Postgres that came back within 0.2 s, not after the 15 s default.
    SETTINGS = {"server_login_retry": "0.2", "query_wait_timeout": "10"}

    def __init__(self, directory: Path, cluster: Cluster) -> None:
        self.cluster = cluster
        self.directory = directory / "pgbouncer"
        self.directory.mkdir()
        self.port = free_port()
        self.running: PgBouncer | None = None

    def start(self) -> None:
        self.running = start_pgbouncer(
            self.cluster.dsn, port=self.port, directory=str(self.directory), extra=self.SETTINGS
        )

    def kill(self) -> None:
        """SIGKILL: every client and server connection drops at once."""
        running, self.running = self.running, None
        if running is not None and running.process.poll() is None:
            running.process.kill()
            running.process.wait(5)

    def stop(self) -> None:
        running, self.running = self.running, None
        if running is not None:
            stop_pgbouncer(running, remove=False)

    def dsn(self, password: str) -> str:
        # Trust auth: the password is never asked for, but it is in the DSN the
        # app is given, so a log line carrying the DSN would show it.
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/{Cluster.database}"


@dataclass
class Fault:
    """What one provider route does instead of answering normally."""

    delay: float = 0.0
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None


class Provider:
    """The local identity provider in a thread with its own loop, on a fixed port.

    ``faults[route]`` (``"jwks"``, ``"user"``) changes one route; ``down()``
    closes the listening socket and every connection, ``up()`` listens again.
    Counters are the provider's own (``requests``, ``introspected``,
    ``peak_in_flight``), counted before any fault applies.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        service_key = note_secret("service-role key", f"srk-{uuid.uuid4().hex}")
        anon_key = f"anon-{uuid.uuid4().hex}"
        self.provider = LocalIdentityProvider(
            base_url=self.url, anon_key=anon_key, service_role_key=service_key
        )
        self.faults: dict[str, Fault] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    def start(self) -> None:
        self._thread.start()
        self.up()

    def up(self) -> None:
        self._call(self._up())

    def down(self) -> None:
        self._call(self._down())

    def close(self) -> None:
        self.down()
        self._call(self._cancel_the_rest())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _up(self) -> None:
        if self._runner is not None:
            return
        app = build_app(self.provider)
        app.middlewares.append(self._fault_middleware)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        self._runner = runner

    @staticmethod
    async def _cancel_the_rest() -> None:
        """End what a slow fault left sleeping, so the loop closes with no task pending."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _down(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _fault_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        fault = self.faults.get(request.match_info.route.name or "")
        if fault is None:
            return await handler(request)  # type: ignore[no-any-return]
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status is not None:
            return web.Response(status=fault.status, headers=fault.headers, body=b"{}")
        if fault.body is not None:
            return web.Response(body=fault.body, content_type="application/json")
        return await handler(request)  # type: ignore[no-any-return]

    def token(self, **options: Any) -> str:
        """A valid access token (ES256) for a new user, noted as a secret."""
        return note_secret("bearer token", self.provider.mint_token(**options))

    def settings_env(self) -> dict[str, str]:
        return {
            "SUPABASE_URL": self.url,
            "SUPABASE_ANON_KEY": self.provider.anon_key,
            "SUPABASE_SERVICE_ROLE_KEY": self.provider.service_role_key,
        }


class Server:
    """``ghar-core serve`` with the suite's app, as a subprocess on a free port."""

    def __init__(self, directory: Path, env: Mapping[str, str], name: str = "serve") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env)
        self.log_path = directory / f"{name}-{self.port}.log"
        LOG_FILES.append(self.log_path)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GHAR_", "PG"))}
        env.update(self.env)
        env["PYTHONPATH"] = str(ROOT)
        command = [sys.executable, "-m", "ghar_core", "serve", "--port", str(self.port)]
        command += ["--app", "tests.reliability.app:build", "--factory"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        process = self.process
        if not _wait_port(self.port, timeout, lambda: process.poll() is None):
            self.kill()
            raise RuntimeError(f"ghar-core serve did not start:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM and wait; the seconds it took to exit (SIGKILL past ``timeout``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return 0.0
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise
        return time.monotonic() - started

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_kib(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class Stack:
    """Postgres, PgBouncer, the provider and one served app, started in that order."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="ghar-reliability-"))
        os.chmod(self.directory, 0o755)  # the postgres user must enter it
        self.cluster = Cluster(self.directory)
        self.bouncer = Bouncer(self.directory, self.cluster)
        self.provider = Provider()
        self.db_password = note_secret("database password", f"pw-{uuid.uuid4().hex}")
        self.jwt_secret = note_secret("JWT secret", f"jwt-{uuid.uuid4().hex}{uuid.uuid4().hex}")
        self.server: Server | None = None

    def env(self, **overrides: str) -> dict[str, str]:
        """The served app's settings: test env file, our parts, tight database bounds."""
        env = {
            "APP_ENV": "test",
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "json",
            "DATABASE_URL": self.bouncer.dsn(self.db_password),
            "DB_POOL_MIN_SIZE": "2",
            "DB_POOL_MAX_SIZE": "10",
            "DB_POOL_ACQUIRE_TIMEOUT": "2.0",
            "DB_COMMAND_TIMEOUT": "2.0",
            "DB_CONNECT_TIMEOUT": "2.0",
            "SUPABASE_JWT_SECRET": self.jwt_secret,
            "SHUTDOWN_STEP_TIMEOUT": "5",
            "HEAD_TIMEOUT": "3",
            "SSE_MAX_SUBSCRIBERS": "60",
            "SSE_SEND_TIMEOUT": "1.0",
            "SSE_HEARTBEAT_INTERVAL": "1.0",
            "SSE_REAPER_INTERVAL": "0.5",
            "WS_SEND_TIMEOUT": "1.0",
            **self.provider.settings_env(),
        }
        env.update(overrides)
        return env

    def start(self) -> None:
        self.cluster.start()
        run_sync(migrate_dsn(self.cluster.dsn, [MIGRATIONS]))
        self.bouncer.start()
        self.provider.start()
        self.server = self.new_server()

    def new_server(self, name: str = "serve", **overrides: str) -> Server:
        server = Server(self.directory, self.env(**overrides), name)
        server.start()
        return server

    def close(self) -> None:
        for step in (
            lambda: self.server and self.server.kill(),
            self.provider.close,
            self.bouncer.stop,
            self.cluster.close,
        ):
            with contextlib.suppress(Exception):
                step()

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Answer:
    """One HTTP answer as the suite judges it (status 0: no answer, ``error`` says why)."""

    status: int
    body: Any
    headers: Mapping[str, str]
    seconds: float
    error: str | None = None

    @property
    def retry_after(self) -> str | None:
        return self.headers.get("Retry-After")

    def is_clean_503(self) -> bool:
        """A 503 envelope with a Retry-After: how an outage must look."""
        return (
            self.status == 503
            and isinstance(self.body, dict)
            and isinstance(self.body.get("error"), dict)
            and bool(self.retry_after)
        )


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    within: float = 15.0,
    **options: Any,
) -> Answer:
    """One request; a transport failure or a hang past ``within`` seconds is status 0."""
    started = time.perf_counter()
    try:
        async with (
            asyncio.timeout(within),
            session.request(method, url, **options) as resp,
        ):
            raw = await resp.read()
            try:
                body: Any = await resp.json(content_type=None) if raw else None
            except ValueError:
                body = raw
            return Answer(resp.status, body, resp.headers, time.perf_counter() - started)
    except TimeoutError:
        return Answer(0, None, {}, time.perf_counter() - started, "hang")
    except (aiohttp.ClientError, OSError) as exc:
        return Answer(0, None, {}, time.perf_counter() - started, type(exc).__name__)


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of ``samples`` in milliseconds (nearest rank)."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return round(ordered[index] * 1000, 1)

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(ordered[-1] * 1000, 1)}
