"""Issue 11 over raw sockets against ``ghar-core serve``: every limit, every fault.

Two servers per module (subprocesses on free loopback ports): one with short
deadlines (head 1 s, body 1.5 s, keep-alive 1 s) for the limits and faults,
one with small caps (3 requests in flight, 8 connections). Each group ends by
checking that the server still answers ``/health``. Deadlines are kept short
so the whole module runs in well under a minute. At the end, in memory: the
parser callbacks ours re-implements (for speed) against uvicorn's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given

from ghar_core.asgi.limits import PROTOCOL
from tests.asgi.sse_support import SERVED_ENV, token_for
from tests.strategies import parsed_header_fields

ROOT = Path(__file__).resolve().parents[2]
STREAM = "/api/v1/events/stream"
HEAD_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE = 1.0, 1.5, 1.0
LONGEST = max(HEAD_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE)
SERVE = ("-m", "ghar_core", "serve", "--app", "tests.asgi.hostile_app:app")
PLAIN_UVICORN = ("-m", "uvicorn", "tests.asgi.hostile_app:app", "--http", PROTOCOL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def _serve(tmp: Path, *flags: str, command: tuple[str, ...] = (), **env: str) -> Iterator[Served]:
    port = _free_port()
    log = tmp / f"server-{port}.log"
    environ = {
        **os.environ,
        **SERVED_ENV,
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "plain",
        "CORS_ORIGINS": "https://app.example.com",
        "SSE_HEARTBEAT_INTERVAL": "0.3",
        **env,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ghar_core",
                "serve",
                "--port",
                str(port),
                "--app",
                "tests.asgi.hostile_app:app",
                *flags,
            ],
            cwd=ROOT,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, _ = _request_sync(port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"ghar-core serve did not come up:\n{log.read_text()}")
            time.sleep(0.05)
        yield Served(port, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return status, headers, body


def _request_sync(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
            _status, headers, body = _parse(b"".join(chunks))
            if "content-length" in headers and len(body) >= int(headers["content-length"]):
                break
    return _parse(b"".join(chunks))


async def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_request_sync, port, data)


def _envelope(raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = _parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json", headers
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", headers["x-request-id"]), headers
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert error["code"] == code, error
    return error


async def _wait_for_log(served: Served, needle: str) -> str:
    """The server's log once ``needle`` is in it (the access log is buffered 0.2 s)."""
    async with asyncio.timeout(5):
        while needle not in (text := served.log_text()):  # noqa: ASYNC110 - a file, no event
            await asyncio.sleep(0.1)
    return text


async def _healthy(port: int) -> None:
    status, _, body = await _request(port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 200
    assert orjson.loads(body)["status"] == "ok"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    flags = ["--head-timeout", str(HEAD_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)]
    flags += ["--keep-alive-timeout", str(KEEP_ALIVE)]
    with _serve(tmp_path_factory.mktemp("limits"), *flags) as served:
        yield served


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("caps")
    with _serve(tmp, HEAD_TIMEOUT="5", MAX_CONCURRENCY="3", MAX_CONNECTIONS="8") as served:
        yield served


# --- the head: size, count, target, Host ----------------------------------------------


async def _stream_one_field(port: int, head: bytes, most: int) -> tuple[bytes, int]:
    """Send ``head``, then one field's value 64 KiB at a time (up to ``most`` bytes)
    until the server answers; (what it answered, bytes of the value sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    sent = 0
    raw = b""
    try:
        while sent < most:
            writer.write(b"a" * 65536)
            await writer.drain()
            sent += 65536
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.01):
                    raw += await reader.read(65536)
            if raw:
                break
        async with asyncio.timeout(5):
            raw += await reader.read(-1)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return raw, sent


async def test_a_huge_header_is_refused_while_it_arrives(server: Served) -> None:
    # Up to 64 MiB; the server must answer long before.
    head = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: "
    raw, sent = await _stream_one_field(server.port, head, 64 << 20)
    error = _envelope(raw, 431, "HEADERS_TOO_LARGE")
    assert error["details"] == {"max_header_bytes": 16384}
    assert sent < 4 << 20, f"the server read {sent} bytes of one header"
    await _healthy(server.port)


async def test_a_huge_trailer_is_refused_while_it_arrives(server: Served) -> None:
    head = (
        b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n0\r\nX-Trailer: "
    )
    # Up to 3 MiB (httptools' work grows with the square of one field's size).
    raw, sent = await _stream_one_field(server.port, head, 3 << 20)
    error = _envelope(raw, 431, "TRAILERS_TOO_LARGE")
    assert error["details"] == {"max_header_bytes": 16384}
    assert sent < 1 << 20, f"the server read {sent} bytes of one trailer field"
    await _healthy(server.port)


@pytest.mark.parametrize("split", [False, True])
async def test_too_many_trailer_fields_are_a_431(server: Served, split: bool) -> None:
    head = b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n"
    trailers = b"0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(150)) + b"\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head if split else head + trailers)
        if split:  # the trailers in a read of their own, after the body
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(trailers)
        async with asyncio.timeout(5):
            raw = await reader.read(-1)
    finally:
        writer.close()
    assert _envelope(raw, 431, "TOO_MANY_TRAILERS")["details"] == {"max_headers": 100}
    await _healthy(server.port)


async def test_a_chunked_body_with_small_trailers_is_read_whole(server: Served) -> None:
    chunks = b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in (1, 300, 5000))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        # Framing in reads of its own (no body byte in them), trailers likewise.
        writer.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (chunks[:2], chunks[2:], b"0\r\n", b"X-Sum: 1\r\nX-Ok: 2\r\n", b"\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            raw = await reader.read(-1)
    finally:
        writer.close()
    first, _, rest = raw.partition(b"HTTP/1.1 200 OK\r\n")[2].partition(b"HTTP/1.1 ")
    assert b'{"size":5301}' in first, raw
    assert rest.startswith(b"200"), raw


async def test_trailer_fields_do_not_become_headers(server: Served) -> None:
    """Review: uvicorn appends trailer fields to the request's header list, so a trailer
    reached the app as a header (here a second Host) after the head was checked."""
    status, _, body = await _request(
        server.port,
        b"POST /header-names HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n2\r\nab\r\n0\r\nHost: evil\r\nX-Injected: 1\r\n\r\n",
    )
    assert status == 200
    names = orjson.loads(body)
    assert names.count("host") == 1, names
    assert "x-injected" not in names, names


@pytest.mark.parametrize(
    ("count", "code"), [(150, "TOO_MANY_HEADERS"), (10_000, "HEADERS_TOO_LARGE")]
)
async def test_too_many_headers_are_a_431(server: Served, count: int, code: str) -> None:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(count))
    raw = await _exchange(server.port, b"GET /health HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n")
    _envelope(raw, 431, code)
    await _healthy(server.port)


async def test_a_long_request_target_is_a_414(server: Served) -> None:
    raw = await _exchange(
        server.port, b"GET /health?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    assert _envelope(raw, 414, "URI_TOO_LONG")["details"] == {"max_url_bytes": 8192}
    await _healthy(server.port)


@pytest.mark.parametrize(
    ("head", "hosts"),
    [
        (b"GET /health HTTP/1.1\r\n\r\n", 0),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 2),
        (b"GET /health HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 2),
        # llhttp takes "HTTP/2.0" in a request line: a version past 1.1 needs Host too.
        (b"GET /health HTTP/2.0\r\n\r\n", 0),
    ],
    ids=["1.1-none", "1.1-two", "1.0-two", "2.0-none"],
)
async def test_missing_or_duplicated_host_is_a_400(server: Served, head: bytes, hosts: int) -> None:
    raw = await _exchange(server.port, head)
    assert _envelope(raw, 400, "BAD_HOST_HEADER")["details"] == {"host_headers": hosts}
    await _healthy(server.port)


async def test_a_host_trailer_does_not_count_towards_the_next_head(server: Served) -> None:
    """Host fields are counted as the parser hands them over, trailers too: the count
    must start again with each request on a keep-alive connection."""
    raw = await _exchange(
        server.port,
        b"POST /header-names HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n0\r\nHost: evil\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 2, raw
    assert b"BAD_HOST_HEADER" not in raw


async def test_http_1_0_without_host_is_fine(server: Served) -> None:
    raw = await _exchange(server.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert _parse(raw)[0] == 200


async def test_garbage_is_a_400_envelope(server: Served) -> None:
    raw = await _exchange(server.port, b"\x00\x01 nonsense\r\n\r\n")
    _envelope(raw, 400, "BAD_HTTP_REQUEST")
    await _healthy(server.port)


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (b"X-Big: " + b"a" * 100_000 + b"\r\n", "HEADERS_TOO_LARGE"),
        (b"".join(b"X-%d: a\r\n" % i for i in range(150)), "TOO_MANY_HEADERS"),
        (b"Host: u\r\n", "BAD_HOST_HEADER"),
    ],
    ids=["huge", "many", "two-hosts"],
)
async def test_a_bad_head_pipelined_behind_a_good_request_is_refused_after_its_answer(
    server: Served, extra: bytes, code: str
) -> None:
    """Review: the head after a request in the same read was not counted (a 100 KB head
    got 200), and a refusal was written before the answer ahead of it, which then
    failed with an ERROR traceback ("Cannot call write() after write_eof()")."""
    rid = f"pipelined-{code.lower()}"
    good = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Request-ID: %s\r\n\r\n" % rid.encode()
    bad = b"GET /health HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"
    raw = await _exchange(server.port, good + bad)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses[0] == b"200", raw[:600]
    assert len(statuses) == 2, raw[:600]
    _envelope(raw[raw.index(b"HTTP/1.1", 10) :], int(statuses[1]), code)
    text = await _wait_for_log(server, f"[{rid}] GET /health 200")
    assert not [line for line in text.splitlines() if "ERROR" in line and rid in line], text
    await _healthy(server.port)


async def test_a_bad_head_pipelined_behind_two_good_requests_is_refused_after_both(
    server: Served,
) -> None:
    """The refusal used to go out as soon as the last queued request was started, so
    with two good requests ahead of it the second one's answer was cut (200, 400)."""
    goods = b"".join(
        b"GET /health HTTP/1.1\r\nHost: t\r\nX-Request-ID: two-ahead-%d\r\n\r\n" % i
        for i in range(2)
    )
    bad = b"GET /health HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n"
    raw = await _exchange(server.port, goods + bad)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"200", b"200", b"400"], raw[:900]
    _envelope(raw[raw.rindex(b"HTTP/1.1 400") :], 400, "BAD_HOST_HEADER")
    text = await _wait_for_log(server, "[two-ahead-1] GET /health 200")
    assert not [line for line in text.splitlines() if "ERROR" in line and "two-ahead" in line]
    await _healthy(server.port)


async def test_a_queued_request_whose_body_is_refused_never_reaches_the_app(
    server: Served,
) -> None:
    """A pipelined request refused in its body (too many trailer fields) is answered
    in its turn after the one ahead of it, and its handler is never run."""
    good = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Request-ID: queued-ahead\r\n\r\n"
    bad = (
        b"POST /upload HTTP/1.1\r\nHost: t\r\nX-Request-ID: queued-refused\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n"
        + b"".join(b"X-T%d: a\r\n" % i for i in range(150))
        + b"\r\n"
    )
    raw = await _exchange(server.port, good + bad)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"200", b"431"], raw[:900]
    _envelope(raw[raw.rindex(b"HTTP/1.1 431") :], 431, "TOO_MANY_TRAILERS")
    text = await _wait_for_log(server, "[queued-ahead] GET /health 200")
    await _healthy(server.port)
    assert "queued-refused" not in server.log_text(), text


# --- slow clients: head and body deadlines, idle keep-alive ----------------------------


async def _trickle(port: int, head: bytes, drip: bytes) -> bytes:
    """Send ``head``, then ``drip`` one byte every 0.2 s until the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    got = b""
    try:
        for byte in drip:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    got += await reader.read(65536)
            if got:
                break
        async with asyncio.timeout(3):
            got += await reader.read(-1)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return got


def _slowloris(port: int) -> Any:
    return _trickle(port, b"", b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1000)


def _slow_body(port: int) -> Any:
    head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
    return _trickle(port, head, b"x" * 100)


async def _silent(port: int) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    try:
        async with asyncio.timeout(HEAD_TIMEOUT + 3):
            return await reader.read(-1), time.monotonic() - start
    finally:
        writer.close()


async def _idle_after_a_response(port: int) -> tuple[int, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    first = b""
    while not first.endswith(b"}"):  # the whole /health answer
        first += await reader.read(65536)
    start = time.monotonic()
    try:
        async with asyncio.timeout(KEEP_ALIVE + 3):
            rest = await reader.read(-1)
    finally:
        writer.close()
    assert rest == b""
    return _parse(first)[0], time.monotonic() - start


async def test_slow_and_silent_clients_are_cut_off(server: Served) -> None:
    start = time.monotonic()
    results = await asyncio.gather(
        *(_slowloris(server.port) for _ in range(48)),
        _silent(server.port),
        _slow_body(server.port),
        _idle_after_a_response(server.port),
    )
    elapsed = time.monotonic() - start
    *loris, (silent, silent_after), body, (status, idle_after) = results
    for raw in loris:
        assert _envelope(raw, 408, "REQUEST_TIMEOUT")["details"] == {"head_timeout": HEAD_TIMEOUT}
    assert silent == b""  # never sent a byte: closed without an answer
    assert silent_after < HEAD_TIMEOUT + 1.5
    assert _envelope(body, 408, "REQUEST_TIMEOUT")["details"] == {"body_timeout": BODY_TIMEOUT}
    assert status == 200
    assert idle_after < KEEP_ALIVE + 1.5
    assert elapsed < LONGEST + 6, elapsed  # the 24 s of the issue, without limits
    await _healthy(server.port)


async def test_a_body_the_app_is_slow_to_read_is_not_the_clients_fault(server: Served) -> None:
    body = b"x" * 4096
    data = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\n\r\n" + body
    status, _, answer = await _request(server.port, data)
    assert status == 200
    assert orjson.loads(answer) == {"size": 4096}


# --- what must outlive every deadline: event streams, WebSockets ---------------------------


async def test_an_event_stream_and_a_websocket_outlive_every_deadline(server: Served) -> None:
    _, token = token_for()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"GET {STREAM} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://127.0.0.1:{server.port}/ws/echo")
        received = b""
        start = time.monotonic()
        # Three times the longest deadline, reading the stream as it comes.
        while time.monotonic() - start < 3 * LONGEST:
            async with asyncio.timeout(2):
                chunk = await reader.read(65536)
            assert chunk, f"the stream was closed after {time.monotonic() - start:.1f}s"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        assert received.count(b"\n:") >= 3, received[-300:]  # heartbeats kept arriving
        await ws.send_str("still there")
        async with asyncio.timeout(2):
            assert (await ws.receive_str()) == "still there"
        await ws.close()
    writer.close()
    await _healthy(server.port)


# --- the faults of the issue over the wire ------------------------------------------------


async def _get(port: int, path: str, *extra: bytes) -> tuple[int, dict[str, str], bytes]:
    head = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + b"".join(extra) + b"\r\n"
    return await _request(port, head)


async def test_the_faults_of_the_issue_over_the_wire(server: Served) -> None:
    # 1. 300 nested arrays: a 400 naming the limit, not a 500.
    deep = b"[" * 300 + b"]" * 300
    status, headers, body = await _request(
        server.port,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(deep), deep),
    )
    assert status == 400
    assert orjson.loads(body)["error"]["code"] == "JSON_TOO_DEEP"
    # 2. A cancelled handler: the envelope, its request id, the real status logged.
    status, headers, body = await _get(server.port, "/cancelled", b"X-Request-ID: cancel-wire\r\n")
    assert status == 500
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == "cancel-wire"
    # 3. Client text in an exception cannot forge a log record.
    forged = "x%0d%0a2099-01-01T00:00:00.000Z%20INFO%20forged"
    status, _, _ = await _get(server.port, f"/boom?msg={forged}", b"X-Request-ID: forge-wire\r\n")
    assert status == 500
    # 4. Vary: Origin without an Origin; one Allow-Origin with it.
    _, headers, _ = await _get(server.port, "/health")
    assert "Origin" in headers["vary"]
    _, headers, _ = await _get(server.port, "/health", b"Origin: https://app.example.com\r\n")
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    await _healthy(server.port)

    text = await _wait_for_log(server, "GET /cancelled 500")
    assert re.search(r"\[cancel-wire\] GET /cancelled 500 ", text), text[-2000:]
    errors = [line for line in text.splitlines() if "ERROR" in line and "cancel-wire" in line]
    assert len(errors) == 1, errors
    assert "Exception in ASGI application" not in text  # nothing left to uvicorn
    assert not [line for line in text.splitlines() if line.startswith("2099-")], text[-2000:]
    assert "[forge-wire]" in text, text
    # The exception text is in the traceback, its lines indented under the record.
    assert "RuntimeError: x\\r\n  " in text, text


# --- caps: requests in flight, open connections --------------------------------------------


@contextlib.asynccontextmanager
async def _holding(port: int, count: int) -> AsyncIterator[list[asyncio.StreamReader]]:
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    for _, writer in opened:
        writer.write(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
    try:
        yield [reader for reader, _ in opened]
    finally:
        for _, writer in opened:
            writer.close()


async def test_past_the_concurrency_limit_is_a_503_with_retry_after(capped: Served) -> None:
    async with _holding(capped.port, 3) as readers:
        await asyncio.sleep(0.5)  # all three in their handlers (1.5 s each)
        raw = await _exchange(capped.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        error = _envelope(raw, 503, "TOO_MANY_REQUESTS_IN_FLIGHT")
        assert error["details"] == {"max_concurrency": 3}
        assert _parse(raw)[1]["retry-after"] == "1"
        for reader in readers:  # the held ones are answered, not hurt
            async with asyncio.timeout(5):
                assert (await reader.read(65536)).startswith(b"HTTP/1.1 200")
    await _healthy(capped.port)


async def test_past_the_connection_cap_a_new_connection_gets_a_503(capped: Served) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", capped.port) for _ in range(8)]
    try:
        await asyncio.sleep(0.2)
        raw = await _exchange(capped.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _envelope(raw, 503, "TOO_MANY_CONNECTIONS")["details"] == {"max_connections": 8}
    finally:
        for _, writer in idle:
            writer.close()
    await asyncio.sleep(0.3)
    await _healthy(capped.port)


# --- the same protocol under plain uvicorn, limits from the settings ------------------------


async def test_plain_uvicorn_with_our_protocol_enforces_the_settings(tmp_path: Path) -> None:
    env = {"HEAD_TIMEOUT": "1", "MAX_HEADERS": "20"}
    with _serve(tmp_path, command=PLAIN_UVICORN, **env) as served:
        fields = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
        raw = await _exchange(
            served.port, b"GET /health HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n"
        )
        assert _envelope(raw, 431, "TOO_MANY_HEADERS")["details"] == {"max_headers": 20}
        _envelope(
            await _exchange(served.port, b"GET /health HTTP/1.1\r\n\r\n"), 400, "BAD_HOST_HEADER"
        )
        silent, after = await _silent(served.port)
        assert silent == b""
        assert after < 2.5
        await _healthy(served.port)


# --- in memory: the callbacks ours re-implements, against uvicorn's -----------------------


class _MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: Any) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _memory_app(scope: Any, receive: Any, send: Any) -> None:
    """``/answer`` answers at once without reading the body; anything else never answers."""
    if scope["path"] == "/answer":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await asyncio.Event().wait()


def _both_protocols(loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
    """uvicorn's httptools protocol and ours, each connected to its own memory transport."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from ghar_core.asgi.limits import LimitedHttpToolsProtocol, ServerLimits

    config = uvicorn.Config(_memory_app, lifespan="off", access_log=False, log_config=None)
    config.load()
    theirs = HttpToolsProtocol(config, ServerState(), {}, loop)
    ours = LimitedHttpToolsProtocol(config, ServerState(), {}, loop, limits=ServerLimits())
    for protocol in (theirs, ours):
        protocol.connection_made(_MemoryTransport())
    return theirs, ours


@given(fields=parsed_header_fields)
def test_on_header_keeps_what_uvicorns_keeps(fields: list[tuple[bytes, bytes]]) -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    loop = asyncio.new_event_loop()
    try:
        theirs, ours = _both_protocols(loop)
        for protocol in (theirs, ours):
            protocol.headers = []
            protocol.expect_100_continue = False
        for name, value in fields:
            HttpToolsProtocol.on_header(theirs, name, value)
            ours.on_header(name, value)
        assert ours.headers == theirs.headers
        assert ours.expect_100_continue is theirs.expect_100_continue
        assert ours._hosts == [name for name, _ in theirs.headers].count(b"host")
        for protocol in (theirs, ours):
            protocol.connection_lost(None)
    finally:
        loop.close()


def _cycle_state(protocol: Any) -> tuple[Any, ...]:
    cycle = protocol.cycle
    if cycle is None:
        return (None,)
    return (
        cycle.more_body,
        cycle.message_event.is_set(),
        bytes(cycle.body),
        cycle.response_complete,
        cycle.disconnected,
    )


@pytest.mark.parametrize(
    "reads",
    [
        [b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n"],
        [b"POST /wait HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"],
        [b"POST /wait HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhe", b"llo"],
        [
            b"POST /wait HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"2\r\nab\r\n0\r\nX-T: 1\r\n\r\n",
        ],
        # The app answered before the body ended: uvicorn's leaves the body unfinished.
        [b"POST /answer HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhe", b"llo"],
        # An upgrade the server does not take: a plain request.
        [b"GET /wait HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"],
    ],
    ids=["get", "body", "body-in-two-reads", "chunked-trailer", "answered-first", "h2c"],
)
async def test_on_message_complete_leaves_the_request_as_uvicorns_does(reads: list[bytes]) -> None:
    """Ours does uvicorn's on_message_complete inline: the same cycle after every read."""
    theirs, ours = _both_protocols(asyncio.get_running_loop())
    try:
        for data in reads:
            for protocol in (theirs, ours):
                protocol.data_received(data)
            for _ in range(5):  # the apps' tasks run up to their first wait
                await asyncio.sleep(0)
            assert _cycle_state(ours) == _cycle_state(theirs)
        assert ours.transport.data == theirs.transport.data
        assert _cycle_state(ours)[0] is (b"/answer" in reads[0])  # more_body
    finally:
        for protocol in (theirs, ours):
            protocol.connection_lost(None)
            tasks = list(protocol.tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
