"""The ASGI application: the one composition root of routes, middleware and resources.

``create_app`` builds an :class:`App`; the app builds its middleware stack
once (outermost first: request ID, access log, error envelope, CORS, then
any added with :meth:`App.add_middleware`, then the router) and owns its
:class:`~ghar_core.lifecycle.Resources` through one
:class:`~ghar_core.asgi.lifespan.LifespanManager`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ghar_core.asgi.accesslog import AccessLogMiddleware, AccessSink
from ghar_core.asgi.auth import register_auth_routes
from ghar_core.asgi.cors import CORSMiddleware
from ghar_core.asgi.datastructures import State
from ghar_core.asgi.endpoints import health, ready
from ghar_core.asgi.lifespan import LifespanManager
from ghar_core.asgi.middleware import (
    ErrorEnvelopeMiddleware,
    RequestIDMiddleware,
    safe_for_log,
    send_error,
)
from ghar_core.asgi.requests import Request
from ghar_core.asgi.responses import Response, dump_json
from ghar_core.asgi.routing import Router, is_async_callable
from ghar_core.asgi.sse import register_sse_routes
from ghar_core.asgi.websocket import WebSocket, WebSocketDisconnect, WebSocketState
from ghar_core.asgi.ws_routes import register_websocket_routes
from ghar_core.auth import SupabaseAuth
from ghar_core.broker import build_broker
from ghar_core.database import Database
from ghar_core.error_reporting import ErrorReporter
from ghar_core.exceptions import (
    BaseAPIException,
    MethodNotAllowedException,
    NotFoundException,
    render_error,
)
from ghar_core.http import ClientSpec, HTTPClients
from ghar_core.lifecycle import Resources, ResourceSpec
from ghar_core.sse import SSEEventBus
from ghar_core.websocket import ConnectionManager

if TYPE_CHECKING:
    from ghar_core.asgi.types import ASGIApp, Receive, Scope, Send
    from ghar_core.config import Settings
    from ghar_core.migrate import MigrationSet

__all__ = [
    "App",
    "build_default_resources",
    "create_app",
]

logger = logging.getLogger("ghar_core.asgi")

Handler = Callable[[Request], Any]
WebSocketHandler = Callable[[WebSocket], Any]
F = TypeVar("F", bound=Callable[..., Any])

_JSON_HEADER = (b"content-type", b"application/json")


def build_default_resources(
    settings: Settings,
    *,
    migrations: Sequence[MigrationSet] = (),
    clients: Sequence[ClientSpec] = (),
) -> list[ResourceSpec]:
    """The core's resources, in start order (stopped in reverse).

    ``create_app`` starts these first, then the app's own ``resources=``.
    ``migrations``: the app's own migration sets, applied after the core's
    when ``DB_MIGRATE_ON_STARTUP`` is on (see :mod:`ghar_core.migrate`);
    ``clients``: the app's own client domains, beside the core's four.
    """
    database = Database(settings, migrations=migrations)
    broker = build_broker(settings, database)
    bus = SSEEventBus(settings, broker=broker)
    return [
        HTTPClients(clients),  # "http_clients": every outbound session; stops last
        database,  # "database": both pools
        # "auth": JWKS and token caches, on the clients resource's provider session.
        lambda started: SupabaseAuth(
            settings, client=started.get("http_clients", HTTPClients).provider("supabase_auth")
        ),
        broker,  # "broker": EVENT_BROKER (memory, or the Postgres outbox + a direct LISTEN)
        bus,  # "sse": per-user event bus; stop ends the streams
        # "websocket": job and user sockets; notifications may also go to `bus`; stop closes (1001)
        ConnectionManager(settings, sse=bus, broker=broker),
    ]


class App:
    """An ASGI 3 application (see :func:`create_app` for how to build one).

    Routes: ``@app.route(path, methods=[...])``, ``app.add_route(path,
    handler, methods=...)``, ``@app.get/post/put/patch/delete(path)``;
    WebSockets: ``@app.websocket_route(path)``. Handlers are ``async def
    handler(request)`` returning a ``dict``/``list`` (200 JSON), a response
    object, or ``None`` (204), or raising any ``BaseAPIException``.
    A ``GET`` route also answers ``HEAD``; a known path with another method
    is a 405 envelope with ``Allow``. Routes may be added until the first
    request; the router is not locked against later additions, but the
    stack is built for serving, not for reconfiguring while serving.
    """

    def __init__(
        self,
        settings: Settings,
        resources: Resources,
        *,
        access_log: bool | AccessSink = True,
        cors: bool = True,
    ) -> None:
        self.settings = settings
        self.resources = resources
        self.state = State()
        self.router: Router[Handler] = Router()
        self.websocket_router: Router[WebSocketHandler] = Router()
        self._access_log = access_log is not False
        self.access_log_sink: AccessSink | None = (
            None if isinstance(access_log, bool) else access_log
        )
        #: Unhandled errors go to Sentry when SENTRY_DSN is set (closed at shutdown).
        self.error_reporter = ErrorReporter(settings)
        self.lifespan_manager = LifespanManager(resources, after_shutdown=self._after_shutdown)
        self._cors = cors
        self._user_middleware: list[tuple[Callable[..., ASGIApp], dict[str, Any]]] = []
        self._no_startup: set[int] = set()
        self._stack: ASGIApp = self._build_stack()

    # --- composition -------------------------------------------------------------

    def _build_stack(self) -> ASGIApp:
        app: ASGIApp = self._dispatch
        for factory, options in reversed(self._user_middleware):
            app = factory(app, **options)
        if self._cors:
            s = self.settings
            app = CORSMiddleware(
                app,
                allow_origins=s.CORS_ORIGINS,
                allow_credentials=s.CORS_ALLOW_CREDENTIALS,
                max_age=s.CORS_MAX_AGE,
            )
        app = ErrorEnvelopeMiddleware(app, report=self.error_reporter.report)
        if self._access_log:
            app = AccessLogMiddleware(app, sink=self.access_log_sink)
        return RequestIDMiddleware(app)

    def add_middleware(self, factory: Callable[..., ASGIApp], **options: Any) -> None:
        """Add a pure ASGI middleware inside CORS (the first added is the outermost).

        ``factory(app, **options)`` must return the wrapping ASGI app; add
        middleware before serving.
        """
        self._user_middleware.append((factory, options))
        self._stack = self._build_stack()

    @property
    def access_log_enabled(self) -> bool:
        """Whether the access-log middleware is in the stack."""
        return self._access_log

    def use_access_sink(self, sink: AccessSink) -> None:
        """Write the access lines through ``sink`` from now on (the app flushes it at shutdown).

        ``ghar-core serve`` calls it with its buffered writer on an app that
        logs through the logging module; call it before serving.
        """
        self._access_log = True
        self.access_log_sink = sink
        self._stack = self._build_stack()

    # --- routes ------------------------------------------------------------------

    def add_route(
        self,
        path: str,
        handler: Handler,
        methods: Sequence[str] = ("GET",),
        *,
        lazy_start: bool = True,
    ) -> None:
        """Register ``handler`` for ``methods`` on ``path`` (see ``routing`` for templates).

        ``lazy_start=False`` lets the route answer without starting resources
        (what ``/health`` uses); duplicates and non-async handlers are refused.
        """
        if not is_async_callable(handler):
            raise TypeError(f"handler for {path!r} must be an async function, got {handler!r}")
        route = self.router.add(path, handler, methods)
        if not lazy_start:
            self._no_startup.add(id(route))

    def route(self, path: str, methods: Sequence[str] = ("GET",)) -> Callable[[F], F]:
        """Decorator form of :meth:`add_route`."""

        def register(handler: F) -> F:
            self.add_route(path, handler, methods)
            return handler

        return register

    def get(self, path: str) -> Callable[[F], F]:
        """``@app.get(path)``."""
        return self.route(path, ("GET",))

    def post(self, path: str) -> Callable[[F], F]:
        """``@app.post(path)``."""
        return self.route(path, ("POST",))

    def put(self, path: str) -> Callable[[F], F]:
        """``@app.put(path)``."""
        return self.route(path, ("PUT",))

    def patch(self, path: str) -> Callable[[F], F]:
        """``@app.patch(path)``."""
        return self.route(path, ("PATCH",))

    def delete(self, path: str) -> Callable[[F], F]:
        """``@app.delete(path)``."""
        return self.route(path, ("DELETE",))

    def add_websocket_route(self, path: str, handler: WebSocketHandler) -> None:
        """Register ``async def handler(ws)`` for WebSocket connections on ``path``.

        With ``ENABLE_WEBSOCKETS=false`` the route is not added: a handshake
        on ``path`` is refused like any unknown route (404).
        """
        if not is_async_callable(handler):
            raise TypeError(f"websocket handler for {path!r} must be an async function")
        if not self.settings.ENABLE_WEBSOCKETS:
            logger.debug("ENABLE_WEBSOCKETS is off: not serving the WebSocket route %s", path)
            return
        self.websocket_router.add(path, handler, ("WS",))

    def websocket_route(self, path: str) -> Callable[[F], F]:
        """Decorator form of :meth:`add_websocket_route`."""

        def register(handler: F) -> F:
            self.add_websocket_route(path, handler)
            return handler

        return register

    # --- lifespan ------------------------------------------------------------------

    async def startup(self) -> None:
        """Start the resources now (idempotent); raises ``LifecycleError`` on failure."""
        await self.lifespan_manager.startup()

    async def shutdown(self) -> None:
        """Stop the resources in reverse, every stop attempted, each bounded.

        A buffered access log and the error reporter are flushed afterwards,
        whatever happened.
        """
        await self.lifespan_manager.shutdown()

    def _after_shutdown(self) -> None:
        flush = getattr(self.access_log_sink, "flush", None)
        if flush is not None:
            flush()
        self.error_reporter.close()

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[App]:
        """``async with app.lifespan():`` -- started inside, stopped on the way out."""
        await self.startup()
        try:
            yield self
        finally:
            await self.shutdown()

    # --- ASGI ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan_manager.handle(scope, receive, send)
            return
        await self._stack(scope, receive, send)

    def _route_path(self, scope: Scope) -> str:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        # Servers put the mount prefix in both root_path and path (ASGI spec);
        # a host that already stripped it is handled too.
        if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
            return path[len(root) :] or "/"
        return path

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket":
                await self._dispatch_websocket(scope, receive, send)
            return
        path = self._route_path(scope) if scope.get("root_path") else scope["path"]
        router = self.router
        route = router.static.get(path)
        params: dict[str, Any] = {}
        if route is None:
            found = router.match(path)
            if found is None:
                # Paths in the details are the client's (mount prefix included),
                # so a client following the hint lands on this app again.
                prefix = scope.get("root_path", "")
                hint = router.suggest(path)
                details = {"path": safe_for_log(prefix + path, 256)}
                if hint is not None:
                    details["did_you_mean"] = prefix + hint
                await send_error(scope, send, NotFoundException(details=details))
                return
            route, params = found
        method: str = scope["method"]
        handler = route.handlers.get(method)
        if handler is None:
            handler = route.handlers.get("GET") if method == "HEAD" else None
            if handler is None:
                exc = MethodNotAllowedException(
                    f"{safe_for_log(method, 32)} is not allowed here.",
                    headers={"Allow": route.allow},
                    details={"allowed": route.allow.split(", ")},
                )
                await send_error(scope, send, exc)
                return
        request = Request(scope, receive, self, path, params)
        try:
            if not self.lifespan_manager.started and id(route) not in self._no_startup:
                await self.lifespan_manager.ensure_started()
            result = await handler(request)
        except BaseAPIException as exc:
            if exc.status_code >= 500:
                # Escaped: the method and path come from the client (no log injection).
                logger.warning(
                    "%s %s answered %d: %s",
                    safe_for_log(method, 32),
                    safe_for_log(path),
                    exc.status_code,
                    exc.message,
                )
            await send_error(scope, send, exc)
            return
        cls = type(result)
        if cls is dict or cls is list:
            # The hot path: no response object, two sends.
            body = dump_json(result)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [_JSON_HEADER, (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        elif result is None:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif callable(result):
            await result(scope, receive, send)
        elif isinstance(result, dict | list):
            # Subclasses (defaultdict, OrderedDict) are dicts too; checked only here,
            # off the exact-type hot path above.
            await Response(dump_json(result), media_type="application/json")(scope, receive, send)
        else:
            raise TypeError(
                f"handler for {route.path!r} returned {cls.__name__}; return a dict, a list, "
                "a response object or None"
            )

    async def _dispatch_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = self._route_path(scope) if scope.get("root_path") else scope["path"]
        found = self.websocket_router.match(path)
        if found is None:
            details = {"path": safe_for_log(path, 256)}
            await _deny_websocket(
                scope, send, NotFoundException(details=details), 1008, "no such route"
            )
            return
        route, params = found
        try:
            await self.lifespan_manager.ensure_started()
        except BaseAPIException as exc:
            await _deny_websocket(scope, send, exc, 1011, "not ready")
            return
        ws = WebSocket(scope, receive, send, self, path, params)
        try:
            await route.handlers["WS"](ws)
        except WebSocketDisconnect:
            ws.application_state = WebSocketState.CLOSED
        except BaseAPIException as exc:
            # An expected refusal (current_user's 401, a missing object's 404):
            # one log line, no traceback, and the client learns the code.
            status = exc.status_code
            (logger.warning if status >= 500 else logger.info)(
                "websocket %s refused: %d %s", safe_for_log(path), status, exc.error_code
            )
            close_code = 1013 if status == 503 else 1011 if status >= 500 else 1008
            await _refuse(ws, scope, send, exc, close_code, exc.error_code[:120])
        except Exception as exc:
            self.error_reporter.report(exc)
            logger.error("websocket handler for %s failed", safe_for_log(path), exc_info=exc)
            await _refuse(ws, scope, send, exc, 1011, "internal error")
        finally:
            if ws.application_state is not WebSocketState.CLOSED:
                with contextlib.suppress(Exception):
                    await ws.close()


async def _refuse(
    ws: WebSocket, scope: Scope, send: Send, exc: BaseException, code: int, reason: str
) -> None:
    """End a failed WebSocket call: deny the handshake, or close an accepted socket."""
    with contextlib.suppress(Exception):
        if ws.application_state is WebSocketState.CONNECTING:
            ws.application_state = WebSocketState.CLOSED
            await _deny_websocket(scope, send, exc, code, reason)
        else:
            await ws.close(code, reason)


async def _deny_websocket(
    scope: Scope, send: Send, exc: BaseException, code: int, reason: str
) -> None:
    """Refuse a handshake: the error envelope as an HTTP answer when the server can.

    With the ``websocket.http.response`` extension (uvicorn offers it) the client
    gets the real status, the envelope and ``X-Request-ID`` (the request-ID
    middleware stamps ``websocket.http.response.start``); otherwise a close
    before accept, which servers turn into a bare 403.
    """
    if "websocket.http.response" in (scope.get("extensions") or {}):
        rendered = render_error(exc)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": rendered.status_code,
                "headers": rendered.headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": rendered.body})
        return
    await send({"type": "websocket.close", "code": code, "reason": reason})


def create_app(
    settings: Settings | None = None,
    *,
    resources: Sequence[ResourceSpec] | Resources = (),
    migrations: Sequence[MigrationSet] = (),
    clients: Sequence[ClientSpec] = (),
    core_resources: bool = True,
    access_log: bool | AccessSink | None = None,
    cors: bool = True,
    builtin_endpoints: bool = True,
) -> App:
    r"""Build the ASGI app.

    ``settings``: defaults to the process settings (``ghar_core.config``).
    ``resources``: the app's own resources, started in order after the core's
    (:func:`build_default_resources`: HTTP clients, database, auth, SSE bus)
    and stopped in reverse, each step bounded by ``settings.SHUTDOWN_STEP_TIMEOUT``.
    An item may be a factory (a class taking ``Resources`` works): it is called
    with the resources before it, so it can use any of them
    (``resources.get("database", Database)``). A ready :class:`Resources` is
    used as is, without the core's.
    ``migrations``: the app's own :class:`~ghar_core.migrate.MigrationSet`\ s,
    applied after the core's on ``DB_MIGRATE_ON_STARTUP`` (or ``ghar-core migrate``).
    ``clients``: the app's own :class:`~ghar_core.http.ClientSpec`\ s (name,
    base URL, timeouts, limit), owned and closed by the ``"http_clients"``
    resource like the core's four.
    ``core_resources=False`` leaves the core's resources out (a bare app for
    tests of routing and middleware); ``migrations``/``clients`` then have no
    owner and are refused.
    ``access_log``: one line per request (default ``settings.ACCESS_LOG``);
    ``True`` logs through the ``ghar_core.access`` logger, a sink (e.g.
    :class:`~ghar_core.asgi.accesslog.BufferedAccessLog`) writes the lines
    itself, much faster; ``False`` leaves the middleware out.
    ``cors``: the CORS middleware from the ``CORS_*`` settings.
    ``builtin_endpoints``: ``GET /health``, ``GET /ready`` and ``GET {API_V1_STR}/me``.

    Serve it with uvicorn (lifespan events start the resources), mount it in
    another ASGI app (``root_path`` honoured; without lifespan events the
    first request starts the resources), or drive it yourself::

        app = create_app(settings)
        async with app.lifespan():
            ...            # or: await app.startup() ... await app.shutdown()
    """
    if settings is None:
        from ghar_core.config import get_settings

        settings = get_settings()
    if isinstance(resources, Resources):
        owned = resources
    else:
        specs: list[ResourceSpec] = []
        if core_resources:
            specs = build_default_resources(settings, migrations=migrations, clients=clients)
        elif migrations or clients:
            raise ValueError(
                "migrations= and clients= need the core's resources (its database and "
                "HTTP clients); drop core_resources=False, or pass Database(settings, "
                "migrations=...) and HTTPClients([...]) in resources= yourself"
            )
        specs.extend(resources)
        owned = Resources(specs, step_timeout=settings.SHUTDOWN_STEP_TIMEOUT)
    if access_log is None:
        access_log = settings.ACCESS_LOG
    app = App(settings, owned, access_log=access_log, cors=cors)
    if builtin_endpoints:
        app.add_route("/health", health, ("GET",), lazy_start=False)
        app.add_route("/ready", ready, ("GET",))
        register_auth_routes(app)  # GET {API_V1_STR}/me (issue 5)
        register_sse_routes(app)  # GET .../events/stream, POST .../events/test (ENABLE_SSE)
        register_websocket_routes(app)  # .../ws/jobs/{job_id}, .../ws/notifications
    return app
