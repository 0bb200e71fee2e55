"""The per-user event bus behind ``GET {API_V1_STR}/events/stream`` (resource ``"sse"``).

``sse_bus.emit(user_id, event)`` after a commit: it never blocks and never
awaits, and returns how many open streams got the event. Each open stream is
one :class:`Subscription` with a bounded queue; a full queue drops its oldest
event and takes the new one. Subscriptions that stay full for
``SSE_FULL_CYCLES_LIMIT`` reap cycles (a reap runs every 10 emits and every
``SSE_REAPER_INTERVAL`` seconds) or go ``SSE_IDLE_TIMEOUT`` without being read
are removed; past ``SSE_MAX_SUBSCRIBERS`` a new subscription is refused (503).

Exact resume. Every event of a user has a *position* that only grows, under an
*epoch* that changes whenever positions could have been lost (a new process,
a user's log forgotten); the SSE ``id:`` is ``"<epoch>:<position>"``. A client
that comes back with ``Last-Event-ID`` is subscribed first (live events
buffer in its queue), then given what it missed from a small per-user history
(``SSE_HISTORY_SIZE`` events, ``SSE_HISTORY_MAX_AGE`` seconds), then the live
events, skipping any it already got: nothing lost, nothing twice. When the gap
cannot be filled -- another epoch, older than the history, a malformed id, or
this subscription's own queue dropped events -- the client gets an in-band
``reset`` event (its ``data`` names the reason) and must reload its state;
there is never a silent hole.

Positions, epochs and history come from an :class:`EventLog`; the default is
the in-process :class:`MemoryEventLog`. A broker that spans processes supplies
its own log (positions from an outbox) and hands events that were published
elsewhere to :meth:`SSEEventBus.deliver`.

Ownership: the app's lifespan owns the ``"sse"`` resource (``start`` runs the
reaper, ``stop`` ends every stream). ``sse_bus`` is the process default: it
forwards to the running app's bus (the first ``SSEEventBus`` started in the
process), else to one built from the settings on first use.

Shutdown: servers wait for open responses before they run the lifespan
shutdown, and an event stream never ends by itself. So ``start`` chains the
process's SIGINT/SIGTERM handlers (when it runs in the main thread): on the
signal every stream gets a final jittered ``retry:`` and ends, then the
server's own handler runs as before. A host that stops by other means calls
:meth:`SSEEventBus.begin_shutdown`.
"""

from __future__ import annotations

from ghar_core.sse.bus import Published, SSEEventBus, SSEUnavailableError
from ghar_core.sse.default import get_sse_bus, set_default_bus, sse_bus
from ghar_core.sse.log import (
    RESET_EVENT,
    Event,
    EventLog,
    MemoryEventLog,
    format_event_id,
    parse_event_id,
)
from ghar_core.sse.subscription import (
    CLOSED_BY_CLIENT,
    DISCONNECTED,
    REAPED_IDLE,
    REAPED_STALLED,
    SHUTDOWN,
    Subscription,
)

__all__ = [
    "CLOSED_BY_CLIENT",
    "DISCONNECTED",
    "REAPED_IDLE",
    "REAPED_STALLED",
    "RESET_EVENT",
    "SHUTDOWN",
    "Event",
    "EventLog",
    "MemoryEventLog",
    "Published",
    "SSEEventBus",
    "SSEUnavailableError",
    "Subscription",
    "format_event_id",
    "get_sse_bus",
    "parse_event_id",
    "set_default_bus",
    "sse_bus",
]
