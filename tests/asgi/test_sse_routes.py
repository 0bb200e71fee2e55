"""The event-stream routes in process (``ghar_core.asgi.sse``), through the whole stack.

Auth is real (HS256 tokens verified locally); the client is the package's
own ``TestClient``. Real sockets are in ``test_sse_uvicorn.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from ghar_core.asgi import create_app
from ghar_core.auth import SupabaseAuth
from ghar_core.config import Settings
from ghar_core.http import HTTPClients
from ghar_core.sse import SSEEventBus
from ghar_core.testing import TestClient, TestStreamResponse
from tests.asgi.sse_support import parse_blocks, sse_settings, token_for

STREAM = "/api/v1/events/stream"
TEST = "/api/v1/events/test"


def _app(settings: Settings | None = None, **options: Any) -> tuple[Any, SSEEventBus]:
    settings = settings or sse_settings(SSE_HEARTBEAT_INTERVAL=0.05)
    bus = SSEEventBus(settings, handle_signals=False, **options)
    return create_app(
        settings, core_resources=False, resources=[HTTPClients(), SupabaseAuth(settings), bus]
    ), bus


async def _read_blocks(r: TestStreamResponse, count: int) -> list[dict[str, str]]:
    """The next ``count`` complete blocks that are not keepalive comments."""
    text = ""
    async with asyncio.timeout(5):
        async for chunk in r.aiter_bytes():
            text += chunk.decode()
            complete = text[: text.rfind("\n\n") + 2] if "\n\n" in text else ""
            blocks = [b for b in parse_blocks(complete) if ":" not in b]
            if len(blocks) >= count:
                return blocks
    return [b for b in parse_blocks(text) if ":" not in b]


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestClient, SSEEventBus]]:
    app, bus = _app()
    async with TestClient(app) as client:
        yield client, bus


async def test_the_stream_frames_events_with_ids_types_and_json(
    served: tuple[TestClient, SSEEventBus],
) -> None:
    client, bus = served
    user, token = token_for()
    async with client.stream("GET", STREAM, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        (opening,) = await _read_blocks(r, 1)
        epoch = bus.log.head(user)[0]
        assert opening == {"retry": "3000", "id": f"{epoch}:0"}
        bus.emit(user, {"type": "booking.confirmed", "booking": 7})
        (block,) = await _read_blocks(r, 1)
        assert block == {
            "id": f"{epoch}:1",
            "event": "booking.confirmed",
            "data": '{"type":"booking.confirmed","booking":7}',
        }
    async with asyncio.timeout(2):
        while bus.stats()["subscribers"]:  # noqa: ASYNC110 - the disconnect closes it
            await asyncio.sleep(0.01)


async def test_keepalive_comments_flow_while_nothing_happens(
    served: tuple[TestClient, SSEEventBus],
) -> None:
    client, _ = served
    _, token = token_for()
    async with client.stream("GET", STREAM, params={"access_token": token}) as r:
        text = ""
        async with asyncio.timeout(5):
            async for chunk in r.aiter_bytes():
                text += chunk.decode()
                if text.count(": keepalive\n\n") >= 2:
                    break


@pytest.mark.parametrize(
    ("headers", "params", "code"),
    [
        ({}, {}, "AUTH_TOKEN_MISSING"),
        ({"Authorization": "Bearer nope"}, {}, "AUTH_TOKEN_MALFORMED"),
        ({}, {"access_token": "nope"}, "AUTH_TOKEN_MALFORMED"),
    ],
)
async def test_the_stream_needs_a_valid_token(
    served: tuple[TestClient, SSEEventBus],
    headers: dict[str, str],
    params: dict[str, str],
    code: str,
) -> None:
    client, bus = served
    r = await client.get(STREAM, headers=headers, params=params)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == code
    assert bus.stats()["subscribers"] == 0


async def test_the_test_route_reaches_the_callers_own_stream(
    served: tuple[TestClient, SSEEventBus],
) -> None:
    client, bus = served
    _, token = token_for()
    _, other = token_for()
    auth = {"Authorization": f"Bearer {token}"}
    async with client.stream("GET", STREAM, headers=auth) as r:
        await _read_blocks(r, 1)
        answer = await client.post(TEST, headers=auth, json={"hello": "you"})
        assert answer.status_code == 200
        assert answer.json()["delivered"] == 1
        (block,) = await _read_blocks(r, 1)
        assert block["event"] == "test"
        assert block["id"] == answer.json()["id"]
        assert orjson.loads(block["data"]) == {"type": "test", "data": {"hello": "you"}}
        bare = await client.post(TEST, headers={"Authorization": f"Bearer {other}"})
        assert bare.json()["delivered"] == 0  # another user's stream: not this one
    assert (await client.post(TEST)).status_code == 401
    r = await client.post(
        TEST,
        headers=auth,
        content=b"{",
    )
    assert r.status_code == 415
    assert bus.stats()["emitted"] == 2


async def test_last_event_id_replays_exactly_the_missed_events(
    served: tuple[TestClient, SSEEventBus],
) -> None:
    client, bus = served
    user, token = token_for()
    for i in range(5):
        bus.emit(user, {"type": "tick", "i": i})
    epoch = bus.log.head(user)[0]
    auth = {"Authorization": f"Bearer {token}"}
    for headers, params in (
        ({**auth, "Last-Event-ID": f"{epoch}:2"}, {}),
        (auth, {"last_event_id": f"{epoch}:2"}),  # a first connect that knows its place
    ):
        async with client.stream("GET", STREAM, headers=headers, params=params) as r:
            opening, *events = await _read_blocks(r, 4)
            assert opening == {"retry": "3000"}  # no id: the client keeps its own
            assert [e["id"] for e in events] == [f"{epoch}:{n}" for n in (3, 4, 5)]


async def test_an_unknown_last_event_id_gets_an_in_band_reset(
    served: tuple[TestClient, SSEEventBus],
) -> None:
    client, bus = served
    user, token = token_for()
    bus.emit(user, {"type": "tick"})
    epoch = bus.log.head(user)[0]
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": "x" * 5000}
    async with client.stream("GET", STREAM, headers=headers) as r:
        _, reset = await _read_blocks(r, 2)
    assert reset["event"] == "reset"
    assert reset["id"] == f"{epoch}:1"
    assert orjson.loads(reset["data"]) == {
        "reason": "unknown_position",
        "epoch": epoch,
        "position": 1,
    }


async def test_past_the_cap_the_stream_is_a_503_with_retry_after() -> None:
    app, bus = _app(max_subscribers=1)
    _, token = token_for()
    auth = {"Authorization": f"Bearer {token}"}
    async with TestClient(app) as client, client.stream("GET", STREAM, headers=auth) as r:
        await _read_blocks(r, 1)
        refused = await client.get(STREAM, headers=auth)
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "SSE_UNAVAILABLE"
        assert bus.stats()["refused"] == 1


async def test_head_answers_headers_without_subscribing(
    served: tuple[TestClient, SSEEventBus],
) -> None:
    client, bus = served
    _, token = token_for()
    r = await client.request("HEAD", STREAM, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.content == b""
    assert bus.stats()["subscribers"] == 0


async def test_shutdown_ends_each_stream_with_a_jittered_retry() -> None:
    app, bus = _app()
    _, token = token_for()
    async with TestClient(app) as client:
        async with client.stream("GET", STREAM, params={"access_token": token}) as r:
            await _read_blocks(r, 1)
            bus.begin_shutdown()
            rest = await _read_blocks(r, 1)
            body_left = await r.read()
        assert r.complete  # a proper end of the response, not a cut
        assert body_left == b""
        (final,) = rest
        assert 3000 <= int(final["retry"]) <= 12000
        refused = await client.get(STREAM, params={"access_token": token})
        assert refused.status_code == 503


async def test_enable_sse_false_removes_both_routes() -> None:
    app, _ = _app(sse_settings(ENABLE_SSE=False))
    _, token = token_for()
    async with TestClient(app) as client:
        for method, path in (("GET", STREAM), ("POST", TEST)):
            r = await client.request(method, path, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 404, path


async def test_the_default_app_has_the_bus_and_ready_shows_its_stats() -> None:
    settings = sse_settings()
    assert "sse" in create_app(settings).resources
    app, _ = _app(settings)
    async with TestClient(app) as client:
        r = await client.get("/ready")
        assert r.json()["checks"]["sse"] == "ok"
        assert r.json()["stats"]["sse"]["subscribers"] == 0


async def test_cors_headers_reach_the_stream(served: tuple[TestClient, SSEEventBus]) -> None:
    client, _ = served
    _, token = token_for()
    headers = {"Origin": "http://localhost:3000"}
    async with client.stream("GET", STREAM, headers=headers, params={"access_token": token}) as r:
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


async def test_the_access_token_never_reaches_the_access_log(
    served: tuple[TestClient, SSEEventBus], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = served
    _, token = token_for()
    caplog.set_level(logging.DEBUG)
    async with client.stream("GET", STREAM, params={"access_token": token}) as r:
        await _read_blocks(r, 1)
    await client.get(STREAM, params={"access_token": "bad-secret-value"})
    await asyncio.sleep(0.05)
    text = caplog.text
    assert "/api/v1/events/stream?access_token=[REDACTED]" in text
    assert token not in text
    assert "bad-secret-value" not in text


async def test_an_apps_own_middleware_sees_every_event_the_stream_writes() -> None:
    """The stream skips only the core's start-watching layers, never an app's middleware."""
    bodies: list[bytes] = []

    def watching(app: Any) -> Any:
        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            async def send_watching(message: Any) -> None:
                if message["type"] == "http.response.body":
                    bodies.append(message.get("body", b""))
                await send(message)

            await app(scope, receive, send_watching)

        return middleware

    app, bus = _app()
    app.add_middleware(watching)
    user, token = token_for()
    async with (
        TestClient(app) as client,
        client.stream("GET", STREAM, params={"access_token": token}) as r,
    ):
        await _read_blocks(r, 1)
        for i in range(3):
            bus.emit(user, {"type": "n", "i": i})
        blocks = await _read_blocks(r, 3)
    assert [b["data"] for b in blocks] == [f'{{"type":"n","i":{i}}}' for i in range(3)]
    seen = b"".join(bodies)
    for i in range(3):
        assert f'data: {{"type":"n","i":{i}}}\n\n'.encode() in seen
