"""``emit``: publish one event to the running servers from a script, a scheduler or a shell."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from ghar_core.broker.base import TOPIC_JOB, TOPIC_USER, Record, check_event, split_stream
from ghar_core.broker.outbox import publish_rows

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = ["emit", "encode_event"]


def encode_event(type: str, data: Any) -> bytes:
    """The payload of ``{"type": type, "data": data}``, as the event stream sends it."""
    return orjson.dumps({"type": type, "data": data}, option=orjson.OPT_NON_STR_KEYS)


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
    it to that user's event streams and sockets (or to the job's sockets),
    resumable like any other event. Give exactly one of ``user`` / ``job``.
    ``conn``: an asyncpg connection to write on -- inside your transaction,
    the event is published exactly when the transaction commits; otherwise a
    connection of its own is opened to ``dsn`` (default ``DATABASE_URL``)
    and closed. A payload over ``EVENT_MAX_PAYLOAD_BYTES`` raises
    :class:`EventTooLargeError` and nothing is written.
    """
    if (user is None) == (job is None):
        raise ValueError("give exactly one of user= or job=")
    if settings is None:
        from ghar_core.config import get_settings

        settings = get_settings()
    topic, key = (TOPIC_USER, str(user)) if user is not None else (TOPIC_JOB, str(job))
    payload = encode_event(type, data)
    stream = check_event(topic, key, type, payload, settings.EVENT_MAX_PAYLOAD_BYTES)
    batch = uuid.uuid4()
    if conn is not None:
        rows = await publish_rows(conn, [stream], [type], [payload], batch)
    else:
        own = await asyncpg.connect(
            dsn or settings.DATABASE_URL,
            timeout=settings.DB_CONNECT_TIMEOUT,
            statement_cache_size=0,
            server_settings={"application_name": "ghar-core-emit"},
        )
        try:
            rows = await publish_rows(own, [stream], [type], [payload], batch)
        finally:
            await own.close()
    _, epoch, position = rows[0][1:4]
    topic, key = split_stream(stream)
    return Record(topic, key, epoch, position, type, payload, time.time())
