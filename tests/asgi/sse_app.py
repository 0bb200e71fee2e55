"""The app the subprocess tests serve (``ghar-core serve --app`` and plain uvicorn).

No database: the auth and event-bus resources only, settings from the
environment (see ``tests/asgi/sse_support.SERVED_ENV``).
"""

from __future__ import annotations

from ghar_core.asgi import create_app
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
