"""``await current_user(request)``: the authenticated user of a request.

The token comes from ``Authorization: Bearer <token>``; SSE and WebSocket
routes (``allow_query_token=True``) may also pass it as the ``access_token``
query parameter, because browsers cannot set headers on ``EventSource`` or
``WebSocket`` (the access log redacts that parameter). Credentials are never
guessed: several ``Authorization`` headers, or a header and a query token
that differ, are a 400 (``AUTH_CREDENTIALS_AMBIGUOUS``), whatever their order.
Verification is the app's ``"auth"`` resource (:class:`~ghar_core.auth.SupabaseAuth`),
or the running app's when this app has none (a host mounting the core); a
cached token costs a header scan, a hash and a dict lookup.

The users row is synced through :func:`~ghar_core.users.get_or_create_user_from_supabase`
(one upsert, safe when first requests race) when the app has a ``"database"``
resource. Called while the handler holds a connection (inside
``execute_with_transient_retry`` or ``db.transaction()``), the upsert runs on
that connection, in a savepoint: never a second connection from the pool
(that row is not remembered: the handler's transaction may still roll back).
Rows are remembered per provider user id for ``TOKEN_CACHE_TTL`` seconds, so
a busy user costs one upsert a minute, not one per request; profile changes
at the provider show up within that time. The result is
kept on ``request.state`` so several calls within one request verify once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ghar_core.auth import (
    AmbiguousCredentialsException,
    SupabaseAuth,
    SupabaseUser,
    get_auth,
    token_from_authorization,
)
from ghar_core.database import held_connection
from ghar_core.exceptions import BaseAPIException
from ghar_core.lifecycle import ResourceNotFound
from ghar_core.users import get_or_create_user_from_supabase

if TYPE_CHECKING:
    from ghar_core.asgi.app import App
    from ghar_core.asgi.connection import HTTPConnection
    from ghar_core.asgi.requests import Request

__all__ = [
    "ACCESS_TOKEN_PARAM",
    "CurrentUser",
    "bearer_token",
    "current_user",
    "me",
    "register_auth_routes",
]

ACCESS_TOKEN_PARAM: Final = "access_token"
_STATE_KEY: Final = "current_user"


@dataclass(frozen=True, slots=True)
class CurrentUser:
    """Who is calling: the provider's view (``identity``) and our users row.

    ``row`` is ``None`` when the app has no database resource.
    """

    identity: SupabaseUser
    row: dict[str, Any] | None

    @property
    def id(self) -> Any:
        """Our users-row id when synced, else the provider's user id."""
        return self.row["id"] if self.row is not None else self.identity["id"]

    def as_dict(self) -> dict[str, Any]:
        """The JSON the ``/me`` endpoint returns."""
        identity: Mapping[str, Any] = self.identity
        base: dict[str, Any] = {}
        for key, value in (self.row or {}).items():
            # asyncpg's UUID subclass is not one orjson knows: send the text form.
            base[key] = str(value) if isinstance(value, uuid.UUID) else value
        base.setdefault("supabase_user_id", identity["id"])
        for key in ("email", "phone", "role", "app_metadata", "user_metadata"):
            base.setdefault(key, identity[key])
        base["is_anonymous"] = identity["is_anonymous"]
        base["session_id"] = identity["session_id"]
        return base


def bearer_token(conn: HTTPConnection, *, allow_query_token: bool = False) -> str | None:
    """The token the client sent, or ``None`` when it sent none.

    Another scheme (``Basic ...``) counts as no token: RFC 6750 (3.1) asks
    for a plain ``Bearer`` challenge, without an error code, when a client
    used an unsupported method. ``Bearer`` followed by a tab or another
    separator than one space is a malformed token (401). More than one
    ``Authorization`` header, or (with ``allow_query_token``) ``access_token``
    values that differ from each other or from the header's token, raise
    :class:`~ghar_core.auth.AmbiguousCredentialsException` (400). Scans the
    raw ASGI headers (no header dict is built).
    """
    header: bytes | None = None
    for name, value in conn.scope.get("headers", ()):
        if name == b"authorization":
            if header is not None:
                raise AmbiguousCredentialsException(
                    details={"reason": "more than one Authorization header"}
                )
            header = value
    token = None if header is None else token_from_authorization(header)
    if not allow_query_token:
        return token
    sent = {v for v in conn.query_params.getlist(ACCESS_TOKEN_PARAM) if v}
    if token:
        sent.add(token)
    if len(sent) > 1:
        raise AmbiguousCredentialsException(
            details={"reason": "different tokens in the Authorization header and the query"}
        )
    return sent.pop() if sent else None


def _auth_of(app: App) -> SupabaseAuth:
    try:
        resource = app.resources.get("auth")
    except ResourceNotFound:
        return get_auth()
    assert isinstance(resource, SupabaseAuth), "the 'auth' resource must be a SupabaseAuth"
    return resource


async def current_user(conn: HTTPConnection, *, allow_query_token: bool = False) -> CurrentUser:
    """The verified caller of this request or WebSocket; raises 401 or 503.

    ``allow_query_token`` also accepts ``?access_token=`` (SSE and WebSocket
    routes only: query strings end up in browser history and proxies' logs).
    """
    state = conn.state.__dict__
    known: CurrentUser | None = state.get(_STATE_KEY)
    if known is not None:
        return known
    auth = _auth_of(conn.app)
    # Synchronous first: a cache hit, and every refusal we make on our own,
    # costs no coroutine (the negative cache, a kid the key set lacks), and a
    # refusal is raised once, here.
    if allow_query_token:
        token = bearer_token(conn, allow_query_token=True)
        identity = auth.cached_user(token) if token else None
        if identity is None:
            verdict = auth.decide(token)
            if isinstance(verdict, BaseAPIException):
                try:
                    raise verdict
                finally:
                    del verdict  # no cycle (exception -> traceback -> frame -> local)
            identity = verdict
    else:
        # The header scan and the caches in one call (see decide_request).
        verdict = auth.decide_request(conn.scope.get("headers", ()))
        if isinstance(verdict, BaseAPIException):
            try:
                raise verdict
            finally:
                # The traceback holds this frame: had it kept the exception in a
                # local, every refused request would leave a reference cycle
                # (exception -> traceback -> frame -> exception) for the GC.
                del verdict
        identity = verdict
    if identity is None:
        # The key set must be fetched first, or only the provider can tell.
        identity = await auth.verify_token(bearer_token(conn, allow_query_token=allow_query_token))
    row: dict[str, Any] | None = None
    try:
        db = conn.app.resources.get("database")
    except ResourceNotFound:
        db = None
    if db is not None:
        rows = auth.user_rows
        row = rows.get(identity["id"])
        if row is None:
            held = held_connection()
            if held is not None:
                # Called inside the handler's own transaction: sync the row on
                # that connection (a second one could wait forever on a small
                # pool). Not remembered: that transaction may still roll back.
                row = await get_or_create_user_from_supabase(db, identity, conn=held)  # type: ignore[arg-type]
            else:
                row = await get_or_create_user_from_supabase(db, identity)  # type: ignore[arg-type]
                rows.set(identity["id"], row)
    user = CurrentUser(identity, row)
    state[_STATE_KEY] = user
    return user


async def me(request: Request) -> dict[str, Any]:
    """``GET {API_V1_STR}/me``: the authenticated user."""
    return (await current_user(request)).as_dict()


def register_auth_routes(app: App) -> None:
    """Add ``GET {API_V1_STR}/me`` to ``app`` (``create_app`` does this)."""
    app.add_route(f"{app.settings.API_V1_STR}/me", me, ("GET",))
