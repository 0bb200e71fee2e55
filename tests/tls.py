"""Loopback test servers, plain or TLS with a throwaway trustme CA.

Shared by every test that talks real HTTP(S) to a server of its own (the
shared clients, JWKS and introspection in the auth tests)::

    tls = make_tls()                                  # or the ``tls`` fixture
    async with serve(app, ssl_context=tls.server_context) as base_url:
        with trusting(tls.client_context):            # the shared sessions trust the CA
            ...
        await close_all_clients()

``serve`` binds 127.0.0.1 on a free port and always cleans up its runner.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import trustme
from aiohttp import web

from ghar_core import http

__all__ = ["TLS", "make_tls", "serve", "trusting"]


@dataclass(frozen=True)
class TLS:
    """A CA, a server context (cert for 127.0.0.1 and localhost), a client context trusting it."""

    ca: trustme.CA
    server_context: ssl.SSLContext
    client_context: ssl.SSLContext


def make_tls() -> TLS:
    """Issue a fresh CA and a loopback server certificate."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return TLS(ca=ca, server_context=server_context, client_context=client_context)


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1 (a free port) and yield its base URL, http or https."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.SockSite(runner, sock, ssl_context=ssl_context)
        await site.start()
        scheme = "https" if ssl_context is not None else "http"
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        sock.close()


@contextlib.contextmanager
def trusting(context: ssl.SSLContext | None) -> Iterator[None]:
    """Let shared sessions created inside the block use ``context``; restore after.

    Sessions created inside keep the context until closed: close them
    (``await http.close_all_clients()``) before the block ends.
    """
    previous = http.set_ssl_context(context)
    try:
        yield
    finally:
        http.set_ssl_context(previous)
