"""Learn of shutdown early: a chained SIGINT/SIGTERM handler, and redacted server logs.

Why a signal hook: on SIGTERM uvicorn stops accepting, then waits for every
open response before it sends the lifespan shutdown, and an event stream never
finishes by itself. Its documented alternative, ``--timeout-graceful-shutdown``,
only cancels the request tasks once the timeout has passed (an ERROR line, no
final ``retry:``, a late exit). The hook needs no change to the server, works
under ``ghar-core serve`` and plain uvicorn (both tested with 500 streams), and
leaves the server's own handling as it was. Multi-worker setups were not
tested: each worker needs to receive the signal itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import FrameType
from typing import Any, Protocol

from ghar_core.logging import RedactingFilter

__all__ = ["ShutdownAware", "redact_server_logs", "signal_hook"]


class ShutdownAware(Protocol):
    """What the hook tells of a signal: the SSE bus, the WebSocket manager."""

    def begin_shutdown(self) -> None: ...


class _SignalHook:
    """One chained SIGINT/SIGTERM handler per process, shared by every started bus or manager.

    Servers (uvicorn included) install their handlers before the lifespan
    starts; the hook wraps whatever is installed, tells each bus's loop to
    end its streams (thread-safe: the signal may land at any bytecode), then
    calls the previous handler as if the hook were not there. When the last
    bus stops it puts the previous handlers back, unless someone replaced
    the hook meanwhile.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._buses: dict[ShutdownAware, asyncio.AbstractEventLoop] = {}
        self._previous: dict[int, Any] = {}
        # One bound method, kept: each attribute access would make a new object.
        self._handler = self.handle

    def add(self, bus: ShutdownAware) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers can only be set from the main thread
        for sig in self.signals:
            current = signal.getsignal(sig)
            if current is not self._handler:
                self._previous[sig] = current
                signal.signal(sig, self._handler)
        self._buses[bus] = asyncio.get_running_loop()
        return True

    def discard(self, bus: ShutdownAware) -> None:
        if self._buses.pop(bus, None) is None or self._buses:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) is self._handler:
                signal.signal(sig, previous)
        self._previous.clear()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        for bus, loop in list(self._buses.items()):
            if not loop.is_closed():
                loop.call_soon_threadsafe(bus.begin_shutdown)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            # Nobody handled it before us: behave as the default would.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


signal_hook = _SignalHook()


def redact_server_logs() -> None:
    # The stream accepts ?access_token= (EventSource cannot send headers), and
    # servers log request lines with the query: redact them at the source even
    # when the host configured logging itself (plain uvicorn).
    for name in ("uvicorn.access", "uvicorn.error"):
        server_logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in server_logger.filters):
            server_logger.addFilter(RedactingFilter())
