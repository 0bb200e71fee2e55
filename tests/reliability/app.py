"""The app the reliability suite serves with ``ghar-core serve --app ... --factory``.

The core app plus three routes that give the suite a real read/write load:

- ``POST {API_V1_STR}/writes`` with ``Idempotency-Key: <uuid>`` (the client's
  id of the write) and a JSON body ``{"payload": str}``: in one transaction
  through :func:`execute_with_transient_retry`, claim the key, insert the
  write and bump the user's counter. A key already claimed answers 200 with
  ``"replayed": true`` and changes nothing, so a retry after a lost answer
  is safe; the suite checks afterwards that every acknowledged write is
  there once, and that the counters agree with the rows (no half-applied
  transaction).
- ``GET {API_V1_STR}/writes/{id:uuid}``: read one back (404 when absent).
- ``GET {API_V1_STR}/slow?seconds=S``: ``pg_sleep(S)`` in a transaction, a
  statement that outlives ``DB_COMMAND_TIMEOUT`` on purpose;
- ``POST {API_V1_STR}/notify``: the JSON body as a notification to the
  caller's WebSockets (``ConnectionManager.send_user_notification``).

Every route authenticates with ``current_user``; a handler sleeps inside the
write transaction when ``?hold=S`` asks it to, so the shutdown case can
have requests in flight.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

from ghar_core.asgi import App, Request, build_default_resources, create_app, current_user
from ghar_core.auth import SupabaseAuth
from ghar_core.config import Settings, load_settings, setting
from ghar_core.database import Database
from ghar_core.db_resilience import execute_with_transient_retry
from ghar_core.exceptions import BadRequestException, NotFoundException, ValidationException
from ghar_core.http import HTTPClients
from ghar_core.lifecycle import Resource, Resources
from ghar_core.migrate import MigrationSet
from ghar_core.websocket import ConnectionManager

__all__ = ["MIGRATIONS", "ReliabilitySettings", "build"]

MIGRATIONS = MigrationSet("reliability", Path(__file__).parent / "migrations")
_MAX_HOLD = 5.0


def _idempotency_key(request: Request) -> uuid.UUID:
    raw = request.headers.get("idempotency-key")
    if raw is None:
        raise BadRequestException(
            "Send an Idempotency-Key header (a UUID).", error_code="IDEMPOTENCY_KEY_MISSING"
        )
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise BadRequestException(
            "Idempotency-Key must be a UUID.", error_code="IDEMPOTENCY_KEY_INVALID"
        ) from None


def _seconds(request: Request, name: str, default: float, most: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValidationException(f"{name} must be a number of seconds.") from None
    if not 0 <= value <= most:
        raise ValidationException(f"{name} must be 0 to {most:g} seconds.")
    return value


async def create_write(request: Request) -> dict[str, Any]:
    """Apply one write exactly once per Idempotency-Key."""
    user = await current_user(request)
    key = _idempotency_key(request)
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("payload"), str):
        raise ValidationException('The body must be {"payload": "<text>"}.')
    payload: str = body["payload"]
    hold = _seconds(request, "hold", 0.0, _MAX_HOLD)
    db = request.resources.get("database", Database)
    user_id = str(user.identity["id"])

    async def apply(conn: Any) -> bool:
        claimed = await conn.fetchval(
            "INSERT INTO reliability_keys (key) VALUES ($1) ON CONFLICT DO NOTHING RETURNING key",
            key,
        )
        if claimed is None:
            return False
        await conn.execute(
            "INSERT INTO reliability_writes (write_id, user_id, payload) VALUES ($1, $2, $3)",
            key,
            user_id,
            payload,
        )
        await conn.execute(
            "INSERT INTO reliability_counters (user_id, writes) VALUES ($1, 1) "
            "ON CONFLICT (user_id) DO UPDATE SET writes = reliability_counters.writes + 1",
            user_id,
        )
        if hold:
            await conn.execute("SELECT pg_sleep($1)", hold)
        return True

    applied = await execute_with_transient_retry(db, apply, operation_name="reliability_write")
    return {"id": str(key), "replayed": not applied}


async def read_write(request: Request) -> dict[str, Any]:
    """One write back, as stored."""
    await current_user(request)
    key = request.path_params["id"]
    db = request.resources.get("database", Database)

    async def load(conn: Any) -> Any:
        return await conn.fetchrow(
            "SELECT write_id, payload FROM reliability_writes WHERE write_id = $1", key
        )

    row = await execute_with_transient_retry(db, load, operation_name="reliability_read")
    if row is None:
        raise NotFoundException("No such write.", details={"id": str(key)})
    return {"id": str(row["write_id"]), "payload": row["payload"]}


async def slow(request: Request) -> dict[str, Any]:
    """A statement that runs ``seconds``: past the command timeout it must become a 503."""
    await current_user(request)
    seconds = _seconds(request, "seconds", 1.0, 60.0)
    db = request.resources.get("database", Database)

    async def sleep(conn: Any) -> None:
        await conn.execute("SELECT pg_sleep($1)", seconds)

    await execute_with_transient_retry(db, sleep, operation_name="reliability_slow")
    return {"slept": seconds}


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class ReliabilitySettings(Settings):
    """The suite app's own setting, declared beside the core's as any app would."""

    RELIABILITY_AUTH_TIMEOUT: float = setting(
        5.0,
        "float",
        "Deadline of an authentication (key-set wait and introspection), in seconds.",
        minimum=0.1,
        maximum=60.0,
    )


async def notify(request: Request) -> dict[str, Any]:
    """A notification to the caller's own WebSockets (the body is its ``data``)."""
    user = await current_user(request)
    data = await request.json()
    sent = await request.resources.get("websocket", ConnectionManager).send_user_notification(
        user.id, data
    )
    return {"sent": sent}


def build() -> App:
    """The factory ``ghar-core serve --app tests.reliability.app:build --factory`` calls.

    ``RELIABILITY_AUTH_TIMEOUT`` gives the auth resource a shorter deadline
    than its 5 s default, so the slow-provider case stays short: an app that
    replaces one of the core's resources passes a ready ``Resources`` (used
    as is) built from :func:`build_default_resources` with that one swapped.
    """
    settings = load_settings(schema=ReliabilitySettings)

    def auth(started: Resources) -> SupabaseAuth:
        clients = started.get("http_clients", HTTPClients)
        return SupabaseAuth(
            settings,
            client=clients.provider("supabase_auth"),
            timeout=settings.RELIABILITY_AUTH_TIMEOUT,
        )

    specs = build_default_resources(settings, migrations=[MIGRATIONS])
    # The core's auth is its one factory (it needs the clients resource): ours instead.
    factories = [i for i, spec in enumerate(specs) if not isinstance(spec, Resource)]
    assert len(factories) == 1, f"expected one factory among the core's resources: {specs}"
    specs[factories[0]] = auth
    app = create_app(
        settings, resources=Resources(specs, step_timeout=settings.SHUTDOWN_STEP_TIMEOUT)
    )
    prefix = app.settings.API_V1_STR
    app.add_route(f"{prefix}/writes", create_write, ("POST",))
    app.add_route(f"{prefix}/writes/{{id:uuid}}", read_write, ("GET",))
    app.add_route(f"{prefix}/slow", slow, ("GET",))
    app.add_route(f"{prefix}/notify", notify, ("POST",))
    return app
