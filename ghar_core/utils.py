"""Small helpers every layer uses; nothing here does I/O."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

__all__ = ["make_tz_aware", "utc_now"]


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
