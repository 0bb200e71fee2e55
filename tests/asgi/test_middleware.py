"""Middleware: request id, access log (redaction), error envelope, CORS, pass-through."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ghar_core.asgi import BufferedAccessLog, create_app
from ghar_core.asgi.accesslog import AccessLogMiddleware, redact_query
from ghar_core.asgi.cors import CORSMiddleware
from ghar_core.asgi.middleware import (
    ErrorEnvelopeMiddleware,
    RequestIDMiddleware,
    is_valid_request_id,
    new_request_id,
)
from ghar_core.config import Settings
from ghar_core.exceptions import ServiceUnavailableException
from ghar_core.logging import get_request_id
from ghar_core.testing import TestClient
from tests.asgi.conftest import make_settings


def _app(settings: Settings, **kwargs):
    app = create_app(settings, core_resources=False, resources=[], **kwargs)

    @app.get("/ok")
    async def ok(request):
        return {"rid": get_request_id()}

    @app.get("/boom")
    async def boom(request):
        raise RuntimeError("secret internals: password=hunter2")

    @app.get("/down")
    async def down(request):
        raise ServiceUnavailableException()

    return app


async def test_request_id_kept_when_valid_else_generated(settings: Settings) -> None:
    client = TestClient(_app(settings))
    r = await client.get("/ok", headers={"X-Request-ID": "abc.DEF_1-2"})
    assert r.headers["x-request-id"] == "abc.DEF_1-2" == r.json()["rid"]
    for hostile in ("a b", "x" * 129, "é", "", "a\r\nSet-Cookie: x"):
        r = await client.get("/ok", headers=[("X-Request-ID", hostile)] if hostile else None)
        rid = r.headers["x-request-id"]
        assert rid != hostile
        assert is_valid_request_id(rid.encode())
        assert r.json()["rid"] == rid
    assert get_request_id() is None  # reset after every request


def test_generated_ids_are_unique_and_valid() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_valid_request_id(i.encode()) for i in ids)


async def test_unhandled_error_is_500_envelope_logged_once(settings: Settings, caplog) -> None:
    caplog.set_level(logging.INFO)
    r = await TestClient(_app(settings)).get("/boom", headers={"X-Request-ID": "req-9"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "req-9"
    body = r.json()
    assert body["error"]["code"] == "INTERNAL_ERROR"
    assert "hunter2" not in r.text
    assert "RuntimeError" not in r.text
    errors = [rec for rec in caplog.records if rec.name == "ghar_core.errors"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert get_request_id() is None


async def test_api_exception_keeps_its_headers(settings: Settings) -> None:
    r = await TestClient(_app(settings)).get("/down")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "SERVICE_UNAVAILABLE"


async def test_access_log_line_with_redaction(settings: Settings, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ghar_core.access")
    client = TestClient(_app(settings))
    await client.get(
        "/ok?access_token=AAA&page=2&apikey=BBB&user_password=CCC&token",
        headers={"X-Request-ID": "log-1"},
    )
    lines = [rec for rec in caplog.records if rec.name == "ghar_core.access"]
    assert len(lines) == 1
    msg = lines[0].getMessage()
    assert msg.startswith("GET /ok?access_token=[REDACTED]&page=2&apikey=[REDACTED]")
    assert "user_password=[REDACTED]" in msg
    assert " 200 " in msg
    assert msg.endswith("ms")
    assert not any(secret in msg for secret in ("AAA", "BBB", "CCC"))
    assert lines[0].request_id == "log-1"  # type: ignore[attr-defined]
    assert lines[0].status == 200  # type: ignore[attr-defined]


def test_redact_query_cases() -> None:
    assert redact_query("a=1&Token=x&API_KEY=y&b") == "a=1&Token=[REDACTED]&API_KEY=[REDACTED]&b"
    assert redact_query("access%5Ftoken=z") == "access%5Ftoken=[REDACTED]"
    assert redact_query("") == ""


async def test_buffered_access_log_writes_in_batches(settings: Settings) -> None:
    stream = io.StringIO()
    sink = BufferedAccessLog(stream, json=True, flush_interval=60)
    logging.getLogger("ghar_core.access").setLevel(logging.INFO)
    try:
        app = _app(settings, access_log=sink)
        client = TestClient(app)
        await client.get("/ok?password=p", headers={"X-Request-ID": "b-1"})
        await client.get("/nope")
        assert stream.getvalue() == ""  # buffered
        await app.shutdown()  # flushes
    finally:
        logging.getLogger("ghar_core.access").setLevel(logging.NOTSET)
        sink.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["path"], x["status"]) for x in lines] == [
        ("/ok?password=[REDACTED]", 200),
        ("/nope", 404),
    ]
    assert lines[0]["request_id"] == "b-1"
    assert lines[0]["logger"] == "ghar_core.access"


async def test_access_log_escapes_control_characters(settings: Settings, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ghar_core.access")
    await TestClient(_app(settings)).get("/ok\r\nFAKE LINE")
    msg = next(rec for rec in caplog.records if rec.name == "ghar_core.access").getMessage()
    assert "\n" not in msg
    assert "\\r\\n" in msg


async def test_cors_preflight_and_actual(settings: Settings) -> None:
    app = _app(make_settings(CORS_ORIGINS=("https://app.example",), CORS_ALLOW_CREDENTIALS=True))
    client = TestClient(app)
    pre = await client.options(
        "/ok",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "GET" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-max-age"] == "600"

    actual = await client.get("/ok", headers={"Origin": "https://app.example"})
    assert actual.headers["access-control-allow-origin"] == "https://app.example"
    assert actual.headers["access-control-expose-headers"] == "X-Request-ID"
    assert actual.headers["vary"] == "Origin"
    missing = await client.get("/nope", headers={"Origin": "https://app.example"})
    assert missing.headers["access-control-allow-origin"] == "https://app.example"

    denied = await client.options(
        "/ok", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "CORS_ORIGIN_NOT_ALLOWED"
    other = await client.get("/ok", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers
    plain = await client.get("/ok")
    assert "access-control-allow-origin" not in plain.headers


async def test_cors_headers_reach_the_last_resort_500() -> None:
    app = _app(make_settings(CORS_ORIGINS=("https://app.example",), CORS_ALLOW_CREDENTIALS=True))
    client = TestClient(app)
    r = await client.get("/boom", headers={"Origin": "https://app.example"})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "INTERNAL_ERROR"
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["access-control-expose-headers"] == "X-Request-ID"
    assert "x-request-id" in r.headers
    other = await client.get("/boom", headers={"Origin": "https://evil.example"})
    assert other.status_code == 500
    assert "access-control-allow-origin" not in other.headers


async def test_cors_wildcard_without_credentials(settings: Settings) -> None:
    app = _app(make_settings(CORS_ORIGINS=("*",), CORS_ALLOW_CREDENTIALS=False))
    r = await TestClient(app).get("/ok", headers={"Origin": "https://any.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers


@pytest.mark.parametrize(
    "factory",
    [
        RequestIDMiddleware,
        AccessLogMiddleware,
        ErrorEnvelopeMiddleware,
        lambda app: CORSMiddleware(app, allow_origins=["*"]),
    ],
)
async def test_middleware_passes_lifespan_through(factory) -> None:
    seen: list[str] = []

    async def inner(scope, receive, send):
        seen.append(scope["type"])
        await send({"type": "lifespan.startup.complete"})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "lifespan.startup"}

    await factory(inner)({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]
    assert sent == [{"type": "lifespan.startup.complete"}]


# --- review: redaction in every encoding, log injection, CORS Vary -----------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _spell(key: str, data: st.DataObject) -> str:
    """``key`` with random case and some characters percent-encoded (once or twice)."""
    out = []
    for ch in key:
        ch = ch.upper() if data.draw(st.booleans()) else ch
        how = data.draw(st.sampled_from(["plain", "plain", "once", "twice"]))
        if how == "once":
            ch = f"%{ord(ch):02X}"
        elif how == "twice":
            ch = f"%25{ord(ch):02X}"
        out.append(ch)
    return "".join(out)


@given(
    key=st.sampled_from(["access_token", "password", "api_key", "session_id", "client_secret"]),
    sep=st.sampled_from(["&", ";"]),
    repeats=st.integers(1, 3),
    data=st.data(),
)
def test_redaction_survives_case_encoding_repeats_and_separators(key, sep, repeats, data) -> None:
    secret = "S3CR3TVALUE"
    pairs = ["page=1"] + [f"{_spell(key, data)}={secret}{i}" for i in range(repeats)]
    line = redact_query(sep.join(pairs))
    assert secret not in line, line
    assert line.startswith("page=1")


async def test_method_and_path_cannot_inject_log_lines(settings: Settings, caplog) -> None:
    caplog.set_level(logging.INFO)
    app = _app(settings)
    client = TestClient(app)
    # A host that does not validate the request line hands us CR/LF in the method.
    await client.request("GET\nFAKE", "/ok")
    await client.get("/down\nFAKE 200")  # a 5xx raised by a handler is logged with the path
    r = await client.request("GE\rT", "/boom")
    assert r.status_code in (405, 500)
    for rec in caplog.records:
        assert "\n" not in rec.getMessage(), rec.getMessage()
        assert "\r" not in rec.getMessage(), rec.getMessage()


async def test_cors_vary_origin_also_for_disallowed_origins() -> None:
    # The answer depends on Origin whenever the origin list is explicit; without
    # Vary a shared cache may serve the no-CORS answer to an allowed origin.
    app = _app(make_settings(CORS_ORIGINS=("https://app.example",), CORS_ALLOW_CREDENTIALS=True))
    r = await TestClient(app).get("/ok", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    assert "Origin" in r.headers.getlist("vary")


async def test_body_send_skips_only_the_layers_that_watch_the_start() -> None:
    """Through every layer of ours a body reaches the server's send; a foreign one stops it."""
    from ghar_core.asgi.middleware import body_send

    seen: list[str] = []

    async def server_send(message: dict) -> None:
        seen.append(message["type"])

    async def foreign(message: dict) -> None:
        seen.append("foreign")
        await server_send(message)

    found: list[object] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        found.append(body_send(send))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    access = logging.getLogger("tests.body_send.access")
    access.setLevel(logging.INFO)  # else the access log adds no wrapper
    cors = CORSMiddleware(app, allow_origins=["https://a.example", "https://b.example"])
    stack = RequestIDMiddleware(
        AccessLogMiddleware(ErrorEnvelopeMiddleware(cors), logger=access, sink=lambda *a: None)
    )
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    # send_with_cors; send_with_vary (no Origin, and CORS varies on it always)
    for origin in ([(b"origin", b"https://a.example")], []):
        found.clear()
        await stack({**scope, "headers": origin}, None, server_send)
        assert found == [server_send]
    found.clear()
    await stack(scope, None, foreign)
    assert found == [foreign]  # not ours: bodies keep going through it
    assert body_send(server_send) is server_send
    assert cors._vary_always  # the no-Origin round went through send_with_vary
