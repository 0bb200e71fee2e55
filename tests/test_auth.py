"""verify_supabase_token and the admin API against the local provider over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from email.utils import formatdate
from types import SimpleNamespace
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghar_core import auth as auth_module
from ghar_core import http
from ghar_core.asgi.auth import current_user
from ghar_core.auth import (
    AmbiguousCredentialsException,
    AuthenticationException,
    AuthFailureReason,
    AuthProviderUnavailableException,
    SupabaseAuth,
    verify_supabase_token,
)
from ghar_core.config import load_settings
from ghar_core.devtools import IdentityProviderServer
from ghar_core.exceptions import (
    BaseAPIException,
    ExternalServiceError,
    UserNotFoundException,
    ValidationException,
    render_error,
)
from ghar_core.jwt_verification import UNKNOWN_KEY_MESSAGES
from tests.idp import (
    fingerprint,
    forge,
    hs256,
    legacy_token,
    settings_for,
    sign_raw,
    unb64,
    with_header,
)
from tests.strategies import ASYMMETRIC_ALGS, json_values, kid_headers, token_attacks
from tests.tls import serve

USER_KEYS = {
    "id",
    "email",
    "phone",
    "role",
    "aud",
    "app_metadata",
    "user_metadata",
    "is_anonymous",
    "session_id",
}


@pytest.fixture(autouse=True)
async def _clients() -> AsyncIterator[None]:
    """The running clients resource the provider's session comes from, as in an app."""
    async with http.HTTPClients():
        yield


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProviderServer]:
    async with IdentityProviderServer() as server:
        yield server
    await http.close_all_clients()


@pytest.fixture
async def auth(idp: IdentityProviderServer) -> AsyncIterator[SupabaseAuth]:
    resource = SupabaseAuth(settings_for(idp))
    await resource.start()
    yield resource
    await resource.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 50_000.0

    def __call__(self) -> float:
        return self.now


def headers_of(exc: BaseException) -> dict[bytes, bytes]:
    return dict(render_error(exc).headers)


def assert_401(exc: BaseException, reason: AuthFailureReason) -> None:
    rendered = render_error(exc)
    assert rendered.status_code == 401
    assert orjson.loads(rendered.body)["error"]["code"] == reason.value
    challenge = headers_of(exc)[b"www-authenticate"]
    if reason is AuthFailureReason.MISSING:
        assert challenge == b"Bearer"
    else:
        assert challenge == b'Bearer error="invalid_token"'


def assert_503(exc: BaseException) -> None:
    rendered = render_error(exc)
    assert rendered.status_code == 503
    assert headers_of(exc)[b"retry-after"] == b"5"
    assert orjson.loads(rendered.body)["error"]["code"] == "AUTH_PROVIDER_UNREACHABLE"


async def test_local_path_returns_the_user_shape(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    token = idp.provider.mint_token(email="Asha@Example.com", phone="+911234567890")
    user = await auth.verify_token(token)
    assert set(user) == USER_KEYS
    assert user["email"] == "asha@example.com"
    assert user["phone"] == "+911234567890"
    assert user["role"] == "authenticated"
    assert user["aud"] == "authenticated"
    assert user["is_anonymous"] is False
    assert user["session_id"]
    assert auth.introspections == 0
    assert idp.provider.requests["user"] == 0


async def test_cache_hit_does_no_crypto_and_no_io(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    token = idp.provider.mint_token()
    first = await auth.verify_token(token)
    checks = auth.verifier.signature_checks
    for _ in range(1000):
        assert auth.cached_user(token) is first
        assert await auth.verify_token(token) is first
    assert auth.verifier.signature_checks == checks == 1
    assert idp.provider.requests == {"jwks": 1}


async def test_a_key_published_after_our_fetch_is_refused_until_the_next_refresh(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    # The provider publishes keys before signing with them (standby keys), so a
    # kid missing from a set fetched within JWKS_MIN_REFRESH_INTERVAL is not its.
    await auth.verify_token(idp.provider.mint_token())  # key set fetched now
    idp.provider.rotate_key()  # ours signs with a key at once: the worst case
    token = idp.provider.mint_token(email="new@example.com")
    with pytest.raises(AuthenticationException) as info:
        await auth.verify_token(token)
    assert_401(info.value, AuthFailureReason.UNKNOWN_KEY)
    assert idp.provider.requests["user"] == 0
    assert await auth.verifier.jwks.refresh(force=True)  # type: ignore[union-attr]
    user = await auth.verify_token(token)
    assert user["email"] == "new@example.com"
    assert auth.introspections == 0


async def test_legacy_hs256_without_secret_goes_to_the_provider(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    payload = {
        "iss": idp.provider.issuer,
        "aud": "authenticated",
        "sub": str(uuid.uuid4()),
        "exp": int(time.time()) + 60,
    }
    token = hs256({"alg": "HS256", "typ": "JWT"}, payload, b"legacy")
    with pytest.raises(AuthenticationException) as info:
        await auth.verify_token(token)
    assert_401(info.value, AuthFailureReason.REJECTED)
    assert info.value.details == {"reason": "provider said bad_jwt"}
    assert idp.provider.requests["user"] == 1


async def test_provider_rejections_are_401(auth: SupabaseAuth, idp: IdentityProviderServer) -> None:
    idp.provider.jwks_document = {"keys": []}  # no key set: only the provider can decide
    gone = idp.provider.mint_token()
    del idp.provider.users[next(reversed(idp.provider.users))]
    revoked = idp.provider.mint_token(session_id="s-1")
    idp.provider.revoked_sessions.add("s-1")
    for token, code in ((gone, "user_not_found"), (revoked, "session_not_found")):
        with pytest.raises(AuthenticationException) as info:
            await auth.verify_token(token)
        assert_401(info.value, AuthFailureReason.REJECTED)
        assert info.value.details == {"reason": f"provider said {code}"}


async def test_definitely_bad_tokens_never_reach_the_provider(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    expired = idp.provider.mint_token(headers={"kid": "unknown"}, claims={"exp": 1})
    with pytest.raises(AuthenticationException) as info:
        await auth.verify_token(expired)
    assert_401(info.value, AuthFailureReason.EXPIRED)
    with pytest.raises(AuthenticationException) as info:
        await auth.verify_token("not-a-jwt")
    assert_401(info.value, AuthFailureReason.MALFORMED)
    for missing in (None, ""):
        with pytest.raises(AuthenticationException) as info:
            await auth.verify_token(missing)
        assert_401(info.value, AuthFailureReason.MISSING)
    assert idp.provider.requests == {}


async def test_provider_down_with_keys_cached_still_verifies(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    await auth.verify_token(idp.provider.mint_token())
    token = idp.provider.mint_token()
    await idp.stop()
    assert (await auth.verify_token(token))["id"]


@pytest.mark.parametrize("outage", ["down", "500", "429", "slow"])
async def test_provider_outage_with_nothing_cached_is_503(
    idp: IdentityProviderServer, outage: str
) -> None:
    clock = Clock()
    resource = SupabaseAuth(settings_for(idp), timeout=0.2, clock=clock)
    token = idp.provider.mint_token()
    if outage == "down":
        await idp.stop()
    elif outage == "slow":
        idp.provider.delay = 2
    else:
        idp.provider.fail_status = int(outage)
    with pytest.raises(AuthProviderUnavailableException) as info:
        await resource.verify_token(token)
    if outage == "429":  # the provider's own Retry-After (none here: 5 s), then a circuit
        assert headers_of(info.value)[b"retry-after"] == b"5"
    else:
        assert_503(info.value)
    # Recovers by itself once the provider is back (introspection needs no refresh slot).
    if outage == "down":
        await idp.start()
    idp.provider.fail_status = None
    idp.provider.delay = 0
    clock.now += 5  # the 429 circuit has closed by then
    assert (await resource.verify_token(token))["id"]
    await resource.stop()


async def test_unconfigured_provider_is_503() -> None:
    resource = SupabaseAuth(load_settings(app_env="test", environ={}))
    with pytest.raises(AuthProviderUnavailableException) as info:
        await resource.verify_token("a.b.c")
    assert_503(info.value)
    with pytest.raises(BaseAPIException) as admin:
        await resource.get_user(str(uuid.uuid4()))
    assert admin.value.status_code == 503


async def test_module_level_function_uses_the_running_resource(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    assert auth_module.get_auth() is auth
    user = await verify_supabase_token(idp.provider.mint_token(email="m@example.com"))
    assert user["email"] == "m@example.com"
    await auth.stop()
    assert auth_module._default_auth is None


async def test_concurrent_unknown_tokens_fetch_jwks_once(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    tokens = [idp.provider.mint_token() for _ in range(50)]
    users = await asyncio.gather(*(auth.verify_token(t) for t in tokens))
    assert len({u["id"] for u in users}) == 50
    assert idp.provider.requests["jwks"] == 1
    assert auth.introspections == 0


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=token_attacks())
async def test_forged_tokens_get_a_4xx_never_a_user(
    auth: SupabaseAuth, idp: IdentityProviderServer, recipe: tuple[Any, ...]
) -> None:
    token = forge(recipe, idp.provider)
    with pytest.raises(AuthenticationException) as info:
        await auth.verify_token(token)
    rendered = render_error(info.value)
    assert rendered.status_code == 401
    assert orjson.loads(rendered.body)["error"]["code"].startswith("AUTH_TOKEN_")


# -- admin API -------------------------------------------------------------------


async def test_admin_user_lifecycle(auth: SupabaseAuth, idp: IdentityProviderServer) -> None:
    created = await auth.create_user(
        {"email": "Owner@Example.com", "password": "pw", "user_metadata": {"name": "Ravi"}}
    )
    assert created["email"] == "owner@example.com"
    fetched = await auth.get_user(created["id"])
    assert fetched["user_metadata"] == {"name": "Ravi"}
    updated = await auth.update_user(created["id"], {"user_metadata": {"city": "Pune"}})
    assert updated["user_metadata"] == {"name": "Ravi", "city": "Pune"}
    await auth.delete_user(created["id"])
    with pytest.raises(UserNotFoundException):
        await auth.get_user(created["id"])
    with pytest.raises(UserNotFoundException):
        await auth.delete_user(created["id"])


async def test_admin_list_pages(auth: SupabaseAuth) -> None:
    emails = {f"u{i}@example.com" for i in range(7)}
    for email in sorted(emails):
        await auth.create_user({"email": email})
    seen: list[str] = []
    page: int | None = 1
    while page is not None:
        result = await auth.list_users(page=page, per_page=3)
        assert result.total == 7
        assert len(result.users) <= 3
        seen.extend(u["email"] for u in result.users)
        page = result.next_page
    assert sorted(seen) == sorted(emails)
    with pytest.raises(ValidationException):
        await auth.list_users(page=0)


async def test_admin_errors_map_to_our_exceptions(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    await auth.create_user({"email": "dup@example.com"})
    with pytest.raises(ValidationException) as dup:
        await auth.create_user({"email": "dup@example.com"})
    assert dup.value.details == {"provider_error_code": "email_exists"}
    with pytest.raises(ValidationException):
        await auth.create_user({"email": "not an email"})
    with pytest.raises(ValidationException):
        await auth.get_user("../../etc/passwd")
    idp.provider.fail_status = 500
    with pytest.raises(AuthProviderUnavailableException) as down:
        await auth.get_user(str(uuid.uuid4()))
    assert_503(down.value)
    idp.provider.fail_status = None
    await idp.stop()
    with pytest.raises(AuthProviderUnavailableException):
        await auth.list_users()


async def test_admin_with_a_wrong_service_key(idp: IdentityProviderServer) -> None:
    from ghar_core.config import Secret

    resource = SupabaseAuth(settings_for(idp, SUPABASE_SERVICE_ROLE_KEY=Secret("wrong")))
    with pytest.raises(ExternalServiceError) as info:
        await resource.list_users()
    assert "SUPABASE_SERVICE_ROLE_KEY" in info.value.message
    await resource.stop()


# --- adversarial review ------------------------------------------------------------


async def test_admin_list_of_a_large_page_is_read_whole(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    # Regression: the body was read with one `content.read(n)`, which returns
    # what is buffered so far: a page of a few hundred KB arrived cut short
    # and became a 502 "invalid JSON".
    for i in range(1200):
        idp.provider.create_user({"email": f"bulk{i}@example.com", "user_metadata": {"i": i}})
    page = await auth.list_users(page=1, per_page=1000)
    assert len(page.users) == 1000
    assert page.total == 1200
    assert page.next_page == 2
    assert len((await auth.list_users(page=2, per_page=1000)).users) == 200


@contextlib.asynccontextmanager
async def odd_provider(body: bytes) -> AsyncIterator[str]:
    """A provider on loopback whose ``/user`` answers 200 with ``body``; no keys."""

    async def user(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/auth/v1/user", user)
    app.router.add_get("/auth/v1/.well-known/jwks.json", jwks)
    async with serve(app) as url:
        try:
            yield url
        finally:
            await http.close_all_clients()


@pytest.mark.parametrize(
    "body",
    [b"", b"<html>bad gateway</html>", b"[]", b"null", b'{"id": 5}', b'{"email": "a@b.c"}'],
)
async def test_a_provider_200_with_a_malformed_user_is_an_outage_not_a_502(body: bytes) -> None:
    # The token may be fine, the provider is misbehaving: clients must see the
    # same 503 + Retry-After as for an outage (and never a 401 that logs them out).
    async with odd_provider(body) as url:
        base = load_settings(app_env="test", environ={})
        resource = SupabaseAuth(replace(base, SUPABASE_URL=url))
        payload = {
            "iss": f"{url}/auth/v1",
            "aud": "authenticated",
            "sub": str(uuid.uuid4()),
            "exp": int(time.time()) + 60,
        }
        token = hs256({"alg": "HS256"}, payload, b"legacy")  # no secret: provider decides
        with pytest.raises(AuthProviderUnavailableException) as info:
            await resource.verify_token(token)
        assert_503(info.value)
        assert resource.cached_user(token) is None
        await resource.stop()


async def test_tokens_and_keys_never_reach_the_logs(
    auth: SupabaseAuth, idp: IdentityProviderServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    idp.provider.jwks_document = {"keys": []}  # the provider decides, and we log about it
    tokens = [idp.provider.mint_token() for _ in range(3)]
    with contextlib.suppress(BaseAPIException):
        await auth.verify_token(tokens[0])  # introspected
    idp.provider.fail_status = 500
    with contextlib.suppress(BaseAPIException):
        await auth.verify_token(tokens[1])
    idp.provider.fail_status = None
    await idp.stop()
    with contextlib.suppress(BaseAPIException):
        await auth.verify_token(tokens[2])
    with contextlib.suppress(BaseAPIException):
        await auth.list_users()
    secrets = [*tokens, idp.provider.anon_key, idp.provider.service_role_key]
    text = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert caplog.records  # something was logged, and none of it is a credential
    for secret in secrets:
        assert secret not in text
        assert secret.split(".")[-1] not in text


async def test_admin_writes_drop_the_cached_users_row(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    # The ASGI layer keeps synced users rows per provider id for TOKEN_CACHE_TTL;
    # a change made through our own admin API must not be served stale from it.
    created = await auth.create_user({"email": "row@example.com"})
    auth.user_rows.set(created["id"], {"id": 1, "email": "row@example.com"})
    await auth.update_user(created["id"], {"email": "new-row@example.com"})
    assert auth.user_rows.get(created["id"]) is None
    auth.user_rows.set(created["id"], {"id": 1, "email": "new-row@example.com"})
    await auth.delete_user(created["id"].upper())  # any spelling of the id
    assert auth.user_rows.get(created["id"]) is None


# --- issue 10: the provider is asked only within a budget ---------------------------------


def code_of(exc: BaseException) -> str:
    return str(orjson.loads(render_error(exc).body)["error"]["code"])


async def outcome(auth: SupabaseAuth, token: str) -> BaseException | dict[str, Any]:
    try:
        return dict(await auth.verify_token(token))
    except BaseAPIException as exc:
        return exc


async def test_a_storm_of_random_kids_never_reaches_the_provider(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    # Reproduces issue 10: 500 random-kid tokens made 500 provider calls.
    valid = idp.provider.mint_token()
    tokens = [with_header(valid, {"alg": "ES256", "kid": str(uuid.uuid4())}) for _ in range(500)]
    results = await asyncio.gather(*(outcome(auth, t) for t in tokens))
    for result in results:
        assert isinstance(result, AuthenticationException)
        assert_401(result, AuthFailureReason.UNKNOWN_KEY)
    assert idp.provider.requests["user"] == 0
    assert idp.provider.requests["jwks"] == 1  # one fetch, shared, then decided locally
    stats = auth.stats()
    assert stats["local"]["unknown_kid_refusals"] == 500
    assert stats["provider"]["introspections"] == 0


def request_headers(*authorization: bytes) -> list[tuple[bytes, bytes]]:
    """Raw ASGI headers as a server parses them, with these Authorization values."""
    return [
        (b"host", b"api.test"),
        *((b"authorization", value) for value in authorization),
        (b"accept", b"application/json"),
    ]


async def test_decide_request_answers_from_the_raw_header_bytes(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    token = idp.provider.mint_token()
    user = await auth.verify_token(token)
    checks = auth.verifier.signature_checks
    hits = auth.verifier.token_cache.stats.hits
    # The usual spelling is looked up by its bytes; others are decoded, then looked up.
    for spelling in (f"Bearer {token}", f"bearer {token}", f"BEARER  {token} "):
        assert auth.decide_request(request_headers(spelling.encode())) == user
    assert auth.verifier.signature_checks == checks  # all three were cache hits
    assert auth.verifier.token_cache.stats.hits == hits + 3
    # Refusals are returned, not raised, each a fresh exception.
    assert_401(auth.decide_request(request_headers()), AuthFailureReason.MISSING)  # type: ignore[arg-type]
    basic = auth.decide_request(request_headers(b"Basic dXNlcjpwYXNz"))
    assert_401(basic, AuthFailureReason.MISSING)  # type: ignore[arg-type]
    tab = auth.decide_request(request_headers(b"Bearer\t" + token.encode()))
    assert_401(tab, AuthFailureReason.MALFORMED)  # type: ignore[arg-type]
    both = auth.decide_request(request_headers(f"Bearer {token}".encode(), b"Bearer junk"))
    assert isinstance(both, AmbiguousCredentialsException)
    assert render_error(both).status_code == 400
    refused = legacy_token(idp.provider)  # HS256 without a secret: the provider's to judge
    auth.remember_refusal(refused, "provider said session_not_found")
    first = auth.decide_request(request_headers(f"Bearer {refused}".encode()))
    second = auth.decide_request(request_headers(f"Bearer {refused}".encode()))
    assert isinstance(first, AuthenticationException)
    assert first is not second
    assert first.headers is not second.headers  # type: ignore[union-attr]
    assert_401(first, AuthFailureReason.REJECTED)
    assert auth.refusals.stats.hits == 2
    unknown = with_header(token, {"alg": "ES256", "kid": "not-ours"})
    for _ in range(2):
        assert_401(
            auth.decide_request(request_headers(f"Bearer {unknown}".encode())),  # type: ignore[arg-type]
            AuthFailureReason.UNKNOWN_KEY,
        )
    assert auth.local_refusals.stats.hits == 1  # parsed once, then a lookup
    # No raw token is kept: keys are hashes, entries keep the credential's last 16 bytes.
    for cache in (auth.verifier.token_cache, auth.refusals, auth.local_refusals):
        assert len(cache) == 1
        for key, (_, (tail, _value)) in cache._data.items():
            assert type(key) is int
            assert type(tail) is bytes
            assert len(tail) == 16


async def test_a_refused_request_leaves_no_reference_cycle_for_the_gc(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    # Raising the returned refusal from a local would tie exception -> traceback
    # -> frame -> exception: five objects for the cyclic GC per refused request.
    await auth.verify_token(idp.provider.mint_token())  # a fresh key set
    unknown = with_header(idp.provider.mint_token(), {"alg": "ES256", "kid": "not-ours"})
    headers = request_headers(f"Bearer {unknown}".encode())

    def conn() -> Any:
        return SimpleNamespace(
            scope={"type": "http", "headers": headers},
            state=SimpleNamespace(),
            app=SimpleNamespace(resources=SimpleNamespace(get=lambda name: auth)),
        )

    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            with pytest.raises(AuthenticationException):
                await current_user(conn())
            with pytest.raises(AuthenticationException):
                auth.verify_now(unknown)
        assert gc.collect() == 0
    finally:
        gc.enable()


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    alg=st.sampled_from([*ASYMMETRIC_ALGS, "HS256"]),
    kid=st.one_of(kid_headers, st.just({"kid": "held"}), st.just({"kid": 7})),
    extra=st.dictionaries(st.sampled_from(["crit", "typ", "jku"]), json_values, max_size=1),
    suffix=st.sampled_from(["", " ", "\u00e9", ".x"]),
)
async def test_a_refusal_told_from_the_header_bytes_is_the_verdict_on_the_token(
    auth: SupabaseAuth,
    idp: IdentityProviderServer,
    alg: str,
    kid: dict[str, Any],
    extra: dict[str, Any],
    suffix: str,
) -> None:
    # decide_request refuses an unknown kid from the header segment alone; it must
    # give exactly what the full parse of the token gives (code and message).
    await auth.verify_token(idp.provider.mint_token())  # a fresh key set
    if kid == {"kid": "held"}:
        kid = {"kid": idp.provider.signing_kid}
    token = with_header(idp.provider.mint_token(), {"alg": alg} | kid | extra) + suffix
    via_header = auth.decide_request(request_headers(f"Bearer {token}".encode("latin-1")))
    auth.local_refusals.clear()
    via_token = auth.decide(token.strip())
    if via_token is None:  # only the provider can tell (HS256 and no secret here)
        assert via_header is None
    else:
        assert isinstance(via_header, BaseAPIException)
        assert isinstance(via_token, BaseAPIException)
        assert code_of(via_header) == code_of(via_token)
        assert via_header.details == via_token.details
    assert idp.provider.requests["user"] == 0


async def test_a_replayed_unknown_kid_token_is_refused_from_the_cache_until_the_key_set_changes(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    await auth.verify_token(idp.provider.mint_token())  # key set fetched now
    idp.provider.rotate_key()
    token = idp.provider.mint_token(email="rotated@example.com")
    for _ in range(3):
        with pytest.raises(AuthenticationException) as info:
            await auth.verify_token(token)
        assert_401(info.value, AuthFailureReason.UNKNOWN_KEY)
    stats = auth.stats()
    assert stats["local"]["unknown_kid_refusals"] == 1  # parsed once, then cache hits
    assert stats["unknown_kid_cache"]["hits"] == 2
    # Each refusal is its own exception object (tracebacks and headers are per request).
    with pytest.raises(AuthenticationException) as again:
        auth.verify_now(token)
    assert again.value is not info.value
    assert again.value.headers is not info.value.headers
    # A new key set may hold the kid: the cached verdict no longer counts.
    assert await auth.verifier.jwks.refresh(force=True)  # type: ignore[union-attr]
    assert (await auth.verify_token(token))["email"] == "rotated@example.com"
    assert idp.provider.requests["user"] == 0


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    alg=st.sampled_from(ASYMMETRIC_ALGS),
    kid=kid_headers,
    claims=st.dictionaries(
        st.sampled_from(["exp", "nbf", "iat", "email", "role"]), json_values, max_size=2
    ),
)
async def test_asymmetric_tokens_with_keys_we_do_not_hold_cost_no_provider_call(
    auth: SupabaseAuth,
    idp: IdentityProviderServer,
    alg: str,
    kid: dict[str, Any],
    claims: dict[str, Any],
) -> None:
    token = with_header(idp.provider.mint_token(claims=claims), {"alg": alg} | kid)
    result = await outcome(auth, token)
    assert isinstance(result, AuthenticationException)
    assert render_error(result).status_code == 401
    assert idp.provider.requests["user"] == 0


async def test_the_same_bad_token_reaches_the_provider_once(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    # Reproduces issue 10: no single flight, no negative cache (1000 calls before).
    token = legacy_token(idp.provider)  # HS256 and no secret: only the provider can judge
    idp.provider.delay = 0.1  # the concurrent half really overlaps the one call
    first = await asyncio.gather(*(outcome(auth, token) for _ in range(500)))
    idp.provider.delay = 0
    later = [await outcome(auth, token) for _ in range(500)]
    for result in [*first, *later]:
        assert isinstance(result, AuthenticationException)
        assert_401(result, AuthFailureReason.REJECTED)
        assert result.details == {"reason": "provider said bad_jwt"}
    assert idp.provider.requests["user"] == 1
    provider = auth.stats()["provider"]
    assert provider["introspections"] == 1
    assert provider["shared"] == 499
    assert auth.stats()["negative_cache"]["hits"] == 500


async def test_distinct_tokens_are_capped_in_flight_and_each_asked_at_most_once(
    idp: IdentityProviderServer,
) -> None:
    cap = 20
    resource = SupabaseAuth(settings_for(idp, AUTH_PROVIDER_MAX_IN_FLIGHT=cap))
    tokens = [legacy_token(idp.provider) for _ in range(500)]
    idp.provider.delay = 0.05
    pending = list(tokens)
    busy = 0
    for _ in range(60):  # 500 / 20 = 25 rounds when every slot is used
        results = await asyncio.gather(*(outcome(resource, t) for t in pending))
        assert idp.provider.peak_in_flight["user"] <= cap
        still: list[str] = []
        for token, result in zip(pending, results, strict=True):
            assert isinstance(result, BaseAPIException)
            if isinstance(result, AuthProviderUnavailableException):
                assert headers_of(result)[b"retry-after"] == b"1"
                busy += 1
                still.append(token)
            else:
                assert_401(result, AuthFailureReason.REJECTED)
        pending = still
        if not pending:
            break
    assert not pending
    counts = idp.provider.introspected
    assert set(counts) == {fingerprint(t) for t in tokens}
    assert set(counts.values()) == {1}  # each token asked exactly once
    stats = resource.stats()["provider"]
    assert stats["busy_refusals"] == busy > 0
    assert stats["peak_in_flight"] <= cap
    assert stats["max_in_flight"] == cap
    # Asked again, every one is answered from the negative cache.
    for token in tokens[:50]:
        assert_401(await outcome(resource, token), AuthFailureReason.REJECTED)  # type: ignore[arg-type]
    assert idp.provider.requests["user"] == 500
    await resource.stop()


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("7", 7), (None, 5), ("soon", 5), ("0", 1), ("99999", 300), ("date+8", 8)],
)
async def test_a_provider_429_opens_a_short_circuit(
    idp: IdentityProviderServer, retry_after: str | None, expected: int
) -> None:
    clock = Clock()
    resource = SupabaseAuth(settings_for(idp), clock=clock)
    if retry_after == "date+8":  # an HTTP-date has whole seconds: 7 < wait <= 8
        retry_after = formatdate(math.floor(time.time()) + 8, usegmt=True)
    idp.provider.fail_status = 429
    idp.provider.retry_after = retry_after
    first = await outcome(resource, legacy_token(idp.provider))
    assert isinstance(first, AuthProviderUnavailableException)
    allowed = {7, 8} if expected == 8 else {expected}  # the HTTP-date may round down
    assert int(headers_of(first)[b"retry-after"]) in allowed
    assert idp.provider.requests["user"] == 1
    clock.now += expected / 2
    for _ in range(20):  # distinct tokens: answered 503 without asking again
        result = await outcome(resource, legacy_token(idp.provider))
        assert isinstance(result, AuthProviderUnavailableException)
        assert code_of(result) == "AUTH_PROVIDER_UNREACHABLE"
        assert 1 <= int(headers_of(result)[b"retry-after"]) <= expected
    assert idp.provider.requests["user"] == 1
    assert resource.stats()["provider"]["circuit_refusals"] == 20
    idp.provider.fail_status = None
    clock.now += expected  # the circuit closes by itself
    recovered = await outcome(resource, legacy_token(idp.provider))
    assert isinstance(recovered, AuthenticationException)  # the provider's own "no"
    assert idp.provider.requests["user"] == 2
    await resource.stop()


@pytest.mark.parametrize("kind", ["es256-no-keys-yet", "hs256"])
async def test_a_hanging_provider_costs_one_deadline(
    idp: IdentityProviderServer, kind: str
) -> None:
    # Reproduces issue 10: the key-set fetch timed out, then introspection did
    # too: two timeouts in a row (11 s against a 5 s client timeout).
    timeout = 1.0
    resource = SupabaseAuth(settings_for(idp), timeout=timeout)
    token = idp.provider.mint_token() if kind != "hs256" else legacy_token(idp.provider)
    idp.provider.delay = 60
    start = time.monotonic()
    result = await outcome(resource, token)
    elapsed = time.monotonic() - start
    assert isinstance(result, AuthProviderUnavailableException)
    assert_503(result)
    assert elapsed < 1.8 * timeout, elapsed  # one deadline (two would be >= 2 s)
    await resource.stop()


async def test_a_poisoned_key_set_keeps_valid_tokens_local(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    await auth.verify_token(idp.provider.mint_token())  # keys held
    idp.provider.jwks_document = {"keys": [{"kty": "oct", "kid": "x", "k": "c2VjcmV0"}]}
    assert not await auth.verifier.jwks.refresh(force=True)  # type: ignore[union-attr]
    for _ in range(20):
        assert (await auth.verify_token(idp.provider.mint_token()))["id"]
    assert idp.provider.requests["user"] == 0
    assert "no usable key" in (auth.stats()["jwks"]["last_error"] or "")
    assert auth.stats()["jwks"]["keys"] == 1


async def test_with_no_key_set_ever_fetched_the_provider_decides(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    # The rule's other half: while no key set could be fetched, any token goes
    # to the provider (budgeted), so a valid one still gets in.
    idp.provider.jwks_document = {"keys": []}
    token = idp.provider.mint_token(email="nokeys@example.com")
    user = await auth.verify_token(token)
    assert set(user) == USER_KEYS  # the same shape whichever path decided
    assert user["email"] == "nokeys@example.com"
    assert auth.stats()["provider"]["introspections"] == 1
    assert await auth.verify_token(token) is user  # then cached
    assert idp.provider.requests["user"] == 1


async def test_a_sub_that_is_not_a_uuid_is_a_401_and_never_cached(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    for sub in ("admin", str(uuid.uuid4()) + "\x00"):
        valid = idp.provider.mint_token()
        claims = orjson.loads(unb64(valid.split(".")[1])) | {"sub": sub}
        token = jwt.PyJWS().encode(
            orjson.dumps(claims),
            idp.provider.signing_key(),
            algorithm="ES256",
            headers={"kid": idp.provider.signing_kid},
        )
        for _ in range(2):
            result = await outcome(auth, token)
            assert isinstance(result, AuthenticationException)
            assert_401(result, AuthFailureReason.INVALID_CLAIMS)
        assert auth.cached_user(token) is None
    assert idp.provider.requests["user"] == 0


async def test_stats_show_every_part_of_the_budget(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    await auth.verify_token(idp.provider.mint_token())
    stats = auth.stats()
    assert stats["token_cache"]["size"] == 1
    assert stats["jwks"]["fetches"] == 1
    assert stats["jwks"]["fresh"] is True
    assert stats["local"]["signature_checks"] == 1
    assert set(stats["provider"]) >= {
        "introspections",
        "shared",
        "in_flight",
        "peak_in_flight",
        "max_in_flight",
        "busy_refusals",
        "rate_limited",
        "circuit_open_for",
        "circuit_refusals",
        "deadline_exceeded",
    }
    assert set(stats["negative_cache"]) >= {"size", "hits", "ttl"}
    orjson.dumps(stats)  # plain data, ready for a metrics endpoint


@pytest.mark.parametrize("reason", list(AuthFailureReason))
def test_the_lean_401_carries_what_the_base_exception_would(reason: AuthFailureReason) -> None:
    # AuthenticationException sets its attributes without BaseAPIException.__init__
    # (a refusal is an attacker's hot path); it must not drift from the base class.
    if reason is AuthFailureReason.PROVIDER_UNREACHABLE:
        return
    lean = AuthenticationException(reason, "why")
    base = BaseAPIException("m", details={"reason": "why"}, headers={"X": "1"}, error_code="C")
    assert set(vars(base)) <= set(vars(lean))
    assert lean.args == (lean.message,)
    assert lean.status_code == 401
    assert lean.details == {"reason": "why"}
    assert AuthenticationException(reason).details is None
    assert_401(lean, reason)


async def test_stop_ends_introspections_in_flight_and_their_waiters_get_a_503(
    idp: IdentityProviderServer,
) -> None:
    resource = SupabaseAuth(settings_for(idp))
    idp.provider.delay = 30
    waiters = [asyncio.ensure_future(outcome(resource, legacy_token(idp.provider)))]
    waiters.append(asyncio.ensure_future(outcome(resource, legacy_token(idp.provider))))
    for _ in range(100):
        if idp.provider.in_flight["user"] == 2:
            break
        await asyncio.sleep(0.01)
    assert resource.stats()["provider"]["in_flight"] == 2
    await asyncio.wait_for(resource.stop(), 2)
    for result in await asyncio.wait_for(asyncio.gather(*waiters), 2):
        assert isinstance(result, AuthProviderUnavailableException)
        assert_503(result)
    assert resource.stats()["provider"]["in_flight"] == 0


@pytest.mark.parametrize("message", UNKNOWN_KEY_MESSAGES)
def test_an_unknown_kid_refusal_copy_is_the_plain_401(message: str) -> None:
    # The unknown-kid 401s are copied from constants whose fields live on a class
    # (a random-kid storm builds one per request): each copy must render and
    # compare exactly as a 401 built the usual way, with headers of its own.
    plain = AuthenticationException(AuthFailureReason.UNKNOWN_KEY, message)
    first = auth_module._LOCAL_REFUSALS[message].again()
    second = auth_module._LOCAL_REFUSALS[message].again()
    assert isinstance(first, AuthenticationException)
    for copy in (first, second):
        assert render_error(copy) == render_error(plain)
        assert copy.args == plain.args
        for name in ("message", "error_code", "details", "reason", "headers", "status_code"):
            assert getattr(copy, name) == getattr(plain, name)
    assert first is not second
    first.headers["X-Changed"] = "1"  # a layer adding a header changes that response only
    assert second.headers == plain.headers
    assert auth_module._LOCAL_REFUSALS[message].again().headers == plain.headers


# Header members as a client may spell them: escaped names ("\\u006bid" is "kid"),
# colons and quotes inside strings, nested objects with their own duplicates.
_HEADER_NAMES = st.sampled_from(
    ['"kid"', '"\\u006bid"', '"k\\u0069d"', '"alg"', '"\\u0061lg"', '"typ"', '"a:b"', '"a\\"b"']
)
_HEADER_VALUES = st.sampled_from(
    [
        '"ES256"', '"RS256"', '"EdDSA"', '"HS256"', '"none"', "null", "1", "[]", "{}", '""',
        '"KID"', '"zz"', '"a:b"', '"\\u003a"', '"\\"kid\\":1"', '{"a":1}', '{"a":1,"a":2}',
        '[{"kid":"x","kid":"y"}]', '{"k":{"j":1,"j":1}}',
    ]
)  # fmt: skip
_raw_headers = st.lists(
    st.tuples(_HEADER_NAMES, st.sampled_from(["", " "]), _HEADER_VALUES),
    min_size=1,
    max_size=5,
).map(lambda members: "{" + ",".join(f"{n}{s}:{s}{v}" for n, s, v in members) + "}")


def _names_a_member_twice(text: str) -> bool:
    """The independent oracle: the stdlib parser's pairs, at every depth."""
    twice = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal twice
        twice = twice or len({name for name, _ in items}) != len(items)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return twice


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_raw_headers)
async def test_a_header_naming_a_member_twice_is_refused_however_it_is_spelled(
    auth: SupabaseAuth, idp: IdentityProviderServer, text: str
) -> None:
    # decide_request's unknown-kid shortcut skips the duplicate check when the
    # colons match the members (094c2e4 inlined it): a header the provider's own
    # key signed, naming a member twice in any spelling or depth, must still be
    # the malformed 401, and the raw-bytes verdict the same as the token's.
    await auth.verify_token(idp.provider.mint_token())  # a fresh key set
    text = text.replace('"KID"', f'"{idp.provider.signing_kid}"')
    payload = unb64(idp.provider.mint_token().split(".")[1])
    token = sign_raw(idp.provider, text.encode(), payload)
    via_header = auth.decide_request(request_headers(f"Bearer {token}".encode()))
    auth.local_refusals.clear()
    via_token = auth.decide(token)
    if _names_a_member_twice(text):
        assert isinstance(via_header, AuthenticationException)
        assert_401(via_header, AuthFailureReason.MALFORMED)
    if via_token is None:
        assert via_header is None
    elif isinstance(via_token, BaseAPIException):
        assert isinstance(via_header, BaseAPIException)
        assert code_of(via_header) == code_of(via_token)
        assert via_header.details == via_token.details
    else:
        assert via_header == via_token
    assert idp.provider.requests["user"] == 0


async def test_an_unknown_kid_remembered_from_the_header_bytes_counts_only_for_that_fresh_key_set(
    auth: SupabaseAuth, idp: IdentityProviderServer
) -> None:
    # decide_request stores its unknown-kid refusal itself (094c2e4 inlined the
    # store): replayed, it is a cache hit; once the key set rotates the kid in,
    # the token verifies; once the key set is stale, only a refresh can tell.
    await auth.verify_token(idp.provider.mint_token())  # key set fetched now
    idp.provider.rotate_key()
    token = idp.provider.mint_token(email="rotated@example.com")
    for _ in range(2):
        refused = auth.decide_request(request_headers(f"Bearer {token}".encode()))
        assert isinstance(refused, AuthenticationException)
        assert_401(refused, AuthFailureReason.UNKNOWN_KEY)
    assert auth.stats()["unknown_kid_cache"]["hits"] == 1
    assert await auth.verifier.jwks.refresh(force=True)  # type: ignore[union-attr]
    user = auth.decide_request(request_headers(f"Bearer {token}".encode()))
    assert isinstance(user, dict)
    assert user["email"] == "rotated@example.com"
    idp.provider.rotate_key()
    other = idp.provider.mint_token()
    refused = auth.decide_request(request_headers(f"Bearer {other}".encode()))
    assert isinstance(refused, AuthenticationException)
    jwks = auth.verifier.jwks
    assert jwks is not None
    assert jwks._fetched_at is not None
    jwks._fetched_at -= jwks.min_refresh_interval  # the same keys, no longer fresh
    assert auth.decide_request(request_headers(f"Bearer {other}".encode())) is None
    assert idp.provider.requests["user"] == 0
