"""The core inside another framework's app (FastAPI, Starlette): one lifespan, its services.

A host mounts the core's app and drives its resources from its own lifespan
(hosts do not forward lifespan events to mounted apps), then uses the core's
services in its own routes::

    core = create_app(settings)

    @contextlib.asynccontextmanager
    async def lifespan(host):
        async with core.lifespan():      # the core's resources start and stop here
            yield

    api = FastAPI(lifespan=lifespan)
    api.mount("/core", core)             # the core's routes, root_path honoured
    CurrentUserDep = Annotated[CurrentUser, Depends(fastapi_current_user(core))]

    @api.get("/listings/mine")
    async def mine(user: CurrentUserDep) -> dict: ...
    db = core.resources.get("database", Database)   # any resource, typed

The runtime never imports a host framework: :func:`fastapi_current_user`
imports Starlette's connection class when it is called, in the host's process.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ghar_core.asgi.auth import CurrentUser, current_user
from ghar_core.asgi.connection import HTTPConnection
from ghar_core.asgi.types import Receive, Scope, Send
from ghar_core.exceptions import BaseAPIException, render_error

if TYPE_CHECKING:
    from ghar_core.asgi.app import App

__all__ = ["api_exception_handler", "fastapi_current_user", "host_current_user"]

_STATE_KEY = "ghar_core.current_user"


async def host_current_user(
    core: App, connection: Any, *, allow_query_token: bool = False
) -> CurrentUser:
    """The verified caller of a host's request or WebSocket (401/503 as the core's own).

    ``connection`` is anything with the ASGI ``scope`` (Starlette's
    ``Request``/``WebSocket``); verification and the users row use ``core``'s
    resources, which the host's lifespan must have started. The result is kept
    in the scope's state, so one request verifies once however many routes or
    dependencies ask.
    """
    scope = connection.scope
    state = scope.setdefault("state", {})
    known: CurrentUser | None = state.get(_STATE_KEY)
    if known is not None:
        return known
    user = await current_user(HTTPConnection(scope, core), allow_query_token=allow_query_token)
    state[_STATE_KEY] = user
    return user


def fastapi_current_user(
    core: App, *, allow_query_token: bool = False
) -> Callable[..., Awaitable[CurrentUser]]:
    """A FastAPI dependency giving the route the caller (``Depends(fastapi_current_user(core))``).

    Our exceptions carry their status and envelope: register
    :func:`api_exception_handler` for ``BaseAPIException`` on the host, or
    the host answers them with its own 500.
    """
    from starlette.requests import HTTPConnection as StarletteConnection

    async def dependency(connection: Any) -> CurrentUser:
        return await host_current_user(core, connection, allow_query_token=allow_query_token)

    # FastAPI injects the connection by the parameter's class; set it as an
    # object, not a string annotation this module could not resolve.
    dependency.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "connection",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=StarletteConnection,
            )
        ],
        return_annotation=CurrentUser,
    )
    return dependency


class _Envelope:
    """The core's error envelope as an ASGI response (what host handlers return)."""

    __slots__ = ("_rendered",)

    def __init__(self, exc: BaseException) -> None:
        self._rendered = render_error(exc)

    @property
    def status_code(self) -> int:
        return self._rendered.status_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rendered = self._rendered
        await send(
            {
                "type": "http.response.start",
                "status": rendered.status_code,
                "headers": rendered.headers,
            }
        )
        await send({"type": "http.response.body", "body": rendered.body})


async def api_exception_handler(connection: Any, exc: Exception) -> Any:
    """A host's handler for ``BaseAPIException``: the core's status, headers and envelope.

    ``api.add_exception_handler(BaseAPIException, api_exception_handler)``
    (FastAPI and Starlette); the response is a plain ASGI callable.
    """
    if not isinstance(exc, BaseAPIException):  # registered for another class by mistake
        raise exc
    return _Envelope(exc)
