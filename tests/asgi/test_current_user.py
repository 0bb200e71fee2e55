"""current_user and GET /api/v1/me: the local provider over loopback, a real Postgres."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import jwt
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghar_core import http
from ghar_core.asgi import create_app
from ghar_core.asgi.app import build_default_resources
from ghar_core.asgi.auth import current_user
from ghar_core.auth import SupabaseAuth
from ghar_core.config import Settings
from ghar_core.database import Database
from ghar_core.db_resilience import execute_with_transient_retry
from ghar_core.devtools import IdentityProviderServer
from ghar_core.http import HTTPClientsResource
from ghar_core.testing import TestClient
from tests.idp import settings_for, unb64


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProviderServer]:
    async with IdentityProviderServer() as server:
        yield server
    await http.close_all_clients()


def app_without_db(idp: IdentityProviderServer) -> Any:
    s = settings_for(idp, ACCESS_LOG=False)
    return create_app(s, core_resources=False, resources=[HTTPClientsResource(), SupabaseAuth(s)])


@pytest.fixture
def migrated_dsn(_migrated: str) -> str:
    """The module's database with the migrations applied (tests/pg.py)."""
    return _migrated


@pytest.fixture
def app_with_db(idp: IdentityProviderServer, migrated_dsn: str) -> tuple[Any, Settings]:
    s = settings_for(idp, ACCESS_LOG=False, DATABASE_URL=migrated_dsn, DB_POOL_MAX_SIZE=5)
    app = create_app(
        s, core_resources=False, resources=[HTTPClientsResource(), SupabaseAuth(s), Database(s)]
    )

    @app.get("/events")
    async def events(request: Any) -> dict[str, Any]:  # stands in for the SSE route
        user = await current_user(request, allow_query_token=True)
        again = await current_user(request, allow_query_token=True)
        return {"id": str(user.identity["id"]), "same": user is again}

    @app.websocket_route("/ws")
    async def ws_route(ws: Any) -> None:
        user = await current_user(ws, allow_query_token=True)
        await ws.accept()
        await ws.send_json({"email": user.identity["email"]})
        await ws.close()

    return app, s


def test_default_resources_include_auth(idp: IdentityProviderServer) -> None:
    app = create_app(settings_for(idp))
    names = list(app.resources.names)
    assert len(names) == len(build_default_resources(settings_for(idp)))
    assert names.index("auth") > names.index("http_clients")  # stops before the sessions close
    # The auth resource's provider session is the clients resource's own domain.
    clients = app.resources.get("http_clients", HTTPClientsResource)
    assert "supabase_auth" in clients.specs


async def test_current_user_inside_a_held_transaction_needs_no_second_connection(
    idp: IdentityProviderServer, migrated_dsn: str
) -> None:
    """Pool of 1, current_user() called inside the retried operation: the held one is used."""
    s = settings_for(
        idp,
        ACCESS_LOG=False,
        DATABASE_URL=migrated_dsn,
        DB_POOL_MIN_SIZE=1,
        DB_POOL_MAX_SIZE=1,
        DB_POOL_ACQUIRE_TIMEOUT=0.5,
    )
    app = create_app(s)

    @app.post("/listings")
    async def create(request: Any) -> dict[str, Any]:
        db = request.resources.get("database", Database)

        async def op(conn: Any) -> dict[str, Any]:
            user = await current_user(request)  # while `conn` is held
            owner = await conn.fetchval("SELECT id FROM users WHERE id = $1", user.id)
            return {"owner": str(owner), "email": user.identity["email"]}

        return await execute_with_transient_retry(db, op, operation_name="create_listing")

    email = f"held-{uuid.uuid4().hex[:8]}@example.com"
    token = idp.provider.mint_token(email=email)
    async with TestClient(app) as client:
        r = await client.post("/listings", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert r.json()["email"] == email
        owner = r.json()["owner"]
        assert owner != "None"  # the row the upsert made is visible in the same transaction
        main = app.resources.get("database", Database).stats()["main"]
        assert main["exhausted"] == 0
        assert main["opened"] == 1
        # Committed with the handler's transaction: /me finds the same row.
        r = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert r.json()["id"] == owner


async def test_me_syncs_the_users_row(
    app_with_db: tuple[Any, Settings], idp: IdentityProviderServer, migrated_dsn: str
) -> None:
    app, _ = app_with_db
    token = idp.provider.mint_token(email="me@example.com", user_metadata={"full_name": "Me"})
    async with TestClient(app) as client:
        r = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["email"] == "me@example.com"
        assert body["full_name"] == "Me"
        assert body["session_id"]
        assert body["is_anonymous"] is False
        # The second request is a token-cache hit and a row-cache hit.
        r2 = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert r2.json() == body
    conn = await asyncpg.connect(migrated_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT id::text, email FROM users WHERE supabase_user_id = $1::uuid",
            body["supabase_user_id"],
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["id"] == str(body["id"])
    assert row["email"] == "me@example.com"


async def test_fifty_concurrent_first_requests_make_one_row(
    app_with_db: tuple[Any, Settings], idp: IdentityProviderServer, migrated_dsn: str
) -> None:
    app, _ = app_with_db
    token = idp.provider.mint_token(email="racer@example.com")
    headers = {"Authorization": f"Bearer {token}"}
    async with TestClient(app) as client:
        responses = await asyncio.gather(
            *(client.get("/api/v1/me", headers=headers) for _ in range(50))
        )
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["id"] for r in responses}) == 1
    conn = await asyncpg.connect(migrated_dsn)
    try:
        count = await conn.fetchval("SELECT count(*) FROM users WHERE email = 'racer@example.com'")
    finally:
        await conn.close()
    assert count == 1
    assert idp.provider.requests["jwks"] == 1


async def test_query_token_only_where_allowed(
    app_with_db: tuple[Any, Settings], idp: IdentityProviderServer
) -> None:
    app, _ = app_with_db
    token = idp.provider.mint_token(email="sse@example.com")
    async with TestClient(app) as client:
        r = await client.get("/events", params={"access_token": token})
        assert r.status_code == 200
        assert r.json()["same"] is True  # cached on the request state
        refused = await client.get("/api/v1/me", params={"access_token": token})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "AUTH_TOKEN_MISSING"
        async with client.websocket_connect("/ws", params={"access_token": token}) as ws:
            assert await ws.receive_json() == {"email": "sse@example.com"}


async def test_me_without_a_database_returns_the_identity(idp: IdentityProviderServer) -> None:
    token = idp.provider.mint_token(email="nodb@example.com")
    async with TestClient(app_without_db(idp)) as client:
        r = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert r.json()["email"] == "nodb@example.com"
    assert r.json()["supabase_user_id"]


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "AUTH_TOKEN_MISSING"),
        ("Bearer", "AUTH_TOKEN_MISSING"),
        ("Basic dXNlcjpwdw==", "AUTH_TOKEN_MISSING"),  # RFC 6750 3.1: no error code
        ("Bearer not.a.jwt", "AUTH_TOKEN_MALFORMED"),
        ("expired", "AUTH_TOKEN_EXPIRED"),
    ],
)
async def test_401s(idp: IdentityProviderServer, header: str | None, code: str) -> None:
    if header == "expired":
        header = "Bearer " + idp.provider.mint_token(claims={"exp": int(time.time()) - 60})
    headers = {"Authorization": header} if header is not None else {}
    async with TestClient(app_without_db(idp)) as client:
        r = await client.get("/api/v1/me", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == code
    challenge = r.headers.get("www-authenticate")
    assert challenge == (
        "Bearer" if code == "AUTH_TOKEN_MISSING" else 'Bearer error="invalid_token"'
    )


async def test_provider_down_with_nothing_cached_is_503(idp: IdentityProviderServer) -> None:
    token = idp.provider.mint_token()
    app = app_without_db(idp)
    await idp.stop()
    async with TestClient(app) as client:
        r = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 503
        assert r.headers.get("retry-after") == "5"
        assert r.json()["error"]["code"] == "AUTH_PROVIDER_UNREACHABLE"
        await idp.start()  # the provider comes back: the app recovers by itself
        r = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.text(max_size=200).map(lambda t: "Bearer " + t)
    | st.text(max_size=100)
    | st.binary(max_size=100).map(lambda b: b.decode("latin-1"))
)
async def test_garbage_authorization_is_never_a_500(
    idp: IdentityProviderServer, header: str
) -> None:
    try:
        header.encode("latin-1")
    except UnicodeEncodeError:
        header = header.encode().decode("latin-1")
    header = header.replace("\r", "").replace("\n", "")
    async with TestClient(app_without_db(idp)) as client:
        r = await client.get("/api/v1/me", headers=[("Authorization", header)])
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"].startswith("AUTH_TOKEN_")


# --- issue 10: ambiguous credentials, wording, claims checked where verified -------------


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(
        st.sampled_from(["valid", "junk", "other-valid", "basic"]), min_size=2, max_size=4
    )
)
async def test_several_authorization_headers_are_refused_in_any_order(
    idp: IdentityProviderServer, values: list[str]
) -> None:
    # Reproduces issue 10: [valid, junk] was 200 and [junk, valid] 401 (first one won).
    tokens = {
        "valid": "Bearer " + idp.provider.mint_token(),
        "other-valid": "Bearer " + idp.provider.mint_token(),
        "junk": "Bearer junk",
        "basic": "Basic dXNlcjpwdw==",
    }
    headers = [("Authorization", tokens[v]) for v in values]
    async with TestClient(app_without_db(idp)) as client:
        r = await client.get("/api/v1/me", headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "AUTH_CREDENTIALS_AMBIGUOUS"
    assert r.headers.get("www-authenticate") == 'Bearer error="invalid_request"'


async def test_a_header_and_a_query_token_that_differ_are_refused(
    app_with_db: tuple[Any, Settings], idp: IdentityProviderServer
) -> None:
    app, _ = app_with_db
    mine, other = idp.provider.mint_token(), idp.provider.mint_token()
    async with TestClient(app) as client:
        r = await client.get(
            "/events", params={"access_token": other}, headers={"Authorization": f"Bearer {mine}"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "AUTH_CREDENTIALS_AMBIGUOUS"
        assert other not in r.text
        assert mine not in r.text
        twice = await client.get(
            "/events", params=[("access_token", mine), ("access_token", other)]
        )
        assert twice.status_code == 400
        # The same token both ways is not ambiguous.
        same = await client.get(
            "/events", params={"access_token": mine}, headers={"Authorization": f"Bearer {mine}"}
        )
        assert same.status_code == 200, same.text
        # Where no query token is allowed, the query parameter is not a credential.
        me = await client.get(
            "/api/v1/me",
            params={"access_token": other},
            headers={"Authorization": f"Bearer {mine}"},
        )
        assert me.status_code == 200


@pytest.mark.parametrize("separator", ["\t", "\x0b", "\x0c"])
async def test_bearer_with_another_separator_is_malformed_not_missing(
    idp: IdentityProviderServer, separator: str
) -> None:
    token = idp.provider.mint_token()
    async with TestClient(app_without_db(idp)) as client:
        r = await client.get("/api/v1/me", headers=[("Authorization", f"Bearer{separator}{token}")])
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "AUTH_TOKEN_MALFORMED"
    assert "Bearer <token>" in r.json()["error"]["details"]["reason"]


async def test_a_signed_token_whose_sub_is_not_a_uuid_is_401_not_422(
    app_with_db: tuple[Any, Settings], idp: IdentityProviderServer
) -> None:
    # Reproduces issue 10: verification passed, the users sync failed with a 422.
    app, _ = app_with_db
    valid = idp.provider.mint_token()
    claims = orjson.loads(unb64(valid.split(".")[1])) | {"sub": "admin"}
    token = jwt.PyJWS().encode(
        orjson.dumps(claims),
        idp.provider.signing_key(),
        algorithm="ES256",
        headers={"kid": idp.provider.signing_kid},
    )
    async with TestClient(app) as client:
        for _ in range(2):
            r = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "AUTH_TOKEN_INVALID_CLAIMS"
