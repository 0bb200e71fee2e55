"""Feature flags that shape the routes: ENABLE_WEBSOCKETS=false leaves the WebSocket routes out."""

from __future__ import annotations

import pytest

from ghar_core.asgi import create_app
from ghar_core.testing import TestClient, WebSocketRejected
from tests.asgi.conftest import make_settings


@pytest.mark.parametrize("enabled", [True, False])
async def test_enable_websockets_false_leaves_the_websocket_routes_out(enabled: bool) -> None:
    app = create_app(make_settings(ENABLE_WEBSOCKETS=enabled), resources=[])

    @app.websocket_route("/ws/echo")
    async def echo(ws) -> None:
        await ws.accept()
        await ws.send_text(await ws.receive_text())
        await ws.close()

    @app.get("/plain")
    async def plain(request) -> dict[str, bool]:
        return {"ok": True}

    async with TestClient(app) as client:
        assert (await client.get("/plain")).json() == {"ok": True}  # HTTP routes unaffected
        if enabled:
            async with client.websocket_connect("/ws/echo") as ws:
                await ws.send_text("hi")
                assert await ws.receive_text() == "hi"
        else:
            assert app.websocket_router.match("/ws/echo") is None
            with pytest.raises(WebSocketRejected) as info:
                async with client.websocket_connect("/ws/echo"):
                    pass
            assert info.value.status_code == 404
            assert b'"NOT_FOUND"' in info.value.body
