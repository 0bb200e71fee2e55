"""What a request and a WebSocket have in common: a lazy view over the scope.

Handlers and helpers that work on either (``current_user`` reads the bearer
token from both) take an :class:`HTTPConnection`. Nothing is parsed until
asked for; headers, query parameters and state are built on first access and
cached. A connection owns nothing that needs closing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ghar_core.asgi.datastructures import Headers, QueryParams, State
from ghar_core.logging import get_request_id

if TYPE_CHECKING:
    from ghar_core.asgi.app import App
    from ghar_core.asgi.types import Scope
    from ghar_core.config import Settings
    from ghar_core.lifecycle import Resources

__all__ = ["HTTPConnection"]


class HTTPConnection:
    """The parts of an HTTP or WebSocket scope every handler may read.

    ``path`` is the path inside this app (``root_path`` removed when the app
    is mounted under a prefix); ``path_params`` hold converted values
    (``int``, ``uuid.UUID`` or ``str``). ``app``, ``settings`` and
    ``resources`` reach the app's shared parts; ``state`` is per connection.
    """

    __slots__ = ("_headers", "_query", "_state", "app", "path", "path_params", "scope")

    def __init__(
        self,
        scope: Scope,
        app: App,
        path: str | None = None,
        path_params: dict[str, Any] | None = None,
    ) -> None:
        self.scope = scope
        self.app = app
        self.path: str = scope["path"] if path is None else path
        self.path_params: dict[str, Any] = {} if path_params is None else path_params
        self._headers: Headers | None = None
        self._query: QueryParams | None = None
        self._state: State | None = None

    @property
    def root_path(self) -> str:
        """The prefix this app is mounted under ("" at the top level)."""
        root: str = self.scope.get("root_path", "")
        return root

    @property
    def headers(self) -> Headers:
        """Case-insensitive headers."""
        if self._headers is None:
            self._headers = Headers(self.scope.get("headers", ()))
        return self._headers

    @property
    def query_params(self) -> QueryParams:
        """Decoded query parameters (first value wins; ``getlist`` for all)."""
        if self._query is None:
            self._query = QueryParams(self.scope.get("query_string", b""))
        return self._query

    @property
    def client(self) -> tuple[str, int] | None:
        """``(host, port)`` of the peer, or ``None`` when the server does not know."""
        client = self.scope.get("client")
        return (client[0], client[1]) if client else None

    @property
    def state(self) -> State:
        """Per-connection attributes, shared by helpers (e.g. the current user) and handlers."""
        if self._state is None:
            self._state = State()
        return self._state

    @property
    def settings(self) -> Settings:
        """The app's settings."""
        return self.app.settings

    @property
    def resources(self) -> Resources:
        """The app's resources (``request.resources.get("database")``)."""
        return self.app.resources

    @property
    def request_id(self) -> str | None:
        """The id the request-ID middleware bound for this request or socket."""
        return get_request_id()
