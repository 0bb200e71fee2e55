"""The package's pytest plugin: fixtures to test an app on the core with real parts.

Installed with the package (the ``pytest11`` entry point ``ghar_core``), so a
project that depends on ghar_core has these fixtures without a conftest:

``ghar_database``
    DSN of a throwaway database, uniquely named, migrated with the core's set
    and ``ghar_migrations``, dropped after the test. The server: the
    ``GHAR_TEST_DATABASE_URL`` maintenance DSN when set; else the server of the
    test settings' ``DATABASE_URL`` when it answers; else a throwaway
    PostgreSQL started from the machine's binaries for the session (stopped at
    its end). With none of these the test fails, saying which were tried.
``ghar_admin_dsn``
    The maintenance DSN those databases are made on (override to choose).
``ghar_migrations``
    The app's :class:`~ghar_core.migrate.MigrationSet`\\ s: by default those the
    app's ``"database"`` resource carries (``create_app(migrations=[...])``).
``ghar_identity_provider``
    The local identity provider (:class:`~ghar_core.devtools.IdentityProviderServer`)
    on a free loopback port.
``ghar_token``
    ``ghar_token(email="asha@example.com", **mint_options)``: a real access
    token signed by that provider.
``ghar_base_settings``
    ``load_settings(app_env="test")`` (so ``env/.env.test`` and
    ``GHAR_SETTINGS`` of the project apply); override it to change them.
``ghar_settings``
    The base settings pointed at the database and the provider, migrations on
    startup (the app's own sets are applied when the app starts).
``ghar_app``
    The app under test: the factory named by the ini option ``ghar_app``
    (``"package.module:build"``, called with ``ghar_settings``), else the
    core's ``create_app(ghar_settings)``; override it to build yours.
``ghar_client``
    ``TestClient(ghar_app)``, entered: the lifespan started, stopped after.

The async fixtures need pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from ghar_core.utils import run_on_private_loop, with_database

if TYPE_CHECKING:
    from ghar_core.asgi.app import App
    from ghar_core.config import Settings
    from ghar_core.devtools import IdentityProviderServer
    from ghar_core.devtools.postgres import EmbeddedPostgres
    from ghar_core.migrate import MigrationSet
    from ghar_core.testing import TestClient

try:  # strict mode needs the marker; auto mode takes it as well
    import pytest_asyncio

    _async_fixture: Callable[..., Any] = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - the fixtures then need another async plugin
    _async_fixture = pytest.fixture

__all__ = [
    "ghar_admin_dsn",
    "ghar_app",
    "ghar_base_settings",
    "ghar_client",
    "ghar_database",
    "ghar_identity_provider",
    "ghar_migrations",
    "ghar_settings",
    "ghar_token",
    "pytest_addoption",
    "pytest_sessionfinish",
]

ADMIN_ENV = "GHAR_TEST_DATABASE_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "ghar_app",
        "the app factory the ghar_app fixture calls with the test settings "
        "('package.module:build')",
        default="",
    )


async def _answers(dsn: str) -> str | None:
    """``None`` when a connection to ``dsn`` opens, else why not."""
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


class _Server:
    """The Postgres server of the session, decided once (see the module doc)."""

    def __init__(self) -> None:
        self.dsn: str | None = None
        self.tried: list[str] = []
        self.cluster: EmbeddedPostgres | None = None
        self.folder: str | None = None

    def admin_dsn(self, settings: Settings) -> str:
        if self.dsn is not None:
            return self.dsn
        explicit = os.environ.get(ADMIN_ENV)
        candidates = [explicit] if explicit else [with_database(settings.DATABASE_URL, "postgres")]
        for dsn in candidates:
            why = run_on_private_loop(_answers(dsn))
            if why is None:
                self.dsn = dsn
                return dsn
            self.tried.append(f"{dsn}: {why}")
        if not explicit:
            self.dsn = self._own_cluster()
        if self.dsn is None:
            pytest.fail(
                "ghar_database needs PostgreSQL; tried " + "; ".join(self.tried) + ". Start one, "
                f"set {ADMIN_ENV} to a maintenance-database DSN, or install the server "
                "binaries (Debian's postgresql) so the plugin can start its own",
                pytrace=False,
            )
        return self.dsn

    def _own_cluster(self) -> str | None:
        from ghar_core.devtools.postgres import EmbeddedPostgres, EmbeddedPostgresError

        folder = tempfile.mkdtemp(prefix="ghar-pytest-pg-")
        os.chmod(folder, 0o755)  # as root the server runs as postgres, who must enter it
        cluster = EmbeddedPostgres(os.path.join(folder, "pg"), durable=False)
        try:
            dsn = cluster.start()
        except EmbeddedPostgresError as exc:
            self.tried.append(f"a throwaway cluster: {exc}")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        self.cluster, self.folder = cluster, folder
        return dsn

    def stop(self) -> None:
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


_server = _Server()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _server.stop()


async def _create_migrated(admin: str, name: str, sets: Sequence[MigrationSet]) -> str:
    import asyncpg

    from ghar_core.migrate import migrate_dsn

    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(admin, name)
    await migrate_dsn(dsn, sets)
    return dsn


async def _drop(admin: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _factory(config: pytest.Config) -> Callable[[Settings], App] | None:
    target = str(config.getini("ghar_app") or "").strip()
    if not target:
        return None
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise pytest.UsageError(f"ghar_app = {target!r} is not of the form 'package.module:build'")
    factory: Callable[[Settings], App] = getattr(importlib.import_module(module_name), attr)
    return factory


@pytest.fixture
def ghar_base_settings() -> Settings:
    """The project's test settings (``env/.env.test``, ``GHAR_SETTINGS``); override at will."""
    from ghar_core.config import load_settings

    return load_settings(app_env="test")


@pytest.fixture
def ghar_migrations(
    request: pytest.FixtureRequest, ghar_base_settings: Settings
) -> Sequence[MigrationSet]:
    """The app's migration sets: those its ``"database"`` resource carries."""
    factory = _factory(request.config)
    if factory is None:
        return ()
    from ghar_core.database import Database

    resources = factory(ghar_base_settings).resources  # built, never started: no I/O
    if "database" not in resources:
        return ()
    return tuple(resources.get("database", Database).migrations)


@pytest.fixture
def ghar_admin_dsn(ghar_base_settings: Settings) -> str:
    """The maintenance DSN databases are made on (decided once; see the module doc)."""
    return _server.admin_dsn(ghar_base_settings)


@pytest.fixture
def ghar_database(ghar_admin_dsn: str, ghar_migrations: Sequence[MigrationSet]) -> Iterator[str]:
    """DSN of a throwaway database with the core's and the app's migrations; dropped after."""
    admin = ghar_admin_dsn
    name = f"ghar_test_{uuid.uuid4().hex[:16]}"
    dsn = run_on_private_loop(_create_migrated(admin, name, ghar_migrations))
    try:
        yield dsn
    finally:
        run_on_private_loop(_drop(admin, name))


@_async_fixture
async def ghar_identity_provider() -> AsyncIterator[IdentityProviderServer]:
    """The local identity provider on a free loopback port, stopped after the test."""
    from ghar_core.devtools import IdentityProviderServer

    async with IdentityProviderServer() as server:
        yield server


@pytest.fixture
def ghar_token(ghar_identity_provider: IdentityProviderServer) -> Callable[..., str]:
    """``ghar_token(email=..., **options)``: a real token of the local provider."""

    def mint(email: str = "user@example.com", **options: Any) -> str:
        return ghar_identity_provider.provider.mint_token(email=email, **options)

    return mint


@pytest.fixture
def ghar_settings(
    ghar_base_settings: Settings,
    ghar_database: str,
    ghar_identity_provider: IdentityProviderServer,
) -> Settings:
    """The test settings on the throwaway database and the local provider."""
    return dataclasses.replace(
        ghar_base_settings,
        DATABASE_URL=ghar_database,
        DB_MIGRATE_ON_STARTUP=True,
        **ghar_identity_provider.settings_overrides(),
    )


@pytest.fixture
def ghar_app(request: pytest.FixtureRequest, ghar_settings: Settings) -> App:
    """The app under test (the ini's ``ghar_app`` factory, else the core app)."""
    factory = _factory(request.config)
    if factory is not None:
        return factory(ghar_settings)
    from ghar_core.asgi import create_app

    return create_app(ghar_settings)


@_async_fixture
async def ghar_client(ghar_app: App) -> AsyncIterator[TestClient]:
    """``async with TestClient(ghar_app)``: resources started, stopped after the test."""
    from ghar_core.testing import TestClient

    async with TestClient(ghar_app) as client:
        yield client
