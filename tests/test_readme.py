"""The README's code examples run as written (a newcomer copies them first)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_the_readme_has_its_examples() -> None:
    assert len(BLOCKS) >= 3


def _service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The README's myservice/main.py, executed as a module (dataclasses look it up)."""
    (block,) = [b for b in BLOCKS if "def build(" in b]
    module = types.ModuleType("readme_myservice")
    module.__file__ = str(tmp_path / "main.py")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(block, "README.md[use-it]", "exec"), module.__dict__)
    return module.__dict__


def test_use_it_example_builds_the_core_and_its_own_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run for real by tests/test_fresh_project.py; here: what it declares is wired."""
    from ghar_core.config import load_settings
    from ghar_core.http import HTTPClients

    service = _service(tmp_path, monkeypatch)
    settings = load_settings(
        app_env="test", schema=service["ServiceSettings"], environ={"GEOCODER_URL": "http://g:1"}
    )
    app = service["build"](settings)
    assert app.resources.names[-1] == "geocoder"  # after the core's
    spec = app.resources.get("http_clients", HTTPClients).specs["geocoder"]
    assert spec.base_url == "http://g:1"
    database = app.resources.get("database")
    assert [s.namespace for s in database.migrations] == ["myservice"]


async def test_real_token_example_with_the_plugins_fixtures(
    ghar_client: Any, ghar_token: Any
) -> None:
    """The README's test, with this repository's own plugin fixtures (the core app)."""
    (block,) = [b for b in BLOCKS if "def test_me_with_a_real_token" in b]
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md[test-it]", "exec"), namespace)
    await namespace["test_me_with_a_real_token"](ghar_client, ghar_token)


def test_own_migrations_example_builds_an_app(tmp_path: Path) -> None:
    (block,) = [b for b in BLOCKS if "MigrationSet(" in b and "def build(" not in b]
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "0001_listings.sql").write_text("CREATE TABLE listings (id int);")
    namespace: dict[str, object] = {"__file__": str(tmp_path / "app.py")}
    exec(compile(block, "README.md[migrations]", "exec"), namespace)
    database = namespace["app"].resources.get("database")  # type: ignore[attr-defined]
    assert [s.namespace for s in database.migrations] == ["marketplace"]


def test_event_stream_example_emits() -> None:
    from ghar_core.sse import SSEEventBus, set_default_bus
    from tests.asgi.sse_support import sse_settings

    (block,) = [b for b in BLOCKS if "delivered = sse_bus.emit" in b]
    bus = SSEEventBus(sse_settings(), handle_signals=False)
    previous = set_default_bus(bus)
    try:
        namespace: dict[str, object] = {}
        exec(compile(block, "README.md[event-stream]", "exec"), namespace)
    finally:
        set_default_bus(previous)
    assert namespace["delivered"] == 0  # nobody is listening
    assert bus.stats()["emitted"] == 1


async def test_websocket_example_publishes_to_the_default_manager() -> None:
    import ghar_core.websocket as ws
    from ghar_core.websocket import ConnectionManager
    from tests.asgi.sse_support import sse_settings

    (block,) = [b for b in BLOCKS if "manager.register_job" in b]
    previous, ws._default = ws._default, ConnectionManager(sse_settings(), handle_signals=False)
    try:
        namespace: dict[str, object] = {}
        exec(compile(block, "README.md[websocket]", "exec"), namespace)
        await namespace["render_tour"]("job-7", "owner", "user")  # type: ignore[operator]
        stats = ws._default.stats()
    finally:
        ws._default = previous
    assert stats["published"] == 3  # nobody connected: published, delivered to none
    assert stats["jobs"] == 0  # the completion released the registration


async def test_tell_the_user_example_reaches_both_transports() -> None:
    import ghar_core.websocket as ws
    from ghar_core.sse import SSEEventBus, set_default_bus
    from ghar_core.websocket import ConnectionManager
    from tests.asgi.sse_support import sse_settings

    (block,) = [b for b in BLOCKS if "def on_booking_confirmed" in b]
    bus = SSEEventBus(sse_settings(), handle_signals=False)
    previous_bus = set_default_bus(bus)
    manager = ConnectionManager(sse_settings(), sse=bus, handle_signals=False)
    previous, ws._default = ws._default, manager
    try:
        async with bus.subscribe("user-1") as subscription:
            namespace: dict[str, object] = {}
            exec(compile(block, "README.md[tell-the-user]", "exec"), namespace)
            await namespace["on_booking_confirmed"]("user-1", 42)  # type: ignore[operator]
            taken = subscription.take()
    finally:
        ws._default = previous
        set_default_bus(previous_bus)
    assert taken is not None
    assert [event.type for event in taken] == ["booking.confirmed", "notification"]
    assert manager.stats()["published"] == 1


def test_fastapi_host_example_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run for real by tests/asgi/test_hosts.py; here: the README's code as written builds."""
    (block,) = [b for b in BLOCKS if "fastapi_current_user(core)" in b]
    module = types.ModuleType("readme_host")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(block, "README.md[hosts]", "exec"), module.__dict__)
    api = module.__dict__["api"]
    paths = {getattr(route, "path", None) for route in api.routes}
    assert {"/listings/mine", "/core"} <= paths


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
