"""Ordered SQL migrations, each applied once, safe when instances start together.

The migrations are the package's ``ghar_core/migrations/NNNN_name.sql``
files, applied in version order. Each runs in its own transaction that first
takes ``pg_advisory_xact_lock`` on a fixed key, then (re)checks the
``schema_migrations`` table: two instances starting together serialise on
the lock and the second finds the version already recorded and skips it.

Why a *transaction* advisory lock: a session lock (``pg_advisory_lock``)
outlives the statement and, behind PgBouncer in transaction mode, may be
taken on one server connection and "released" on another. The transaction
lock is released by the COMMIT itself, so migrations work the same through
PgBouncer or on a direct connection. A recorded migration whose file has
changed since (checksum mismatch) is refused, not re-run: write a new one.

Entry points: :func:`apply_migrations` on any asyncpg connection (used by
``Database.start`` when ``DB_MIGRATE_ON_STARTUP`` is true), and
``ghar-core migrate`` (``migrate_dsn``), which opens and closes its own
direct connection.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

import asyncpg

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "load_migrations",
    "migrate_dsn",
    "migration_status",
]

#: Key of the advisory lock every migrating instance takes ("ghar" + 1).
MIGRATION_LOCK_KEY: Final = 0x6768_6172_0000_0001
_NAME_RE: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_TABLE_SQL: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text        PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """A migration file is malformed, changed after being applied, or failed."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: ``version`` ("0001"), ``name`` ("users"), its text and sha256."""

    version: str
    name: str
    sql: str
    checksum: str


def load_migrations(directory: str | Path | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default: the package's), sorted by version.

    Files not named ``NNNN_name.sql`` are refused, as are two files sharing
    a version, so a typo cannot silently skip a migration.
    """
    root: Any = Path(directory) if directory is not None else resources.files("ghar_core")
    if directory is None:
        root = root.joinpath("migrations")
    found: dict[str, Migration] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME_RE.match(entry.name)
        if match is None:
            raise MigrationError(f"{entry.name}: migration files are named NNNN_lower_name.sql")
        version, name = match.groups()
        if version in found:
            raise MigrationError(f"{entry.name}: version {version} is used twice")
        sql = entry.read_text(encoding="utf-8")
        checksum = hashlib.sha256(sql.encode("utf-8")).hexdigest()
        found[version] = Migration(version, name, sql, checksum)
    return [found[v] for v in sorted(found)]


async def apply_migrations(
    conn: asyncpg.Connection, migrations: list[Migration] | None = None
) -> list[str]:
    """Apply the pending ``migrations`` on ``conn``; return the versions applied now.

    Each migration: one transaction, advisory lock first, skip if recorded.
    A failing migration rolls back alone and raises :class:`MigrationError`
    naming it; the ones before it stay applied.
    """
    todo = load_migrations() if migrations is None else migrations
    applied: list[str] = []
    for migration in todo:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(_TABLE_SQL)
            recorded = await conn.fetchval(
                "SELECT checksum FROM schema_migrations WHERE version = $1", migration.version
            )
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version}_{migration.name} changed after it was "
                        "applied; add a new migration instead of editing an applied one"
                    )
                continue
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.version}_{migration.name} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied.append(migration.version)
    return applied


async def migration_status(conn: asyncpg.Connection) -> list[tuple[Migration, datetime | None]]:
    """Every known migration with when it was applied (``None``: pending)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done: dict[str, datetime] = {}
    if exists:
        rows = await conn.fetch("SELECT version, applied_at FROM schema_migrations")
        done = {r["version"]: r["applied_at"] for r in rows}
    return [(m, done.get(m.version)) for m in load_migrations()]


async def migrate_dsn(dsn: str, *, connect_timeout: float = 10.0) -> list[str]:
    """Open a direct connection to ``dsn``, apply pending migrations, close it."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=connect_timeout)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close(timeout=connect_timeout)
