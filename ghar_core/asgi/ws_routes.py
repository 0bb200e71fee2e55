"""The WebSocket routes: ``{API_V1_STR}/ws/jobs/{job_id}`` and ``{API_V1_STR}/ws/notifications``.

Both authenticate before the handshake completes, the same way as the event
stream (``Authorization: Bearer`` or ``?access_token=``, redacted in every
log line): a bad token, a job that is not the caller's (403) or not
registered (404), and a caller past ``WS_MAX_CONNECTIONS_PER_USER`` (429)
are refused with the error envelope as the HTTP answer, never accepted and
then closed. Accepted sockets are run by the app's ``"websocket"`` resource
(:class:`~ghar_core.websocket.ConnectionManager`). ``ENABLE_WEBSOCKETS=false``
leaves both routes out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ghar_core.asgi.auth import current_user
from ghar_core.asgi.websocket import WebSocket, WebSocketDisconnect
from ghar_core.lifecycle import ResourceNotFound
from ghar_core.websocket import ConnectionManager, get_manager

if TYPE_CHECKING:
    from ghar_core.asgi.app import App

__all__ = ["job_socket", "notification_socket", "register_websocket_routes"]


def _manager_of(app: App) -> ConnectionManager:
    try:
        return app.resources.get("websocket", ConnectionManager)
    except ResourceNotFound:
        return get_manager()


def _receiver(ws: WebSocket) -> Callable[[], Awaitable[str | None]]:
    async def receive() -> str | None:
        try:
            message = await ws.receive()
        except WebSocketDisconnect:
            return None
        text = message.get("text")
        return text if isinstance(text, str) else ""

    return receive


async def job_socket(ws: WebSocket) -> None:
    """``{API_V1_STR}/ws/jobs/{job_id}``: the progress of one of the caller's jobs."""
    user = await current_user(ws, allow_query_token=True)
    manager = _manager_of(ws.app)
    conn = await manager.connect_job(ws, ws.path_params["job_id"], user.id)
    await manager.serve(conn, _receiver(ws))


async def notification_socket(ws: WebSocket) -> None:
    """``{API_V1_STR}/ws/notifications``: the caller's notifications."""
    user = await current_user(ws, allow_query_token=True)
    manager = _manager_of(ws.app)
    conn = await manager.connect_user(ws, user.id)
    await manager.serve(conn, _receiver(ws))


def register_websocket_routes(app: App) -> None:
    """Add both routes to ``app`` unless ``ENABLE_WEBSOCKETS`` is off (``create_app`` does this)."""
    if not app.settings.ENABLE_WEBSOCKETS:
        return
    prefix = app.settings.API_V1_STR
    app.add_websocket_route(f"{prefix}/ws/jobs/{{job_id}}", job_socket)
    app.add_websocket_route(f"{prefix}/ws/notifications", notification_socket)
