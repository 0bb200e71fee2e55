"""The shared outbound HTTP clients: one aiohttp session per client domain.

Why shared sessions: a session owns a connection pool. A new session per
request pays a TCP connect (and over HTTPS a TLS handshake) every time; a
shared one reuses warm keep-alive connections (see
``benchmarks/results/http_clients.md`` for the numbers on our machine).

Ownership: the :class:`HTTPClients` resource (``"http_clients"``) owns every
session. It holds one :class:`ClientSpec` per client domain (the core's four
in :data:`CLIENT_SPECS`, plus any the app registers), creates a domain's
session lazily on first use in the running loop (exactly once: ``session()``
is synchronous, so no task interleaves between the check and the creation)
and closes them all when it stops. Callers use a session and never close it.
The module getters (``get_general_client()``, ...) ask the clients resource of
the running app; outside an app, own one: ``async with HTTPClients() as
clients: clients.session("general")``.

An app adds a client domain without editing this module::

    GEOCODER = ClientSpec("geocoder", total_timeout=5.0, limit=4, base_url=settings.GEOCODER_URL)
    app = create_app(settings, clients=[GEOCODER])   # or clients.register(GEOCODER)
    ...
    session = request.resources.get("http_clients", HTTPClients).session("geocoder")
    async with session.get("/v1/search", params={"q": q}) as r: ...   # relative to base_url

How the seed's "keepalive" numbers map onto aiohttp's connector options
(``aiohttp.TCPConnector``), per :class:`ClientSpec` field:

``limit``
    ``TCPConnector(limit=...)``: the most connections the session holds at
    once, in use and idle together (httpx: ``max_connections``). A request
    beyond it waits for a free connection; that wait counts against the
    request's total timeout.
``keepalive_timeout``
    ``TCPConnector(keepalive_timeout=...)``: seconds an idle connection stays
    in the pool before it is closed (httpx: ``keepalive_expiry``).
(httpx's ``max_keepalive_connections``)
    No aiohttp equivalent: every released connection may stay idle, so the
    idle pool is bounded by ``limit`` too.
``limit_per_host``
    Left at 0 (no per-host cap beyond ``limit``): each client talks to one or
    a few hosts, and ``limit`` is the number that matters.
``force_close``
    ``False``: connections are reused. ``True`` would open one connection per
    request, which is what the shared sessions exist to avoid.
``enable_cleanup_closed``
    On only on Pythons whose SSL transports can leak when a peer does not
    finish the TLS shutdown (before 3.12.8, and 3.13.0); aiohttp warns if it
    is set where CPython fixed that, so we decide from the version.
``total_timeout``
    ``ClientTimeout(total=...)`` on the session: the default for the whole
    request (pool wait, connect, send, read). A per-request ``timeout=`` (an
    ``aiohttp.ClientTimeout``, see :func:`request_timeout`) replaces it.
``connect_timeout``
    ``ClientTimeout(sock_connect=...)``: seconds to open a TCP (and TLS)
    connection; ``None`` leaves it to the total.
``base_url``
    ``ClientSession(base_url=...)``: requests may then name only a path.

TLS: sessions verify certificates with the system trust store. A private CA:
``HTTPClients(ssl_context=context)``, or :func:`set_ssl_context` before the sessions
are created (tests use it with a trustme CA).

Also here, because every outbound caller needs them: :data:`ClientProvider`
(how a service is handed "a session" without owning one), :func:`resolve_session`
and :func:`read_limited` (a body bounded in bytes).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import aiohttp

__all__ = [
    "CLIENT_SPECS",
    "ClientProvider",
    "ClientSpec",
    "HTTPClients",
    "HTTPClientsResource",
    "close_all_clients",
    "get_blog_client",
    "get_general_client",
    "get_scraper_client",
    "get_ssl_context",
    "get_supabase_auth_http_client",
    "read_limited",
    "request_timeout",
    "resolve_session",
    "running_clients",
    "set_ssl_context",
]

logger = logging.getLogger(__name__)

# Same rule aiohttp uses: CPython fixed the SSL transport leak in 3.12.8 and 3.13.1.
_NEEDS_CLEANUP_CLOSED = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)

#: Something that hands out a session without giving its ownership away:
#: ``clients.provider("supabase_auth")``, a getter, or an async callable.
ClientProvider = Callable[[], "aiohttp.ClientSession | Awaitable[aiohttp.ClientSession]"]


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """One client domain: name, timeouts (seconds), connection limit, optional base URL.

    Validated eagerly, so a bad spec fails where it is written, not on first use.
    """

    name: str
    total_timeout: float
    limit: int
    keepalive_timeout: float = 30.0
    base_url: str | None = None
    connect_timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ClientSpec.name must not be empty")
        if not self.total_timeout > 0:
            raise ValueError(f"ClientSpec {self.name!r}: total_timeout must be > 0 seconds")
        if self.limit < 1:
            raise ValueError(f"ClientSpec {self.name!r}: limit must be at least 1 connection")
        if not self.keepalive_timeout > 0:
            raise ValueError(f"ClientSpec {self.name!r}: keepalive_timeout must be > 0 seconds")
        if self.connect_timeout is not None and not self.connect_timeout > 0:
            raise ValueError(f"ClientSpec {self.name!r}: connect_timeout must be > 0 seconds")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"ClientSpec {self.name!r}: base_url must start with http:// or https://, "
                f"got {self.base_url[:60]!r}"
            )


#: The core's four client domains (the seed's numbers); an app adds its own
#: with ``create_app(clients=[...])`` or :meth:`HTTPClients.register`.
CLIENT_SPECS: Mapping[str, ClientSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ClientSpec("scraper", total_timeout=60.0, limit=10, keepalive_timeout=30.0),
            ClientSpec("blog", total_timeout=120.0, limit=5, keepalive_timeout=30.0),
            ClientSpec("general", total_timeout=60.0, limit=5, keepalive_timeout=30.0),
            ClientSpec("supabase_auth", total_timeout=10.0, limit=10, keepalive_timeout=30.0),
        )
    }
)

# None means aiohttp's default verification against the system trust store.
_ssl_context: ssl.SSLContext | None = None


def set_ssl_context(context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """Set the SSL context sessions created from now on use by default; return the previous.

    For tests (a trustme CA) and private CAs; ``HTTPClients(ssl_context=...)`` wins.
    Sessions that already exist keep theirs. ``None`` restores aiohttp's default.
    """
    global _ssl_context
    previous, _ssl_context = _ssl_context, context
    return previous


def get_ssl_context() -> ssl.SSLContext | None:
    """The SSL context new sessions use by default (``None``: aiohttp's default)."""
    return _ssl_context


def request_timeout(total: float) -> aiohttp.ClientTimeout:
    """A per-request ``timeout=`` that replaces the client's default total timeout."""
    if not total > 0:
        raise ValueError("request_timeout: total must be > 0 seconds")
    return aiohttp.ClientTimeout(total=total)


async def resolve_session(client: ClientProvider) -> aiohttp.ClientSession:
    """Call a client provider and await its result when it is awaitable."""
    session = client()
    if inspect.isawaitable(session):
        return await session
    return session


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of ``response``; :class:`ValueError` once it passes ``limit`` bytes.

    Why not ``response.content.read(limit)``: that returns what is buffered so
    far, so a body that arrives in several TCP reads or HTTP chunks is cut short.
    """
    if response.content_length is not None and response.content_length > limit:
        raise ValueError(f"the response body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"the response body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# The started HTTPClients the module getters use: a pointer to the running
# app's resource (set by its start, cleared by its stop), never an owner.
_running: HTTPClients | None = None


def running_clients() -> HTTPClients:
    """The clients resource of the running app (what the module getters use).

    Raises :class:`RuntimeError` outside a started app: nothing creates a
    session that no one would close.
    """
    if _running is None:
        raise RuntimeError(
            "no HTTP clients resource is running: call this inside an app's lifespan "
            "(create_app starts one), or own one: `async with HTTPClients() as clients:`"
        )
    return _running


class HTTPClients:
    """The resource ``"http_clients"``: every outbound session, one per client domain.

    ``specs``: the app's own domains, beside the core's :data:`CLIENT_SPECS`
    (``core=False`` leaves those out). ``ssl_context``: what every session
    verifies with (default: :func:`get_ssl_context`). Sessions belong to the
    loop they were made in, which is this resource's loop. ``stop`` (or leaving ``async
    with``) closes them all and is idempotent; ``start`` opens it again.
    ``check`` never fails: third-party hosts are not ours to vouch for.
    """

    name = "http_clients"

    def __init__(
        self,
        specs: Iterable[ClientSpec] = (),
        *,
        core: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._specs: dict[str, ClientSpec] = dict(CLIENT_SPECS) if core else {}
        self._ssl = ssl_context
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        for spec in specs:
            self.register(spec)

    @property
    def specs(self) -> Mapping[str, ClientSpec]:
        """The registered client domains by name (read-only)."""
        return MappingProxyType(self._specs)

    def register(self, spec: ClientSpec) -> None:
        """Add a client domain; a name already registered is refused."""
        if spec.name in self._specs:
            raise ValueError(f"an HTTP client named {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    def session(self, name: str) -> aiohttp.ClientSession:
        """The open session of domain ``name``, created now if there is none."""
        session = self._sessions.get(name)
        if session is not None and not session.closed:
            return session
        return self._open(name)

    def provider(self, name: str) -> Callable[[], aiohttp.ClientSession]:
        """A :data:`ClientProvider` for domain ``name`` (checked now, resolved on each call)."""
        if name not in self._specs:
            raise KeyError(self._unknown(name))

        def get() -> aiohttp.ClientSession:
            return self.session(name)

        return get

    def _unknown(self, name: str) -> str:
        known = ", ".join(sorted(self._specs)) or "none"
        return (
            f"no HTTP client named {name!r} (registered: {known}); register it with "
            "create_app(clients=[ClientSpec(...)]) or HTTPClients.register"
        )

    def _open(self, name: str) -> aiohttp.ClientSession:
        # Rare path: first use of a domain, or use after its session was closed.
        try:
            spec = self._specs[name]
        except KeyError:
            raise KeyError(self._unknown(name)) from None
        if self._closed:
            raise RuntimeError(
                f"the HTTP clients resource is stopped; no {name!r} session is made after stop"
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"the {name!r} HTTP client must be used inside a running event loop: "
                "an aiohttp session belongs to the loop it was created in"
            ) from None
        if self._loop is not None and self._loop is not loop and self._sessions:
            raise RuntimeError(
                f"the {name!r} HTTP client belongs to another event loop; "
                "each loop (each app) needs its own HTTPClients"
            )
        self._loop = loop
        tls = self._ssl if self._ssl is not None else _ssl_context
        connector = aiohttp.TCPConnector(
            limit=spec.limit,
            limit_per_host=0,
            keepalive_timeout=spec.keepalive_timeout,
            force_close=False,
            enable_cleanup_closed=_NEEDS_CLEANUP_CLOSED,
            ssl=tls if tls is not None else True,
        )
        session = aiohttp.ClientSession(
            base_url=spec.base_url,
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=spec.total_timeout, sock_connect=spec.connect_timeout
            ),
        )
        self._sessions[name] = session
        return session

    def open_sessions(self) -> int:
        """How many sessions are open now (for tests and diagnostics)."""
        return sum(1 for session in self._sessions.values() if not session.closed)

    async def aclose_sessions(self) -> None:
        """Close every open session now; the next ``session()`` makes a new one."""
        # One domain at a time, each taken out just before its close (whose
        # first step marks it closed): a getter racing this never finds a
        # second open session of the same domain.
        for name in list(self._sessions):
            session = self._sessions.pop(name, None)
            if session is None or session.closed:
                continue
            try:
                await session.close()
            except Exception:
                logger.debug("closing the %r HTTP session failed", name, exc_info=True)

    # -- the Resource protocol -------------------------------------------------------

    async def start(self) -> None:
        """Open for use (sessions are lazy) and serve the module getters."""
        global _running
        self._closed = False
        if _running is None:
            _running = self

    async def stop(self) -> None:
        """Close every session (idempotent); later ``session()`` calls are refused."""
        global _running
        self._closed = True
        if _running is self:
            _running = None
        await self.aclose_sessions()

    async def check(self) -> None:
        """Always ready: outbound hosts are not ours to vouch for."""

    async def __aenter__(self) -> HTTPClients:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


#: The seed's name for the resource.
HTTPClientsResource = HTTPClients


def get_scraper_client() -> aiohttp.ClientSession:
    """The running app's session for scraping (60 s default timeout, 10 connections)."""
    return running_clients().session("scraper")


def get_blog_client() -> aiohttp.ClientSession:
    """The running app's session for blog content (120 s default timeout, 5 connections)."""
    return running_clients().session("blog")


def get_general_client() -> aiohttp.ClientSession:
    """The running app's session for everything else (60 s default timeout, 5 connections)."""
    return running_clients().session("general")


def get_supabase_auth_http_client() -> aiohttp.ClientSession:
    """The running app's session for the identity provider: JWKS, introspection, admin (10 s)."""
    return running_clients().session("supabase_auth")


async def close_all_clients() -> None:
    """Close the running clients resource's sessions now (nothing when none runs).

    The resource stays open: a getter called afterwards makes a new session,
    closed again when the app stops.
    """
    if _running is not None:
        await _running.aclose_sessions()
