"""Postgres and PgBouncer fixtures: a pytest plugin (``pytest_plugins = ["tests.pg"]``).

Real servers only. Postgres is the test settings' ``DATABASE_URL``
(env/.env.test: the machine's own at 127.0.0.1:5432, trust auth, user
postgres); when nothing answers there, the session starts a throwaway cluster
of its own from the machine's PostgreSQL binaries
(:class:`ghar_core.devtools.postgres.EmbeddedPostgres`) and stops it at the
end. An explicit ``GHAR_TEST_DATABASE_URL`` (a maintenance-database DSN) wins
and is never replaced. Every database a test uses is created with a unique
name and dropped afterwards (``DROP ... WITH (FORCE)``). PgBouncer is Debian's binary
(``scripts/ensure-pgbouncer.sh`` installs it), started per session on a free
loopback port in transaction mode with its own temporary config and auth
files; it refuses to run as root, so as root it is started with
``-u postgres``.

Fixtures:
- ``pg_admin_dsn``: DSN of the maintenance database (skips, or fails in CI).
- ``pg_database`` (module) / ``fresh_database`` (function): DSN of an empty
  uniquely named database, dropped afterwards.
- ``db_settings``: test settings pointing at ``pg_database``.
- ``db``: a started :class:`~ghar_core.database.Database` on ``pg_database``
  with the migrations applied; stopped afterwards.
- ``pgbouncer``: a running :class:`PgBouncer` (``.dsn(database)``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ghar_core.config import Settings, load_settings
from ghar_core.database import Database
from ghar_core.devtools.postgres import EmbeddedPostgres, EmbeddedPostgresError
from ghar_core.migrate import migrate_dsn
from ghar_core.utils import run_on_private_loop
from tests.conftest import require

__all__ = [
    "PG_ADMIN_DSN",
    "PgBouncer",
    "admin_dsn",
    "db",
    "db_settings",
    "free_port",
    "fresh_database",
    "pg_admin_dsn",
    "pg_database",
    "pgbouncer",
    "pgbouncer_binary",
    "pgbouncer_config",
    "postgres_available",
    "run_sync",
    "start_pgbouncer",
    "stop_pgbouncer",
    "with_database",
]

# An explicit choice: used as it is, never replaced by a cluster of our own.
PG_ADMIN_DSN = os.environ.get("GHAR_TEST_DATABASE_URL") or os.environ.get("GHAR_TEST_PG_DSN")


# Sync fixtures use it so they never touch the loop pytest-asyncio runs.
run_sync = run_on_private_loop


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_resolved: list[str | None] = []  # [dsn] once decided; [None]: no Postgres to be had
_own: list[EmbeddedPostgres] = []  # the throwaway cluster, when the session started one
_why_not: list[str] = []
_own_folder: list[str] = []


async def _answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
    await conn.close()
    return True


def _own_cluster() -> str | None:
    """Start a throwaway cluster (fast, not durable) in a temporary folder; its DSN."""
    directory = tempfile.mkdtemp(prefix="ghar-test-pg-")
    os.chmod(directory, 0o755)  # as root the server runs as postgres, who must enter it
    cluster = EmbeddedPostgres(os.path.join(directory, "pg"), durable=False)
    try:
        dsn = cluster.start()
    except EmbeddedPostgresError as exc:
        _why_not.append(str(exc))
        shutil.rmtree(directory, ignore_errors=True)
        return None
    _own.append(cluster)
    _own_folder.append(directory)
    atexit.register(_stop_own_cluster)  # belt and braces: pytest_sessionfinish stops it
    return dsn


def _configured() -> str:
    return load_settings(app_env="test").DATABASE_URL


def admin_dsn() -> str | None:
    """DSN of the maintenance database the tests use, decided once per session.

    The explicit ``GHAR_TEST_DATABASE_URL`` as it is; else the test settings'
    ``DATABASE_URL`` when it answers; else a throwaway cluster started now and
    stopped at the end of the session. None when there is no Postgres to be had.
    """
    if not _resolved:
        configured = PG_ADMIN_DSN or _configured()
        if run_sync(_answers(configured)):
            _resolved.append(configured)
        elif PG_ADMIN_DSN:
            _why_not.append(f"nothing answers at GHAR_TEST_DATABASE_URL={PG_ADMIN_DSN}")
            _resolved.append(None)
        else:
            _resolved.append(_own_cluster())
    return _resolved[0]


def _stop_own_cluster() -> None:
    while _own:
        cluster = _own.pop()
        cluster.stop()
        shutil.rmtree(cluster.data_dir.parent, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    _stop_own_cluster()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # Runs after pytest_sessionfinish: say what the session used, the cluster is gone.
    if _resolved and not PG_ADMIN_DSN and _resolved[0] != _configured():
        used = f"{_resolved[0]} in {_own_folder[0]}" if _own_folder else "none"
        used += "".join(f" ({why})" for why in _why_not)
        terminalreporter.write_line(
            f"tests/pg.py: nothing answered at {_configured()}; "
            f"the session ran its own PostgreSQL: {used}"
        )


def postgres_available() -> bool:
    """Whether the tests have a Postgres (their own when none is configured)."""
    return admin_dsn() is not None


def pgbouncer_binary() -> str | None:
    """Path of the pgbouncer binary (Debian puts it in /usr/sbin)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def with_database(dsn: str, database: str, *, port: int | None = None) -> str:
    """``dsn`` with its database (and optionally port) replaced."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if port is not None:
        host = parts.hostname or "127.0.0.1"
        auth = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
        netloc = f"{auth}{host}:{port}"
    return urlunsplit((parts.scheme, netloc, "/" + database, parts.query, parts.fragment))


async def _create(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.contextmanager
def _temporary_database(admin_dsn: str) -> Iterator[str]:
    name = f"ghar_test_{uuid.uuid4().hex[:16]}"
    run_sync(_create(admin_dsn, name))
    try:
        yield with_database(admin_dsn, name)
    finally:
        run_sync(_drop(admin_dsn, name))


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    """DSN of the maintenance database; the test skips (fails in CI) without Postgres."""
    dsn = admin_dsn()
    require(dsn is not None, "PostgreSQL (" + " ".join(_why_not) + ")")
    assert dsn is not None
    return dsn


@pytest.fixture(scope="module")
def pg_database(pg_admin_dsn: str) -> Iterator[str]:
    """An empty, uniquely named database for this test module (dropped afterwards)."""
    with _temporary_database(pg_admin_dsn) as dsn:
        yield dsn


@pytest.fixture
def fresh_database(pg_admin_dsn: str) -> Iterator[str]:
    """An empty, uniquely named database for one test (dropped afterwards)."""
    with _temporary_database(pg_admin_dsn) as dsn:
        yield dsn


@pytest.fixture
def db_settings(pg_database: str) -> Settings:
    """Test settings whose DATABASE_URL is the module's database."""
    return dataclasses.replace(load_settings(app_env="test"), DATABASE_URL=pg_database)


@pytest.fixture(scope="module")
def _migrated(pg_database: str) -> str:
    run_sync(migrate_dsn(pg_database))
    return pg_database


@pytest.fixture
async def db(_migrated: str, db_settings: Settings) -> AsyncIterator[Database]:
    """A started Database on the module's migrated database; stopped afterwards."""
    database = Database(db_settings)
    await database.start()
    try:
        yield database
    finally:
        await database.stop(grace=2.0)


@dataclasses.dataclass
class PgBouncer:
    """A private pgbouncer in transaction pooling mode, in front of the test Postgres."""

    host: str
    port: int
    directory: str
    process: subprocess.Popen[bytes]

    def dsn(self, database_dsn: str) -> str:
        """The DSN reaching ``database_dsn``'s database through this pgbouncer."""
        name = urlsplit(database_dsn).path.lstrip("/") or "postgres"
        return with_database(database_dsn, name, port=self.port)

    def log(self) -> str:
        path = os.path.join(self.directory, "pgbouncer.log")
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()


def _wait_listening(port: int, process: subprocess.Popen[bytes], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def pgbouncer_config(
    directory: str,
    *,
    listen_port: int,
    server_host: str,
    server_port: int,
    user: str,
    extra: dict[str, str] | None = None,
) -> str:
    """Write a transaction-mode pgbouncer.ini (trust auth, log file) in ``directory``; its path.

    ``extra`` adds or overrides ``[pgbouncer]`` settings (e.g. ``server_login_retry``).
    """
    ini = os.path.join(directory, "pgbouncer.ini")
    auth = os.path.join(directory, "userlist.txt")
    with open(auth, "w", encoding="utf-8") as fh:
        fh.write(f'"{user}" ""\n')
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(listen_port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": auth,
        "pool_mode": "transaction",
        "default_pool_size": "20",
        "max_client_conn": "200",
        "server_reset_query": "",
        "ignore_startup_parameters": "extra_float_digits",
        "logfile": os.path.join(directory, "pgbouncer.log"),
    } | (extra or {})
    with open(ini, "w", encoding="utf-8") as fh:
        fh.write(f"[databases]\n* = host={server_host} port={server_port}\n[pgbouncer]\n")
        fh.writelines(f"{name} = {value}\n" for name, value in settings.items())
    for path in (ini, auth):
        os.chmod(path, 0o644)
    return ini


def start_pgbouncer(
    admin_dsn: str,
    *,
    port: int | None = None,
    directory: str = "",
    extra: dict[str, str] | None = None,
) -> PgBouncer:
    """Start a private pgbouncer (transaction mode, 20 server connections) on ``port``.

    Tests that kill and restart it (``kill -9`` under load) call this directly,
    passing the previous instance's ``port`` and ``directory``; the session
    fixture :func:`pgbouncer` uses it once. ``extra``: more ``[pgbouncer]``
    settings (see :func:`pgbouncer_config`).
    """
    binary = pgbouncer_binary()
    require(binary is not None, "the pgbouncer binary (scripts/ensure-pgbouncer.sh)")
    assert binary is not None
    admin = urlsplit(admin_dsn)
    user = admin.username or "postgres"
    directory = directory or tempfile.mkdtemp(prefix="ghar-pgbouncer-")
    port = port or free_port()
    ini = pgbouncer_config(
        directory,
        listen_port=port,
        server_host=admin.hostname or "127.0.0.1",
        server_port=admin.port or 5432,
        user=user,
        extra=extra,
    )
    command = [binary, ini]
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root: switch to the postgres user.
        runas = pwd.getpwnam("postgres")
        os.chmod(directory, 0o777)
        os.chown(directory, runas.pw_uid, runas.pw_gid)
        command = [binary, "-u", "postgres", ini]
    # pgbouncer also logs to stderr: into a file, never a pipe nobody reads (a Postgres
    # outage makes it log a line per failed connect; a full pipe would block it).
    errors = os.path.join(directory, "pgbouncer.stderr")
    with open(errors, "ab") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    if not _wait_listening(port, process, 10.0):
        process.kill()
        process.wait(timeout=5)
        with open(errors, encoding="utf-8", errors="replace") as fh:
            pytest.fail(f"pgbouncer did not start: {fh.read()[-2000:]}")
    return PgBouncer("127.0.0.1", port, directory, process)


def stop_pgbouncer(bouncer: PgBouncer, *, remove: bool = True) -> None:
    """Stop ``bouncer`` (terminate, then kill) and remove its folder unless ``remove=False``."""
    process = bouncer.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    if remove:
        shutil.rmtree(bouncer.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def pgbouncer(pg_admin_dsn: str) -> Iterator[PgBouncer]:
    """pgbouncer on a free loopback port, transaction mode, 20 server connections."""
    bouncer = start_pgbouncer(pg_admin_dsn)
    try:
        yield bouncer
    finally:
        stop_pgbouncer(bouncer)


@contextlib.asynccontextmanager
async def started(base: Settings, **changes: Any) -> AsyncIterator[Database]:
    """A started Database on ``base`` with ``changes`` (pool sizes, timeouts), stopped after."""
    database = Database(dataclasses.replace(base, **changes))
    await database.start()
    try:
        yield database
    finally:
        await database.stop()


@contextlib.asynccontextmanager
async def holding(database: Any, count: int) -> AsyncIterator[None]:
    """Hold ``count`` main-pool connections of ``database`` until the block ends."""
    release = asyncio.Event()
    ready = asyncio.Semaphore(0)

    async def hold() -> None:
        async with database.connection():
            ready.release()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(count)]
    try:
        for _ in range(count):
            await ready.acquire()
        yield
    finally:
        release.set()
        await asyncio.gather(*holders)
