"""The in-process TTL + LRU cache (base layer: imports nothing of ours).

:class:`TTLCache` is what the verified-token cache and other hot lookups sit
on: a dict lookup plus one clock read on a hit, no locks (the event loop is
single-threaded), bounded size with least-recently-used eviction.
"""

from __future__ import annotations

from ghar_core.cache.ttl import CacheStats, TTLCache

__all__ = ["CacheStats", "TTLCache"]
