"""WebSocket routes: accept, text/JSON round trips, refusal, request id, errors."""

from __future__ import annotations

import pytest

from ghar_core.asgi import WebSocketDisconnect, create_app
from ghar_core.config import Settings
from ghar_core.testing import TestClient, WebSocketRejected


def _app(settings: Settings):
    app = create_app(settings, core_resources=False, resources=[])
    seen: dict[str, object] = {}

    @app.websocket_route("/ws/{room}")
    async def room(ws):
        await ws.accept()
        seen["room"] = ws.path_params["room"]
        seen["token"] = ws.query_params.get("token")
        try:
            while True:
                data = await ws.receive_json()
                await ws.send_json({"echo": data, "room": ws.path_params["room"]})
        except WebSocketDisconnect as exc:
            seen["closed"] = exc.code

    @app.websocket_route("/text")
    async def text(ws):
        await ws.accept()
        await ws.send_text((await ws.receive_text()).upper())
        await ws.close(4000)

    @app.websocket_route("/refuse")
    async def refuse(ws):
        await ws.close(4403)

    @app.websocket_route("/crash")
    async def crash(ws):
        await ws.accept()
        raise RuntimeError("bug")

    app.state.seen = seen
    return app


async def test_json_round_trip_and_disconnect(settings: Settings) -> None:
    app = _app(settings)
    client = TestClient(app)
    async with client.websocket_connect(
        "/ws/lobby?token=t1", headers={"X-Request-ID": "ws-1"}
    ) as ws:
        assert (b"x-request-id", b"ws-1") in ws.accepted["headers"]
        await ws.send_json({"n": 1})
        assert await ws.receive_json() == {"echo": {"n": 1}, "room": "lobby"}
    assert app.state.seen == {"room": "lobby", "token": "t1", "closed": 1000}


async def test_text_and_server_close(settings: Settings) -> None:
    async with TestClient(_app(settings)).websocket_connect("/text") as ws:
        await ws.send_text("hi")
        assert await ws.receive_text() == "HI"
        with pytest.raises(ConnectionError):
            await ws.receive()
        assert ws.close_code == 4000


async def test_refusals(settings: Settings) -> None:
    client = TestClient(_app(settings))
    with pytest.raises(WebSocketRejected) as info:
        async with client.websocket_connect("/refuse"):
            pass
    assert info.value.code == 4403
    with pytest.raises(WebSocketRejected) as missing:
        async with client.websocket_connect("/nowhere"):
            pass
    assert missing.value.code == 1008


async def test_handler_error_closes_1011_and_logs(settings: Settings, caplog) -> None:
    async with TestClient(_app(settings)).websocket_connect("/crash") as ws:
        with pytest.raises(ConnectionError):
            await ws.receive()
        assert ws.close_code == 1011
    assert any("websocket handler" in rec.getMessage() for rec in caplog.records)


async def test_denials_carry_request_id_and_envelope_when_the_server_can(settings) -> None:
    # uvicorn offers the websocket.http.response extension: a refusal by the app
    # (no route) is then a real 404 envelope with X-Request-ID, not a bare 403.
    client = TestClient(_app(settings))
    with pytest.raises(WebSocketRejected) as missing:
        async with client.websocket_connect("/nowhere", headers={"X-Request-ID": "ws-404"}):
            pass
    assert missing.value.status_code == 404
    assert missing.value.headers["x-request-id"] == "ws-404"
    assert b'"NOT_FOUND"' in missing.value.body


async def test_api_exceptions_are_expected_refusals_not_errors(settings, caplog) -> None:
    import logging

    from ghar_core.exceptions import NotFoundException, UnauthorizedException

    app = create_app(settings, core_resources=False, resources=[])

    @app.websocket_route("/private")
    async def private(ws):
        raise UnauthorizedException(error_code="AUTH_TOKEN_MISSING")  # before accept

    @app.websocket_route("/gone")
    async def gone(ws):
        await ws.accept()
        raise NotFoundException(error_code="PROPERTY_NOT_FOUND")  # after accept

    client = TestClient(app)
    caplog.set_level(logging.INFO, logger="ghar_core.asgi")
    with pytest.raises(WebSocketRejected) as refused:
        async with client.websocket_connect("/private"):
            pass
    assert refused.value.status_code == 401
    assert b'"AUTH_TOKEN_MISSING"' in refused.value.body
    assert refused.value.headers["www-authenticate"] == "Bearer"
    async with client.websocket_connect("/gone") as ws:
        with pytest.raises(ConnectionError):
            await ws.receive()
        assert ws.close_code == 1008
    refusals = [r for r in caplog.records if r.name == "ghar_core.asgi"]
    assert [r.levelno for r in refusals] == [logging.INFO, logging.INFO]
    assert all(r.exc_info is None for r in refusals)
    assert "401 AUTH_TOKEN_MISSING" in refusals[0].getMessage()


async def test_websockets_get_an_access_line_with_the_token_redacted(settings, caplog) -> None:
    import logging

    app = _app(settings)
    client = TestClient(app)
    caplog.set_level(logging.INFO, logger="ghar_core.access")
    async with client.websocket_connect("/ws/lobby?token=zq9secret&x=1") as ws:
        await ws.send_json({"hi": 1})
        await ws.receive_json()
    with pytest.raises(WebSocketRejected):
        async with client.websocket_connect("/nowhere"):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "ghar_core.access"]
    assert len(lines) == 2
    assert lines[0].startswith("WS /ws/lobby?token=[REDACTED]&x=1 101 ")
    assert lines[1].startswith("WS /nowhere 404 ")
    assert "zq9secret" not in caplog.text
