"""The core mounted in FastAPI and in Starlette: one lifespan, its services in the host's routes.

Real parts throughout: the plugin's throwaway database and local identity
provider, real tokens, the host frameworks themselves (test-only dependencies).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes'
# annotations at runtime, and the dependency below is local to a function.
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse as StarletteJSON
from starlette.routing import Mount, Route

from ghar_core.asgi import App, CurrentUser, create_app
from ghar_core.asgi.hosts import api_exception_handler, fastapi_current_user, host_current_user
from ghar_core.config import Settings
from ghar_core.database import Database
from ghar_core.exceptions import BaseAPIException
from ghar_core.http import HTTPClients
from ghar_core.testing import TestClient


def _lifespan(core: App) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(host: Any) -> AsyncIterator[None]:
        async with core.lifespan():  # the host's lifespan drives the core's resources
            yield

    return lifespan


async def _rows_of(core: App, user: CurrentUser) -> int:
    db = core.resources.get("database", Database)
    async with db.connection() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM users WHERE id = $1", user.id)
    return count


def fastapi_host(core: App) -> FastAPI:
    api = FastAPI(lifespan=_lifespan(core))
    api.add_exception_handler(BaseAPIException, api_exception_handler)
    api.mount("/core", core)
    User = Annotated[CurrentUser, Depends(fastapi_current_user(core))]

    @api.get("/mine")
    async def mine(user: User) -> dict[str, Any]:
        return {"email": user.identity["email"], "rows": await _rows_of(core, user)}

    return api


def starlette_host(core: App) -> Starlette:
    async def mine(request: StarletteRequest) -> StarletteJSON:
        user = await host_current_user(core, request)
        return StarletteJSON({"email": user.identity["email"], "rows": await _rows_of(core, user)})

    return Starlette(
        routes=[Route("/mine", mine), Mount("/core", app=core)],
        lifespan=_lifespan(core),
        exception_handlers={BaseAPIException: api_exception_handler},
    )


async def _exercise(host: Any, core: App, token: str) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
    async with TestClient(host) as client:  # lifespan events go to the host
        assert core.lifespan_manager.started
        r = await client.get("/mine")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "AUTH_TOKEN_MISSING"
        assert "Bearer" in r.headers["www-authenticate"]
        r = await client.get("/mine", headers=bearer)
        assert r.status_code == 200, r.text
        assert r.json() == {"email": "host@example.com", "rows": 1}  # the users row, synced
        r = await client.get("/core/api/v1/me", headers=bearer)  # the mounted core's own route
        assert r.status_code == 200, r.text
        assert r.json()["email"] == "host@example.com"
        r = await client.get("/core/nowhere")
        assert r.status_code == 404
        assert r.json()["error"]["details"]["path"] == "/core/nowhere"  # root_path honoured
        clients = core.resources.get("http_clients", HTTPClients)
    assert not core.lifespan_manager.started  # the host's shutdown stopped the core
    assert clients.open_sessions() == 0


async def test_fastapi_mounts_the_core_and_uses_current_user(
    ghar_settings: Settings, ghar_token: Any
) -> None:
    core = create_app(ghar_settings)
    await _exercise(fastapi_host(core), core, ghar_token(email="host@example.com"))


async def test_starlette_mounts_the_core_and_uses_current_user(
    ghar_settings: Settings, ghar_token: Any
) -> None:
    core = create_app(ghar_settings)
    await _exercise(starlette_host(core), core, ghar_token(email="host@example.com"))


def test_the_runtime_imports_no_host_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ghar_core.asgi.hosts, ghar_core.asgi.app; "
        "print(sorted(m for m in ('fastapi', 'starlette') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
