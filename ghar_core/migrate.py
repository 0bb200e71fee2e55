"""Ordered SQL migrations in namespaced sets, each applied once, safe when instances start together.

A *migration set* is a directory of ``NNNN_lower_name.sql`` files with a
namespace of its own. The core's set is the package's
``ghar_core/migrations/`` under the namespace ``"ghar_core"``
(:data:`CORE_NAMESPACE`); an app built on the core keeps its tables in its
own set, so its ``0001_listings.sql`` never collides with the core's
``0001_users.sql``::

    from pathlib import Path
    from ghar_core.migrate import MigrationSet, apply_migrations

    MARKETPLACE = MigrationSet("marketplace", Path(__file__).parent / "migrations")

    await apply_migrations(conn, [MARKETPLACE])     # core first, then marketplace
    Database(settings, migrations=[MARKETPLACE])    # same, on DB_MIGRATE_ON_STARTUP
    # shell: ghar-core migrate --dir app/migrations --namespace marketplace [--status]

With ``create_app``, name the sets (``DB_MIGRATE_ON_STARTUP`` then applies
core and app sets)::

    app = create_app(settings, migrations=[MARKETPLACE])

``schema_migrations`` is keyed by ``(namespace, version)``. Sets are applied
core first, then the given sets in the order given, each in version order.
Each migration runs in its own transaction that first takes
``pg_advisory_xact_lock`` on a fixed key, then (re)checks
``schema_migrations``: two instances starting together serialise on the lock
and the second finds the migration recorded and skips it.

Why a *transaction* advisory lock: a session lock (``pg_advisory_lock``)
outlives the statement and, behind PgBouncer in transaction mode, may be
taken on one server connection and "released" on another. The transaction
lock is released by the COMMIT itself, so migrations work the same through
PgBouncer or on a direct connection.

Databases migrated before sets existed have ``schema_migrations`` keyed by
``version`` alone. The first run of this code upgrades that table in place,
in one transaction under the same lock: the ``namespace`` column is added
with the default ``'ghar_core'`` (every old row was the core's, unless an app
wrote its files into the same sequence: move those rows with ``UPDATE
schema_migrations SET namespace = 'yours' WHERE name IN (...)``) and the
primary key becomes ``(namespace, version)``.

Refused with a :class:`MigrationError` that names the file or the recorded
row: a file named other than ``NNNN_lower_name.sql``, two files of one set
sharing a version, a recorded migration whose text changed (write a new
migration instead) or whose version is recorded under another name, a set
without a namespace, and any other set claiming ``"ghar_core"``.

Entry points: :func:`apply_migrations` on any asyncpg connection (used by
``Database.start``/``check`` when ``DB_MIGRATE_ON_STARTUP`` is true),
:func:`migration_status`, and ``ghar-core migrate`` (:func:`migrate_dsn`),
which opens and closes its own direct connection.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

import asyncpg

__all__ = [
    "CORE_NAMESPACE",
    "MIGRATION_LOCK_KEY",
    "Migration",
    "MigrationError",
    "MigrationSet",
    "MigrationState",
    "apply_migrations",
    "load_migrations",
    "migrate_dsn",
    "migration_status",
]

#: Key of the advisory lock every migrating instance takes ("ghar" + 1).
MIGRATION_LOCK_KEY: Final = 0x6768_6172_0000_0001
#: Namespace of the package's own migrations.
CORE_NAMESPACE: Final = "ghar_core"
_FILE_PATTERN: Final = "NNNN_lower_name.sql (four digits, '_', then a-z, 0-9 and '_')"
_NAME_RE: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_NAMESPACE_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_TABLE_SQL: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    namespace  text        NOT NULL DEFAULT 'ghar_core',
    version    text        NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, version)
)
"""
_HAS_NAMESPACE_SQL: Final = """
SELECT EXISTS (
    SELECT 1 FROM pg_attribute
    WHERE attrelid = 'schema_migrations'::regclass AND attname = 'namespace'
      AND NOT attisdropped
)
"""


class MigrationError(Exception):
    """A migration file or set is malformed, changed after being applied, or failed."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file of a set: ``namespace``, ``version`` ("0001"), ``name`` ("users")."""

    version: str
    name: str
    sql: str
    checksum: str
    namespace: str = CORE_NAMESPACE

    @property
    def filename(self) -> str:
        """The file it was read from, e.g. ``0001_users.sql``."""
        return f"{self.version}_{self.name}.sql"

    @property
    def label(self) -> str:
        """``namespace/NNNN_name``, as logs and the CLI print it."""
        return f"{self.namespace}/{self.version}_{self.name}"


@dataclass(frozen=True, slots=True)
class MigrationSet:
    """A directory of migrations under a namespace of its own.

    The files are read by :meth:`load` each time the set is applied, so a
    set can be built at import time. ``"ghar_core"`` is reserved for the
    package's set (:meth:`core`).
    """

    namespace: str
    directory: str | Path

    def __post_init__(self) -> None:
        _check_namespace(self.namespace)
        if self.namespace == CORE_NAMESPACE:
            raise MigrationError(
                f"namespace {CORE_NAMESPACE!r} is the core's own; give your set its own name"
            )

    @staticmethod
    def core() -> list[Migration]:
        """The package's migrations (namespace ``"ghar_core"``)."""
        return load_migrations()

    def load(self) -> list[Migration]:
        """This set's migrations, sorted by version (see :func:`load_migrations`)."""
        return load_migrations(self.directory, namespace=self.namespace)


@dataclass(frozen=True, slots=True)
class MigrationState:
    """One row of :func:`migration_status`.

    ``applied_at`` is ``None`` for a pending migration; ``has_file`` is false
    for a recorded migration no given set has a file for.
    """

    namespace: str
    version: str
    name: str
    applied_at: datetime | None
    has_file: bool


def _check_namespace(namespace: object) -> None:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise MigrationError(
            f"migration namespace {namespace!r} must be 1-63 characters of a-z, 0-9 and '_', "
            "starting with a letter"
        )


def load_migrations(
    directory: str | Path | None = None, *, namespace: str | None = None
) -> list[Migration]:
    """The migrations in ``directory`` under ``namespace``, sorted by version.

    Without ``directory``: the package's own set (namespace ``"ghar_core"``).
    An app's directory needs its own ``namespace`` (there is no default, so
    an app's ``0001`` cannot land on the core's). Files ending in ``.sql``
    but not named ``NNNN_lower_name.sql`` are refused, as are two files
    sharing a version, so a typo cannot silently skip a migration.
    """
    root: Any
    if directory is None:
        if namespace not in (None, CORE_NAMESPACE):
            raise MigrationError("the package's migrations are the 'ghar_core' namespace")
        namespace = CORE_NAMESPACE
        root = resources.files("ghar_core").joinpath("migrations")
    else:
        if namespace is None:
            raise MigrationError(
                f"migrations in {directory} need a namespace of their own: "
                "load_migrations(directory, namespace='yourapp') or MigrationSet('yourapp', ...)"
            )
        _check_namespace(namespace)
        root = Path(directory)
        if not root.is_dir():
            raise MigrationError(f"migration directory {directory} does not exist")
    found: dict[str, Migration] = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.lower().endswith(".sql"):
            continue
        match = _NAME_RE.fullmatch(entry.name)
        if match is None or not entry.is_file():
            raise MigrationError(
                f"{_where(directory, entry.name)}: migration files are named {_FILE_PATTERN}"
            )
        version, name = match.groups()
        if version in found:
            raise MigrationError(
                f"{_where(directory, entry.name)}: version {version} of {namespace!r} is used "
                f"twice ({found[version].filename} and {entry.name}); renumber one of them"
            )
        try:
            sql = entry.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MigrationError(
                f"{_where(directory, entry.name)}: cannot read: {type(exc).__name__}: {exc}"
            ) from exc
        checksum = hashlib.sha256(sql.encode("utf-8")).hexdigest()
        found[version] = Migration(version, name, sql, checksum, namespace)
    return [found[v] for v in sorted(found)]


def _where(directory: str | Path | None, filename: str) -> str:
    return str(Path(directory) / filename) if directory is not None else filename


def _plan(
    sets: Iterable[MigrationSet | Migration | Sequence[Migration]], include_core: bool
) -> list[Migration]:
    """Core first (unless given or excluded), then the given sets in order; no duplicates."""
    given: list[Migration] = []
    for item in [sets] if isinstance(sets, MigrationSet) else sets:
        if isinstance(item, MigrationSet):
            given.extend(item.load())
        elif isinstance(item, Migration):
            given.append(item)
        else:
            given.extend(item)
    has_core = any(m.namespace == CORE_NAMESPACE for m in given)
    ordered = (load_migrations() if include_core and not has_core else []) + given
    seen: dict[tuple[str, str], Migration] = {}
    for migration in ordered:
        key = (migration.namespace, migration.version)
        if key in seen:
            raise MigrationError(
                f"version {migration.version} of {migration.namespace!r} is given twice "
                f"({seen[key].filename} and {migration.filename})"
            )
        seen[key] = migration
    return ordered


async def _ensure_table(conn: asyncpg.Connection) -> None:
    """Create ``schema_migrations`` or upgrade the old single-key shape, under the lock."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(_TABLE_SQL)
        if await conn.fetchval(_HAS_NAMESPACE_SQL):
            return
        primary_key = await conn.fetchval(
            "SELECT conname FROM pg_constraint"
            " WHERE conrelid = 'schema_migrations'::regclass AND contype = 'p'"
        )
        await conn.execute(
            "ALTER TABLE schema_migrations ADD COLUMN namespace text NOT NULL DEFAULT 'ghar_core'"
        )
        if primary_key is not None:
            quoted = '"' + str(primary_key).replace('"', '""') + '"'
            await conn.execute(f"ALTER TABLE schema_migrations DROP CONSTRAINT {quoted}")
        await conn.execute("ALTER TABLE schema_migrations ADD PRIMARY KEY (namespace, version)")


def _changed(migration: Migration, recorded_name: str) -> MigrationError:
    if recorded_name != migration.name:
        hint = "restore the file or give the new migration the next free version"
        if migration.namespace == CORE_NAMESPACE:
            hint += (
                " (if an app recorded that row before migration sets existed, move it: "
                f"UPDATE schema_migrations SET namespace = 'yourapp' WHERE namespace = "
                f"'{CORE_NAMESPACE}' AND version = '{migration.version}')"
            )
        return MigrationError(
            f"version {migration.version} of {migration.namespace!r} is recorded as "
            f"{migration.version}_{recorded_name} but the file is "
            f"{migration.version}_{migration.name}; a recorded version is never re-run: {hint}"
        )
    return MigrationError(
        f"migration {migration.version}_{migration.name} of {migration.namespace!r} changed "
        "after it was applied (checksum differs); add a new migration instead of editing "
        "an applied one"
    )


async def apply_migrations(
    conn: asyncpg.Connection,
    sets: Iterable[MigrationSet | Migration | Sequence[Migration]] = (),
    *,
    include_core: bool = True,
) -> list[Migration]:
    """Apply the pending migrations on ``conn``; return the ones applied now, in order.

    ``sets``: :class:`MigrationSet` objects or lists from
    :func:`load_migrations`, applied after the core's set (which is added
    unless ``include_core=False`` or it is given explicitly). Each
    migration: one transaction, advisory lock first, skip if recorded. A
    failing migration rolls back alone and raises :class:`MigrationError`
    naming it; the ones before it stay applied.
    """
    todo = _plan(sets, include_core)
    await _ensure_table(conn)
    applied: list[Migration] = []
    for migration in todo:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            recorded = await conn.fetchrow(
                "SELECT name, checksum FROM schema_migrations"
                " WHERE namespace = $1 AND version = $2",
                migration.namespace,
                migration.version,
            )
            if recorded is not None:
                if recorded["checksum"] != migration.checksum:
                    raise _changed(migration, recorded["name"])
                continue
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.label} failed: {type(exc).__name__}: {exc}"
                ) from exc
            await conn.execute(
                "INSERT INTO schema_migrations (namespace, version, name, checksum)"
                " VALUES ($1, $2, $3, $4)",
                migration.namespace,
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied.append(migration)
    return applied


async def migration_status(
    conn: asyncpg.Connection,
    sets: Iterable[MigrationSet | Migration | Sequence[Migration]] = (),
    *,
    include_core: bool = True,
) -> list[MigrationState]:
    """Every known migration (core first, then ``sets``) and every recorded one.

    Read-only: an old single-key table is read as all ``"ghar_core"``, not
    upgraded. Recorded rows without a file come after the known ones,
    sorted by namespace and version.
    """
    known = _plan(sets, include_core)
    done: dict[tuple[str, str], tuple[str, datetime]] = {}
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        namespace = "namespace" if await conn.fetchval(_HAS_NAMESPACE_SQL) else "'ghar_core'"
        rows = await conn.fetch(
            f"SELECT {namespace} AS namespace, version, name, applied_at FROM schema_migrations"
        )
        done = {(r["namespace"], r["version"]): (r["name"], r["applied_at"]) for r in rows}
    states = [
        MigrationState(
            m.namespace,
            m.version,
            m.name,
            done[(m.namespace, m.version)][1] if (m.namespace, m.version) in done else None,
            True,
        )
        for m in known
    ]
    files = {(m.namespace, m.version) for m in known}
    for key in sorted(set(done) - files):
        name, applied_at = done[key]
        states.append(MigrationState(key[0], key[1], name, applied_at, False))
    return states


async def migrate_dsn(
    dsn: str,
    sets: Iterable[MigrationSet | Migration | Sequence[Migration]] = (),
    *,
    connect_timeout: float = 10.0,
) -> list[Migration]:
    """Open a direct connection to ``dsn``, apply the core's and ``sets``' pending ones, close."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=connect_timeout)
    try:
        return await apply_migrations(conn, sets)
    finally:
        await conn.close(timeout=connect_timeout)
