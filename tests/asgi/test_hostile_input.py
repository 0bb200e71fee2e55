"""Issue 11, in process: valid JSON that must not become a 500, cancelled handlers
inside the envelope, and CORS by the Fetch standard's rules.

The same faults over raw sockets against ``ghar-core serve`` are in
``tests/asgi/test_server_limits.py``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ghar_core.asgi import StreamingResponse, create_app
from ghar_core.asgi.cors import CORSMiddleware
from ghar_core.asgi.requests import JSON_MAX_DEPTH
from ghar_core.asgi.responses import dump_json
from ghar_core.config import Settings
from ghar_core.logging import RequestIDFilter
from ghar_core.testing import TestClient
from tests.asgi.conftest import make_settings
from tests.strategies import nested_json

# --- 1. whatever request.json() accepts, a handler can return ---------------------


def _echo_app(settings: Settings) -> Any:
    app = create_app(settings, core_resources=False, resources=[])

    @app.post("/echo")
    async def echo(request):
        return await request.json()

    @app.post("/wrapped")
    async def wrapped(request):
        # What handlers really do: put what they were sent inside an answer.
        return {"data": {"received": [await request.json()]}}

    return app


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_the_parse_limit_leaves_room_under_the_encoders() -> None:
    """orjson writes at most 254 levels; we accept fewer, so wrapping is safe."""
    deep: Any = 1
    for _ in range(254):
        deep = [deep]
    dump_json(deep)
    with pytest.raises(TypeError):
        dump_json([deep])
    assert JSON_MAX_DEPTH <= 254 - 16


async def test_300_nested_arrays_are_a_400_naming_the_limit(settings: Settings) -> None:
    client = TestClient(_echo_app(settings))
    body = b"[" * 300 + b"]" * 300  # 600 bytes, valid JSON (orjson parses it)
    r = await client.post("/echo", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "JSON_TOO_DEEP"
    assert error["details"] == {"max_depth": JSON_MAX_DEPTH}
    assert str(JSON_MAX_DEPTH) in error["message"]
    assert r.headers["x-request-id"]


@hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), depth=st.integers(JSON_MAX_DEPTH - 3, JSON_MAX_DEPTH + 3))
async def test_hypothesis_json_round_trips_at_the_limit_and_is_refused_past_it(
    data: st.DataObject, depth: int
) -> None:
    value = data.draw(nested_json(depth))
    assert _depth(value) == depth
    client = TestClient(_echo_app(make_settings()))
    for path in ("/echo", "/wrapped"):
        r = await client.post(path, json=value)
        if depth <= JSON_MAX_DEPTH:
            assert r.status_code == 200, r.text
            got = r.json()
            assert (got if path == "/echo" else got["data"]["received"][0]) == value
        else:
            assert r.status_code == 400, r.text
            assert r.json()["error"]["details"] == {"max_depth": JSON_MAX_DEPTH}


async def test_a_wide_shallow_body_is_not_refused(settings: Settings) -> None:
    client = TestClient(_echo_app(settings))
    value = [[i, {"k": [i]}] for i in range(5000)]  # many containers, depth 4
    r = await client.post("/echo", json=value)
    assert r.status_code == 200
    assert r.json() == value


# --- 2. a cancelled handler ends inside the envelope -------------------------------


def _cancelling_app(settings: Settings, lines: list[tuple[str, str, int]]) -> Any:
    def sink(method: str, path: str, status: int, duration_ms: float) -> None:
        lines.append((method, path, status))

    app = create_app(settings, core_resources=False, resources=[], access_log=sink)

    @app.get("/cancelled")
    async def cancelled(request):
        # A shared future cancelled elsewhere (at shutdown, by another task).
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    class Custom(BaseException):
        pass

    @app.get("/base-exception")
    async def base_exception(request):
        raise Custom("not a shutdown of the process")

    @app.get("/stream-cancelled")
    async def stream_cancelled(request):
        async def body():
            yield b"first"
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.cancel()
            await future

        return StreamingResponse(body(), media_type="text/plain")

    return app


@pytest.mark.parametrize("path", ["/cancelled", "/base-exception"])
async def test_a_cancelled_handler_is_the_500_envelope_with_its_request_id(
    settings: Settings, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIDFilter())  # what configure_logging's handler does
    lines: list[tuple[str, str, int]] = []
    client = TestClient(_cancelling_app(settings, lines))
    r = await client.get(path, headers={"X-Request-ID": "cancel-1"})
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == "cancel-1"
    assert r.json()["error"]["code"] == "INTERNAL_ERROR"
    assert lines == [("GET", path, 500)]
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1, [rec.getMessage() for rec in errors]
    assert getattr(errors[0], "request_id", None) == "cancel-1"
    assert errors[0].exc_info is not None


async def test_a_cancelled_streaming_body_is_logged_once_and_the_response_cut(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIDFilter())  # what configure_logging's handler does
    lines: list[tuple[str, str, int]] = []
    client = TestClient(_cancelling_app(settings, lines))
    r = await client.get("/stream-cancelled", headers={"X-Request-ID": "cancel-2"})
    assert r.status_code == 200
    assert r.complete is False  # cut, not a complete-looking answer
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1, [rec.getMessage() for rec in errors]
    assert getattr(errors[0], "request_id", None) == "cancel-2"
    assert lines == [("GET", "/stream-cancelled", 200)]


async def test_the_servers_own_cancellation_still_propagates(settings: Settings) -> None:
    """A task cancelled from outside (the server at shutdown) must stay cancelled."""
    app = create_app(settings, core_resources=False, resources=[], access_log=False)
    entered = asyncio.Event()
    sent: list[dict[str, Any]] = []

    @app.get("/slow")
    async def slow(request):
        entered.set()
        await asyncio.sleep(30)

    scope = TestClient(app)._scope("http", "GET", "/slow", None, [])

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    task = asyncio.create_task(app(scope, receive, send))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent == []  # no envelope for a cancellation that is the server's own


# --- 4. CORS by the Fetch standard ---------------------------------------------------

ALLOWED = "https://app.example.com"


def _cors_app(app_acao: str | None) -> Any:
    async def inner(scope, receive, send):
        headers = [(b"content-type", b"text/plain")]
        if app_acao is not None:
            headers.append((b"access-control-allow-origin", app_acao.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    return inner


def _values(raw: list[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode() for n, v in raw if n.lower() == name]


def _vary_tokens(raw: list[tuple[bytes, bytes]]) -> set[str]:
    return {t.strip().lower() for v in _values(raw, b"vary") for t in v.split(",")}


@hsettings(max_examples=120, deadline=None)
@given(
    allow_all=st.booleans(),
    credentials=st.booleans(),
    origin=st.sampled_from([None, ALLOWED, "https://evil.example", "null"]),
    app_acao=st.sampled_from([None, "*", ALLOWED, "https://other.example"]),
    method=st.sampled_from(["GET", "POST", "OPTIONS", "PREFLIGHT"]),
)
async def test_cors_follows_the_fetch_standard(
    allow_all: bool, credentials: bool, origin: str | None, app_acao: str | None, method: str
) -> None:
    origins = ["*"] if allow_all else [ALLOWED]
    app = CORSMiddleware(_cors_app(app_acao), allow_origins=origins, allow_credentials=credentials)
    client = TestClient(app)
    headers = {"Origin": origin} if origin is not None else {}
    if method == "PREFLIGHT":
        method, headers = "OPTIONS", {**headers, "Access-Control-Request-Method": "GET"}
    r = await client.request(method, "/x", headers=headers)
    raw = r.raw_headers
    acao = _values(raw, b"access-control-allow-origin")
    allowed = origin is not None and (allow_all or origin == ALLOWED)
    # "*" never goes with credentials (Fetch, "HTTP responses" and the CORS check:
    # a credentialed request fails on "*"), so any origin is a constant "*" and
    # the allowed origin depends on Origin otherwise (Fetch, "CORS protocol and
    # HTTP caches"): then Vary: Origin on every response.
    constant_star = allow_all
    if not constant_star:
        assert "origin" in _vary_tokens(raw), (raw, origin)
    # Never two values: browsers reject a list.
    assert len(acao) <= 1, raw
    credentialed = _values(raw, b"access-control-allow-credentials")
    if allowed:
        assert acao == (["*"] if constant_star else [origin]), raw
        assert credentialed == (["true"] if credentials and not allow_all else []), raw
    elif origin is not None and app_acao is None:
        assert acao == [], raw
    if acao == ["*"]:
        assert credentialed == [], raw


async def test_vary_origin_without_an_origin_header() -> None:
    app = create_app(make_settings(CORS_ORIGINS=(ALLOWED,)), core_resources=False, resources=[])

    @app.get("/cached")
    async def cached(request):
        return {"ok": True}

    client = TestClient(app)
    for path in ("/cached", "/no-such-route"):
        r = await client.get(path)
        assert "origin" in _vary_tokens(r.raw_headers), r.raw_headers
        assert _values(r.raw_headers, b"access-control-allow-origin") == []


async def test_an_apps_own_allow_origin_is_replaced_not_doubled() -> None:
    app = CORSMiddleware(_cors_app("*"), allow_origins=[ALLOWED], allow_credentials=True)
    r = await TestClient(app).get("/x", headers={"Origin": ALLOWED})
    assert _values(r.raw_headers, b"access-control-allow-origin") == [ALLOWED]
    assert orjson.dumps(r.text)  # the body untouched


async def test_star_with_credentials_is_star_without_credentials_and_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: ``*`` with credentials echoed every origin back with credentials, so
    any site could read a signed-in user's answers."""
    caplog.set_level(logging.WARNING, logger="ghar_core.cors")
    app = create_app(
        make_settings(CORS_ORIGINS=("*",), CORS_ALLOW_CREDENTIALS=True),
        core_resources=False,
        resources=[],
    )

    @app.get("/me")
    async def me(request):
        return {"ok": True}

    client = TestClient(app)
    for origin in ("https://evil.example", ALLOWED):
        r = await client.get("/me", headers={"Origin": origin, "Cookie": "session=1"})
        assert _values(r.raw_headers, b"access-control-allow-origin") == ["*"]
        assert _values(r.raw_headers, b"access-control-allow-credentials") == []
        preflight = await client.options(
            "/me", headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
        )
        assert _values(preflight.raw_headers, b"access-control-allow-origin") == ["*"]
        assert _values(preflight.raw_headers, b"access-control-allow-credentials") == []
    warnings = [rec for rec in caplog.records if rec.name == "ghar_core.cors"]
    assert len(warnings) == 1, [rec.getMessage() for rec in warnings]
    assert "credentials" in warnings[0].getMessage()


def _exposing_app(*values: str) -> Any:
    async def inner(scope, receive, send):
        headers = [(b"access-control-expose-headers", v.encode()) for v in values]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    return inner


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((), ["X-Request-ID"]),
        (("ETag",), ["X-Request-ID", "ETag"]),
        (("x-request-id, ETag , Link", "etag,X-Page"), ["X-Request-ID", "ETag", "Link", "X-Page"]),
        ((" , ",), ["X-Request-ID"]),
    ],
)
async def test_an_apps_expose_headers_are_merged_with_ours(
    values: tuple[str, ...], expected: list[str]
) -> None:
    app = CORSMiddleware(_exposing_app(*values), allow_origins=[ALLOWED])
    r = await TestClient(app).get("/x", headers={"Origin": ALLOWED})
    exposed = _values(r.raw_headers, b"access-control-expose-headers")
    assert len(exposed) == 1, r.raw_headers  # one field, each name once
    assert [n.strip() for n in exposed[0].split(",")] == expected
