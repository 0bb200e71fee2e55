"""get_or_create_user_from_supabase against the real Postgres: races, updates, bad input."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ghar_core.database import Database
from ghar_core.exceptions import ValidationException, render_error
from ghar_core.users import get_or_create_user_from_supabase, parse_supabase_user


def provider_user(**overrides: Any) -> dict[str, Any]:
    user: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "aud": "authenticated",
        "role": "authenticated",
        "email": "asha@example.com",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {"full_name": "Asha Rao"},
        "created_at": "2026-01-01T00:00:00Z",
    }
    user.update(overrides)
    return user


async def test_fifty_concurrent_first_calls_make_one_row(db: Database) -> None:
    user = provider_user()
    results = await asyncio.gather(
        *(get_or_create_user_from_supabase(db, user) for _ in range(50)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert len({r["id"] for r in results}) == 1  # type: ignore[index]
    async with db.connection() as conn:
        count = await conn.fetchval(
            "SELECT count(*) FROM users WHERE supabase_user_id = $1", uuid.UUID(user["id"])
        )
    assert count == 1


async def test_second_call_updates_and_keeps_identity(db: Database) -> None:
    user = provider_user()
    first = await get_or_create_user_from_supabase(db, user)
    assert first["email"] == "asha@example.com"
    assert first["phone"] is None
    assert first["full_name"] == "Asha Rao"
    assert first["app_metadata"] == {"provider": "email", "providers": ["email"]}
    changed = dict(user, email="asha@new.example", user_metadata={})
    second = await get_or_create_user_from_supabase(db, changed)
    assert second["id"] == first["id"]
    assert second["created_at"] == first["created_at"]
    assert second["email"] == "asha@new.example"
    assert second["full_name"] == "Asha Rao"  # kept when the provider stops sending it
    assert second["updated_at"] >= first["updated_at"]
    assert second["last_seen_at"] >= first["last_seen_at"]
    third = await get_or_create_user_from_supabase(db, changed)
    assert third["updated_at"] == second["updated_at"]  # nothing changed, only last_seen_at


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        "user",
        {},
        {"id": None},
        {"id": "not-a-uuid"},
        {"id": 12345},
        {"id": str(uuid.uuid4()), "email": 5},
        {"id": str(uuid.uuid4()), "app_metadata": ["x"]},
        {"id": str(uuid.uuid4()), "user_metadata": {"k": "nul\x00"}},
        {"id": str(uuid.uuid4()), "phone": "1\x002"},
        {"id": str(uuid.uuid4()), "email": "a" * 5000},
        {"id": str(uuid.uuid4()), "email": "lone \ud800 surrogate"},
        {"id": str(uuid.uuid4()), "user_metadata": {"name": "lone \udfff"}},
    ],
    ids=repr,
)
async def test_bad_provider_data_is_a_422(db: Database, bad: Any) -> None:
    with pytest.raises(ValidationException) as info:
        await get_or_create_user_from_supabase(db, bad)
    rendered = render_error(info.value)
    assert rendered.status_code == 422
    assert b"VALIDATION_ERROR" in rendered.body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
user_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.uuids().map(str), st.text(max_size=40), st.integers(), st.none()),
        "email": st.one_of(st.none(), st.text(max_size=60), st.integers()),
        "phone": st.one_of(st.none(), st.text(max_size=20)),
        "role": st.one_of(st.none(), st.text(max_size=20)),
        "app_metadata": json_values,
        "user_metadata": json_values,
    },
)


@hsettings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=user_like)
async def test_any_provider_shape_is_stored_or_refused_with_422(
    db: Database, data: dict[str, Any]
) -> None:
    try:
        parsed = parse_supabase_user(data)
    except ValidationException:
        with pytest.raises(ValidationException):
            await get_or_create_user_from_supabase(db, data)
        return
    row = await get_or_create_user_from_supabase(db, data)
    assert row["supabase_user_id"] == parsed["supabase_user_id"]
    assert row["app_metadata"] == parsed["app_metadata"]
    assert row["user_metadata"] == parsed["user_metadata"]
    assert row["role"] == parsed["role"]
