"""utc_now is aware; make_tz_aware is idempotent and never shifts aware values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from ghar_core.constants import (
    DEFAULT_VISION_MODELS,
    DEFAULT_VISION_PROVIDER,
    VALID_VISION_PROVIDERS,
)
from ghar_core.utils import make_tz_aware, utc_now

zones = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))


def test_utc_now_is_aware_utc() -> None:
    now = utc_now()
    assert now.tzinfo is UTC


@given(naive=st.datetimes(), tz=zones)
def test_naive_values_get_the_zone_without_shifting(naive: datetime, tz: timezone) -> None:
    aware = make_tz_aware(naive, tz)
    assert aware.tzinfo is tz
    assert aware.replace(tzinfo=None) == naive
    assert make_tz_aware(aware) is aware


@given(aware=st.datetimes(timezones=zones))
def test_aware_values_are_returned_unchanged(aware: datetime) -> None:
    assert make_tz_aware(aware) is aware


def test_vision_constants_are_consistent() -> None:
    assert DEFAULT_VISION_PROVIDER in VALID_VISION_PROVIDERS
    assert set(DEFAULT_VISION_MODELS) == VALID_VISION_PROVIDERS
