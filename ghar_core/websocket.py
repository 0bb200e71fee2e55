"""``ConnectionManager``: the WebSocket registries (resource ``"websocket"``).

Two registries, the seed's: ``job_connections`` (job id -> the sockets
following that job's progress) and ``user_connections`` (user id -> the
user's notification sockets). Services call ``manager.send_job_update``,
``broadcast_job_completion``, ``broadcast_job_error`` and
``send_user_notification``; none of them awaits a socket.

Why a queue and a writer per socket: the usual manager awaits each send in
turn, so one client that stops reading (its TCP window full, the server's
write buffer full) holds every socket behind it for the whole send timeout.
Here a message is encoded once and appended to each target socket's bounded
queue; each socket's writer (the task of its route) sends it, every send
bounded by ``WS_SEND_TIMEOUT``. A socket that times out (close code 4001),
overflows its queue (4002), or does not answer a ``ping`` in time (4003) is
removed from the registries at once and closed with that code; the others
never wait for it.

Who may hear what: a user's notification sockets are keyed by their own id,
and a job socket is accepted only for a job the starting service registered
to that user (``await register_job(job_id, owner_id)``); a foreign job is
refused (403) and an unknown or expired one too (404), before the handshake
completes. Registrations end when the job completes or fails, and after
``WS_JOB_TTL``. With a remote broker they are stored in Postgres
(``ghar_ws_jobs``): a job registered on one instance may be followed from any
other, the check before accept asks the stored row when this process does not
know the job for that user, and expiry here asks it again first (another
instance may have renewed the job).

Liveness: every ``WS_PING_INTERVAL`` of silence from a client the server
sends ``{"type": "ping"}``; any message from the client counts as the answer
(``{"type": "pong"}`` is the expected one), and a client that sends
``{"type": "ping"}`` is answered ``{"type": "pong"}``. ASGI gives an app no
access to protocol-level ping frames, so liveness is in the messages.

Publication goes through :meth:`ConnectionManager.publish`, which calls
``publisher`` (by default :meth:`ConnectionManager.deliver_local`); a broker
that spans processes replaces ``publisher`` and hands messages published
elsewhere to ``deliver_local``. Ownership: the app's lifespan owns the
resource; ``stop`` (or the chained SIGINT/SIGTERM hook, like the SSE bus's)
closes every socket with 1001 "going away", promptly. On a signal the hook
hands it to the server only once :meth:`ConnectionManager.drained` (at most
1 s): uvicorn closes every socket still open with its own 1012 the moment it
sees the signal, so without the wait the close code would be a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, Protocol, cast

import orjson

from ghar_core.broker import (
    TOPIC_JOB,
    TOPIC_SOCKET,
    Broker,
    Record,
    decode_socket_message,
    encode_socket_message,
)
from ghar_core.exceptions import (
    ForbiddenException,
    NotFoundException,
    RateLimitException,
    ServiceUnavailableException,
)
from ghar_core.sse import SSEEventBus, get_sse_bus
from ghar_core.sse.log import json_default
from ghar_core.sse.signals import redact_server_logs, signal_hook

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_JOB_RELEASED",
    "CLOSE_NORMAL",
    "CLOSE_PONG_TIMEOUT",
    "CLOSE_QUEUE_OVERFLOW",
    "CLOSE_SEND_TIMEOUT",
    "Connection",
    "ConnectionManager",
    "ManagedSocket",
    "Outbound",
    "get_manager",
    "manager",
]

logger = logging.getLogger("ghar_core.websocket")

CLOSE_NORMAL: Final = 1000  # the job completed or failed; the client closed
CLOSE_GOING_AWAY: Final = 1001  # the server is shutting down
CLOSE_SEND_TIMEOUT: Final = 4001  # one send took longer than WS_SEND_TIMEOUT
CLOSE_QUEUE_OVERFLOW: Final = 4002  # more than WS_QUEUE_MAX_SIZE messages waiting
CLOSE_PONG_TIMEOUT: Final = 4003  # no answer to a ping within WS_PONG_TIMEOUT
CLOSE_JOB_RELEASED: Final = 4004  # the job's registration expired or was released

_CLOSE_TIMEOUT: Final = 1.0  # seconds a close (and a drain before it) may take
_PING: Final = '{"type":"ping"}'
_PONG: Final = '{"type":"pong"}'
_JSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS


class ManagedSocket(Protocol):
    """What the manager needs of a socket (``ghar_core.asgi.WebSocket`` is one)."""

    async def accept(
        self, subprotocol: str | None = None, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None: ...

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class Outbound(NamedTuple):
    """One message, already encoded, for every socket of one job or one user.

    ``end``: close those sockets after it (``(code, reason)``) and, for a job,
    release its registration -- how a completion reaches every instance.
    """

    target: Literal["job", "user"]
    key: str
    text: str
    end: tuple[int, str] | None = None


class _Job:
    __slots__ = ("checking", "expires", "owner")

    def __init__(self, owner: str, expires: float) -> None:
        self.owner = owner
        self.expires = expires
        self.checking = False  # expired here; the stored registration is being asked


class _Done:
    """An awaitable that is already done (``register_job`` without a remote broker)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


_DONE: Final = _Done()


class Connection:
    """One managed socket: its queue, its liveness and why it closed.

    Made by ``connect_job`` / ``connect_user``; :meth:`ConnectionManager.serve`
    runs its writer and reader and returns once it is closed and removed.
    """

    __slots__ = (
        "_scope",
        "_waiter",
        "client_gone",
        "close_code",
        "close_reason",
        "deadline",
        "job_id",
        "ping_sent",
        "queue",
        "seen",
        "sent",
        "user_id",
        "ws",
    )

    def __init__(self, ws: ManagedSocket, user_id: str, job_id: str | None, now: float) -> None:
        self.ws = ws
        self.user_id = user_id
        self.job_id = job_id
        self.queue: deque[str] = deque()
        self.seen = now
        self.ping_sent: float | None = None
        self.sent = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.deadline: float | None = None
        self.client_gone = False
        self._waiter: asyncio.Future[None] | None = None
        self._scope: asyncio.Timeout | None = None

    @property
    def closed(self) -> bool:
        """True once the manager decided to close it (it is then in no registry)."""
        return self.close_code is not None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __repr__(self) -> str:
        what = f"job {self.job_id}" if self.job_id is not None else "notifications"
        return f"<Connection {what} of {self.user_id} queued={len(self.queue)}>"


def _loop_time() -> float:
    # Deadlines of sends are in the loop's clock (asyncio.timeout's), not ``clock``.
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def _dumps(message: Mapping[str, Any]) -> str:
    return orjson.dumps(message, default=json_default, option=_JSON_OPTIONS).decode()


class ConnectionManager:
    """The job and user WebSocket registries (see the module doc).

    ``ConnectionManager(settings)`` takes its tunables from the ``WS_*``
    settings; keyword arguments override them. ``sse`` is the bus that
    ``send_user_notification(..., sse=True)`` also publishes to (default: the
    process's ``sse_bus``). As a resource it is started and stopped by the
    app's lifespan: ``start`` runs the liveness task, ``stop`` closes every
    socket with 1001. Unstarted it still delivers (no pings, no expiry).
    """

    name = "websocket"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        sse: SSEEventBus | None = None,
        max_per_user: int | None = None,
        send_timeout: float | None = None,
        queue_size: int | None = None,
        ping_interval: float | None = None,
        pong_timeout: float | None = None,
        job_ttl: float | None = None,
        broker: Broker | None = None,
        clock: Callable[[], float] = time.monotonic,
        handle_signals: bool = True,
    ) -> None:
        if settings is None:
            from ghar_core.config import get_settings

            settings = get_settings()

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        self.max_per_user: int = pick(max_per_user, settings.WS_MAX_CONNECTIONS_PER_USER)
        self.send_timeout: float = pick(send_timeout, settings.WS_SEND_TIMEOUT)
        self.queue_size: int = pick(queue_size, settings.WS_QUEUE_MAX_SIZE)
        self.ping_interval: float = pick(ping_interval, settings.WS_PING_INTERVAL)
        self.pong_timeout: float = pick(pong_timeout, settings.WS_PONG_TIMEOUT)
        self.job_ttl: float = pick(job_ttl, settings.WS_JOB_TTL)
        if self.max_per_user < 1 or self.queue_size < 1:
            raise ValueError("max_per_user and queue_size must be at least 1")
        for option in ("send_timeout", "ping_interval", "pong_timeout", "job_ttl"):
            if getattr(self, option) <= 0:
                raise ValueError(f"{option} must be positive, got {getattr(self, option)!r}")
        self.sse = sse
        self.clock = clock
        self.handle_signals = handle_signals
        self.job_connections: dict[str, set[Connection]] = {}
        self.user_connections: dict[str, set[Connection]] = {}
        self._per_user: dict[str, int] = {}
        self._jobs: dict[str, _Job] = {}
        self._live: set[Connection] = set()  # from registration until its close is done
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.publisher: Callable[[Outbound], int] = self.deliver_local
        # A remote broker (EVENT_BROKER=postgres) carries every message, so each
        # instance -- this one too -- delivers what comes back to its own sockets.
        self.broker = broker if broker is not None and broker.remote else None
        if self.broker is not None:
            self.publisher = self._publish_remote
            self.broker.attach(TOPIC_JOB, _SocketSink(self, "job"))
            self.broker.attach(TOPIC_SOCKET, _SocketSink(self, "user"))
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()  # registrations' background writes
        self._closing = False
        self.started = False
        self.counters: dict[str, int] = dict.fromkeys(
            ("published", "queued", "sent", "refused", "send_timeout", "overflow", "pong_timeout"),
            0,
        )

    # --- jobs ------------------------------------------------------------------

    def register_job(
        self, job_id: Any, owner_id: Any, *, ttl: float | None = None
    ) -> Awaitable[None]:
        """Let ``owner_id`` follow ``job_id`` (the service that starts the job calls this).

        Await it: with a remote broker (``EVENT_BROKER=postgres``) the
        registration is stored in Postgres, so a job socket may connect to
        any instance once the awaitable is done; it is in this process's
        registry at once either way. The registration ends when the job
        completes or fails, or after ``ttl`` seconds (default ``WS_JOB_TTL``);
        registering again renews it.
        """
        job, owner = str(job_id), str(owner_id)
        known = self._jobs.get(job)
        if known is not None and known.owner != owner and self.job_connections.get(job):
            raise ValueError(f"job {job!r} is registered to another user with sockets open")
        seconds = self.job_ttl if ttl is None else ttl
        self._jobs[job] = _Job(owner, self.clock() + seconds)
        if self.broker is None:
            return _DONE
        return asyncio.ensure_future(self.broker.register_job(job, owner, seconds))

    def release_job(self, job_id: Any, *, code: int = CLOSE_JOB_RELEASED, reason: str = "") -> int:
        """End ``job_id``'s registration (on every instance) and close its sockets here.

        Returns how many sockets of this process it closed. With a remote
        broker the stored registration is deleted in the background, so a new
        socket for the job is refused on every instance once that is done.
        """
        job = str(job_id)
        if self.broker is not None:
            self._background(self.broker.release_job(job), f"release job {job!r}")
        return self._release_here(job, code, reason)

    def _release_here(self, job: str, code: int = CLOSE_JOB_RELEASED, reason: str = "") -> int:
        self._jobs.pop(job, None)
        conns = list(self.job_connections.get(job, ()))
        for conn in conns:
            self._drop(conn, code, reason or "job registration released", drain=True)
        return len(conns)

    async def _forget_stored(self, job: str) -> None:
        # The completion already releases it on every instance that knows it; a
        # failed delete leaves the stored row to expire (logged, never raised).
        if self.broker is None:
            return
        self._jobs.pop(job, None)  # refused here now, before the message comes back
        try:
            await self.broker.release_job(job)
        except Exception as exc:
            logger.warning("websocket: release job %r failed: %s: %s", job, type(exc).__name__, exc)

    def _background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(task: asyncio.Future[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                logger.warning("websocket: %s failed: %s: %s", what, type(exc).__name__, exc)

        task.add_done_callback(done)

    def job_owner(self, job_id: Any) -> str | None:
        """Who may follow ``job_id`` now, as this process knows it (``None``: unknown, expired).

        With a remote broker a registration made on another instance is
        learnt by :meth:`connect_job` (or :meth:`refresh_job`) before it checks.
        """
        job = self._jobs.get(str(job_id))
        if job is None or job.expires <= self.clock():
            return None
        return job.owner

    async def refresh_job(self, job_id: Any) -> str | None:
        """Learn ``job_id``'s stored registration (any instance's); returns its owner now.

        Without a remote broker it is :meth:`job_owner`. A stored registration
        replaces this process's (the last registration wins everywhere); none
        stored leaves this process's own as it is.
        """
        job = str(job_id)
        if self.broker is not None:
            found = await self.broker.job_owner(job)
            if found is not None:
                owner, left = found
                known = self._jobs.get(job)
                if known is not None and known.owner == owner:
                    known.expires = self.clock() + left
                    known.checking = False
                else:
                    self._jobs[job] = _Job(owner, self.clock() + left)
        return self.job_owner(job)

    # --- connecting ------------------------------------------------------------

    def _admit(self, user: str) -> None:
        if self._closing:
            self.counters["refused"] += 1
            raise ServiceUnavailableException(
                "The server is restarting; reconnect shortly.", headers={"Retry-After": "2"}
            )
        if self._per_user.get(user, 0) >= self.max_per_user:
            self.counters["refused"] += 1
            raise RateLimitException(
                "Too many open WebSockets for this user; close one first.",
                error_code="WS_TOO_MANY_CONNECTIONS",
                details={"max_connections_per_user": self.max_per_user},
            )

    def check_job(self, job_id: Any, user_id: Any) -> None:
        """Raise 404 (not registered, expired) or 403 (another user's) for this job socket."""
        owner = self.job_owner(job_id)
        if owner is None:
            self.counters["refused"] += 1
            raise NotFoundException(
                "No such job, or it has already finished.", error_code="WS_JOB_NOT_FOUND"
            )
        if owner != str(user_id):
            self.counters["refused"] += 1
            raise ForbiddenException(
                "This job belongs to another user.", error_code="WS_JOB_FORBIDDEN"
            )

    async def connect_job(self, ws: ManagedSocket, job_id: Any, user_id: Any) -> Connection:
        """Accept ``ws`` for ``job_id``'s updates; refuses (raises) before accept.

        403/404 for a job that is not ``user_id``'s, 429 past the per-user cap,
        503 while shutting down. With a remote broker the ownership check
        consults the stored registrations, so the job may have been registered
        on any instance.
        """
        user, job = str(user_id), str(job_id)
        if self.broker is not None and self.job_owner(job) != user:
            await self.refresh_job(job)  # registered on another instance, or since renewed
        self.check_job(job, user)
        return await self._accept(ws, user, job)

    async def connect_user(self, ws: ManagedSocket, user_id: Any) -> Connection:
        """Accept ``ws`` for ``user_id``'s notifications; 429 past the cap, 503 when stopping."""
        return await self._accept(ws, str(user_id), None)

    async def _accept(self, ws: ManagedSocket, user: str, job: str | None) -> Connection:
        self._admit(user)
        conn = Connection(ws, user, job, self.clock())
        # Registered before accept: sockets racing past the cap are counted.
        if job is None:
            self.user_connections.setdefault(user, set()).add(conn)
        else:
            self.job_connections.setdefault(job, set()).add(conn)
        self._per_user[user] = self._per_user.get(user, 0) + 1
        self._live.add(conn)
        try:
            if self.broker is not None:
                # From here on every message of this job or user reaches this process.
                if job is None:
                    await self.broker.head(TOPIC_SOCKET, user)
                else:
                    await self.broker.head(TOPIC_JOB, job)
            await ws.accept()
        except BaseException:
            self._drop(conn, CLOSE_NORMAL, "accept failed", drain=False)
            self._finished(conn)
            raise
        return conn

    def _remove(self, conn: Connection) -> None:
        if conn.job_id is not None:
            registry, key = self.job_connections, conn.job_id
        else:
            registry, key = self.user_connections, conn.user_id
        conns = registry.get(key)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        if not conns:
            del registry[key]  # never an empty entry left behind
        left = self._per_user[conn.user_id] - 1
        if left:
            self._per_user[conn.user_id] = left
        else:
            del self._per_user[conn.user_id]

    def disconnect_job(self, conn: Connection, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Remove a job socket now and close it after what is queued (bounded)."""
        self._drop(conn, code, reason, drain=True)

    def disconnect_user(self, conn: Connection, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Remove a notification socket now and close it after what is queued (bounded)."""
        self._drop(conn, code, reason, drain=True)

    def _drop(self, conn: Connection, code: int, reason: str, *, drain: bool) -> None:
        if conn.close_code is not None:
            return
        conn.close_code, conn.close_reason = code, reason
        self._remove(conn)
        if not drain:
            conn.queue.clear()
        deadline = _loop_time() + _CLOSE_TIMEOUT
        conn.deadline = deadline
        scope = conn._scope
        if scope is not None:
            # A send in flight must not hold the close longer than the close bound.
            when = scope.when()
            scope.reschedule(deadline if when is None else min(when, deadline))
        conn._wake()

    # --- serving ---------------------------------------------------------------

    async def serve(self, conn: Connection, receive: Callable[[], Awaitable[str | None]]) -> None:
        """Run ``conn`` until it closes: its writer here, its reader in a child task.

        ``receive`` returns the next text the client sent, ``None`` once it is
        gone. Returns after the socket is closed (or the close gave up, bounded)
        and removed from the registries.
        """
        reader = asyncio.ensure_future(self._read(conn, receive))
        try:
            await self._write(conn)
        finally:
            self._drop(conn, CLOSE_NORMAL, "", drain=False)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._finished(conn)

    def _finished(self, conn: Connection) -> None:
        self._live.discard(conn)
        if not self._live:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def drained(self) -> None:
        """Return once every socket's close is done (sent, or its bound passed).

        The signal hook awaits it before it hands the signal to the server:
        uvicorn fails every socket still open with 1012 as soon as it sees it.
        """
        if not self._live:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def _read(self, conn: Connection, receive: Callable[[], Awaitable[str | None]]) -> None:
        while True:
            text = await receive()
            if text is None:
                conn.client_gone = True
                self._drop(conn, CLOSE_NORMAL, "client closed", drain=False)
                return
            conn.seen = self.clock()
            conn.ping_sent = None
            if len(text) < 64 and '"ping"' in text:
                with contextlib.suppress(ValueError):
                    if orjson.loads(text).get("type") == "ping":
                        self._queue(conn, _PONG)

    async def _write(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        ws = conn.ws
        queue = conn.queue
        while True:
            if not queue:
                if conn.close_code is not None:
                    break
                conn._waiter = loop.create_future()
                try:
                    await conn._waiter
                finally:
                    conn._waiter = None
                continue
            text = queue.popleft()
            deadline = loop.time() + self.send_timeout
            if conn.deadline is not None:
                deadline = min(deadline, conn.deadline)
            try:
                async with asyncio.timeout_at(deadline) as scope:
                    conn._scope = scope
                    await ws.send_text(text)
            except TimeoutError:
                conn._scope = None
                if conn.close_code is None:
                    self.counters["send_timeout"] += 1
                    logger.warning(
                        "websocket: closed a socket of %s whose client stopped reading "
                        "(no send in %gs)",
                        conn.user_id,
                        self.send_timeout,
                    )
                    self._drop(conn, CLOSE_SEND_TIMEOUT, "send timeout", drain=False)
                queue.clear()
                break
            except Exception:
                # The client went away mid-send (the server says so by raising).
                conn._scope = None
                conn.client_gone = True
                self._drop(conn, CLOSE_NORMAL, "client gone", drain=False)
                break
            conn._scope = None
            conn.sent += 1
            self.counters["sent"] += 1
        if conn.client_gone:
            return
        # A socket that just timed out gets the close bound afresh: it may read again.
        end = conn.deadline if conn.deadline is not None else loop.time() + _CLOSE_TIMEOUT
        with contextlib.suppress(Exception):
            async with asyncio.timeout_at(max(end, loop.time() + 0.05)):
                await ws.close(conn.close_code or CLOSE_NORMAL, conn.close_reason)

    # --- sending ---------------------------------------------------------------

    def _queue(self, conn: Connection, text: str) -> None:
        queue = conn.queue
        if len(queue) >= self.queue_size:
            self.counters["overflow"] += 1
            logger.warning("websocket: closed a socket of %s: its queue overflowed", conn.user_id)
            self._drop(conn, CLOSE_QUEUE_OVERFLOW, "queue overflow", drain=False)
            return
        queue.append(text)
        self.counters["queued"] += 1
        conn._wake()

    def publish(self, message: Outbound) -> int:
        """The one way out: hand ``message`` to ``publisher`` (local delivery by default)."""
        self.counters["published"] += 1
        return self.publisher(message)

    def _publish_remote(self, message: Outbound) -> int:
        # Counted as 0: the sockets are reached when the message comes back committed.
        assert self.broker is not None
        topic = TOPIC_JOB if message.target == "job" else TOPIC_SOCKET
        self.broker.publish_nowait(
            topic, message.key, "ws", encode_socket_message(message.text, message.end)
        )
        return 0

    def deliver_local(self, message: Outbound) -> int:
        """Queue an encoded message on this process's sockets of its job or user.

        Never awaits; returns how many sockets took it. With ``end`` set the
        sockets close after it and a job's registration is released (a
        broker's entry point for messages published by other instances).
        """
        if message.target == "job":
            conns = self.job_connections.get(message.key)
        else:
            conns = self.user_connections.get(message.key)
        if message.end is not None and message.target == "job":
            self._jobs.pop(message.key, None)
        if not conns:
            return 0
        targets = list(conns)
        for conn in targets:
            self._queue(conn, message.text)
        if message.end is not None:
            code, reason = message.end
            for conn in targets:
                self._drop(conn, code, reason, drain=True)
        return len(targets)

    async def send_job_update(self, job_id: Any, data: Mapping[str, Any]) -> int:
        """``{"type": "job_update", "job_id", "data"}`` to the job's sockets; returns how many."""
        job = str(job_id)
        text = _dumps({"type": "job_update", "job_id": job, "data": data})
        return self.publish(Outbound("job", job, text))

    async def broadcast_job_completion(self, job_id: Any, result: Any = None) -> int:
        """``{"type": "job_completed", ...}``, then close its sockets (1000) and release it."""
        job = str(job_id)
        text = _dumps({"type": "job_completed", "job_id": job, "result": result})
        count = self.publish(Outbound("job", job, text, (CLOSE_NORMAL, "job completed")))
        await self._forget_stored(job)  # no instance accepts a socket for it now
        return count

    async def broadcast_job_error(self, job_id: Any, error: Any) -> int:
        """``{"type": "job_error", ...}``, then close its sockets (1000) and release it."""
        job = str(job_id)
        text = _dumps({"type": "job_error", "job_id": job, "error": error})
        count = self.publish(Outbound("job", job, text, (CLOSE_NORMAL, "job failed")))
        await self._forget_stored(job)
        return count

    async def send_user_notification(
        self,
        user_id: Any,
        notification: Any,
        *,
        sse: bool = False,
        type: str = "notification",
    ) -> int:
        """``{"type": "notification", "data"}`` to the user's sockets; returns how many.

        ``sse=True`` also publishes it on the user's event stream (the same
        ``type`` and ``data``) and gives the WebSocket message that event's
        ``id``, so a client may follow either transport and tell them apart
        from duplicates. The count is of sockets only.
        """
        user = str(user_id)
        message: dict[str, Any] = {"type": type, "data": notification}
        if sse:
            bus = self.sse if self.sse is not None else get_sse_bus()
            published = await bus.send(user, message)
            message = {**message, "id": published.event.id}
        return self.publish(Outbound("user", user, _dumps(message)))

    # --- liveness and expiry ---------------------------------------------------

    def tick(self) -> None:
        """One liveness cycle now: ping the silent, drop the unanswered, expire jobs.

        The liveness task calls it several times per ``min(WS_PING_INTERVAL,
        WS_PONG_TIMEOUT)``.
        """
        now = self.clock()
        for conns in (*self.job_connections.values(), *self.user_connections.values()):
            for conn in list(conns):
                sent = conn.ping_sent
                if sent is not None:
                    if now - sent >= self.pong_timeout:
                        self.counters["pong_timeout"] += 1
                        logger.info("websocket: a client of %s did not answer", conn.user_id)
                        self._drop(conn, CLOSE_PONG_TIMEOUT, "pong timeout", drain=False)
                elif now - conn.seen >= self.ping_interval:
                    conn.ping_sent = now
                    self._queue(conn, _PING)
        expired = [
            job for job, reg in self._jobs.items() if reg.expires <= now and not reg.checking
        ]
        for job in expired:
            if self.broker is None:
                self._release_here(job, reason="job registration expired")
            else:
                # Another instance may have renewed it: ask before closing its sockets.
                self._jobs[job].checking = True
                self._background(self._expire(job), f"expire job {job!r}")

    async def _expire(self, job: str) -> None:
        try:
            await self.refresh_job(job)
        finally:
            reg = self._jobs.get(job)
            if reg is not None and reg.expires <= self.clock():
                self._release_here(job, reason="job registration expired")

    async def _tick_forever(self) -> None:
        period = max(0.02, min(self.ping_interval, self.pong_timeout) / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self.tick()
            except Exception:  # a bug here must not stop liveness for good
                logger.exception("websocket liveness cycle failed")

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Run the liveness task, chain the shutdown signals, become the process default."""
        self._closing = False
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(
                self._tick_forever(), name="ghar-websocket-liveness"
            )
        if self.handle_signals:
            signal_hook.add(self)
        redact_server_logs()  # ?access_token= is in uvicorn's WebSocket lines
        global _default
        if _default is None or not _default.started:
            _default = self
        self.started = True

    def begin_shutdown(self) -> None:
        """Close every socket with 1001 (after what is queued, within 1 s) and refuse new ones."""
        if self._closing:
            return
        self._closing = True
        conns = self.connections()
        for conn in conns:
            self._drop(conn, CLOSE_GOING_AWAY, "server shutting down", drain=True)
        if conns:
            logger.info("websocket: closing %d socket(s) for shutdown", len(conns))

    async def stop(self) -> None:
        """Close every socket (1001), stop the liveness task, unhook the signals."""
        global _default
        self.begin_shutdown()
        signal_hook.discard(self)
        ticker, self._ticker = self._ticker, None
        if ticker is not None and not ticker.done():
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if self._tasks:  # registrations still being written or released (bounded)
            await asyncio.wait(list(self._tasks), timeout=_CLOSE_TIMEOUT)
        if _default is self:
            _default = None
        self.started = False

    async def check(self) -> None:
        """Ready while the liveness task runs and the manager is not stopping."""
        if self._closing:
            raise RuntimeError("the websocket manager is shutting down")
        ticker = self._ticker
        if self.started and (ticker is None or ticker.done()):
            raise RuntimeError("the websocket liveness task is not running")

    def connections(self) -> list[Connection]:
        """Every registered socket, job and notification ones."""
        return [
            c
            for reg in (self.job_connections, self.user_connections)
            for cs in reg.values()
            for c in cs
        ]

    def stats(self) -> dict[str, int]:
        """Counters and sizes for ``/ready`` and the logs."""
        return {
            "users": len(self._per_user),
            "sockets": sum(self._per_user.values()),
            "jobs": len(self._jobs),
            "job_sockets": sum(len(c) for c in self.job_connections.values()),
            "user_sockets": sum(len(c) for c in self.user_connections.values()),
            **self.counters,
        }

    def __repr__(self) -> str:
        return f"<ConnectionManager {sum(self._per_user.values())} socket(s)>"


_default: ConnectionManager | None = None


class _SocketSink:
    """The manager's side of a remote broker: messages of its jobs or users, to their sockets."""

    __slots__ = ("manager", "target")

    def __init__(self, manager: ConnectionManager, target: Literal["job", "user"]) -> None:
        self.manager = manager
        self.target = target

    def wants(self, key: str) -> bool:
        manager = self.manager
        if self.target == "job":
            return key in manager.job_connections or key in manager._jobs
        return key in manager.user_connections

    def receive(self, record: Record) -> None:
        text, end = decode_socket_message(record.payload)
        self.manager.deliver_local(Outbound(self.target, record.key, text, end))

    def reset(self, key: str, epoch: str, position: int, reason: str) -> None:
        return None  # sockets carry no positions: nothing to resume


def get_manager() -> ConnectionManager:
    """The process default: the running app's manager, else one built from the settings."""
    global _default
    if _default is None:
        _default = ConnectionManager()
    return _default


class _DefaultManager:
    """``manager``: forwards every attribute to :func:`get_manager`, resolved at call time."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(get_manager(), name)

    def __repr__(self) -> str:
        return f"<manager -> {get_manager()!r}>"


#: ``from ghar_core.websocket import manager``: the process default (the seed's name).
manager: Final[ConnectionManager] = cast("ConnectionManager", _DefaultManager())
