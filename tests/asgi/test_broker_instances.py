"""Two app instances (uvicorn on two ports) over one Postgres, ``EVENT_BROKER=postgres``.

An event emitted on A -- by the test route, by ``ghar-core emit`` in a shell
-- reaches an SSE client of B; a client resumes on B with a ``Last-Event-ID``
it got from A (and the other way round); the app's default resources wire the
broker from the settings alone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import aiohttp
import orjson
import pytest

from ghar_core.asgi import create_app
from ghar_core.auth import SupabaseAuth
from ghar_core.broker import PostgresBroker
from ghar_core.database import Database
from ghar_core.http import HTTPClients
from ghar_core.migrate import migrate_dsn
from ghar_core.sse import SSEEventBus
from tests.asgi.sse_support import SERVED_ENV, parse_blocks, sse_settings, token_for
from tests.asgi.test_e2e_uvicorn import serve
from tests.pg import run_sync

STREAM = "/api/v1/events/stream"
TEST_ROUTE = "/api/v1/events/test"


@pytest.fixture
def outbox_dsn(fresh_database: str) -> str:
    run_sync(migrate_dsn(fresh_database))
    return fresh_database


def _instance(dsn: str, **changes: Any) -> tuple[Any, PostgresBroker, SSEEventBus]:
    settings = sse_settings(
        DATABASE_URL=dsn, EVENT_BROKER="postgres", SSE_HEARTBEAT_INTERVAL=0.2, **changes
    )
    database = Database(settings)
    broker = PostgresBroker(settings, database)
    bus = SSEEventBus(settings, broker=broker, handle_signals=False)
    app = create_app(
        settings,
        core_resources=False,
        resources=[HTTPClients(), database, SupabaseAuth(settings), broker, bus],
    )
    return app, broker, bus


class Stream:
    """An SSE client reading blocks as they come."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.text = ""

    async def events(self, count: int, seconds: float = 10.0) -> list[dict[str, str]]:
        """The first ``count`` event blocks (keepalives and the opening skipped)."""
        async with asyncio.timeout(seconds):
            while True:
                done = self.text[: self.text.rfind("\n\n") + 2]
                events = [b for b in parse_blocks(done) if "event" in b]
                if len(events) >= count:
                    return events[:count]
                self.text += (await self.response.content.readany()).decode()

    async def opening_id(self) -> str:
        async with asyncio.timeout(10):
            while "\n\n" not in self.text:
                self.text += (await self.response.content.readany()).decode()
        return parse_blocks(self.text)[0]["id"]


def _emit_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **SERVED_ENV, "DATABASE_URL": dsn}
    return subprocess.run(
        [sys.executable, "-m", "ghar_core", "emit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_events_cross_instances_and_resume_anywhere(outbox_dsn: str) -> None:
    app_a, broker_a, _ = _instance(outbox_dsn)
    app_b, broker_b, bus_b = _instance(outbox_dsn)
    _, token = token_for()
    auth = {"Authorization": f"Bearer {token}"}
    async with serve(app_a) as base_a, serve(app_b) as base_b, aiohttp.ClientSession() as http:
        async with http.get(f"{base_a}/api/v1/me", headers=auth) as me:
            user = (await me.json())["id"]  # the users row: the key of the user's stream
        async with http.get(f"{base_b}{STREAM}", headers=auth) as r:
            stream = Stream(r)
            epoch, position = (await stream.opening_id()).rsplit(":", 1)
            assert position == "0"
            # 1. The route on A.
            sent = await http.post(f"{base_a}{TEST_ROUTE}", headers=auth, json={"n": 1})
            assert sent.status == 200
            assert (await sent.json())["id"] == f"{epoch}:1"
            # 2. A shell on neither instance.
            done = await asyncio.to_thread(
                _emit_cli, outbox_dsn, "--user", user, "--type", "note", "--data", '{"n": 2}'
            )
            assert done.returncode == 0, done.stderr
            assert f"as {epoch}:2" in done.stdout
            first, second = await stream.events(2)
            assert (first["id"], first["event"]) == (f"{epoch}:1", "test")
            assert orjson.loads(first["data"]) == {"type": "test", "data": {"n": 1}}
            assert (second["id"], second["event"]) == (f"{epoch}:2", "note")
            assert orjson.loads(second["data"]) == {"type": "note", "data": {"n": 2}}
        # Gone from B; two more events are published on A meanwhile.
        for n in (3, 4):
            r = await http.post(f"{base_a}{TEST_ROUTE}", headers=auth, json={"n": n})
            assert r.status == 200
        # Resume on B with the id B gave (it was A's numbering too: one outbox).
        resume = {**auth, "Last-Event-ID": f"{epoch}:2"}
        async with http.get(f"{base_b}{STREAM}", headers=resume) as r:
            replayed = await Stream(r).events(2)
        assert [b["id"] for b in replayed] == [f"{epoch}:3", f"{epoch}:4"]
        assert [orjson.loads(b["data"])["data"]["n"] for b in replayed] == [3, 4]
        # And on A with an id from B: the same events, nothing repeated or lost.
        resume = {**auth, "Last-Event-ID": f"{epoch}:3"}
        async with http.get(f"{base_a}{STREAM}", headers=resume) as r:
            stream = Stream(r)
            (only,) = await stream.events(1)
            assert only["id"] == f"{epoch}:4"
            await http.post(f"{base_b}{TEST_ROUTE}", headers=auth, json={"n": 5})
            _, live = await stream.events(2)
            assert live["id"] == f"{epoch}:5"
        # An id from before the outbox's epoch: an in-band reset, never a hole.
        async with http.get(f"{base_b}{STREAM}", headers={**auth, "Last-Event-ID": "zz:1"}) as r:
            (reset,) = await Stream(r).events(1)
        assert reset["event"] == "reset"
        assert orjson.loads(reset["data"])["reason"] == "epoch_changed"
    assert broker_a.stats()["published"] == 3  # n = 1, 3, 4; the shell wrote n = 2
    assert broker_b.stats()["published"] == 1
    assert bus_b.stats()["subscribers"] == 0


async def test_emit_cli_refuses_an_oversize_payload_and_bad_json(outbox_dsn: str) -> None:
    big = orjson.dumps("x" * 70_000).decode()
    done = await asyncio.to_thread(
        _emit_cli, outbox_dsn, "--user", "u", "--type", "t", "--data", big
    )
    assert done.returncode == 2
    assert "over EVENT_MAX_PAYLOAD_BYTES=65536" in done.stderr
    assert "Traceback" not in done.stderr
    bad = await asyncio.to_thread(_emit_cli, outbox_dsn, "--job", "j", "--type", "t", "--data", "{")
    assert bad.returncode == 2
    assert "--data is not JSON" in bad.stderr


async def test_the_default_resources_take_the_broker_from_the_settings(outbox_dsn: str) -> None:
    settings = sse_settings(DATABASE_URL=outbox_dsn, EVENT_BROKER="postgres")
    app = create_app(settings)
    broker = app.resources.get("broker", PostgresBroker)
    bus = app.resources.get("sse", SSEEventBus)
    assert bus.broker is broker
    memory = create_app(sse_settings())
    assert memory.resources.get("sse", SSEEventBus).broker is None


def _instance_ws(dsn: str) -> tuple[Any, Any]:
    from ghar_core.websocket import ConnectionManager

    settings = sse_settings(DATABASE_URL=dsn, EVENT_BROKER="postgres", SSE_HEARTBEAT_INTERVAL=0.2)
    database = Database(settings)
    broker = PostgresBroker(settings, database)
    bus = SSEEventBus(settings, broker=broker, handle_signals=False)
    manager = ConnectionManager(settings, sse=bus, broker=broker, handle_signals=False)
    resources = [HTTPClients(), database, SupabaseAuth(settings), broker, bus, manager]
    return create_app(settings, core_resources=False, resources=resources), manager


async def test_websocket_messages_cross_instances(outbox_dsn: str) -> None:
    from tests.asgi.ws_support import JOBS, NOTIFICATIONS, connect

    app_a, manager_a = _instance_ws(outbox_dsn)
    app_b, manager_b = _instance_ws(outbox_dsn)
    _, token = token_for()
    ws = {"ws": "websockets-sansio"}
    async with (
        serve(app_a, **ws) as base_a,
        serve(app_b, **ws) as base_b,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(
            f"{base_a}/api/v1/me", headers={"Authorization": f"Bearer {token}"}
        ) as me:
            user = (await me.json())["id"]
        await manager_b.register_job("job-1", user)
        notes = await connect(http, base_b, NOTIFICATIONS, token)
        job = await connect(http, base_b, f"{JOBS}/job-1", token)
        # Published on A, by the manager and from a shell; heard on B's sockets.
        await manager_a.send_user_notification(user, {"n": 1})
        await manager_a.send_job_update("job-1", {"progress": 50})
        for args in (
            ("--user", user, "--type", "note"),
            ("--job", "job-1", "--type", "job_update"),
        ):
            done = await asyncio.to_thread(_emit_cli, outbox_dsn, *args, "--data", '{"n": 2}')
            assert done.returncode == 0, done.stderr
        async with asyncio.timeout(10):
            while len(notes.messages) < 2 or len(job.messages) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        got = [m for _, m in notes.messages]
        assert got[0] == {"type": "notification", "data": {"n": 1}}
        assert got[1]["type"] == "note"
        assert got[1]["data"] == {"n": 2}
        assert ":" in got[1]["id"]
        assert [m for _, m in job.messages] == [
            {"type": "job_update", "job_id": "job-1", "data": {"progress": 50}},
            {"type": "job_update", "job_id": "job-1", "data": {"n": 2}},
        ]
        # A completion published on A closes B's job socket and releases B's registration.
        await manager_a.broadcast_job_completion("job-1", {"ok": True})
        async with asyncio.timeout(10):
            await job.closed.wait()
        assert job.of_type("job_completed")[0]["result"] == {"ok": True}
        assert manager_b.job_owner("job-1") is None
        await notes.close()


async def test_a_job_registered_on_one_instance_is_followed_from_another(outbox_dsn: str) -> None:
    import asyncpg

    from tests.asgi.ws_support import JOBS, connect, refusal

    app_a, manager_a = _instance_ws(outbox_dsn)
    app_b, manager_b = _instance_ws(outbox_dsn)
    _, token = token_for()
    _, other_token = token_for()
    ws = {"ws": "websockets-sansio"}
    async with (
        serve(app_a, **ws) as base_a,
        serve(app_b, **ws) as base_b,
        aiohttp.ClientSession() as http,
    ):
        ids = []
        for bearer in (token, other_token):
            async with http.get(
                f"{base_a}/api/v1/me", headers={"Authorization": f"Bearer {bearer}"}
            ) as me:
                ids.append((await me.json())["id"])
        owner = ids[0]
        # Registered on A only; B has never heard of these jobs.
        await manager_a.register_job("job-x", owner)
        await manager_a.register_job("short", owner, ttl=1.0)
        await manager_a.register_job("renewed", owner, ttl=1.0)
        assert manager_b.job_owner("job-x") is None
        # Ownership is checked on B against the stored registration, before accept.
        status, body = await refusal(
            http, base_b, f"{JOBS}/job-x", {"Authorization": f"Bearer {other_token}"}
        )
        assert (status, body["error"]["code"]) == (403, "WS_JOB_FORBIDDEN")
        status, body = await refusal(
            http, base_b, f"{JOBS}/nobody", {"Authorization": f"Bearer {token}"}
        )
        assert (status, body["error"]["code"]) == (404, "WS_JOB_NOT_FOUND")
        job = await connect(http, base_b, f"{JOBS}/job-x", token)
        short = await connect(http, base_b, f"{JOBS}/short", token)
        renewed = await connect(http, base_b, f"{JOBS}/renewed", token)
        await manager_a.register_job("renewed", owner, ttl=60.0)  # renewed on A after B learnt it
        # Updates from either instance reach the socket on B.
        await manager_a.send_job_update("job-x", {"progress": 10})
        await manager_b.send_job_update("job-x", {"progress": 20})
        async with asyncio.timeout(10):
            while len(job.messages) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert sorted(m["data"]["progress"] for _, m in job.messages) == [10, 20]
        # Expiry on B asks the stored row first: "short" ends, "renewed" goes on.
        async with asyncio.timeout(10):
            await short.closed.wait()
        assert short.ws.close_code == 4004
        await asyncio.sleep(0.5)
        assert not renewed.closed.is_set()
        assert manager_b.job_owner("renewed") == owner
        status, body = await refusal(
            http, base_b, f"{JOBS}/short", {"Authorization": f"Bearer {token}"}
        )
        assert (status, body["error"]["code"]) == (404, "WS_JOB_NOT_FOUND")
        # Completed on A: B's socket closes and no instance accepts the job again.
        await manager_a.broadcast_job_completion("job-x", {"ok": True})
        async with asyncio.timeout(10):
            await job.closed.wait()
        assert job.of_type("job_completed")[0]["result"] == {"ok": True}
        for base in (base_a, base_b):
            status, body = await refusal(
                http, base, f"{JOBS}/job-x", {"Authorization": f"Bearer {token}"}
            )
            assert (status, body["error"]["code"]) == (404, "WS_JOB_NOT_FOUND")
        conn = await asyncpg.connect(outbox_dsn)
        try:
            rows = await conn.fetch("SELECT job_id, instance FROM ghar_ws_jobs ORDER BY job_id")
        finally:
            await conn.close()
        assert [r[0] for r in rows] == ["renewed", "short"]  # "short" waits for the pruner
        assert rows[0][1] == manager_a.broker.instance  # type: ignore[union-attr]
        await renewed.close()
