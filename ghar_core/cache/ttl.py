"""A bounded mapping whose entries expire: TTL per entry, LRU eviction.

Why our own and not ``functools.lru_cache`` or a third-party package: the
token cache needs a per-entry lifetime (never past the token's own ``exp``),
an explicit ``purge``, counters the tests and benchmarks can read, and a hit
path that is one dict lookup and one clock read. The cache is owned by
whoever constructs it; it holds no tasks or handles, so there is nothing to
close: :meth:`TTLCache.clear` drops everything at once.

Not thread-safe by design: it lives on one event loop, where every call runs
to completion without interleaving.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

__all__ = ["CacheStats", "TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")


@dataclass(slots=True)
class CacheStats:
    """Counters since the cache was made (or :meth:`TTLCache.reset_stats`)."""

    hits: int = 0
    misses: int = 0
    expirations: int = 0
    evictions: int = 0


class TTLCache(Generic[K, V]):
    """At most ``max_size`` entries, each living at most ``ttl`` seconds.

    ``set(key, value, ttl)`` may shorten an entry's life, never lengthen it.
    ``clock`` is monotonic seconds (``time.monotonic`` by default; tests pass a
    fake clock to step time). ``max_size=0`` or a ``ttl <= 0`` stores nothing,
    which is how a cache is switched off by configuration. A read refreshes an
    entry's recency but never its lifetime.
    """

    __slots__ = ("_clock", "_data", "max_size", "stats", "ttl")

    def __init__(
        self,
        *,
        max_size: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0, got {ttl}")
        self.max_size = max_size
        self.ttl = ttl
        self._clock = clock
        # key -> (expires_at, value); order is recency, oldest first.
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.stats = CacheStats()

    @overload
    def get(self, key: K) -> V | None: ...

    @overload
    def get(self, key: K, default: D) -> V | D: ...

    def get(self, key: K, default: object = None) -> object:
        """The live value for ``key`` or ``default``; an expired entry is dropped."""
        data = self._data
        entry = data.get(key)
        if entry is not None:
            if entry[0] > self._clock():
                data.move_to_end(key)
                self.stats.hits += 1
                return entry[1]
            del data[key]
            self.stats.expirations += 1
        self.stats.misses += 1
        return default

    def set(self, key: K, value: V, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds, capped at the cache's ``ttl``.

        A non-positive lifetime stores nothing (and forgets an older value), so
        callers can pass ``min(limit, exp - now)`` without a special case.
        """
        lifetime = self.ttl if ttl is None else min(ttl, self.ttl)
        if lifetime <= 0 or self.max_size == 0:
            self._data.pop(key, None)
            return
        data = self._data
        data[key] = (self._clock() + lifetime, value)
        data.move_to_end(key)
        while len(data) > self.max_size:
            data.popitem(last=False)
            self.stats.evictions += 1

    def pop(self, key: K) -> V | None:
        """Remove ``key`` and return its value if it was live."""
        entry = self._data.pop(key, None)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def purge_expired(self) -> int:
        """Drop every expired entry now; returns how many were dropped."""
        now = self._clock()
        dead = [key for key, (expires_at, _) in self._data.items() if expires_at <= now]
        for key in dead:
            del self._data[key]
        self.stats.expirations += len(dead)
        return len(dead)

    def clear(self) -> None:
        """Forget every entry (counters are kept)."""
        self._data.clear()

    def reset_stats(self) -> None:
        """Zero the counters (benchmarks and tests)."""
        self.stats = CacheStats()

    def __contains__(self, key: object) -> bool:
        entry = self._data.get(key)  # type: ignore[arg-type]
        return entry is not None and entry[0] > self._clock()

    def __len__(self) -> int:
        """Entries held, including expired ones not yet dropped."""
        return len(self._data)

    def __repr__(self) -> str:
        return f"TTLCache(size={len(self._data)}, max_size={self.max_size}, ttl={self.ttl})"
