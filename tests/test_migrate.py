"""Migrations against the real Postgres: once each, concurrent instances, PgBouncer, CLI."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import asyncpg
import pytest

from ghar_core.cli import main
from ghar_core.config import Settings
from ghar_core.database import Database
from ghar_core.migrate import (
    MigrationError,
    apply_migrations,
    load_migrations,
    migrate_dsn,
)
from tests.pg import PgBouncer, free_port, run_sync, with_database

USERS_COLUMNS = {
    "id": "uuid",
    "supabase_user_id": "uuid",
    "email": "text",
    "phone": "text",
    "full_name": "text",
    "role": "text",
    "app_metadata": "jsonb",
    "user_metadata": "jsonb",
    "created_at": "timestamp with time zone",
    "updated_at": "timestamp with time zone",
    "last_seen_at": "timestamp with time zone",
}


def test_package_ships_ordered_migrations() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].version == "0001"
    assert migrations[0].name == "users"


def test_bad_file_names_and_duplicates_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1_users.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="NNNN"):
        load_migrations(tmp_path)
    (tmp_path / "1_users.sql").unlink()
    (tmp_path / "0001_a.sql").write_text("SELECT 1")
    (tmp_path / "0001_b.sql").write_text("SELECT 2")
    with pytest.raises(MigrationError, match="twice"):
        load_migrations(tmp_path)


async def _columns(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = 'users'"
        )
        return {r["column_name"]: r["data_type"] for r in rows}
    finally:
        await conn.close()


async def test_concurrent_instances_apply_each_once(fresh_database: str) -> None:
    """Six instances start together: every migration applied once, none fails."""
    conns = [await asyncpg.connect(fresh_database, statement_cache_size=0) for _ in range(6)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
        expected = [m.version for m in load_migrations()]
        assert sorted(v for r in results for v in r) == expected
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == expected
        assert await apply_migrations(conns[0]) == []
    finally:
        for c in conns:
            await c.close()
    assert await _columns(fresh_database) == USERS_COLUMNS


async def test_edited_migration_is_refused(fresh_database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_t.sql").write_text("CREATE TABLE t (x int);")
    conn = await asyncpg.connect(fresh_database)
    try:
        assert await apply_migrations(conn, load_migrations(tmp_path)) == ["0001"]
        (tmp_path / "0001_t.sql").write_text("CREATE TABLE t (x bigint);")
        with pytest.raises(MigrationError, match="changed"):
            await apply_migrations(conn, load_migrations(tmp_path))
    finally:
        await conn.close()


async def test_failing_migration_rolls_back_alone(fresh_database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (x int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (x int); SELECT nonsense;")
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(MigrationError, match="0002_bad"):
            await apply_migrations(conn, load_migrations(tmp_path))
        assert await conn.fetchval("SELECT to_regclass('ok') IS NOT NULL")
        assert not await conn.fetchval("SELECT to_regclass('half') IS NOT NULL")
        versions = await conn.fetch("SELECT version FROM schema_migrations")
        assert [r["version"] for r in versions] == ["0001"]
    finally:
        await conn.close()


async def test_migrations_work_through_pgbouncer(pgbouncer: PgBouncer, fresh_database: str) -> None:
    dsn = pgbouncer.dsn(fresh_database)
    results = await asyncio.gather(*(migrate_dsn(dsn) for _ in range(3)))
    assert sorted(v for r in results for v in r) == [m.version for m in load_migrations()]
    assert await _columns(fresh_database) == USERS_COLUMNS


async def test_migrate_on_startup(fresh_database: str, db_settings: Settings) -> None:
    settings = dataclasses.replace(
        db_settings, DATABASE_URL=fresh_database, DB_MIGRATE_ON_STARTUP=True
    )
    database = Database(settings)
    await database.start()
    try:
        await database.check()
        async with database.connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 1
    finally:
        await database.stop()


def test_cli_migrate_and_status(fresh_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--dsn", fresh_database, "--status"]) == 0
    assert "pending" in capsys.readouterr().out
    assert main(["migrate", "--dsn", fresh_database]) == 0
    assert "applied: 0001" in capsys.readouterr().out
    assert main(["migrate", "--dsn", fresh_database]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["migrate", "--dsn", fresh_database, "--status"]) == 0
    assert "pending" not in capsys.readouterr().out
    assert run_sync(_columns(fresh_database)) == USERS_COLUMNS


def test_cli_migrate_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    dead = with_database("postgresql://postgres@127.0.0.1:5432/x", "x", port=free_port())
    assert main(["migrate", "--dsn", dead]) == 1
    assert "cannot reach the database" in capsys.readouterr().err
