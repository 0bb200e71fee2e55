"""The application's user rows, keyed by the identity provider's user id.

:func:`get_or_create_user_from_supabase` is called on a user's requests with
the provider's user object; many first requests of one new user arrive
together, so it is a single ``INSERT ... ON CONFLICT (supabase_user_id) DO
UPDATE ... RETURNING``: Postgres serialises the racers on the unique index,
exactly one inserts and the others update the same row, and every caller
gets the row back. No read-then-write window exists to race in.

It runs through :func:`~ghar_core.db_resilience.execute_with_transient_retry`
(the upsert is idempotent, so one retry after a lost connection is safe).
Bad provider data (not an object, missing or non-UUID ``id``, wrong types)
is a 422 ``VALIDATION_ERROR`` naming the field, never a 500.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Final

import orjson

from ghar_core.db_resilience import TransactionSource, execute_with_transient_retry
from ghar_core.exceptions import ValidationException

__all__ = ["DEFAULT_ROLE", "get_or_create_user_from_supabase", "parse_supabase_user"]

DEFAULT_ROLE: Final = "authenticated"
_MAX_TEXT: Final = 1024

_UPSERT: Final = """
INSERT INTO users AS u
    (supabase_user_id, email, phone, full_name, role, app_metadata, user_metadata, last_seen_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, now())
ON CONFLICT (supabase_user_id) DO UPDATE SET
    email         = EXCLUDED.email,
    phone         = EXCLUDED.phone,
    full_name     = COALESCE(EXCLUDED.full_name, u.full_name),
    role          = EXCLUDED.role,
    app_metadata  = EXCLUDED.app_metadata,
    user_metadata = EXCLUDED.user_metadata,
    updated_at    = CASE
        WHEN (u.email, u.phone, u.role, u.app_metadata, u.user_metadata)
             IS DISTINCT FROM
             (EXCLUDED.email, EXCLUDED.phone, EXCLUDED.role,
              EXCLUDED.app_metadata, EXCLUDED.user_metadata)
        THEN now() ELSE u.updated_at END,
    last_seen_at  = now()
RETURNING id, supabase_user_id, email, phone, full_name, role, app_metadata,
          user_metadata, created_at, updated_at, last_seen_at
"""


def _utf8_safe(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _text(data: Mapping[str, Any], key: str, problems: dict[str, str]) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        problems[key] = "must be a string or null"
        return None
    value = value.strip()
    if "\x00" in value or (not value.isascii() and not _utf8_safe(value)):
        problems[key] = "must be valid text without NUL characters"
        return None
    if len(value) > _MAX_TEXT:
        problems[key] = f"must be at most {_MAX_TEXT} characters"
        return None
    return value or None


def _object(data: Mapping[str, Any], key: str, problems: dict[str, str]) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        problems[key] = "must be an object with string keys"
        return {}
    try:
        encoded = orjson.dumps(value)
    except TypeError:
        problems[key] = "must be JSON data"
        return {}
    if b"\\u0000" in encoded:
        # Postgres jsonb refuses NUL in strings; say so instead of failing with a 500.
        problems[key] = "must not contain NUL characters"
        return {}
    return dict(value)


def parse_supabase_user(user_data: Any) -> dict[str, Any]:
    """Validate the provider's user object into the columns we store.

    Raises :class:`ValidationException` (422) whose ``details`` maps each bad
    field to the reason.
    """
    if not isinstance(user_data, Mapping):
        raise ValidationException(
            "The identity provider's user data is not an object.",
            details={"user_data": "must be an object"},
        )
    problems: dict[str, str] = {}
    raw_id = user_data.get("id")
    user_id: uuid.UUID | None = None
    if isinstance(raw_id, uuid.UUID):
        user_id = raw_id
    elif isinstance(raw_id, str):
        try:
            user_id = uuid.UUID(raw_id)
        except ValueError:
            problems["id"] = "must be a UUID"
    else:
        problems["id"] = "is required (a UUID)"
    email = _text(user_data, "email", problems)
    phone = _text(user_data, "phone", problems)
    role = _text(user_data, "role", problems) or DEFAULT_ROLE
    app_metadata = _object(user_data, "app_metadata", problems)
    user_metadata = _object(user_data, "user_metadata", problems)
    full_name = None
    for key in ("full_name", "name"):
        candidate = user_metadata.get(key)
        if isinstance(candidate, str) and candidate.strip() and "\x00" not in candidate:
            full_name = candidate.strip()[:_MAX_TEXT]
            break
    if problems:
        raise ValidationException("The identity provider's user data is invalid.", details=problems)
    return {
        "supabase_user_id": user_id,
        "email": email,
        "phone": phone,
        "full_name": full_name,
        "role": role,
        "app_metadata": app_metadata,
        "user_metadata": user_metadata,
    }


async def get_or_create_user_from_supabase(
    db: TransactionSource, user_data: Mapping[str, Any], *, conn: Any = None
) -> dict[str, Any]:
    """Upsert the provider's user and return our row as a dict.

    Values are native (``uuid.UUID``, ``datetime``, dicts for the jsonb
    columns); our JSON responses serialise them as they are. ``conn``: a
    connection the caller already holds: the upsert runs there, in a
    savepoint of its transaction (no second pool connection, no retry: the
    caller's transaction owns the outcome).
    """
    fields = parse_supabase_user(user_data)
    args = (
        fields["supabase_user_id"],
        fields["email"],
        fields["phone"],
        fields["full_name"],
        fields["role"],
        fields["app_metadata"],
        fields["user_metadata"],
    )

    async def upsert(conn: Any) -> dict[str, Any]:
        row = await conn.fetchrow(_UPSERT, *args)
        return dict(row)

    if conn is not None:
        async with conn.transaction():
            return await upsert(conn)

    return await execute_with_transient_retry(
        db, upsert, operation_name="get_or_create_user_from_supabase"
    )
