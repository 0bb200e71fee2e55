"""Small helpers every layer uses; nothing here does I/O."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from datetime import UTC, datetime, tzinfo
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = ["make_tz_aware", "run_on_private_loop", "utc_now", "with_database"]

T = TypeVar("T")


def utc_now() -> datetime:
    """Timezone-aware now in UTC; naive datetimes are a bug factory with asyncpg."""
    return datetime.now(UTC)


def make_tz_aware(value: datetime, tz: tzinfo = UTC) -> datetime:
    """Return ``value`` with a timezone: naive values are taken to be in ``tz``.

    Aware values are returned unchanged (not converted), so the function is
    idempotent and safe to call on anything read back from Postgres.
    """
    if value.tzinfo is not None and value.tzinfo.utcoffset(value) is not None:
        return value
    return value.replace(tzinfo=tz)


def with_database(dsn: str, database: str) -> str:
    """``dsn`` with its database replaced (the rest, credentials included, kept)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def run_on_private_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a private loop in a helper thread.

    Callable from synchronous code that may itself run inside an event loop
    (a sync pytest fixture, a server's start-up): it never touches the
    caller's loop.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
