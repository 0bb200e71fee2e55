"""The README's code examples run as written (a newcomer copies them first)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import require
from tests.pg import postgres_available

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_the_readme_has_its_examples() -> None:
    assert len(BLOCKS) >= 3


async def test_use_it_example_serves_and_refuses_a_missing_token() -> None:
    require(postgres_available(), "PostgreSQL on 127.0.0.1:5432")
    namespace: dict[str, object] = {}
    exec(compile(BLOCKS[0], "README.md[use-it]", "exec"), namespace)
    exec(compile(BLOCKS[1], "README.md[testing]", "exec"), namespace)
    await namespace["test_property_needs_a_token"]()  # type: ignore[operator]


async def test_real_token_example_runs_against_a_fresh_database(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The example reads the process settings: point them at a throwaway
    # database that migrates on startup, as a newcomer's env file would.
    monkeypatch.setenv("DATABASE_URL", fresh_database)
    monkeypatch.setenv("DB_MIGRATE_ON_STARTUP", "true")
    namespace: dict[str, object] = {}
    exec(compile(BLOCKS[2], "README.md[real-token]", "exec"), namespace)
    await namespace["test_me_with_a_real_token"]()  # type: ignore[operator]


def test_own_migrations_example_builds_an_app(tmp_path: Path) -> None:
    (block,) = [b for b in BLOCKS if "MigrationSet(" in b]
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "0001_listings.sql").write_text("CREATE TABLE listings (id int);")
    namespace: dict[str, object] = {"__file__": str(tmp_path / "app.py")}
    exec(compile(block, "README.md[migrations]", "exec"), namespace)
    database = namespace["app"].resources.get("database")  # type: ignore[attr-defined]
    assert [s.namespace for s in database.migrations] == ["marketplace"]


def test_event_stream_example_emits() -> None:
    from ghar_core.sse import SSEEventBus, set_default_bus
    from tests.asgi.sse_support import sse_settings

    (block,) = [b for b in BLOCKS if "sse_bus.emit" in b]
    bus = SSEEventBus(sse_settings(), handle_signals=False)
    previous = set_default_bus(bus)
    try:
        namespace: dict[str, object] = {}
        exec(compile(block, "README.md[event-stream]", "exec"), namespace)
    finally:
        set_default_bus(previous)
    assert namespace["delivered"] == 0  # nobody is listening
    assert bus.stats()["emitted"] == 1


async def test_retries_example_applies_a_payment_once(db: object) -> None:
    (block,) = [b for b in BLOCKS if "record_payment" in b]
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md[retries]", "exec"), namespace)
    async with db.connection() as conn:  # type: ignore[attr-defined]
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS payments"
            " (request_id text PRIMARY KEY, booking_id int, amount int)"
        )
    record = namespace["record_payment"]
    assert await record(db, "req-1", 42, 500) is True  # type: ignore[operator]
    assert await record(db, "req-1", 42, 500) is False  # type: ignore[operator]
    async with db.connection() as conn:  # type: ignore[attr-defined]
        assert await conn.fetchval("SELECT count(*) FROM payments") == 1


def test_app_settings_example_loads_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = [b for b in BLOCKS if "class ListingsSettings(Settings)" in b]
    monkeypatch.setenv("APP_ENV", "test")
    monkeypatch.setenv("GEOCODER_KEY", "geo-secret")
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md[app-settings]", "exec"), namespace)
    loaded = namespace["settings"]
    assert type(loaded).__name__ == "ListingsSettings"
    assert loaded.GEOCODER_URL == "http://127.0.0.1:8081"  # type: ignore[attr-defined]
    assert "geo-secret" not in repr(loaded)
