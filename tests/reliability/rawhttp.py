"""Raw HTTP/1.1 exchanges for the hostile-input cases: bytes out, whatever comes back.

aiohttp refuses to send what a hostile client sends (control characters,
broken framing), so these cases write the bytes themselves and judge what
the server answered: a status, a closed connection, or nothing (a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass

import orjson

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


@dataclass
class Raw:
    """What a raw exchange gave: the status (None: no response) and whether it hung."""

    status: int | None
    head: bytes
    body: bytes
    hung: bool
    # What came after this response's Content-Length: the answers to requests
    # pipelined behind it (a mutated body can leave bytes that parse as one).
    rest: bytes = b""


async def exchange(port: int, data: bytes, *, wait: float = 3.0, half_close: bool = False) -> Raw:
    """Write ``data``, read until the server closes, a full response arrived, or ``wait``.

    ``half_close`` ends our side after ``data``: a server still waiting for the
    rest of a request then knows there is none, so no answer in ``wait`` is a hang.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    hung = False
    try:
        try:
            writer.write(data)
            await writer.drain()
            if half_close:
                writer.write_eof()
        except OSError:
            pass  # the server may close on us mid-write: judged by what it sent
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                hung = True
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                hung = True
                break
            except OSError:
                break
            if not chunk:
                break
            received += chunk
            if _complete(received):
                break
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return _parse(received, hung)


def _parse(received: bytes, hung: bool = False) -> Raw:
    head, _, body = received.partition(b"\r\n\r\n")
    match = _STATUS.match(head)
    status = int(match.group(1)) if match else None
    rest = b""
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length is not None:
        body, rest = body[: int(length.group(1))], body[int(length.group(1)) :]
    return Raw(status, head, body, hung and status is None, rest)


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))


def clean(raw: Raw) -> bool:
    """A 4xx (with our envelope when JSON) or a connection closed without an answer."""
    if raw.hung:
        return False
    if raw.status is None:
        return True  # closed without an answer
    if not 400 <= raw.status < 500:
        return False
    if raw.rest.startswith(b"HTTP/") and not clean(_parse(raw.rest)):
        return False  # every pipelined answer is judged, not only the first
    if b"application/json" in raw.head.lower():
        try:
            return "error" in orjson.loads(raw.body)
        except orjson.JSONDecodeError:
            return False
    return True  # the server's own 4xx for what never reached the app
