"""One lifespan for every way the app is hosted.

:class:`LifespanManager` owns the transition of the app's
:class:`~ghar_core.lifecycle.Resources` between stopped and started:

- a host that speaks the ASGI lifespan protocol (uvicorn) drives it through
  :meth:`LifespanManager.handle`;
- a host that never sends lifespan events (a parent app that does not
  forward them) gets a lazy start on the first request that needs
  resources, exactly once however many requests race for it;
- code can call ``await app.startup()`` / ``await app.shutdown()`` or use
  ``async with app.lifespan()``.

A failed lazy start answers 503 with ``Retry-After`` and is retried by a
later request (at most once a second), so the app recovers by itself when
the dependency comes back. After an explicit shutdown requests get 503
until ``startup()`` is called again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ghar_core.exceptions import ServiceUnavailableException

if TYPE_CHECKING:
    from ghar_core.asgi.types import Receive, Scope, Send
    from ghar_core.lifecycle import Resources

__all__ = ["LifespanManager"]

logger = logging.getLogger("ghar_core.lifespan")

_RETRY_INTERVAL = 1.0  # seconds between lazy start attempts after a failure


class LifespanManager:
    """Start and stop one :class:`Resources` exactly once per cycle (see the module doc)."""

    def __init__(
        self, resources: Resources, *, after_shutdown: Callable[[], None] | None = None
    ) -> None:
        self.resources = resources
        self.after_shutdown = after_shutdown
        # Called after every successful start (``ghar-core serve`` freezes the
        # startup heap there, see ghar_core.server).
        self.after_startup: Callable[[], None] | None = None
        self.started = False  # read on the hot path: a plain attribute
        self.stopped = False
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._failed_at: float | None = None

    def _get_lock(self) -> asyncio.Lock:
        # A lock belongs to one event loop; tests (and reloads) may bring another.
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock = asyncio.Lock()
            self._lock_loop = loop
        return self._lock

    async def startup(self) -> None:
        """Start every resource (no-op when started); raises ``LifecycleError`` on failure."""
        async with self._get_lock():
            if self.started:
                return
            await self._start_locked()

    async def _start_locked(self) -> None:
        await self.resources.start()
        self.started = True
        self.stopped = False
        self._failed_at = None
        if self.after_startup is not None:
            self.after_startup()
        logger.debug("started resources: %s", ", ".join(self.resources.names) or "none")

    def _refuse_lazy_start(self) -> None:
        if self.stopped:
            raise ServiceUnavailableException("The service is shutting down.")
        failed_at = self._failed_at
        if failed_at is not None and time.monotonic() - failed_at < _RETRY_INTERVAL:
            raise ServiceUnavailableException(
                "The service is starting and cannot serve yet.", headers={"Retry-After": "1"}
            )

    async def shutdown(self) -> None:
        """Stop every started resource in reverse; raises ``LifecycleError`` listing failures.

        ``after_shutdown`` (the app flushes its access log there) runs in any case.
        """
        async with self._get_lock():
            self.started = False
            self.stopped = True
            try:
                await self.resources.stop()
            finally:
                if self.after_shutdown is not None:
                    self.after_shutdown()

    async def ensure_started(self) -> None:
        """The lazy start for hosts without lifespan events; 503 while it cannot succeed."""
        if self.started:
            return
        self._refuse_lazy_start()
        try:
            async with self._get_lock():
                # Re-check under the lock: requests queued behind a start that just
                # failed share its outcome instead of retrying one by one (each retry
                # may take a whole step timeout), and a request queued behind a
                # shutdown must not start the resources again after it.
                if self.started:
                    return
                self._refuse_lazy_start()
                await self._start_locked()
        except ServiceUnavailableException:
            raise
        except Exception as exc:
            self._failed_at = time.monotonic()
            logger.error("lazy start failed: %s", exc, exc_info=exc)
            raise ServiceUnavailableException(
                "The service is starting and cannot serve yet.", headers={"Retry-After": "1"}
            ) from exc

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Speak the ASGI lifespan protocol until shutdown completes."""
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.error("startup failed: %s", exc, exc_info=exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    logger.error("shutdown failed: %s", exc, exc_info=exc)
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return
