"""The contract every long-lived resource keeps (pool, session set, task, bus).

A resource has one owner: the app's resources object (see ``ghar_core.asgi``)
starts resources in order, stops them in reverse and asks each for readiness.
Services implement this protocol; they never start each other.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Resource"]


@runtime_checkable
class Resource(Protocol):
    """Something the lifespan starts, stops and checks.

    ``name`` is unique within an app and names the readiness check.
    ``start`` must leave the resource usable (or usable lazily, recovering on
    its own when a dependency comes back); ``stop`` must be idempotent and
    release everything; ``check`` raises when the resource cannot serve now
    (the readiness endpoint turns that into a 503 naming the check).
    """

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def check(self) -> None: ...
