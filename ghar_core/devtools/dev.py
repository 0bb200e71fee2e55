"""``ghar-core dev``: the app for local development, with nothing configured.

Why: a newcomer's first command should serve an app that answers an
authenticated request, not a 503 naming three settings. So this command
brings what is missing and owns it:

- **a database**: ``DATABASE_URL`` when it is set and reachable (its database
  is created when missing); otherwise an :class:`EmbeddedPostgres` on the
  machine's PostgreSQL binaries, data kept in ``.ghar/dev/pg`` (``--data-dir``
  or ``GHAR_DEV_DIR`` moves it) and reused next time. The core migrations are
  applied either way.
- **an identity provider**: when ``SUPABASE_URL`` is unset, the local one
  (:mod:`ghar_core.devtools.identity_provider`), in this process, on
  ``127.0.0.1:54321`` when free, with a ready token for a dev user.
- **the app**: ``ghar-core serve`` in a child process with those settings in
  its environment; ready once ``/health`` answers.

Then it prints the URLs, the token and copy-paste examples
(:func:`example_lines`), and waits. Ctrl-C, SIGTERM or SIGHUP stop what it
started in reverse order -- the app, the provider, the database -- each
bounded in time, so no process and no lock file is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from ghar_core.config import Settings, env_file_path, load_settings
from ghar_core.devtools.identity_provider import DEV_PROVIDER_URL, IdentityProviderServer
from ghar_core.devtools.postgres import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_binaries,
    not_found_message,
)
from ghar_core.envfile import EnvSyntaxError, parse_env_text
from ghar_core.migrate import migrate_dsn
from ghar_core.utils import with_database

__all__ = [
    "DEV_DIR_ENV",
    "DEV_EMAIL",
    "DevOptions",
    "DevSession",
    "example_lines",
    "run_dev",
]

DEV_DIR_ENV: Final = "GHAR_DEV_DIR"
DEV_EMAIL: Final = "dev@example.com"
DEV_TOKEN_TTL: Final = 24 * 3600
EMBEDDED_PG_PORT: Final = 54322  # the port Supabase's local stack gives its database
_PROVIDER_PORT: Final = int(urlsplit(DEV_PROVIDER_URL).port or 54321)
_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_APP_READY_TIMEOUT: Final = 60.0
T = TypeVar("T")


class DevError(Exception):
    """Why ``ghar-core dev`` cannot start, said as a paragraph with the fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class DevOptions:
    """What ``ghar-core dev`` was asked for (its command-line options)."""

    host: str | None = None
    port: int | None = None
    app: str | None = None
    factory: bool = False
    data_dir: Path | None = None
    email: str = DEV_EMAIL


@dataclasses.dataclass(frozen=True, slots=True)
class DevSession:
    """What a running ``ghar-core dev`` serves: what the printout and examples are built from."""

    app_url: str
    api_prefix: str
    database_url: str
    database_note: str
    provider_url: str | None
    email: str | None
    user_id: str | None  # the users row's id, as /me gives it (what streams are keyed by)
    token: str | None
    cli: str = "ghar-core"  # how to call our CLI from a new shell in the working folder
    sse: bool = True  # ENABLE_SSE: the event-stream lines only when its routes are served
    websockets: bool = True  # ENABLE_WEBSOCKETS: the WebSocket line only when served
    # How `ghar-core emit` reaches this server: None when it cannot (the
    # in-memory broker), "" when a new shell's settings already name the
    # database, else the DSN to pass with --dsn (the embedded server's).
    emit_dsn: str | None = None

    @property
    def me_url(self) -> str:
        return f"{self.app_url}{self.api_prefix}/me"


def example_lines(session: DevSession) -> list[str]:
    """Copy-paste examples for the printout: a ``# what`` line, then the command.

    One place, so every feature that wants a line in the printout adds it here.
    """
    if session.token is None:
        return [
            "# liveness and readiness",
            f"curl -s {session.app_url}/health",
            f"curl -s {session.app_url}/ready",
        ]
    lines = [
        "# the token, for the lines below (valid 24 h)",
        f"export GHAR_TOKEN='{session.token}'",
        "# who am I (the users row is created on first use)",
        f'curl -s -H "Authorization: Bearer $GHAR_TOKEN" {session.me_url}',
    ]
    events = f"{session.app_url}{session.api_prefix}/events"
    if session.sse:
        lines += [
            "# your event stream (leave it open in one shell; -N: print as it arrives)",
            f'curl -sN -H "Authorization: Bearer $GHAR_TOKEN" {events}/stream',
            "# from another shell: a test event to your own stream",
            f'curl -s -X POST -H "Authorization: Bearer $GHAR_TOKEN" {events}/test',
        ]
    if session.websockets:
        ws = session.app_url.replace("http", "ws", 1) + session.api_prefix
        lines += [
            "# a WebSocket for your notifications (paste into a browser's developer console)",
            f'new WebSocket("{ws}/ws/notifications?access_token={session.token}")'
            ".onmessage = (e) => console.log(e.data)",
        ]
    if session.emit_dsn is not None and session.user_id:
        dsn = f" --dsn {session.emit_dsn}" if session.emit_dsn else ""
        lines += [
            "# an event to your stream and sockets from any shell (what a script or job does)",
            f"{session.cli} emit{dsn} --user {session.user_id} --type hello"
            """ --data '{"text": "hi"}'""",
        ]
    another = f"{session.cli} token"
    if session.provider_url != DEV_PROVIDER_URL:
        another += f" --provider-url {session.provider_url}"
    lines += [
        "# a token for another user",
        f"{another} --email someone@example.com",
    ]
    return lines


def banner(session: DevSession) -> str:
    """The text printed once everything answers."""
    rows = [
        ("app", f"{session.app_url}  (/health, /ready, {session.api_prefix}/me)"),
        ("database", f"{session.database_url}  ({session.database_note})"),
    ]
    if session.provider_url:
        rows.append(("identity", f"{session.provider_url}  (local provider, users in memory)"))
    else:
        rows.append(("identity", "SUPABASE_URL (sign in there for a token)"))
    if session.email:
        shown = f"  (id {session.user_id})" if session.user_id else ""
        rows.append(("dev user", f"{session.email}{shown}"))
    width = max(len(name) for name, _ in rows)
    out = ["", "ghar-core dev is ready; Ctrl-C stops everything it started.", ""]
    out += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    out += ["", "Try:"]
    out += [f"  {line}" for line in example_lines(session)]
    return "\n".join(out) + "\n\n"  # a blank line ends it (tests read up to it)


# --- helpers -------------------------------------------------------------------------


def _is_set(name: str, settings: Settings) -> bool:
    """Whether ``name`` is given by the environment or the env file (not just defaulted)."""
    if os.environ.get(name, "").strip():
        return True
    path = env_file_path(settings.APP_ENV)
    try:
        values = parse_env_text(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, EnvSyntaxError):
        return False
    return bool(values.get(name, "").strip())


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        # As the servers bind (uvicorn, postgres): a connection of the past in
        # TIME_WAIT on that port is no obstacle, only a socket bound there now.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _masked(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":****@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _users_row_id(me_url: str, token: str) -> str | None:
    """The dev user's id as ``/me`` gives it; None when the app serves no ``/me``."""
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(me_url, headers={"Authorization": f"Bearer {token}"}) as response,
        ):
            body = await response.json() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    found = body.get("id") if isinstance(body, dict) else None
    return found if isinstance(found, str) else None


def _cli_command() -> str:
    """``ghar-core`` when a new shell finds this one, else its path (``.venv/bin/ghar-core``)."""
    ours = Path(sys.executable).parent / "ghar-core"
    found = shutil.which("ghar-core")
    if found and Path(found).resolve() == ours.resolve():
        return "ghar-core"
    if ours.exists():
        return _shown(ours.absolute())
    return f"{sys.executable} -m ghar_core"


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when inside it (shorter to read)."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the app if we die without stopping it (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _probe(dsn: str) -> str | None:
    """None when ``dsn`` answers (its database created when missing), else why not."""
    try:
        conn = await asyncpg.connect(dsn, timeout=3, statement_cache_size=0)
    except asyncpg.InvalidCatalogNameError:
        name = urlsplit(dsn).path.lstrip("/")
        try:
            admin = await asyncpg.connect(with_database(dsn, "postgres"), timeout=3)
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            return f"its database {name!r} is missing and could not be created ({exc})"
        print(f"ghar-core dev: created database {name!r}", flush=True)
        return None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    await conn.close()
    return None


def _embedded(data_dir: Path | None, database: str) -> EmbeddedPostgres:
    """The embedded server for this project: data under ``.ghar/dev`` unless told otherwise."""
    chosen = data_dir or os.environ.get(DEV_DIR_ENV)
    root = Path(chosen or ".ghar/dev").absolute()
    port = EMBEDDED_PG_PORT if _port_free("127.0.0.1", EMBEDDED_PG_PORT) else 0
    name = database or "ghar_dev"
    # Free a moment ago is no promise (another run may bind it first): fall back.
    server = EmbeddedPostgres(
        root / "pg", database=name, port=port, migrate=True, port_fallback=True
    )
    blocked = server.unreachable_parent()
    if blocked is None or chosen:
        return server  # a folder that was asked for gets the plain error, if any
    # As root under e.g. /root (mode 0700) the server's user cannot reach the
    # project: keep the data where it can, one folder per project.
    root = Path("/var/tmp/ghar-dev") / hashlib.sha256(str(Path.cwd()).encode()).hexdigest()[:12]
    print(
        f"ghar-core dev: the PostgreSQL server's user cannot enter {blocked}; keeping its "
        f"data in {root} instead (--data-dir chooses another)",
        flush=True,
    )
    return EmbeddedPostgres(root / "pg", database=name, port=port, migrate=True, port_fallback=True)


# --- the command ---------------------------------------------------------------------


class _Dev:
    """One run of ``ghar-core dev``: starts things in order, stops them in reverse."""

    def __init__(self, options: DevOptions, settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.stop = asyncio.Event()
        self.postgres: EmbeddedPostgres | None = None
        self.provider: IdentityProviderServer | None = None
        self.app: subprocess.Popen[bytes] | None = None

    async def _race(self, work: Awaitable[T]) -> tuple[bool, T | None]:
        """Run ``work`` unless a stop signal comes first; work already begun is awaited."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            with contextlib.suppress(Exception):
                await task  # a thread cannot be interrupted: let it finish, then unwind
            return False, None
        return True, task.result()

    async def database(self) -> tuple[str, str] | None:
        """The DSN the app will use and a note on where it comes from (None: stopped)."""
        configured = _is_set("DATABASE_URL", self.settings)
        dsn = self.settings.DATABASE_URL
        why_not = "DATABASE_URL is not set"
        if configured:
            reason = await _probe(dsn)
            if reason is None:
                await migrate_dsn(dsn)
                return dsn, "DATABASE_URL"
            why_not = f"DATABASE_URL ({_masked(dsn)}) is unreachable: {reason}"
        if find_binaries() is None:
            raise DevError(
                f"no database to use: {why_not}, and {not_found_message()}; "
                "or set DATABASE_URL to a PostgreSQL server you can reach "
                "(`DATABASE_URL=postgresql://user@host:5432/ghar_dev ghar-core dev`)."
            )
        if configured:
            print(f"ghar-core dev: {why_not}; starting the embedded PostgreSQL", flush=True)
        self.postgres = _embedded(self.options.data_dir, urlsplit(dsn).path.lstrip("/"))
        started, _ = await self._race(asyncio.to_thread(self.postgres.start))
        if not started:
            return None
        pg = self.postgres
        state = "created" if pg.initialised else "reused"
        major = pg.binaries.major if pg.binaries else "?"
        return pg.dsn, f"embedded PostgreSQL {major}; data {_shown(pg.data_dir)} ({state})"

    async def identity(self) -> dict[str, str]:
        """Settings for the app's environment; starts the local provider when none is set."""
        if self.settings.SUPABASE_URL:
            return {}
        try:
            server = IdentityProviderServer(port=_PROVIDER_PORT)
            await server.start()
        except OSError:
            server = IdentityProviderServer(port=0)  # 54321 is taken: any free port
            await server.start()
        self.provider = server
        return {
            "SUPABASE_URL": server.url,
            "SUPABASE_ANON_KEY": server.provider.anon_key,
            "SUPABASE_SERVICE_ROLE_KEY": server.provider.service_role_key,
        }

    def spawn_app(self, host: str, port: int, env: Mapping[str, str]) -> None:
        command = [sys.executable, "-m", "ghar_core", "serve", "--host", host, "--port", str(port)]
        if self.options.app:
            command += ["--app", self.options.app]
        if self.options.factory:
            command.append("--factory")
        # Its own session: Ctrl-C reaches only us, and we stop the app first.
        self.app = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    async def wait_app_ready(self, url: str) -> bool:
        """True once ``/health`` answers 200; False on a stop signal; DevError if the app died."""
        deadline = time.monotonic() + _APP_READY_TIMEOUT
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self.stop.is_set():
                assert self.app is not None
                if self.app.poll() is not None:
                    raise DevError(
                        f"the app exited with status {self.app.returncode} before it was ready "
                        "(its log is above)"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(f"{url}/health") as resp:
                        if resp.status == 200:
                            return True
                if time.monotonic() > deadline:
                    raise DevError(f"the app did not answer {url}/health within 60 s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.1)
        return False

    async def wait_app_exit(self) -> int:
        """Until a stop signal (0) or the app exiting by itself (its status)."""
        assert self.app is not None
        while not self.stop.is_set():
            code = self.app.poll()
            if code is not None:
                print(f"ghar-core dev: the app exited with status {code}", file=sys.stderr)
                return code or 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.25)
        return 0

    async def close(self) -> None:
        """Stop the app, the provider, the database, in that order; every step attempted."""
        app, self.app = self.app, None
        if app is not None:
            if app.poll() is None:
                app.send_signal(signal.SIGTERM)
            grace = self.settings.SHUTDOWN_STEP_TIMEOUT * 2 + 5
            try:
                await asyncio.to_thread(app.wait, grace)
            except subprocess.TimeoutExpired:
                app.kill()
                await asyncio.to_thread(app.wait, 5)
        provider, self.provider = self.provider, None
        if provider is not None:
            await provider.stop()
        postgres, self.postgres = self.postgres, None
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)

    async def run(self) -> int:
        host = self.options.host or self.settings.HOST
        port = self.settings.PORT if self.options.port is None else self.options.port
        if not _port_free(host, port):
            raise DevError(
                f"{host}:{port} is in use (another `ghar-core dev` or `serve`?): stop it, or "
                "pass --port"
            )
        found = await self.database()
        if found is None:
            return 0
        dsn, note = found
        env = {"DATABASE_URL": dsn, **await self.identity()}
        emit_dsn: str | None = None
        if self.postgres is not None and not _is_set("EVENT_BROKER", self.settings):
            # Our own server is direct (no pooler): events from `ghar-core emit`,
            # a script or a second instance reach this one through its outbox.
            env["EVENT_BROKER"] = "postgres"
            emit_dsn = dsn
        elif self.settings.EVENT_BROKER == "postgres":
            emit_dsn = ""
        url = f"http://{host}:{port}"
        self.spawn_app(host, port, env)
        if not await self.wait_app_ready(url):
            return 0
        token = user_id = None
        email: str | None = None
        if self.provider is not None:
            email = self.options.email
            subject = str(uuid.uuid5(uuid.NAMESPACE_URL, f"ghar-core-dev:{email}"))
            token = self.provider.provider.mint_token(subject, email, expires_in=DEV_TOKEN_TTL)
            # Streams and sockets are keyed by the users row's id, not the token's
            # subject: ask /me (which creates the row) for the id to emit to.
            user_id = await _users_row_id(f"{url}{self.settings.API_V1_STR}/me", token)
        session = DevSession(
            app_url=url,
            api_prefix=self.settings.API_V1_STR,
            database_url=_masked(dsn),
            database_note=note,
            provider_url=self.provider.url if self.provider else None,
            email=email,
            user_id=user_id,
            token=token,
            cli=_cli_command(),
            sse=self.settings.ENABLE_SSE,
            websockets=self.settings.ENABLE_WEBSOCKETS,
            emit_dsn=emit_dsn,
        )
        sys.stdout.write(banner(session))
        sys.stdout.flush()
        return await self.wait_app_exit()


async def run_dev(options: DevOptions, settings: Settings | None = None) -> int:
    """Serve the app with whatever it is missing started beside it; the exit status.

    Installs handlers for SIGINT, SIGTERM and SIGHUP on the running loop;
    returns after stopping everything it started.
    """
    loaded = settings or load_settings()
    if loaded.APP_ENV == "prod":
        print(
            "ghar-core dev is for development; APP_ENV=prod: use `ghar-core serve`", file=sys.stderr
        )
        return 2
    dev = _Dev(options, loaded)
    loop = asyncio.get_running_loop()
    for signum in _SIGNALS:
        loop.add_signal_handler(signum, dev.stop.set)
    try:
        return await dev.run()
    except (DevError, EmbeddedPostgresError) as exc:
        print(f"ghar-core dev: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            await dev.close()
        finally:
            for signum in _SIGNALS:
                loop.remove_signal_handler(signum)
            if dev.stop.is_set():
                print("ghar-core dev: stopped", file=sys.stderr, flush=True)
