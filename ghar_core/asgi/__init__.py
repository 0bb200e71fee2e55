"""The hand-written ASGI layer: app, router, request/response, middleware, lifespan.

Only this package knows ASGI scopes. Start with :func:`create_app`::

    from ghar_core.asgi import JSONResponse, Request, create_app

    app = create_app()

    @app.get("/api/v1/properties/{id:int}")
    async def get_property(request: Request) -> dict:
        return {"id": request.path_params["id"]}
"""

from __future__ import annotations

from ghar_core.asgi.accesslog import AccessLogMiddleware, BufferedAccessLog, LoggingAccessSink
from ghar_core.asgi.app import App, build_default_resources, create_app
from ghar_core.asgi.auth import CurrentUser, current_user, register_auth_routes
from ghar_core.asgi.connection import HTTPConnection
from ghar_core.asgi.cors import CORSMiddleware
from ghar_core.asgi.datastructures import Headers, QueryParams, State
from ghar_core.asgi.middleware import ErrorEnvelopeMiddleware, RequestIDMiddleware
from ghar_core.asgi.requests import ClientDisconnect, Request
from ghar_core.asgi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from ghar_core.asgi.websocket import WebSocket, WebSocketDisconnect

__all__ = [
    "AccessLogMiddleware",
    "App",
    "BufferedAccessLog",
    "CORSMiddleware",
    "ClientDisconnect",
    "CurrentUser",
    "ErrorEnvelopeMiddleware",
    "HTTPConnection",
    "Headers",
    "JSONResponse",
    "LoggingAccessSink",
    "PlainTextResponse",
    "QueryParams",
    "Request",
    "RequestIDMiddleware",
    "Response",
    "State",
    "StreamingResponse",
    "WebSocket",
    "WebSocketDisconnect",
    "build_default_resources",
    "create_app",
    "current_user",
    "register_auth_routes",
]
