"""``ghar-core serve`` freezes the startup heap once the app's lifespan has started."""

from __future__ import annotations

from typing import Any

import pytest

import ghar_core.logging
import ghar_core.server as server
from ghar_core.asgi import App, create_app
from ghar_core.config import load_settings


def test_the_served_app_freezes_after_its_lifespan_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(server.SERVE_APP_ENV, raising=False)
    monkeypatch.setattr(ghar_core.logging, "configure_logging", lambda settings: None)
    app = server.create_app_for_server()
    assert isinstance(app, App)
    assert app.lifespan_manager.after_startup is server.freeze_startup_heap


async def test_after_startup_runs_once_the_resources_started() -> None:
    app = create_app(load_settings(app_env="test", environ={}), core_resources=False)
    calls: list[bool] = []
    app.lifespan_manager.after_startup = lambda: calls.append(app.lifespan_manager.started)
    async with app.lifespan():
        assert calls == [True]
    assert calls == [True]


def test_freeze_collects_then_freezes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fake: Any = type(
        "FakeGC",
        (),
        {
            "collect": staticmethod(lambda: calls.append("collect")),
            "freeze": staticmethod(lambda: calls.append("freeze")),
        },
    )
    monkeypatch.setattr(server, "gc", fake)
    monkeypatch.setattr(server, "_frozen", False)
    server.freeze_startup_heap()
    server.freeze_startup_heap()
    assert calls == ["collect", "freeze"]
