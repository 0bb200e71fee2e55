"""The process default bus behind ``sse_bus`` (see the package doc)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ghar_core.sse.bus import Published, SSEEventBus
    from ghar_core.sse.subscription import Subscription

__all__ = ["claim_default", "get_sse_bus", "release_default", "set_default_bus", "sse_bus"]

_default_bus: SSEEventBus | None = None
_default_is_fallback = False


def set_default_bus(bus: SSEEventBus | None) -> SSEEventBus | None:
    """Make ``bus`` what ``sse_bus`` forwards to (``None``: build one on next use).

    Returns the previous default (tests put it back).
    """
    global _default_bus, _default_is_fallback
    previous, _default_bus, _default_is_fallback = _default_bus, bus, False
    return previous


def claim_default(bus: SSEEventBus) -> None:
    # A started bus takes over from nothing or from the unstarted fallback,
    # never from another running app's bus.
    global _default_bus, _default_is_fallback
    if _default_bus is None or (_default_is_fallback and not _default_bus.started):
        _default_bus, _default_is_fallback = bus, False


def release_default(bus: SSEEventBus) -> None:
    global _default_bus
    if _default_bus is bus:
        _default_bus = None


def get_sse_bus() -> SSEEventBus:
    """The process default: the running app's bus, else one built from the settings."""
    global _default_bus, _default_is_fallback
    if _default_bus is None:
        from ghar_core.sse.bus import SSEEventBus  # here: the bus module imports this one

        _default_bus, _default_is_fallback = SSEEventBus(), True
    return _default_bus


class _DefaultBus:
    """``sse_bus``: forwards every call to :func:`get_sse_bus`, resolved at call time."""

    __slots__ = ()

    def emit(self, user_id: Any, event: Mapping[str, Any]) -> int:
        return get_sse_bus().emit(user_id, event)

    def publish(self, user_id: Any, event: Mapping[str, Any]) -> Published:
        return get_sse_bus().publish(user_id, event)

    async def send(self, user_id: Any, event: Mapping[str, Any]) -> Published:
        return await get_sse_bus().send(user_id, event)

    def subscribe(self, user_id: Any, *, last_event_id: str | None = None) -> Subscription:
        return get_sse_bus().subscribe(user_id, last_event_id=last_event_id)

    def stats(self) -> dict[str, int]:
        return get_sse_bus().stats()

    def __getattr__(self, name: str) -> Any:
        return getattr(get_sse_bus(), name)

    def __repr__(self) -> str:
        return f"<sse_bus -> {get_sse_bus()!r}>"


#: ``from ghar_core.sse import sse_bus``: the process default bus (see the module doc).
sse_bus: Final = _DefaultBus()
