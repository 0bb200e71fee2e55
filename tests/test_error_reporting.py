"""SENTRY_DSN for real: sentry-sdk sends the 500s to a loopback endpoint that reads the envelopes.

The endpoint is an aiohttp server speaking Sentry's envelope ingestion
(``POST /api/<project>/envelope/``); the DSN points at it,
so the whole path -- the middleware, the SDK, its transport thread, HTTP --
is the real one. What arrives is checked for the request id tag and for the
absence of every secret the request carried.
"""

from __future__ import annotations

import asyncio
import gzip
import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

# The sentry extra is installed by scripts/bootstrap.sh: a missing SDK fails here, never skips.
import sentry_sdk  # noqa: F401
from aiohttp import web

from ghar_core.asgi import create_app
from ghar_core.config import Secret
from ghar_core.error_reporting import ErrorReporter, scrub_event
from ghar_core.testing import TestClient
from tests.asgi.conftest import make_settings
from tests.tls import serve


class Ingest:
    """Envelopes received, parsed into (headers, items)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.arrived = asyncio.Event()

    async def envelope(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp inflates a gzip/deflate body itself
        if body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        self.raw.append(body)
        lines = body.split(b"\n")
        # envelope header, then (item header, payload) pairs
        for i in range(1, len(lines) - 1, 2):
            item = orjson.loads(lines[i])
            if item.get("type") == "event":
                self.events.append(orjson.loads(lines[i + 1]))
                self.arrived.set()
        return web.json_response({"id": "0" * 32})


@pytest.fixture
async def ingest() -> AsyncIterator[tuple[Ingest, str]]:
    rec = Ingest()
    app = web.Application()
    app.router.add_post("/api/{project}/envelope/", rec.envelope)
    async with serve(app) as url:
        host = url.removeprefix("http://")
        yield rec, f"http://publickey@{host}/42"


async def test_a_500_reaches_sentry_with_the_request_id_and_no_secrets(
    ingest: tuple[Ingest, str],
) -> None:
    rec, dsn = ingest
    settings = make_settings(SENTRY_DSN=Secret(dsn), VERSION="9.9.9")
    app = create_app(settings, resources=[])

    @app.get("/boom")
    async def boom(request: Any) -> None:
        token = request.headers.get("authorization")  # a local holding a secret
        query = request.scope["query_string"].decode()  # the secret arrives at run time
        raise RuntimeError(f"broke at /boom?{query} ({len(token)})")

    # Made at run time: the source lines Sentry attaches must not contain them either.
    url_secret, header_secret, cookie_secret = (secrets.token_hex(8) for _ in range(3))
    async with TestClient(app) as client:
        response = await client.get(
            f"/boom?access_token={url_secret}",
            headers={
                "Authorization": f"Bearer {header_secret}",
                "Cookie": f"sid={cookie_secret}",
                "X-Request-ID": "rid-sentry-1",
            },
        )
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "INTERNAL_ERROR"
        assert response.headers["x-request-id"] == "rid-sentry-1"
        # A handled 4xx is no error to report.
        assert (await client.get("/nowhere")).status_code == 404
        await asyncio.to_thread(app.error_reporter.flush)
        await asyncio.wait_for(rec.arrived.wait(), 10)
    # Shutdown closed the client: nothing more is sent from this test's app.
    assert app.error_reporter._client is None

    assert len(rec.events) == 1
    event = rec.events[0]
    assert event["tags"]["request_id"] == "rid-sentry-1"
    assert event["release"] == f"{settings.PROJECT_NAME}@9.9.9"
    assert event["environment"] == "test"
    (exc,) = event["exception"]["values"]
    assert exc["type"] == "RuntimeError"
    assert "access_token=[REDACTED]" in exc["value"]
    everything = b"".join(rec.raw)
    for secret in (url_secret, header_secret, cookie_secret):
        assert secret.encode() not in everything
    frames = exc["stacktrace"]["frames"]
    assert frames, "the traceback is reported"
    assert all("vars" not in frame for frame in frames)


async def test_websocket_handler_errors_are_reported(ingest: tuple[Ingest, str]) -> None:
    rec, dsn = ingest
    app = create_app(make_settings(SENTRY_DSN=Secret(dsn)), resources=[])

    @app.websocket_route("/ws/boom")
    async def ws_boom(ws: Any) -> None:
        await ws.accept()
        raise ValueError("socket handler broke")

    async with TestClient(app) as client:
        async with client.websocket_connect("/ws/boom") as ws:
            with pytest.raises(ConnectionError, match="code 1011"):
                await ws.receive()
        await asyncio.to_thread(app.error_reporter.flush)
        await asyncio.wait_for(rec.arrived.wait(), 10)
    assert rec.events[0]["exception"]["values"][0]["type"] == "ValueError"


def test_no_dsn_reports_nothing_and_starts_no_client() -> None:
    reporter = ErrorReporter(make_settings())
    assert not reporter.enabled
    reporter.report(RuntimeError("nowhere to go"))
    assert reporter._client is None
    reporter.close()


def test_scrub_event_removes_every_secret_field() -> None:
    event = {
        "request": {
            "url": "https://x.test/a?token=t1&page=2",
            "query_string": "access_token=t2&page=2",
            "headers": {"Authorization": "Bearer t3", "Cookie": "c=t4", "Accept": "*/*"},
            "cookies": {"c": "t4"},
            "data": "password=t5",
        },
        "user": {"email": "a@b.c"},
        "breadcrumbs": {"values": [{"message": "t6"}]},
        "message": "GET /x?api_key=t7",
        "exception": {"values": [{"value": "?secret=t8", "stacktrace": {"frames": [{"vars": 1}]}}]},
    }
    scrubbed = orjson.dumps(scrub_event(event))
    for secret in (b"t1", b"t2", b"t3", b"t4", b"t5", b"t6", b"t7", b"t8", b"a@b.c"):
        assert secret not in scrubbed
    assert b"page=2" in scrubbed
    assert b'"Accept":"*/*"' in scrubbed
