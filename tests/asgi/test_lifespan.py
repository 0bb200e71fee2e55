"""One lifespan: ASGI lifespan events, lazy start once, mounting, /health and /ready."""

from __future__ import annotations

import asyncio

import pytest

from ghar_core.asgi import create_app
from ghar_core.config import Settings
from ghar_core.lifecycle import LifecycleError
from ghar_core.testing import TestClient
from tests.asgi.conftest import make_settings


class Counting:
    """An in-memory resource that counts starts and can be made to fail."""

    def __init__(self, name: str = "counting", *, start_delay: float = 0.0) -> None:
        self.name = name
        self.starts = 0
        self.stops = 0
        self.start_delay = start_delay
        self.fail_start = False
        self.fail_check = False

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.fail_start:
            raise ConnectionError("dependency down")
        self.starts += 1

    async def stop(self) -> None:
        self.stops += 1

    async def check(self) -> None:
        if self.fail_check:
            raise ConnectionError("dependency down")


def _app(settings: Settings, resource: Counting):
    app = create_app(settings, core_resources=False, resources=[resource])

    @app.get("/use")
    async def use(request):
        return {"starts": request.resources.get(resource.name).starts}  # type: ignore[attr-defined]

    return app


async def test_lifespan_events_start_and_stop(settings: Settings) -> None:
    res = Counting()
    app = _app(settings, res)
    async with TestClient(app) as client:
        assert res.starts == 1
        assert (await client.get("/use")).json() == {"starts": 1}
    assert res.stops == 1


async def test_startup_failure_reported_to_host(settings: Settings) -> None:
    res = Counting()
    res.fail_start = True
    with pytest.raises(RuntimeError, match=r"lifespan startup failed: .*dependency down"):
        async with TestClient(_app(settings, res)):
            pass


async def test_lazy_start_exactly_once_under_concurrency(settings: Settings) -> None:
    res = Counting(start_delay=0.05)
    app = _app(settings, res)
    client = TestClient(app, lifespan=False)  # no lifespan events
    replies = await asyncio.gather(*(client.get("/use") for _ in range(20)))
    assert {r.status_code for r in replies} == {200}
    assert res.starts == 1
    await app.shutdown()
    assert res.stops == 1
    after = await client.get("/use")
    assert after.status_code == 503


async def test_lazy_start_failure_is_503_and_recovers(settings: Settings, monkeypatch) -> None:
    from ghar_core.asgi import lifespan as lifespan_module

    monkeypatch.setattr(lifespan_module, "_RETRY_INTERVAL", 0.0)
    res = Counting()
    res.fail_start = True
    client = TestClient(_app(settings, res), lifespan=False)
    r = await client.get("/use")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    res.fail_start = False
    assert (await client.get("/use")).json() == {"starts": 1}


async def test_health_does_not_start_resources(settings: Settings) -> None:
    res = Counting()
    r = await TestClient(_app(settings, res), lifespan=False).get("/health")
    assert r.json()["status"] == "ok"
    assert r.json()["environment"] == "test"
    assert res.starts == 0


async def test_ready_names_the_failing_check(settings: Settings) -> None:
    ok, bad = Counting("db"), Counting("idp")
    app = create_app(settings, core_resources=False, resources=[ok, bad])
    async with app.lifespan():
        client = TestClient(app, lifespan=False)
        assert (await client.get("/ready")).json() == {
            "status": "ready",
            "checks": {"db": "ok", "idp": "ok"},
        }
        bad.fail_check = True
        r = await client.get("/ready")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "NOT_READY"
        assert r.json()["error"]["details"] == {
            "failing": ["idp"],
            "checks": {"db": "ok", "idp": "failed"},
        }
        assert "dependency down" not in r.text
    assert (ok.stops, bad.stops) == (1, 1)


async def test_explicit_startup_shutdown(settings: Settings) -> None:
    res = Counting()
    app = _app(settings, res)
    await app.startup()
    await app.startup()
    assert res.starts == 1
    await app.shutdown()
    await app.startup()  # a new cycle is allowed
    assert res.starts == 2
    await app.shutdown()


async def test_shutdown_failure_is_raised_after_all_stops(settings: Settings) -> None:
    class BadStop(Counting):
        async def stop(self) -> None:
            await super().stop()
            raise RuntimeError("stuck")

    a, b = Counting("a"), BadStop("b")
    app = create_app(settings, core_resources=False, resources=[a, b])
    await app.startup()
    with pytest.raises(LifecycleError, match="b: RuntimeError: stuck"):
        await app.shutdown()
    assert (a.stops, b.stops) == (1, 1)


async def test_mounted_under_prefix_without_lifespan(settings: Settings) -> None:
    res = Counting()
    inner = _app(settings, res)

    async def parent(scope, receive, send):
        """A host that mounts the core at /core and never forwards lifespan."""
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/core" or path.startswith("/core/"):
            await inner({**scope, "root_path": scope.get("root_path", "") + "/core"}, receive, send)
            return
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"parent"})

    async with TestClient(parent) as client:
        assert res.starts == 0
        r = await client.get("/core/use")
        assert r.json() == {"starts": 1}
        assert (await client.get("/core/health")).status_code == 200
        missing = await client.get("/core/nope")
        assert missing.status_code == 404
        assert (await client.get("/elsewhere")).status_code == 418


async def test_root_path_already_stripped_by_host(settings: Settings) -> None:
    res = Counting()
    app = _app(settings, res)
    scope_root = TestClient(app, root_path="/api", lifespan=False)
    assert (await scope_root.get("/use")).status_code == 200
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    legacy = {"type": "http", "method": "GET", "path": "/use", "root_path": "/api"}
    await app({**legacy, "headers": [], "query_string": b""}, receive, send)
    assert sent[0]["status"] == 200


async def test_settings_default_from_process(monkeypatch) -> None:
    from ghar_core import config

    monkeypatch.setattr(config, "_cached", make_settings(PROJECT_NAME="Mine"))
    app = create_app(core_resources=False, resources=[])
    assert (await TestClient(app).get("/health")).json()["name"] == "Mine"


# --- review: lazy start under concurrency and against shutdown ---------------------


async def test_failed_lazy_start_is_attempted_once_under_concurrency(settings: Settings) -> None:
    # Requests queued behind a failing start must share its outcome, not retry one by
    # one (20 serial attempts of a slow, failing dependency would hold them for minutes).
    res = Counting(start_delay=0.05)
    res.fail_start = True
    attempts = 0
    original = res.start

    async def counting_start() -> None:
        nonlocal attempts
        attempts += 1
        await original()

    res.start = counting_start  # type: ignore[method-assign]
    client = TestClient(_app(settings, res), lifespan=False)
    replies = await asyncio.gather(*(client.get("/use") for _ in range(20)))
    assert {r.status_code for r in replies} == {503}
    assert all(r.headers["retry-after"] == "1" for r in replies)
    assert attempts == 1


async def test_lazy_start_waiting_behind_shutdown_does_not_restart(settings: Settings) -> None:
    # startup in progress -> shutdown queued -> a request queued behind both: once the
    # shutdown has run, the request must get 503, not start the resources again.
    res = Counting(start_delay=0.1)
    app = _app(settings, res)
    client = TestClient(app, lifespan=False)
    starting = asyncio.create_task(app.startup())
    await asyncio.sleep(0.01)
    stopping = asyncio.create_task(app.shutdown())
    await asyncio.sleep(0.01)
    reply = await client.get("/use")
    await asyncio.gather(starting, stopping)
    assert reply.status_code == 503
    assert (res.starts, res.stops) == (1, 1)
    assert app.resources.started == ()
