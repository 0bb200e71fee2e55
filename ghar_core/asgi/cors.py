"""CORS as a pure ASGI middleware, configured from settings.

Requests without an ``Origin`` header get no CORS headers, only ``Vary:
Origin`` -- unless the allowed origin is a constant ``*`` (any origin, no
credentials) -- because the answer to a request with an Origin would differ
and a shared cache must not mix the two (Fetch standard, "CORS protocol and
HTTP caches"). A preflight (``OPTIONS`` with
``Access-Control-Request-Method``) is answered here: 204 with the allowed
methods, the requested headers echoed when they are well-formed tokens, and
``Max-Age``; a preflight from an origin not allowed gets a 403 envelope. An
actual request from an allowed origin gets ``Access-Control-Allow-Origin``
(the origin itself, or ``*`` when any origin is allowed without
credentials), ``Allow-Credentials`` when configured, ``Vary: Origin`` and
``Access-Control-Expose-Headers: X-Request-ID`` so browsers can read the id.
Ours replace the app's own ``Allow-Origin`` and ``Allow-Credentials`` (two
``Allow-Origin`` values are refused by browsers); an ``Expose-Headers`` the
app set is merged with ours (each name once, compared case-insensitively).
A request from another origin passes through without our CORS headers (with
``Vary: Origin``), and the browser withholds the answer.

``*`` never goes with credentials (Fetch: a credentialed request fails on
``Access-Control-Allow-Origin: *``). With ``*`` among the origins and
``allow_credentials`` set, we answer ``*`` without ``Allow-Credentials`` and
log one warning when the middleware is built: echoing every origin back with
credentials would let any site read a signed-in user's answers. Production
settings refuse the combination outright (``ghar_core.config``).

The middleware sits inside the error envelope. Errors raised by handlers
as :class:`~ghar_core.exceptions.BaseAPIException` are rendered by the
router and pass through here; for the last-resort 500, rendered by the
envelope middleware outside us, we leave the headers in the scope under
``CORS_SCOPE_KEY`` and the envelope middleware adds them, so a browser can
read every error (and its request id).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ghar_core.asgi.middleware import CORS_SCOPE_KEY, forwards_bodies, send_error
from ghar_core.asgi.routing import HTTP_METHODS
from ghar_core.exceptions import ForbiddenException

if TYPE_CHECKING:
    from ghar_core.asgi.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CORSMiddleware"]

logger = logging.getLogger("ghar_core.cors")

_ORIGIN = b"origin"
_REQUEST_METHOD = b"access-control-request-method"
_REQUEST_HEADERS = b"access-control-request-headers"
_VARY_ORIGIN = (b"vary", b"Origin")
_VARY_ONLY = (_VARY_ORIGIN,)
# What we set on an allowed origin's answer; the app's own values are dropped
# (Expose-Headers is merged with ours instead).
_EXPOSE = b"access-control-expose-headers"
_OURS = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        _EXPOSE,
    }
)
_TOKEN_LIST = re.compile(
    rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+(?:[ \t]*,[ \t]*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*"
)


class CORSMiddleware:
    """Answer preflights and add CORS headers for allowed origins (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allow_origins: Iterable[str],
        allow_credentials: bool = False,
        max_age: int = 600,
        allow_methods: Iterable[str] = sorted(HTTP_METHODS),
        expose_headers: Iterable[str] = ("X-Request-ID",),
    ) -> None:
        self.app = app
        origins = [o.strip().rstrip("/") for o in allow_origins if o.strip()]
        self.allow_all = "*" in origins
        self.origins = frozenset(o.encode("latin-1") for o in origins if o != "*")
        if self.allow_all and allow_credentials:
            logger.warning(
                "CORS_ORIGINS has `*` and CORS_ALLOW_CREDENTIALS is on: `*` never goes"
                " with credentials (Fetch standard), so any origin gets `*` without"
                " Allow-Credentials; list the origins that need credentials instead"
            )
            allow_credentials = False
        self.allow_credentials = allow_credentials
        # Only a constant "*" (any origin, no credentials) is the same for every
        # Origin; otherwise every answer depends on it and says so in Vary.
        self._vary_always = not (self.allow_all and not allow_credentials)
        self.methods = frozenset(m.upper().encode("ascii") for m in allow_methods)
        tail: list[tuple[bytes, bytes]] = []
        if allow_credentials:
            tail.append((b"access-control-allow-credentials", b"true"))
        self._exposed = tuple(h.strip() for h in expose_headers if h.strip())
        self._exposed_lower = frozenset(h.lower() for h in self._exposed)
        exposed = ", ".join(self._exposed)
        if exposed:
            tail.append((_EXPOSE, exposed.encode("latin-1")))
        tail.append(_VARY_ORIGIN)
        self._tail = tuple(tail)
        self._preflight = (
            (b"access-control-allow-methods", b", ".join(sorted(self.methods))),
            (b"access-control-max-age", str(max_age).encode("ascii")),
            *tail,
        )

    def _allow_origin_value(self, origin: bytes) -> bytes:
        return b"*" if self.allow_all and not self.allow_credentials else origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin: bytes | None = None
        for name, value in scope["headers"]:
            if name == _ORIGIN:
                origin = value
                break
        if origin is None:
            if not self._vary_always:
                await self.app(scope, receive, send)
                return
            # No Origin, no CORS headers -- but a cache must not serve this answer
            # to a browser that sends one (Fetch, "CORS protocol and HTTP caches").
            scope[CORS_SCOPE_KEY] = _VARY_ONLY
            await self.app(scope, receive, _with_vary(send))
            return
        allowed = self.allow_all or origin in self.origins
        if scope["method"] == "OPTIONS":
            requested = _header(scope, _REQUEST_METHOD)
            if requested is not None:
                await self._answer_preflight(scope, send, origin, allowed, requested)
                return
        if not allowed:
            # No CORS headers, but the answer still depends on Origin: without Vary a
            # shared cache could serve this header-less answer to an allowed origin.
            # Headers the app set itself are its own choice and pass through.
            scope[CORS_SCOPE_KEY] = _VARY_ONLY
            await self.app(scope, receive, _with_vary(send))
            return
        extra = ((b"access-control-allow-origin", self._allow_origin_value(origin)), *self._tail)
        scope[CORS_SCOPE_KEY] = extra

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers") or ()
                # Ours replace the app's own: two Allow-Origin values are refused
                # by browsers (Fetch: the header takes exactly one origin or "*").
                if not headers:
                    message["headers"] = list(extra)
                else:
                    mine = [h for h in headers if h[0].lower() not in _OURS]
                    theirs = [v for n, v in headers if n.lower() == _EXPOSE]
                    message["headers"] = [*mine, *(self._merge(extra, theirs) if theirs else extra)]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _merge(
        self, extra: tuple[tuple[bytes, bytes], ...], theirs: list[bytes]
    ) -> list[tuple[bytes, bytes]]:
        """``extra`` with the app's ``Expose-Headers`` names joined to ours, each once."""
        names = list(self._exposed)
        seen = set(self._exposed_lower)
        for value in theirs:
            for name in value.decode("latin-1").split(","):
                name = name.strip()
                if name and name.lower() not in seen:
                    seen.add(name.lower())
                    names.append(name)
        merged = (_EXPOSE, ", ".join(names).encode("latin-1"))
        out = [h for h in extra if h[0] != _EXPOSE]
        out.insert(len(out) - 1, merged)  # before Vary, where ours stands
        return out

    async def _answer_preflight(
        self, scope: Scope, send: Send, origin: bytes, allowed: bool, method: bytes
    ) -> None:
        if not allowed:
            await send_error(
                scope,
                send,
                ForbiddenException(
                    "This origin may not call the API from a browser.",
                    error_code="CORS_ORIGIN_NOT_ALLOWED",
                    details={"origin": origin.decode("latin-1")[:256]},
                ),
                extra_headers=_VARY_ONLY,  # refused for this Origin: caches must know
            )
            return
        if method.upper() not in self.methods:
            await send_error(
                scope,
                send,
                ForbiddenException(
                    "This method is not allowed for cross-origin requests.",
                    error_code="CORS_METHOD_NOT_ALLOWED",
                    details={"method": method.decode("latin-1")[:32]},
                ),
                extra_headers=_VARY_ONLY,  # refused for this Origin: caches must know
            )
            return
        headers = [
            (b"access-control-allow-origin", self._allow_origin_value(origin)),
            *self._preflight,
        ]
        requested = _header(scope, _REQUEST_HEADERS)
        if requested and _TOKEN_LIST.fullmatch(requested.strip()):
            headers.append((b"access-control-allow-headers", requested.strip()))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _with_vary(send: Send) -> Send:
    async def send_with_vary(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), _VARY_ORIGIN]
        await send(message)

    return send_with_vary


forwards_bodies(CORSMiddleware.__call__, "send_with_cors")
forwards_bodies(_with_vary, "send_with_vary")


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value)
    return None
