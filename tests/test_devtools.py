"""The local identity provider speaks GoTrue's paths, shapes and errors over real HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from ghar_core import cli
from ghar_core.devtools import DEV_SERVICE_ROLE_KEY, IdentityProviderServer
from ghar_core.devtools.identity_provider import TokenRequestError, request_token


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProviderServer]:
    async with IdentityProviderServer() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


ADMIN = {"Authorization": f"Bearer {DEV_SERVICE_ROLE_KEY}", "apikey": DEV_SERVICE_ROLE_KEY}


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, Any]:
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json(), resp.headers


def assert_gotrue_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status
    assert set(body) == {"code", "error_code", "msg"}
    assert body["code"] == expected_status
    assert body["error_code"] == code


async def test_jwks_and_tokens_verify_with_pyjwt(
    idp: IdentityProviderServer, session: aiohttp.ClientSession
) -> None:
    status, jwks, headers = await call(session, "GET", f"{idp.url}/auth/v1/.well-known/jwks.json")
    assert status == 200
    assert "max-age" in headers["Cache-Control"]
    (key,) = jwks["keys"]
    assert key["kty"] == "EC"
    assert key["crv"] == "P-256"
    assert key["alg"] == "ES256"
    assert "d" not in key  # never the private part
    token = idp.provider.mint_token(email="x@example.com")
    header = jwt.get_unverified_header(token)
    assert header["kid"] == key["kid"]
    claims = jwt.decode(
        token,
        jwt.PyJWK(key).key,
        algorithms=["ES256"],
        audience="authenticated",
        issuer=f"{idp.url}/auth/v1",
    )
    assert claims["email"] == "x@example.com"
    assert {"sub", "exp", "iat", "role", "session_id", "aal", "amr", "is_anonymous"} <= set(claims)
    new_kid = idp.provider.rotate_key()
    _, jwks, _ = await call(session, "GET", f"{idp.url}/auth/v1/.well-known/jwks.json")
    assert [k["kid"] for k in jwks["keys"]] == [key["kid"], new_kid]
    with pytest.raises(ValueError, match="current signing key"):
        idp.provider.drop_key(new_kid)
    idp.provider.drop_key(key["kid"])
    _, jwks, _ = await call(session, "GET", f"{idp.url}/auth/v1/.well-known/jwks.json")
    assert [k["kid"] for k in jwks["keys"]] == [new_kid]


async def test_introspection_answers_like_gotrue(
    idp: IdentityProviderServer, session: aiohttp.ClientSession
) -> None:
    url = f"{idp.url}/auth/v1/user"
    apikey = {"apikey": idp.provider.anon_key}
    token = idp.provider.mint_token(email="u@example.com", session_id="sess-1")
    bearer = {"Authorization": f"Bearer {token}"}
    status, user, _ = await call(session, "GET", url, headers=bearer | apikey)
    assert status == 200
    assert user["email"] == "u@example.com"
    assert user["aud"] == "authenticated"
    assert_gotrue_error(
        *(await call(session, "GET", url, headers=bearer))[:2], 401, "no_authorization"
    )
    assert_gotrue_error(
        *(await call(session, "GET", url, headers=apikey))[:2], 401, "no_authorization"
    )
    bad = {"Authorization": f"Bearer {token[:-4]}AAAA"}
    assert_gotrue_error(
        *(await call(session, "GET", url, headers=bad | apikey))[:2], 403, "bad_jwt"
    )
    expired = idp.provider.mint_token(expires_in=-100)
    status, body, _ = await call(
        session, "GET", url, headers={"Authorization": f"Bearer {expired}"} | apikey
    )
    assert_gotrue_error(status, body, 403, "bad_jwt")
    assert "expired" in body["msg"]
    idp.provider.revoked_sessions.add("sess-1")
    status, body, _ = await call(session, "GET", url, headers=bearer | apikey)
    assert_gotrue_error(status, body, 403, "session_not_found")
    idp.provider.users.clear()
    other = idp.provider.mint_token(create_user=False)
    status, body, _ = await call(
        session, "GET", url, headers={"Authorization": f"Bearer {other}"} | apikey
    )
    assert_gotrue_error(status, body, 403, "user_not_found")


async def test_admin_api(idp: IdentityProviderServer, session: aiohttp.ClientSession) -> None:
    base = f"{idp.url}/auth/v1/admin/users"
    status, user, _ = await call(
        session, "POST", base, json={"email": "A@Example.com", "email_confirm": True}, headers=ADMIN
    )
    assert status == 200
    assert user["email"] == "a@example.com"
    assert user["email_confirmed_at"]
    uid = user["id"]
    status, body, _ = await call(
        session, "POST", base, json={"email": "a@example.com"}, headers=ADMIN
    )
    assert_gotrue_error(status, body, 422, "email_exists")
    status, body, _ = await call(session, "POST", base, json={"email": "nope"}, headers=ADMIN)
    assert_gotrue_error(status, body, 400, "validation_failed")
    status, body, _ = await call(
        session, "PUT", f"{base}/{uid}", json={"role": "admin"}, headers=ADMIN
    )
    assert status == 200
    assert body["role"] == "admin"
    for i in range(4):
        await call(session, "POST", base, json={"email": f"p{i}@example.com"}, headers=ADMIN)
    status, page, headers = await call(
        session, "GET", base, params={"page": "2", "per_page": "2"}, headers=ADMIN
    )
    assert status == 200
    assert len(page["users"]) == 2
    assert page["aud"] == "authenticated"
    assert headers["X-Total-Count"] == "5"
    assert 'rel="next"' in headers["Link"]
    assert 'rel="last"' in headers["Link"]
    status, body, _ = await call(session, "GET", base, params={"page": "x"}, headers=ADMIN)
    assert_gotrue_error(status, body, 400, "validation_failed")
    assert (await call(session, "DELETE", f"{base}/{uid}", headers=ADMIN))[:2] == (200, {})
    status, body, _ = await call(session, "GET", f"{base}/{uid}", headers=ADMIN)
    assert_gotrue_error(status, body, 404, "user_not_found")
    status, body, _ = await call(session, "GET", f"{base}/not-a-uuid", headers=ADMIN)
    assert_gotrue_error(status, body, 400, "validation_failed")
    anon = {"Authorization": f"Bearer {idp.provider.anon_key}", "apikey": idp.provider.anon_key}
    status, body, _ = await call(session, "GET", base, headers=anon)
    assert_gotrue_error(status, body, 403, "not_admin")
    status, body, _ = await call(session, "POST", base, data=b"{oops", headers=ADMIN)
    assert_gotrue_error(status, body, 400, "bad_json")


async def test_fail_status_and_counters(
    idp: IdentityProviderServer, session: aiohttp.ClientSession
) -> None:
    idp.provider.fail_status = 503
    status, body, _ = await call(session, "GET", f"{idp.url}/auth/v1/.well-known/jwks.json")
    assert_gotrue_error(status, body, 503, "unexpected_failure")
    assert idp.provider.requests["jwks"] == 1


async def test_request_token_and_the_cli(idp: IdentityProviderServer, capsys: Any) -> None:
    sub = str(uuid.uuid4())
    token = await request_token(idp.url, DEV_SERVICE_ROLE_KEY, sub=sub, email="cli@example.com")
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == sub
    # The same email later gets the same user.
    again = await request_token(idp.url, DEV_SERVICE_ROLE_KEY, email="cli@example.com")
    assert jwt.decode(again, options={"verify_signature": False})["sub"] == sub
    with pytest.raises(TokenRequestError, match="HTTP 403"):
        await request_token(idp.url, "wrong-key")
    with pytest.raises(TokenRequestError, match="HTTP 400"):
        await request_token(idp.url, DEV_SERVICE_ROLE_KEY, sub="not-a-uuid")
    argv = ["token", "--provider-url", idp.url, "--email", "cli@example.com", "--ttl", "120"]
    argv += ["--service-role-key", DEV_SERVICE_ROLE_KEY]
    code = await asyncio.to_thread(cli.main, argv)
    out = capsys.readouterr().out.strip()
    assert code == 0
    claims = jwt.decode(out, options={"verify_signature": False})
    assert claims["sub"] == sub
    assert claims["exp"] - claims["iat"] == 120


async def test_cli_token_without_a_provider(capsys: Any) -> None:
    from tests.pg import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code = await asyncio.to_thread(cli.main, ["token", "--provider-url", url, "--email", "a@b.co"])
    assert code == 1
    assert "cannot reach the local identity provider" in capsys.readouterr().err


def test_identity_provider_command_serves_until_sigterm(tmp_path: Any) -> None:
    """`ghar-core identity-provider` runs the provider; `ghar-core token` mints from it."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ghar_core", "identity-provider", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert url in banner
        assert proc.stdout.readline().strip() == f"SUPABASE_URL={url}"
        proc.stdout.readline()  # the anon key
        key = proc.stdout.readline().strip().removeprefix("SUPABASE_SERVICE_ROLE_KEY=")
        argv = ["token", "--provider-url", url, "--service-role-key", key, "--email", "c@d.io"]
        token = subprocess.run(
            [sys.executable, "-m", "ghar_core", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        assert jwt.decode(token, options={"verify_signature": False})["email"] == "c@d.io"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0


async def test_admin_bodies_sent_in_chunks_are_read_whole(
    idp: IdentityProviderServer, session: aiohttp.ClientSession
) -> None:
    # Regression: the provider read its request body with one `content.read(n)`,
    # which returns what has arrived so far: a chunked body was cut and answered
    # 400 bad_json.
    body = orjson.dumps({"email": "chunks@example.com", "user_metadata": {"bio": "x" * 20_000}})

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]
            await asyncio.sleep(0.001)

    url = f"{idp.url}/auth/v1/admin/users"
    status, created, _ = await call(session, "POST", url, data=chunks(), headers=ADMIN)
    assert status == 200, created
    assert created["user_metadata"]["bio"] == "x" * 20_000

    async def too_big() -> AsyncIterator[bytes]:
        for _ in range(70):
            yield b" " * 1000

    status, error, _ = await call(session, "POST", url, data=too_big(), headers=ADMIN)
    assert_gotrue_error(status, error, 413, "request_timeout")
