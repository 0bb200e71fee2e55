"""The in-process test client against tiny raw ASGI apps (not only ours)."""

from __future__ import annotations

import asyncio

import pytest

from ghar_core.testing import ASGIProtocolError, TestClient


async def echo(scope, receive, send):
    """Echo method, path, query, headers and the body with the number of body messages."""
    if scope["type"] == "lifespan":
        raise RuntimeError("no lifespan here")
    body, parts = b"", 0
    while True:
        message = await receive()
        parts += 1
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text = (
        f"{scope['method']} {scope['path']} {scope['root_path']} "
        f"{scope['query_string'].decode()} {parts} "
        f"{ {k.decode(): v.decode() for k, v in scope['headers']} }"
    )
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
    await send({"type": "http.response.body", "body": text.encode() + b"|" + body})


async def test_request_shape_and_chunked_body() -> None:
    client = TestClient(echo, headers={"X-Default": "d"}, chunk_size=4, root_path="/m")
    r = await client.post("/p", params={"a": "1 2", "b": ["x", "y"]}, content=b"0123456789")
    head, _, body = r.text.partition("|")
    assert body == "0123456789"
    method, path, root, query, parts, _ = head.split(" ", 5)
    assert (method, path, root) == ("POST", "/m/p", "/m")
    assert query == "a=1+2&b=x&b=y"
    assert parts == "3"
    assert "'x-default': 'd'" in head
    assert "'content-length': '10'" in head
    assert r.headers["X-A"] == "1"
    assert r.complete


async def test_json_body_sets_content_type() -> None:
    r = await TestClient(echo).put("/j", json={"k": [1]})
    assert "'content-type': 'application/json'" in r.text
    assert r.text.endswith('|{"k":[1]}')


async def test_lifespan_unsupported_is_tolerated() -> None:
    async with TestClient(echo) as client:
        assert (await client.get("/x")).status_code == 200


async def test_app_without_response_is_a_protocol_error() -> None:
    async def silent(scope, receive, send):
        return None

    with pytest.raises(ASGIProtocolError, match="without starting a response"):
        await TestClient(silent).get("/")


async def test_app_exception_propagates() -> None:
    async def crashing(scope, receive, send):
        raise ValueError("from the app")

    with pytest.raises(ValueError, match="from the app"):
        await TestClient(crashing).get("/")


async def test_stream_lines_and_disconnect() -> None:
    disconnected = asyncio.Event()

    async def lines(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a\nb", "more_body": True})
        await send({"type": "http.response.body", "body": b"c\r\nd\n", "more_body": True})
        if (await receive())["type"] == "http.disconnect":
            disconnected.set()

    async with TestClient(lines).stream("GET", "/") as r:
        got = []
        async for line in r.aiter_lines():
            got.append(line)
            if len(got) == 2:
                break
    assert got == ["a", "bc"]
    assert disconnected.is_set()


async def test_hung_app_fails_instead_of_hanging() -> None:
    async def hung(scope, receive, send):
        await asyncio.sleep(3600)

    with pytest.raises(TimeoutError):
        await TestClient(hung, timeout=0.05).get("/")


async def test_stream_of_an_app_that_stops_mid_body_is_incomplete() -> None:
    async def truncating(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})

    async with TestClient(truncating).stream("GET", "/") as r:
        assert await r.read() == b"part"
    assert not r.complete


async def test_lifespan_errors_after_startup_are_surfaced() -> None:
    async def breaks_on_shutdown(scope, receive, send):
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        raise RuntimeError("pool close exploded")

    with pytest.raises(RuntimeError, match="pool close exploded"):
        async with TestClient(breaks_on_shutdown, timeout=2):
            pass

    async def returns_silently(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()  # shutdown: returns without answering

    with pytest.raises(ASGIProtocolError, match="shutdown"):
        async with TestClient(returns_silently, timeout=2):
            pass


async def test_an_app_with_resources_not_entered_says_use_async_with() -> None:
    """No lazily started pools and sessions that nothing closes: a clear error at once."""
    from ghar_core.asgi import create_app
    from ghar_core.config import load_settings
    from ghar_core.http import HTTPClients

    app = create_app(load_settings(app_env="test"), core_resources=False, resources=[HTTPClients()])
    client = TestClient(app)
    with pytest.raises(RuntimeError, match=r"use `async with TestClient\(app\) as client:`"):
        await client.get("/api/v1/me")
    assert not app.lifespan_manager.started  # nothing was started behind the test's back
    async with TestClient(app) as entered:  # the right way works
        assert (await entered.get("/health")).status_code == 200
    async with app.lifespan():  # started by the test itself: no async with needed
        assert (await TestClient(app).get("/health")).status_code == 200


def test_importing_the_test_client_loads_no_driver() -> None:
    """The lazy ghar_core.asgi package: the test client needs no asyncpg, aiohttp or PyJWT."""
    import subprocess
    import sys

    code = (
        "import sys, ghar_core.testing, ghar_core.asgi; "
        "print(sorted(m for m in ('asyncpg', 'aiohttp', 'jwt') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
    # and the names still resolve, lazily
    code = "import ghar_core.asgi as a; print(a.create_app.__module__, 'create_app' in dir(a))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["ghar_core.asgi.app", "True"]
