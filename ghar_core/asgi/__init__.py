"""The hand-written ASGI layer: app, router, request/response, middleware, lifespan.

The package is lazy: a name is imported from its submodule on first use, so
``import ghar_core.testing`` (which needs only the data structures) does not
load asyncpg, aiohttp and PyJWT. Type checkers see the ordinary imports.

Only this package knows ASGI scopes. Start with :func:`create_app`::

    from ghar_core.asgi import JSONResponse, Request, create_app

    app = create_app()

    @app.get("/api/v1/properties/{id:int}")
    async def get_property(request: Request) -> dict:
        return {"id": request.path_params["id"]}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Public name -> the submodule that defines it.
_WHERE: dict[str, str] = {
    "AccessLogMiddleware": "accesslog",
    "App": "app",
    "BufferedAccessLog": "accesslog",
    "CORSMiddleware": "cors",
    "ClientDisconnect": "requests",
    "CurrentUser": "auth",
    "ErrorEnvelopeMiddleware": "middleware",
    "HTTPConnection": "connection",
    "Headers": "datastructures",
    "JSONResponse": "responses",
    "LoggingAccessSink": "accesslog",
    "PlainTextResponse": "responses",
    "QueryParams": "datastructures",
    "Request": "requests",
    "RequestIDMiddleware": "middleware",
    "Response": "responses",
    "State": "datastructures",
    "StreamingResponse": "responses",
    "WebSocket": "websocket",
    "WebSocketDisconnect": "websocket",
    "build_default_resources": "app",
    "create_app": "app",
    "current_user": "auth",
    "register_auth_routes": "auth",
}


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'ghar_core.asgi' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"ghar_core.asgi.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
