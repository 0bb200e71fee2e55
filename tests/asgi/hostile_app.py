"""The app ``tests/asgi/test_server_limits.py`` serves with ``ghar-core serve``.

The core's routes (health, the event stream with the auth and event-bus
resources, no database) plus the handlers the hostile-input issue found
wanting: an echo of the JSON body, a handler that awaits a cancelled future,
one that fails with client text in its message, one that holds its request
for a while, and a WebSocket echo.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ghar_core.asgi import Request, WebSocket, create_app
from ghar_core.auth import SupabaseAuth
from ghar_core.config import get_settings
from ghar_core.http import HTTPClients
from ghar_core.sse import SSEEventBus

settings = get_settings()
app = create_app(
    settings,
    core_resources=False,
    resources=[HTTPClients(), SupabaseAuth(settings), SSEEventBus(settings)],
)


@app.post("/echo")
async def echo(request: Request) -> Any:
    return await request.json()


@app.get("/cancelled")
async def cancelled(request: Request) -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()  # as a shared task cancelled at shutdown would be
    await future


@app.get("/boom")
async def boom(request: Request) -> None:
    raise RuntimeError(request.query_params.get("msg", "boom"))


@app.get("/hold")
async def hold(request: Request) -> dict[str, bool]:
    await asyncio.sleep(float(request.query_params.get("seconds", "1.5")))
    return {"held": True}


@app.post("/upload")
async def upload(request: Request) -> dict[str, int]:
    return {"size": len(await request.body())}


@app.websocket_route("/ws/echo")
async def ws_echo(ws: WebSocket) -> None:
    await ws.accept()
    while True:
        await ws.send_text(await ws.receive_text())


@app.post("/header-names")
async def header_names(request: Request) -> list[str]:
    """The request's header names as the app sees them once its body is read."""
    await request.body()
    return [name.decode("latin-1") for name, _ in request.scope["headers"]]
