"""Migrations against the real Postgres: namespaced sets, once each, concurrent instances,
the upgrade of the old single-key table, the error messages, PgBouncer and the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import tempfile
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghar_core.cli import main
from ghar_core.config import Settings
from ghar_core.database import Database
from ghar_core.migrate import (
    CORE_NAMESPACE,
    MigrationError,
    MigrationSet,
    apply_migrations,
    load_migrations,
    migrate_dsn,
    migration_status,
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
CORE = [(CORE_NAMESPACE, m.version) for m in load_migrations()]
_OLD_TABLE = """
CREATE TABLE schema_migrations (
    version    text        PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def _app_set(root: Path, namespace: str = "marketplace") -> MigrationSet:
    """An app's set whose 0001 reuses the core's version number."""
    directory = root / namespace
    directory.mkdir()
    (directory / "0001_listings.sql").write_text(
        "CREATE TABLE listings (id bigint PRIMARY KEY, owner uuid REFERENCES users (id));"
    )
    (directory / "0002_listing_title.sql").write_text("ALTER TABLE listings ADD COLUMN title text;")
    return MigrationSet(namespace, directory)


async def _recorded(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await conn.fetch("SELECT namespace, version FROM schema_migrations")
    return sorted((r["namespace"], r["version"]) for r in rows)


async def _columns(dsn: str, table: str = "users") -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1",
            table,
        )
        return {r["column_name"]: r["data_type"] for r in rows}
    finally:
        await conn.close()


# --- loading: file names, namespaces, duplicates ------------------------------------------


def test_package_ships_ordered_migrations() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].label == "ghar_core/0001_users"
    assert migrations[0].filename == "0001_users.sql"
    assert MigrationSet.core() == migrations


def test_bad_file_name_names_the_file_and_the_pattern(tmp_path: Path) -> None:
    (tmp_path / "1_users.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match=r"1_users\.sql: migration files are named NNNN_"):
        load_migrations(tmp_path, namespace="app")


def test_duplicate_versions_name_both_files(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1")
    (tmp_path / "0001_b.sql").write_text("SELECT 2")
    with pytest.raises(MigrationError) as info:
        load_migrations(tmp_path, namespace="app")
    assert "version 0001 of 'app' is used twice (0001_a.sql and 0001_b.sql)" in str(info.value)


def test_an_app_directory_needs_its_own_namespace(tmp_path: Path) -> None:
    (tmp_path / "0001_listings.sql").write_text("SELECT 1")
    # The reported failure: an app's 0001 loaded without a namespace.
    with pytest.raises(MigrationError, match="need a namespace of their own"):
        load_migrations(tmp_path)
    with pytest.raises(MigrationError, match="core's own"):
        MigrationSet(CORE_NAMESPACE, tmp_path)
    with pytest.raises(MigrationError, match="'ghar_core' namespace"):
        load_migrations(namespace="app")
    with pytest.raises(MigrationError, match="does not exist"):
        MigrationSet("app", tmp_path / "missing").load()
    assert [m.label for m in MigrationSet("app", tmp_path).load()] == ["app/0001_listings"]


def test_the_same_version_given_twice_is_refused(tmp_path: Path) -> None:
    app = _app_set(tmp_path)
    with pytest.raises(MigrationError, match="0001 of 'marketplace' is given twice"):
        run_sync(apply_migrations(None, [app, app]))  # type: ignore[arg-type]


_FILE_CHARS = st.sampled_from("0123456789abcz_-.AZ é")
file_names = st.one_of(
    st.builds(
        lambda v, n, ext: f"{v}_{n}{ext}",
        st.integers(0, 12).map(lambda i: f"{i:04d}"),
        st.text("abz09_", min_size=1, max_size=8),
        st.sampled_from([".sql", ".SQL", ".txt", ""]),
    ),
    st.text(_FILE_CHARS, min_size=1, max_size=16).filter(lambda n: n not in (".", "..")),
)


@settings(max_examples=150, deadline=None)
@given(
    names=st.lists(file_names, max_size=6, unique=True),
    undecodable=st.booleans(),
)
def test_any_directory_loads_or_fails_clearly(names: list[str], undecodable: bool) -> None:
    """File names → the right migrations, or a MigrationError naming the file; nothing else."""
    pattern = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            body = b"SELECT \xff" if undecodable and i == 0 else f"SELECT {i};".encode()
            (Path(tmp) / name).write_bytes(body)
        sql_files = [n for n in names if n.lower().endswith(".sql")]
        bad = [n for n in sql_files if not pattern.match(n)]
        versions = [n[:4] for n in sql_files if pattern.match(n)]
        unreadable = undecodable and bool(names) and pattern.match(names[0]) is not None
        refused = bool(bad) or len(set(versions)) < len(versions) or unreadable
        try:
            loaded = load_migrations(tmp, namespace="app")
        except MigrationError as exc:
            message = str(exc)
            assert refused, message
            assert any(n in message for n in sql_files)
            assert any(
                part in message for part in ("NNNN_lower_name.sql", "used twice", "cannot read")
            )
            return
        assert not refused
        assert [m.filename for m in loaded] == sorted(sql_files)
        assert all(m.namespace == "app" for m in loaded)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=70))
def test_namespaces_are_accepted_or_refused_clearly(namespace: str) -> None:
    valid = re.fullmatch(r"[a-z][a-z0-9_]{0,62}", namespace) and namespace != CORE_NAMESPACE
    try:
        made = MigrationSet(namespace, "migrations")
    except MigrationError as exc:
        assert not valid
        assert repr(namespace) in str(exc) or "core's own" in str(exc)
    else:
        assert valid
        assert made.namespace == namespace


# --- applying against the real Postgres -------------------------------------------------


async def test_core_and_app_sets_apply_once_each(fresh_database: str, tmp_path: Path) -> None:
    app = _app_set(tmp_path)
    conn = await asyncpg.connect(fresh_database)
    try:
        applied = await apply_migrations(conn, [app])
        assert [m.label for m in applied] == [
            *(m.label for m in load_migrations()),
            "marketplace/0001_listings",
            "marketplace/0002_listing_title",
        ]
        assert await apply_migrations(conn, [app]) == []
        expected = sorted([*CORE, ("marketplace", "0001"), ("marketplace", "0002")])
        assert await _recorded(conn) == expected
        # A second app reusing version 0001 again is independent of both.
        other = tmp_path / "crm"
        other.mkdir()
        (other / "0001_leads.sql").write_text("CREATE TABLE leads (id int);")
        applied = await apply_migrations(conn, [app, MigrationSet("crm", other)])
        assert [m.label for m in applied] == ["crm/0001_leads"]
    finally:
        await conn.close()
    assert await _columns(fresh_database) == USERS_COLUMNS
    assert await _columns(fresh_database, "listings") == {
        "id": "bigint",
        "owner": "uuid",
        "title": "text",
    }


async def test_concurrent_instances_apply_both_sets_once(
    fresh_database: str, tmp_path: Path
) -> None:
    """Six instances start together: every migration of both sets applied once, none fails."""
    app = _app_set(tmp_path)
    conns = [await asyncpg.connect(fresh_database, statement_cache_size=0) for _ in range(6)]
    try:
        results = await asyncio.gather(*(apply_migrations(c, [app]) for c in conns))
        applied = sorted((m.namespace, m.version) for r in results for m in r)
        expected = sorted([*CORE, ("marketplace", "0001"), ("marketplace", "0002")])
        assert applied == expected
        assert await _recorded(conns[0]) == expected
    finally:
        for c in conns:
            await c.close()


async def test_old_single_key_table_is_upgraded_in_place(
    fresh_database: str, tmp_path: Path
) -> None:
    """A database migrated by the previous code: version PRIMARY KEY, no namespace."""
    core = load_migrations()
    conn = await asyncpg.connect(fresh_database)
    try:
        async with conn.transaction():
            await conn.execute(_OLD_TABLE)
            for m in core:
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
        before = await conn.fetchval("SELECT applied_at FROM schema_migrations LIMIT 1")
        # Status reads the old shape without changing it.
        states = await migration_status(conn)
        assert [(s.namespace, s.version, s.applied_at is not None) for s in states] == [
            (ns, v, True) for ns, v in CORE
        ]
        assert not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
            " WHERE table_name = 'schema_migrations' AND column_name = 'namespace')"
        )
    finally:
        await conn.close()
    app = _app_set(tmp_path)
    conns = [await asyncpg.connect(fresh_database, statement_cache_size=0) for _ in range(4)]
    try:
        results = await asyncio.gather(*(apply_migrations(c, [app]) for c in conns))
        assert sorted(m.label for r in results for m in r) == [
            "marketplace/0001_listings",
            "marketplace/0002_listing_title",
        ]
        conn = conns[0]
        expected = sorted([*CORE, ("marketplace", "0001"), ("marketplace", "0002")])
        assert await _recorded(conn) == expected
        key = await conn.fetch(
            "SELECT a.attname FROM pg_constraint c"
            " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
            " WHERE c.conrelid = 'schema_migrations'::regclass AND c.contype = 'p'"
            " ORDER BY array_position(c.conkey, a.attnum)"
        )
        assert [r["attname"] for r in key] == ["namespace", "version"]
        assert (
            await conn.fetchval(
                "SELECT applied_at FROM schema_migrations WHERE namespace = 'ghar_core' LIMIT 1"
            )
            == before
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ('0001', 'x', 'y')"
            )
    finally:
        for c in conns:
            await c.close()


async def test_version_recorded_under_another_name(fresh_database: str, tmp_path: Path) -> None:
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "0001_listings_old.sql").write_text("CREATE TABLE t (x int);")
    conn = await asyncpg.connect(fresh_database)
    try:
        await apply_migrations(conn, [MigrationSet("marketplace", directory)])
        (directory / "0001_listings_old.sql").rename(directory / "0001_listings.sql")
        (directory / "0001_listings.sql").write_text("CREATE TABLE t2 (x int);")
        with pytest.raises(MigrationError) as info:
            await apply_migrations(conn, [MigrationSet("marketplace", directory)])
        assert (
            "version 0001 of 'marketplace' is recorded as 0001_listings_old "
            "but the file is 0001_listings"
        ) in str(info.value)
        # A pure rename (same text) is accepted and changes nothing.
        (directory / "0001_listings.sql").write_text("CREATE TABLE t (x int);")
        assert await apply_migrations(conn, MigrationSet("marketplace", directory)) == []
        # A row an app wrote into the core's sequence before sets existed.
        await conn.execute(
            "UPDATE schema_migrations SET name = 'listings', checksum = 'x'"
            " WHERE namespace = 'ghar_core'"
        )
        with pytest.raises(MigrationError) as info:
            await apply_migrations(conn)
        message = str(info.value)
        assert "version 0001 of 'ghar_core' is recorded as 0001_listings but the file is" in message
        assert "UPDATE schema_migrations SET namespace = 'yourapp'" in message
    finally:
        await conn.close()


async def test_edited_migration_is_refused(fresh_database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_t.sql").write_text("CREATE TABLE t (x int);")
    conn = await asyncpg.connect(fresh_database)
    try:
        applied = await apply_migrations(conn, load_migrations(tmp_path, namespace="app"))
        assert [m.label for m in applied][-1] == "app/0001_t"
        (tmp_path / "0001_t.sql").write_text("CREATE TABLE t (x bigint);")
        with pytest.raises(MigrationError) as info:
            await apply_migrations(conn, load_migrations(tmp_path, namespace="app"))
        assert "migration 0001_t of 'app' changed after it was applied" in str(info.value)
    finally:
        await conn.close()


async def test_failing_migration_rolls_back_alone(fresh_database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (x int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (x int); SELECT nonsense;")
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(MigrationError, match="app/0002_bad failed"):
            await apply_migrations(conn, [MigrationSet("app", tmp_path)], include_core=False)
        assert await conn.fetchval("SELECT to_regclass('ok') IS NOT NULL")
        assert not await conn.fetchval("SELECT to_regclass('half') IS NOT NULL")
        assert await _recorded(conn) == [("app", "0001")]
    finally:
        await conn.close()


async def test_migrations_work_through_pgbouncer(
    pgbouncer: PgBouncer, fresh_database: str, tmp_path: Path
) -> None:
    dsn = pgbouncer.dsn(fresh_database)
    app = _app_set(tmp_path)
    results = await asyncio.gather(*(migrate_dsn(dsn, [app]) for _ in range(3)))
    labels = sorted(m.label for r in results for m in r)
    assert labels == sorted([m.label for m in load_migrations()] + [m.label for m in app.load()])
    assert await _columns(fresh_database) == USERS_COLUMNS


async def test_migrate_on_startup_applies_the_apps_sets(
    fresh_database: str, db_settings: Settings, tmp_path: Path
) -> None:
    settings = dataclasses.replace(
        db_settings, DATABASE_URL=fresh_database, DB_MIGRATE_ON_STARTUP=True
    )
    database = Database(settings, migrations=[_app_set(tmp_path)])
    await database.start()
    try:
        await database.check()
        async with database.connection() as conn:
            assert await _recorded(conn) == sorted(
                [*CORE, ("marketplace", "0001"), ("marketplace", "0002")]
            )
    finally:
        await database.stop()


# --- the CLI ----------------------------------------------------------------------------


def test_cli_migrate_and_status(
    fresh_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = _app_set(tmp_path)
    pair = ["--dir", str(app.directory), "--namespace", "marketplace"]
    assert main(["migrate", "--dsn", fresh_database, "--status", *pair]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "namespace\tversion\tname\tapplied"
    core = [f"ghar_core\t{m.version}\t{m.name}\tpending" for m in load_migrations()]
    assert core[:2] == ["ghar_core\t0001\tusers\tpending", "ghar_core\t0002\tevent_outbox\tpending"]
    assert out[1:] == [
        *core,
        "marketplace\t0001\tlistings\tpending",
        "marketplace\t0002\tlisting_title\tpending",
    ]
    assert main(["migrate", "--dsn", fresh_database, *pair]) == 0
    applied = ", ".join(m.label for m in load_migrations())
    assert capsys.readouterr().out.strip() == (
        f"applied: {applied}, marketplace/0001_listings, marketplace/0002_listing_title"
    )
    assert main(["migrate", "--dsn", fresh_database, *pair]) == 0
    assert "up to date" in capsys.readouterr().out
    # Without the app's directory its rows are still listed, marked as having no file.
    assert main(["migrate", "--dsn", fresh_database, "--status"]) == 0
    out = capsys.readouterr().out
    assert "pending" not in out
    assert re.search(r"^marketplace\t0001\tlistings\t\S+ \(recorded, no file\)$", out, re.M)
    assert run_sync(_columns(fresh_database)) == USERS_COLUMNS


def test_cli_migrate_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--dsn", "postgresql://x/y", "--dir", str(tmp_path)]) == 2
    assert "in pairs" in capsys.readouterr().err
    args = ["migrate", "--dsn", "postgresql://x/y", "--dir", str(tmp_path), "--namespace"]
    assert main([*args, "ghar_core"]) == 2
    assert "core's own" in capsys.readouterr().err
    assert main([*args, "Bad-Name"]) == 2
    assert "'Bad-Name'" in capsys.readouterr().err


def test_cli_migrate_reports_a_bad_file(
    fresh_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "01_x.sql").write_text("SELECT 1")
    args = ["migrate", "--dsn", fresh_database, "--dir", str(tmp_path), "--namespace", "app"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "migration failed" in err
    assert "01_x.sql" in err
    assert "NNNN_lower_name.sql" in err


def test_cli_migrate_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    dead = with_database("postgresql://postgres@127.0.0.1:5432/x", "x", port=free_port())
    assert main(["migrate", "--dsn", dead]) == 1
    assert "cannot reach the database" in capsys.readouterr().err


async def test_create_app_applies_the_apps_sets_on_startup(
    fresh_database: str, db_settings: Settings, tmp_path: Path
) -> None:
    """``create_app(settings, resources=[...], migrations=[...])``: defaults, the app's own, both.

    The app's resource is a factory of the ones before it and reads the
    app's table in its own start: the migrations ran and the pool is up.
    """
    from ghar_core.asgi.app import create_app
    from ghar_core.database import Database
    from ghar_core.lifecycle import Resources

    settings = dataclasses.replace(
        db_settings, DATABASE_URL=fresh_database, DB_MIGRATE_ON_STARTUP=True
    )
    market = _app_set(tmp_path)
    with pytest.raises(ValueError, match="need the core's resources"):
        create_app(settings, core_resources=False, migrations=[market])

    class Listings:
        name = "listings"

        def __init__(self, resources: Resources) -> None:
            self.db = resources.get("database", Database)
            self.versions: list[str] = []

        async def start(self) -> None:
            async with self.db.connection() as conn:
                rows = await conn.fetch(
                    "SELECT version FROM schema_migrations WHERE namespace = 'marketplace'"
                )
            self.versions = sorted(r["version"] for r in rows)

        async def stop(self) -> None: ...

        async def check(self) -> None: ...

    app = create_app(settings, resources=[Listings], migrations=[market])
    assert app.resources.names == (
        "http_clients",
        "database",
        "auth",
        "broker",
        "sse",
        "websocket",
        "listings",
    )
    async with app.lifespan():
        assert app.resources.get("listings", Listings).versions[-1] == "0002"
        conn = await asyncpg.connect(fresh_database)
        try:
            assert ("marketplace", "0002") in await _recorded(conn)
        finally:
            await conn.close()


async def test_the_publish_migrations_apply_on_a_database_that_has_0004(
    fresh_database: str,
) -> None:
    # A database migrated before 0003, 0005, 0006 existed (0001, 0002, 0004): they
    # are applied after 0004, once, and the function publishes as 0002's did, for a
    # batch of one event (0005's own path) and of several. Since 0006 a caller's five
    # arguments still work (the defaults: durable, the id range in the NOTIFY), and
    # with p_carry a small batch carries a copy of its rows instead of their id range.
    core = load_migrations()
    earlier = [m for m in core if m.version not in ("0003", "0005", "0006")]
    conn = await asyncpg.connect(fresh_database)
    notes: list[str] = []
    carried = False
    await conn.add_listener("t_ch", lambda *args: notes.append(args[3]))

    async def publish(streams: list[str]) -> list[tuple[str, str, int]]:
        args = [streams, ["t"] * len(streams), [b"{}"] * len(streams), uuid.uuid4(), "t_ch"]
        if carried:
            args += [True, True]
        rows = await conn.fetch(
            "SELECT id, stream, epoch, position FROM ghar_event_publish("
            + ", ".join(f"${n}" for n in range(1, len(args) + 1))
            + ")",
            *args,
        )
        ids = [r["id"] for r in rows]
        await asyncio.sleep(0.05)
        note = notes.pop()
        if carried:  # since 0006: a copy of the committed rows, in id order
            assert [r[:6] for r in orjson.loads(note)] == [
                [r["id"], r["stream"], r["epoch"], r["position"], "t", "e30="]  # b"{}"
                for r in rows
            ]
        else:
            assert note == f"{min(ids)} {max(ids)}"
        return [(r["stream"], r["epoch"], r["position"]) for r in rows]

    try:
        assert [m.version for m in await apply_migrations(conn, [earlier])] == [
            "0001",
            "0002",
            "0004",
        ]
        before = [await publish(["a"]), await publish(["b", "a", "b"]), await publish(["c"])]
        assert [m.version for m in await apply_migrations(conn)] == [
            "0003",
            "0005",
            "0006",
        ]
        assert await apply_migrations(conn) == []
        carried = True
        assert (
            await conn.fetchval(
                "SELECT l.lanname FROM pg_proc p JOIN pg_language l"
                " ON l.oid = p.prolang WHERE p.proname = 'ghar_event_publish'"
            )
            == "plpgsql"
        )
        after = [await publish(["a"]), await publish(["b", "a", "b"]), await publish(["d"])]
        carried = False  # five arguments after 0006: the id range, as before it
        after += [await publish(["a"]), await publish(["b", "a"])]
    finally:
        await conn.close()
    epochs = {s: e for batch in before for s, e, _ in batch}
    assert [[(s, p) for s, _, p in b] for b in before] == [
        [("a", 1)],
        [("a", 2), ("b", 1), ("b", 2)],
        [("c", 1)],
    ]
    assert [[(s, p) for s, _, p in b] for b in after] == [
        [("a", 3)],
        [("a", 4), ("b", 3), ("b", 4)],
        [("d", 1)],
        [("a", 5)],
        [("a", 6), ("b", 5)],
    ]
    # The epochs are the streams' own, kept across the upgrade; a new stream gets one.
    assert all(e == epochs[s] for b in after[:2] for s, e, _ in b)
    assert len(after[2][0][1]) == 16
