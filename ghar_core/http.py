"""The shared outbound HTTP clients: one aiohttp session per client domain.

Why shared sessions: a session owns a connection pool. A new session per
request pays a TCP connect (and over HTTPS a TLS handshake) every time; a
shared one reuses warm keep-alive connections (see
``benchmarks/results/http_clients.md`` for the numbers on our machine).

Ownership: this module owns every session it hands out. A session is created
lazily by the first getter call in a running event loop (exactly once: the
getters are synchronous, so no other task can interleave between the check
and the creation), and created anew after it was closed or when called from
another loop. Callers use the session and never close it; the app's lifespan
closes all of them through :class:`HTTPClientsResource` (``close_all_clients``).
Outside an app, a loop run by ``asyncio.run()`` closes its own sessions when it
finishes (see ``_ensure_loop_finalizer``), so scripts need no cleanup call.

Adding a client domain is one row in :data:`CLIENT_SPECS` plus a one-line
getter.

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

TLS: sessions verify certificates with the system trust store. Tests that talk
HTTPS to a server with a private CA call :func:`set_ssl_context` before the
sessions are created (or after ``close_all_clients()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import weakref
from collections.abc import AsyncGenerator, Coroutine, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp

__all__ = [
    "CLIENT_SPECS",
    "ClientSpec",
    "HTTPClientsResource",
    "SharedClient",
    "close_all_clients",
    "get_blog_client",
    "get_general_client",
    "get_scraper_client",
    "get_ssl_context",
    "get_supabase_auth_http_client",
    "request_timeout",
    "set_ssl_context",
]

logger = logging.getLogger(__name__)

# Same rule aiohttp uses: CPython fixed the SSL transport leak in 3.12.8 and 3.13.1.
_NEEDS_CLEANUP_CLOSED = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)

# Bound on waiting for a session that lives in another (running) loop to close.
_FOREIGN_CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """One client domain: its name, default total timeout, connection limit, idle keep-alive.

    ``total_timeout`` and ``keepalive_timeout`` are seconds; ``limit`` is the
    most connections open at once. Validated eagerly so a bad row fails at import.
    """

    name: str
    total_timeout: float
    limit: int
    keepalive_timeout: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ClientSpec.name must not be empty")
        if not self.total_timeout > 0:
            raise ValueError(f"ClientSpec {self.name!r}: total_timeout must be > 0 seconds")
        if self.limit < 1:
            raise ValueError(f"ClientSpec {self.name!r}: limit must be at least 1 connection")
        if not self.keepalive_timeout > 0:
            raise ValueError(f"ClientSpec {self.name!r}: keepalive_timeout must be > 0 seconds")


def _table(*specs: ClientSpec) -> Mapping[str, ClientSpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


#: The client domains. A new client is one row here plus its getter below.
CLIENT_SPECS: Mapping[str, ClientSpec] = _table(
    ClientSpec("scraper", total_timeout=60.0, limit=10, keepalive_timeout=30.0),
    ClientSpec("blog", total_timeout=120.0, limit=5, keepalive_timeout=30.0),
    ClientSpec("general", total_timeout=60.0, limit=5, keepalive_timeout=30.0),
    ClientSpec("supabase_auth", total_timeout=10.0, limit=10, keepalive_timeout=30.0),
)

# None means aiohttp's default verification against the system trust store.
_ssl_context: ssl.SSLContext | None = None


def set_ssl_context(context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """Set the SSL context sessions created from now on use; return the previous one.

    For tests (a trustme CA) and private CAs. Sessions that already exist keep
    theirs, so call it before first use or after :func:`close_all_clients`.
    ``None`` restores aiohttp's default verification.
    """
    global _ssl_context
    previous, _ssl_context = _ssl_context, context
    return previous


def get_ssl_context() -> ssl.SSLContext | None:
    """The SSL context new sessions use (``None``: aiohttp's default)."""
    return _ssl_context


def request_timeout(total: float) -> aiohttp.ClientTimeout:
    """A per-request ``timeout=`` that replaces the client's default total timeout."""
    if not total > 0:
        raise ValueError("request_timeout: total must be > 0 seconds")
    return aiohttp.ClientTimeout(total=total)


def _running_loop(what: str) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{what} must be called inside a running event loop (from async code): "
            "an aiohttp session belongs to the loop it was created in"
        ) from None


class SharedClient:
    """The lazily created session of one client domain, one per event loop.

    Owns its sessions: :meth:`get` creates one on first use in a loop and again
    after it was closed; :meth:`aclose` closes all of them. Normally used
    through the module getters; tests build one with a custom spec.
    """

    __slots__ = ("__weakref__", "_sessions", "spec")

    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        # Keyed by loop so two loops (e.g. a worker thread's) never close each other's session.
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        _instances.add(self)

    def get(self) -> aiohttp.ClientSession:
        """The open session for the running loop, created now if there is none."""
        loop = _running_loop(f"the {self.spec.name!r} HTTP client getter")
        session = self._sessions.get(loop)
        if session is not None and not session.closed:
            return session
        # Rare path: first use, use after close, or first use in a new loop.
        self._retire_dead_loops(loop)
        _ensure_loop_finalizer(loop)
        session = self._new_session()
        self._sessions[loop] = session
        return session

    def _new_session(self) -> aiohttp.ClientSession:
        spec = self.spec
        connector = aiohttp.TCPConnector(
            limit=spec.limit,
            limit_per_host=0,
            keepalive_timeout=spec.keepalive_timeout,
            force_close=False,
            enable_cleanup_closed=_NEEDS_CLEANUP_CLOSED,
            ssl=_ssl_context if _ssl_context is not None else True,
        )
        return aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=spec.total_timeout)
        )

    def _retire_dead_loops(self, current: asyncio.AbstractEventLoop) -> None:
        # Sessions of closed loops can no longer do I/O; mark them closed so they
        # neither leak a ResourceWarning nor keep the old loop alive.
        for loop in [lp for lp in self._sessions if lp is not current and lp.is_closed()]:
            session = self._sessions.pop(loop)
            if not session.closed:
                _spawn(current, _close_quietly(session, self.spec.name))

    async def aclose(self) -> None:
        """Close every session of this client (idempotent; the next get() makes a new one)."""
        current = asyncio.get_running_loop()
        sessions, self._sessions = self._sessions, {}
        for loop, session in sessions.items():
            if session.closed:
                continue
            if loop is current or loop.is_closed() or not loop.is_running():
                await _close_quietly(session, self.spec.name)
            else:
                # Lives in a loop running in another thread: close it there, bounded.
                future = asyncio.run_coroutine_threadsafe(
                    _close_quietly(session, self.spec.name), loop
                )
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(future), _FOREIGN_CLOSE_TIMEOUT)

    async def _close_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close this client's session of ``loop`` (run by that loop's finalizer)."""
        session = self._sessions.pop(loop, None)
        if session is not None and not session.closed:
            await _close_quietly(session, self.spec.name)

    def open_sessions(self) -> int:
        """How many sessions of this client are open now (for tests and diagnostics)."""
        return sum(1 for session in self._sessions.values() if not session.closed)


# Every SharedClient, so a loop's finalizer closes the sessions of all of them
# (the module's four and any a caller built), not only the module's table.
_instances: weakref.WeakSet[SharedClient] = weakref.WeakSet()

# Closes started from the sync getter; held so the tasks are not garbage collected.
_background: set[asyncio.Task[None]] = set()


def _spawn(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    task = loop.create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _close_quietly(session: aiohttp.ClientSession, name: str) -> None:
    # A session from a closed or idle loop may fail to finish closing; its
    # connector is marked closed first, which is what matters.
    try:
        await session.close()
    except Exception:
        logger.debug("closing a stale %r HTTP session failed", name, exc_info=True)


_clients: dict[str, SharedClient] = {n: SharedClient(spec) for n, spec in CLIENT_SPECS.items()}

# One started async generator per loop that has sessions. asyncio.run() (and
# uvicorn, and asyncio.Runner) call loop.shutdown_asyncgens() before closing
# the loop, which runs the generator's ``finally``: the loop's sessions close
# while the loop can still do I/O. Without this, a script that runs
# asyncio.run() per job and never calls close_all_clients() would leave the
# sockets of each finished loop open until garbage collection. The loop only
# holds async generators weakly, so we keep them here (weak on the loop).
_finalizers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = (
    weakref.WeakKeyDictionary()
)


async def _close_sessions_of(loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        for client in list(_instances):
            await client._close_loop(loop)


def _ensure_loop_finalizer(loop: asyncio.AbstractEventLoop) -> None:
    if loop in _finalizers:
        return
    finalizer = _close_sessions_of(loop)
    # Advance to the first ``yield`` synchronously: this registers the generator
    # with the running loop (its firstiter hook) without scheduling anything.
    step = finalizer.asend(None)
    try:
        step.send(None)
    except StopIteration:
        _finalizers[loop] = finalizer
    else:  # pragma: no cover - the generator yields before any await
        raise AssertionError("the loop finalizer awaited before its first yield")


def get_scraper_client() -> aiohttp.ClientSession:
    """The shared session for scraping (60 s default timeout, 10 connections)."""
    return _clients["scraper"].get()


def get_blog_client() -> aiohttp.ClientSession:
    """The shared session for blog content (120 s default timeout, 5 connections)."""
    return _clients["blog"].get()


def get_general_client() -> aiohttp.ClientSession:
    """The shared session for everything else (60 s default timeout, 5 connections)."""
    return _clients["general"].get()


def get_supabase_auth_http_client() -> aiohttp.ClientSession:
    """The shared session for the identity provider: JWKS, introspection, admin (10 s, 10)."""
    return _clients["supabase_auth"].get()


async def close_all_clients() -> None:
    """Close every shared session (idempotent); called by the app's shutdown.

    A getter called afterwards creates a new session, which the next call
    closes again.
    """
    for client in _clients.values():
        await client.aclose()
    current = asyncio.get_running_loop()
    pending = [task for task in _background if not task.done() and task.get_loop() is current]
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


class HTTPClientsResource:
    """The lifespan's handle on the shared sessions: ``stop`` closes them all.

    ``start`` does nothing (sessions are lazy) and ``check`` does nothing: the
    app's readiness must not depend on third-party hosts being up.
    """

    name = "http_clients"

    async def start(self) -> None:
        """Nothing to do: sessions are created on first use."""

    async def stop(self) -> None:
        """Close every shared session (idempotent)."""
        await close_all_clients()

    async def check(self) -> None:
        """Always ready: outbound hosts are not ours to vouch for."""
