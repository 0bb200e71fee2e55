"""Responses: orjson types, plain text, 204, headers, streaming and client disconnect."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import pytest

from ghar_core.asgi import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
    create_app,
)
from ghar_core.config import Settings
from ghar_core.testing import TestClient


@dataclasses.dataclass
class Listing:
    id: uuid.UUID
    listed: dt.datetime
    price: Decimal


async def test_json_types_serialise(settings: Settings) -> None:
    app = create_app(settings, core_resources=False, resources=[])
    uid = uuid.UUID(int=5)
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

    @app.get("/l")
    async def listing(request):
        return JSONResponse(
            {"l": Listing(uid, when, Decimal("1.10")), "tags": {"a"}}, status_code=201
        )

    r = await TestClient(app).get("/l")
    assert r.status_code == 201
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "l": {"id": str(uid), "listed": "2024-01-02T03:04:05+00:00", "price": "1.10"},
        "tags": ["a"],
    }


async def test_plain_bytes_none_and_204(settings: Settings) -> None:
    app = create_app(settings, core_resources=False, resources=[])

    @app.get("/t")
    async def text(request):
        return PlainTextResponse("héllo", headers={"X-Extra": "1"})

    @app.get("/b")
    async def raw(request):
        return Response(b"\x00\x01", media_type="application/octet-stream")

    @app.delete("/n")
    async def nothing(request):
        return None

    @app.get("/e")
    async def explicit(request):
        return Response(b"ignored", status_code=204)

    client = TestClient(app)
    t = await client.get("/t")
    assert (t.text, t.headers["content-type"], t.headers["x-extra"]) == (
        "héllo",
        "text/plain; charset=utf-8",
        "1",
    )
    assert (await client.get("/b")).content == b"\x00\x01"
    for r in (await client.delete("/n"), await client.get("/e")):
        assert r.status_code == 204
        assert r.content == b""
        assert "content-length" not in r.headers


def test_header_injection_is_refused() -> None:
    with pytest.raises(ValueError, match="CR, LF"):
        Response(b"", headers={"X-A": "1\r\nSet-Cookie: x=1"})
    r = Response(b"")
    with pytest.raises(ValueError, match="CR, LF"):
        r.append_header("X-B", "a\nb")


async def test_unsupported_return_is_500_envelope(settings: Settings) -> None:
    app = create_app(settings, core_resources=False, resources=[])

    @app.get("/x")
    async def bad(request):
        return 42

    r = await TestClient(app).get("/x")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "INTERNAL_ERROR"


async def test_streaming_sends_chunks_as_produced(settings: Settings) -> None:
    app = create_app(settings, core_resources=False, resources=[])
    gate = asyncio.Event()

    async def events():
        yield "data: one\n\n"
        await gate.wait()
        yield b"data: two\n\n"

    @app.get("/sse")
    async def sse(request):
        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async with TestClient(app).stream("GET", "/sse") as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert "content-length" not in r.headers
        chunks = r.aiter_bytes()
        assert await chunks.__anext__() == b"data: one\n\n"  # before the gate opens
        gate.set()
        assert await chunks.__anext__() == b"data: two\n\n"
        with pytest.raises(StopAsyncIteration):
            await chunks.__anext__()
        assert r.complete


async def test_client_disconnect_closes_the_iterator(settings: Settings) -> None:
    app = create_app(settings, core_resources=False, resources=[])
    closed = asyncio.Event()
    produced = 0

    async def forever():
        nonlocal produced
        try:
            while True:
                produced += 1
                yield f"data: {produced}\n\n"
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    @app.get("/sse")
    async def sse(request):
        return StreamingResponse(forever(), media_type="text/event-stream")

    async with TestClient(app).stream("GET", "/sse") as r:
        async for _chunk in r.aiter_bytes():
            break
    # Leaving the block sent http.disconnect and waited for the app.
    assert closed.is_set()
    assert not r.complete
    count = produced
    await asyncio.sleep(0.05)
    assert produced == count


async def test_streaming_head_and_sync_iterables(settings: Settings) -> None:
    app = create_app(settings, core_resources=False, resources=[])

    @app.get("/s")
    async def s(request):
        return StreamingResponse(iter([b"a", "b"]), media_type="text/plain")

    client = TestClient(app)
    assert (await client.get("/s")).content == b"ab"
    head = await client.head("/s")
    assert (head.status_code, head.content) == (200, b"")


async def test_error_mid_stream_truncates_and_logs(settings: Settings, caplog) -> None:
    app = create_app(settings, core_resources=False, resources=[])

    async def broken():
        yield b"partial"
        raise RuntimeError("boom")

    @app.get("/s")
    async def s(request):
        return StreamingResponse(broken())

    r = await TestClient(app).get("/s")
    assert r.status_code == 200
    assert r.content == b"partial"
    assert not r.complete  # the connection would be closed, not finished
    errors = [rec for rec in caplog.records if rec.name == "ghar_core.errors"]
    assert len(errors) == 1
    assert "after the response started" in errors[0].getMessage()


def test_uuid_subclasses_serialise_as_text() -> None:
    # asyncpg returns its own UUID subclass, which orjson does not know natively.
    from ghar_core.asgi.responses import dump_json

    class DriverUUID(uuid.UUID):
        pass

    value = DriverUUID("12345678-1234-5678-1234-567812345678")
    assert dump_json({"id": value}) == b'{"id":"12345678-1234-5678-1234-567812345678"}'
    assert dump_json({"n": Decimal("1.10"), "s": {1}}) == b'{"n":"1.10","s":[1]}'


async def test_streaming_iterator_closed_when_the_start_cannot_be_sent() -> None:
    # "The response owns the iterator and closes it in every case": also when the
    # very first send fails because the client is already gone.
    closed = []

    class Source:
        def __aiter__(self):
            return self

        async def __anext__(self) -> bytes:
            raise StopAsyncIteration

        async def aclose(self) -> None:
            closed.append(True)

    async def send(message):
        raise OSError("client gone")

    async def receive():
        return {"type": "http.disconnect"}

    with pytest.raises(OSError, match="client gone"):
        await StreamingResponse(Source())({"type": "http", "method": "GET"}, receive, send)
    assert closed == [True]
