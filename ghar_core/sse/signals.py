"""Learn of shutdown early: a chained SIGINT/SIGTERM handler, and redacted server logs.

Why a signal hook: on SIGTERM uvicorn stops accepting, then waits for every
open response before it sends the lifespan shutdown, and an event stream never
finishes by itself. Its documented alternative, ``--timeout-graceful-shutdown``,
only cancels the request tasks once the timeout has passed (an ERROR line, no
final ``retry:``, a late exit). The hook needs no change to the server, works
under ``ghar-core serve`` and plain uvicorn (both tested with 500 streams), and
leaves the server's own handling as it was (if held, later). Multi-worker
setups were not tested: each worker needs to receive the signal itself.

Why the hook may hold the signal back (at most ``HOLD_TIMEOUT``): uvicorn
fails every WebSocket still open with 1012 at its next tick (0.1 s) after the
signal, so the WebSocket manager's 1001 after the queued messages would be a
race. When a registered part has a ``drained()`` (the manager does), the
server's handler runs once those have drained; a second signal hands over at
once (Ctrl-C twice still forces the exit), replaying the held one first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, Final, Protocol

from ghar_core.logging import RedactingFilter

__all__ = ["HOLD_TIMEOUT", "ShutdownAware", "redact_server_logs", "signal_hook"]

logger = logging.getLogger("ghar_core.sse")

#: Seconds the hook may hold a signal back from the server while parts drain.
HOLD_TIMEOUT: Final = 1.0


class ShutdownAware(Protocol):
    """What the hook tells of a signal: the SSE bus, the WebSocket manager.

    One that also has ``async def drained()`` (the manager) holds the signal
    back from the server until it returns (bounded by ``HOLD_TIMEOUT``).
    """

    def begin_shutdown(self) -> None: ...


class _SignalHook:
    """One chained SIGINT/SIGTERM handler per process, shared by every started bus or manager.

    Servers (uvicorn included) install their handlers before the lifespan
    starts; the hook wraps whatever is installed, tells each bus's loop to
    end its streams (thread-safe: the signal may land at any bytecode), then
    calls the previous handler as if the hook were not there -- after the
    parts with a ``drained()`` on the running loop have drained, for the
    first signal only. When the last bus stops it puts the previous handlers
    back, unless someone replaced the hook meanwhile.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._buses: dict[ShutdownAware, asyncio.AbstractEventLoop] = {}
        self._previous: dict[int, Any] = {}
        self._held: list[tuple[int, FrameType | None]] | None = None
        self._hold: asyncio.Task[None] | None = None
        self._signalled = False  # a later signal is never held
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
        self._signalled = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) is self._handler:
                signal.signal(sig, previous)
        self._previous.clear()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        drains: list[Callable[[], Awaitable[None]]] = []
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for bus, loop in list(self._buses.items()):
            if not loop.is_closed():
                loop.call_soon_threadsafe(bus.begin_shutdown)
                drained = getattr(bus, "drained", None)
                if loop is running and callable(drained):
                    drains.append(drained)
        if self._held is not None:  # a second signal while the first is held
            self._held.append((signum, frame))
            self._release()
            return
        if self._signalled or running is None or not drains:
            self._signalled = True
            self._chain(signum, frame)
            return
        self._signalled = True
        self._held = [(signum, frame)]
        # After the begin_shutdown calls above (the loop runs callbacks in order).
        running.call_soon_threadsafe(self._start_hold, drains)

    def _start_hold(self, drains: list[Callable[[], Awaitable[None]]]) -> None:
        if self._held is not None:
            self._hold = asyncio.get_running_loop().create_task(
                self._wait(drains), name="ghar-signal-hold"
            )

    async def _wait(self, drains: list[Callable[[], Awaitable[None]]]) -> None:
        try:
            async with asyncio.timeout(HOLD_TIMEOUT):
                await asyncio.gather(*(drained() for drained in drains))
        except TimeoutError:
            logger.warning(
                "shutdown: not drained after %gs; handing the signal to the server", HOLD_TIMEOUT
            )
        except Exception:
            logger.exception("shutdown: waiting for the drain failed")
        finally:
            self._hold = None
            self._release()

    def _release(self) -> None:
        held, self._held = self._held, None
        hold, self._hold = self._hold, None
        if hold is not None and hold is not asyncio.current_task():
            hold.cancel()
        for signum, frame in held or ():
            self._chain(signum, frame)

    def _chain(self, signum: int, frame: FrameType | None) -> None:
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
