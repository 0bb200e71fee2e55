"""``emit``: publish one event to the running servers from a script, a scheduler or a shell."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from ghar_core.broker.base import (
    TOPIC_JOB,
    TOPIC_SOCKET,
    TOPIC_USER,
    Record,
    check_event,
    encode_socket_message,
    stream_of,
)
from ghar_core.broker.outbox import publish_rows

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = ["emit", "encode_event"]

_OPTIONS = orjson.OPT_NON_STR_KEYS


def encode_event(type: str, data: Any) -> bytes:
    """The payload of ``{"type": type, "data": data}``, as the event stream sends it."""
    return orjson.dumps({"type": type, "data": data}, option=_OPTIONS)


async def emit(
    *,
    type: str,
    data: Any = None,
    user: str | None = None,
    job: str | None = None,
    conn: Any = None,
    dsn: str | None = None,
    settings: Settings | None = None,
) -> Record:
    """Store ``{"type": type, "data": data}`` for ``user`` (or ``job``) in the outbox.

    Every server with ``EVENT_BROKER=postgres`` on the same database delivers
    it: a user's event goes to their event streams (resumable like any other
    event) and, as ``{"type", "data", "id"}`` with the event's id, to their
    WebSocket connections; a job's goes to the job's sockets as ``{"type",
    "job_id", "data"}``. Give exactly one of ``user`` / ``job``. ``conn``: an
    asyncpg connection to write on -- inside your transaction, the event is
    published exactly when the transaction commits; otherwise a connection of
    its own is opened to ``dsn`` (default ``DATABASE_URL``) and closed. A
    payload over ``EVENT_MAX_PAYLOAD_BYTES`` raises :class:`EventTooLargeError`
    and nothing is written. Returns the stored record (the user's event, or
    the job's message).
    """
    if (user is None) == (job is None):
        raise ValueError("give exactly one of user= or job=")
    if settings is None:
        from ghar_core.config import get_settings

        settings = get_settings()
    limit = settings.EVENT_MAX_PAYLOAD_BYTES
    if user is not None:
        key = str(user)
        payload = encode_event(type, data)
        check_event(TOPIC_USER, key, type, payload, limit)
    else:
        key = str(job)
        text = orjson.dumps({"type": type, "job_id": key, "data": data}, option=_OPTIONS).decode()
        payload = encode_socket_message(text)
        check_event(TOPIC_JOB, key, type, payload, limit)
    if conn is not None:
        return await _write(conn, user is not None, key, type, data, payload, limit)
    own = await asyncpg.connect(
        dsn or settings.DATABASE_URL,
        timeout=settings.DB_CONNECT_TIMEOUT,
        statement_cache_size=0,
        server_settings={"application_name": "ghar-core-emit"},
    )
    try:
        async with own.transaction():
            return await _write(own, user is not None, key, type, data, payload, limit)
    finally:
        await own.close()


async def _write(
    conn: Any, to_user: bool, key: str, type: str, data: Any, payload: bytes, limit: int
) -> Record:
    topic = TOPIC_USER if to_user else TOPIC_JOB
    rows = await publish_rows(conn, [stream_of(topic, key)], [type], [payload], uuid.uuid4())
    epoch, position = rows[0][2], rows[0][3]
    if to_user:
        # The same event for the user's sockets, carrying the stream's id.
        message = {"type": type, "data": data, "id": f"{epoch}:{position}"}
        text = orjson.dumps(message, option=_OPTIONS).decode()
        socket = encode_socket_message(text)
        check_event(TOPIC_SOCKET, key, type, socket, limit)
        await publish_rows(conn, [stream_of(TOPIC_SOCKET, key)], [type], [socket], uuid.uuid4())
    return Record(topic, key, epoch, position, type, payload, time.time())
