"""The app the WebSocket subprocess tests serve (``ghar-core serve --app``, plain uvicorn).

No database: auth, the event bus and the WebSocket manager, settings from the
environment (see ``tests/asgi/sse_support.SERVED_ENV``).
"""

from __future__ import annotations

from ghar_core.asgi import create_app
from ghar_core.auth import SupabaseAuth
from ghar_core.config import get_settings
from ghar_core.http import HTTPClients
from ghar_core.sse import SSEEventBus
from ghar_core.websocket import ConnectionManager

settings = get_settings()
_bus = SSEEventBus(settings)
app = create_app(
    settings,
    core_resources=False,
    resources=[HTTPClients(), SupabaseAuth(settings), _bus, ConnectionManager(settings, sse=_bus)],
)
