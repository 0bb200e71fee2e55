"""TTLCache against a plain model: expiry, LRU order, size bound, counters."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ghar_core.cache import TTLCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hit_miss_and_expiry() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(max_size=10, ttl=60, clock=clock)
    cache.set("a", 1)
    cache.set("b", 2, ttl=5)
    assert cache.get("a") == 1
    assert cache.get("b") == 2
    clock.now += 5
    assert cache.get("b") is None
    assert cache.get("b", "gone") == "gone"
    assert cache.get("a") == 1
    clock.now += 55
    assert "a" not in cache
    assert cache.stats.hits == 3
    assert cache.stats.expirations == 1


def test_ttl_argument_never_extends_the_cap() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(max_size=10, ttl=60, clock=clock)
    cache.set("a", 1, ttl=3600)
    clock.now += 60
    assert cache.get("a") is None


def test_non_positive_lifetime_stores_nothing_and_forgets() -> None:
    cache: TTLCache[str, int] = TTLCache(max_size=10, ttl=60, clock=FakeClock())
    cache.set("a", 1)
    cache.set("a", 2, ttl=-1)
    assert cache.get("a") is None
    assert len(cache) == 0
    off: TTLCache[str, int] = TTLCache(max_size=0, ttl=60)
    off.set("a", 1)
    assert off.get("a") is None


def test_lru_evicts_least_recently_used() -> None:
    cache: TTLCache[str, int] = TTLCache(max_size=2, ttl=60, clock=FakeClock())
    cache.set("a", 1)
    cache.set("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.set("c", 3)
    assert "b" not in cache
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert cache.stats.evictions == 1


def test_purge_expired_and_clear() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(max_size=10, ttl=60, clock=clock)
    cache.set("a", 1, ttl=1)
    cache.set("b", 2)
    clock.now += 1
    assert cache.purge_expired() == 1
    assert len(cache) == 1
    assert cache.pop("b") == 2
    assert cache.pop("b") is None
    cache.set("c", 3)
    cache.clear()
    assert len(cache) == 0


@pytest.mark.parametrize(("max_size", "ttl"), [(-1, 1), (1, -1)])
def test_bad_options_are_refused(max_size: int, ttl: float) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        TTLCache(max_size=max_size, ttl=ttl)


KEYS = st.sampled_from("abcdefgh")


class CacheMachine(RuleBasedStateMachine):
    """The cache behaves like an ordered dict of (expires_at, value) trimmed to max_size."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.max_size = 4
        self.cache: TTLCache[str, int] = TTLCache(max_size=self.max_size, ttl=10, clock=self.clock)
        self.model: dict[str, tuple[float, int]] = {}  # insertion order = recency

    def _live(self, key: str) -> bool:
        entry = self.model.get(key)
        return entry is not None and entry[0] > self.clock.now

    @rule(key=KEYS, value=st.integers(), ttl=st.none() | st.floats(-5, 20))
    def set(self, key: str, value: int, ttl: float | None) -> None:
        self.cache.set(key, value, ttl)
        lifetime = 10 if ttl is None else min(ttl, 10)
        self.model.pop(key, None)
        if lifetime > 0:
            self.model[key] = (self.clock.now + lifetime, value)
            while len(self.model) > self.max_size:
                del self.model[next(iter(self.model))]

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        got = self.cache.get(key)
        if self._live(key):
            entry = self.model.pop(key)
            self.model[key] = entry
            assert got == entry[1]
        else:
            self.model.pop(key, None)
            assert got is None

    @rule(seconds=st.floats(0, 6))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: bool(self.model))
    @rule()
    def purge(self) -> None:
        self.cache.purge_expired()
        self.model = {k: v for k, v in self.model.items() if v[0] > self.clock.now}

    @invariant()
    def bounded_and_consistent(self) -> None:
        assert len(self.cache) <= self.max_size
        for key in "abcdefgh":
            assert (key in self.cache) == self._live(key)


TestCacheMachine = CacheMachine.TestCase
