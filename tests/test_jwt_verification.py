"""Local JWT verification against a JWKS served over real loopback HTTP.

The key sets come from the local identity provider (ES256) or from a small
aiohttp JWKS server defined here (RS256, EdDSA, mixed). Nothing is mocked:
fetches are counted by the servers themselves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ghar_core import http
from ghar_core.devtools import IdentityProviderServer
from ghar_core.jwt_verification import (
    MAX_TOKEN_BYTES,
    AuthFailureReason,
    CannotDecide,
    JWKSCache,
    JWTVerifier,
    TokenCache,
    TokenRejected,
    _has_duplicate_names,
    _header,
    credential,
)
from tests.idp import (
    b64,
    duplicated_member_tokens,
    encode_json,
    forge,
    hs256,
    public_pem,
    sign_raw,
    unb64,
    with_header,
)
from tests.strategies import (
    ASYMMETRIC_ALGS,
    json_values,
    kid_headers,
    non_uuid_subs,
    poisoned_key_sets,
    token_attacks,
)
from tests.tls import serve

ISSUER_PATH = "/auth/v1"


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


def identity(claims: dict[str, Any]) -> dict[str, Any]:
    return claims


def make_verifier(
    base_url: str,
    *,
    clock: Callable[[], float] | None = None,
    min_refresh_interval: float = 30.0,
    ttl: float = 3600.0,
    secret: str | None = None,
) -> JWTVerifier[dict[str, Any]]:
    jwks = JWKSCache(
        f"{base_url}{ISSUER_PATH}/.well-known/jwks.json",
        client=http.get_supabase_auth_http_client,
        ttl=ttl,
        min_refresh_interval=min_refresh_interval,
        clock=clock or Clock(),
    )
    return JWTVerifier(
        issuer=f"{base_url}{ISSUER_PATH}", jwks=jwks, shape=identity, hs256_secret=secret
    )


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


class JWKSServer:
    """A bare JWKS endpoint with keys of every accepted algorithm."""

    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.fetches = 0
        self.status = 200
        self.runner: web.AppRunner | None = None
        self.url = ""

    def jwks(self) -> dict[str, Any]:
        keys = [
            ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True) | {"kid": "ec", "alg": "ES256"},
            RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True) | {"kid": "rsa"},
            OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True) | {"kid": "ed"},
            {"kty": "oct", "kid": "sym", "k": b64(b"secret"), "alg": "HS256"},
            {"kty": "EC", "kid": "broken", "crv": "P-256", "x": "AA", "y": "AA"},
            RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True) | {"kid": "enc", "use": "enc"},
        ]
        return {"keys": keys}

    async def handler(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.Response(status=self.status, body=orjson.dumps(self.jwks()))

    async def __aenter__(self) -> JWKSServer:
        app = web.Application()
        app.router.add_get(f"{ISSUER_PATH}/.well-known/jwks.json", self.handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()
        await http.close_all_clients()

    def token(self, alg: str, kid: str, key: Any, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": f"{self.url}{ISSUER_PATH}",
            "aud": "authenticated",
            "sub": str(uuid.uuid4()),
            "exp": now + 600,
            "iat": now,
        } | claims
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


async def test_valid_token_verifies_then_hits_the_cache_without_crypto(
    idp: IdentityProviderServer,
) -> None:
    verifier = make_verifier(idp.url)
    token = idp.provider.mint_token(email="a@example.com")
    claims = await verifier.verify(token)
    assert claims["email"] == "a@example.com"
    assert verifier.signature_checks == 1
    for _ in range(100):
        assert await verifier.verify(token) is claims
        assert verifier.cached(token) is claims
    assert verifier.signature_checks == 1  # hits did no signature check
    assert idp.provider.requests["jwks"] == 1
    await verifier.aclose()


@pytest.mark.parametrize(("alg", "kid", "attr"), [("RS256", "rsa", "rsa"), ("EdDSA", "ed", "ed")])
async def test_rs256_and_eddsa_verify(alg: str, kid: str, attr: str) -> None:
    async with JWKSServer() as server:
        verifier = make_verifier(server.url)
        token = server.token(alg, kid, getattr(server, attr))
        claims = await verifier.verify_uncached(token)
        assert claims["aud"] == "authenticated"
        # The algorithm comes from our key: the same key named with another alg is refused.
        wrong = server.token("ES256", kid, server.ec)
        with pytest.raises(TokenRejected) as info:
            await verifier.verify_uncached(wrong)
        assert info.value.reason is AuthFailureReason.INVALID_SIGNATURE
        # Unusable entries (symmetric, broken, encryption-only) were skipped.
        assert set(verifier.jwks.keys) == {"ec", "rsa", "ed"}  # type: ignore[union-attr]
        await verifier.aclose()


async def test_hs256_only_with_the_secret() -> None:
    async with JWKSServer() as server:
        payload = {
            "iss": f"{server.url}{ISSUER_PATH}",
            "aud": "authenticated",
            "sub": "0f6c7e43-5b1a-4f0e-9a3c-2d8b7e6f5a41",
            "exp": 4_000_000_000,
        }
        token = hs256({"alg": "HS256", "typ": "JWT"}, payload, b"legacy-secret")
        with_secret = make_verifier(server.url, secret="legacy-secret")
        assert (await with_secret.verify_uncached(token))["sub"] == payload["sub"]
        assert server.fetches == 0  # HS256 never needs the key set
        without = make_verifier(server.url)
        with pytest.raises(CannotDecide):
            await without.verify_uncached(token)
        wrong_secret = hs256({"alg": "HS256"}, payload, b"other")
        with pytest.raises(TokenRejected) as info:
            await with_secret.verify_uncached(wrong_secret)
        assert info.value.reason is AuthFailureReason.INVALID_SIGNATURE


async def test_hs256_signed_with_our_public_key_is_refused(idp: IdentityProviderServer) -> None:
    verifier = make_verifier(idp.url, secret="legacy-secret")
    valid = idp.provider.mint_token()
    await verifier.verify(valid)  # loads the key set
    header = {"alg": "HS256", "kid": idp.provider.signing_kid}
    payload = jwt.decode(valid, options={"verify_signature": False})
    attack = hs256(header, payload, public_pem(idp.provider))
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(attack)
    assert info.value.reason is AuthFailureReason.INVALID_SIGNATURE
    # Without a kid it is checked against the secret, which it does not match.
    header.pop("kid")
    with pytest.raises(TokenRejected):
        await verifier.verify(hs256(header, payload, public_pem(idp.provider)))
    await verifier.aclose()


@pytest.mark.parametrize("alg", ["none", "None", "HS512", "ES512", "PS256"])
async def test_unaccepted_algorithms(idp: IdentityProviderServer, alg: str) -> None:
    verifier = make_verifier(idp.url)
    head, body, _sig = idp.provider.mint_token().split(".")
    header = orjson.loads(unb64(head)) | {"alg": alg}
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(f"{encode_json(header)}.{body}.")
    assert info.value.reason is AuthFailureReason.INVALID_SIGNATURE
    assert idp.provider.requests["jwks"] == 0


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": -100}, AuthFailureReason.EXPIRED),
        ({"exp": "soon"}, AuthFailureReason.INVALID_CLAIMS),
        ({"nbf": 100}, AuthFailureReason.INVALID_CLAIMS),
        ({"iat": 100}, AuthFailureReason.INVALID_CLAIMS),
        ({"aud": "anon"}, AuthFailureReason.INVALID_CLAIMS),
        ({"aud": ["x", "y"]}, AuthFailureReason.INVALID_CLAIMS),
        ({"iss": "https://evil.example/auth/v1"}, AuthFailureReason.INVALID_CLAIMS),
        ({"sub": ""}, AuthFailureReason.INVALID_CLAIMS),
        ({"sub": 42}, AuthFailureReason.INVALID_CLAIMS),
    ],
)
async def test_claims(
    idp: IdentityProviderServer, claims: dict[str, Any], reason: AuthFailureReason
) -> None:
    now = int(time.time())
    adjusted = {
        k: (now + v if k in ("exp", "nbf", "iat") and isinstance(v, int) else v)
        for k, v in claims.items()
    }
    token = idp.provider.mint_token(claims=adjusted)
    verifier = make_verifier(idp.url)
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(token)
    assert info.value.reason is reason
    assert idp.provider.requests["jwks"] == 0  # refused before any key was needed


async def test_leeway_and_audience_lists(idp: IdentityProviderServer) -> None:
    now = int(time.time())
    verifier = make_verifier(idp.url)
    token = idp.provider.mint_token(
        claims={"exp": now - 3, "nbf": now + 3, "aud": ["x", "authenticated"]}
    )
    assert (await verifier.verify_uncached(token))["sub"]
    # Within the leeway it is accepted, but never cached past its own exp.
    await verifier.verify(token)
    assert verifier.cached(token) is None
    await verifier.aclose()


async def test_tokens_over_16_kb_are_refused_before_parsing(idp: IdentityProviderServer) -> None:
    verifier = make_verifier(idp.url)
    token = idp.provider.mint_token(claims={"pad": "x" * MAX_TOKEN_BYTES})
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(token)
    assert info.value.reason is AuthFailureReason.MALFORMED
    assert "larger than" in info.value.message
    assert verifier.signature_checks == 0
    assert idp.provider.requests["jwks"] == 0


async def test_concurrent_first_verifications_share_one_fetch(idp: IdentityProviderServer) -> None:
    verifier = make_verifier(idp.url)
    tokens = [idp.provider.mint_token() for _ in range(50)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert len({r["sub"] for r in results}) == 50
    assert idp.provider.requests["jwks"] == 1
    await verifier.aclose()


async def test_random_kids_cost_one_fetch_per_refresh_interval(
    idp: IdentityProviderServer,
) -> None:
    clock = Clock()
    verifier = make_verifier(idp.url, clock=clock, min_refresh_interval=30)
    await verifier.verify(idp.provider.mint_token())
    assert idp.provider.requests["jwks"] == 1

    async def attempt(i: int) -> None:
        token = idp.provider.mint_token(headers={"kid": f"random-{i}-{uuid.uuid4()}"})
        with pytest.raises(TokenRejected) as info:  # a fresh set lacks it: not the provider's
            await verifier.verify(token)
        assert info.value.reason is AuthFailureReason.UNKNOWN_KEY

    clock.now += 30  # one refresh is allowed again
    await asyncio.gather(*(attempt(i) for i in range(500)))
    for i in range(500, 1000):
        await attempt(i)
    assert idp.provider.requests["jwks"] == 2
    clock.now += 29
    await attempt(1000)
    assert idp.provider.requests["jwks"] == 2
    clock.now += 1
    await attempt(1001)
    assert idp.provider.requests["jwks"] == 3
    await verifier.aclose()


async def test_key_rotation_and_revocation(idp: IdentityProviderServer) -> None:
    clock = Clock()
    verifier = make_verifier(idp.url, clock=clock)
    old_kid = idp.provider.signing_kid
    old_token = idp.provider.mint_token()
    await verifier.verify(old_token)
    new_kid = idp.provider.rotate_key()
    new_token = idp.provider.mint_token()
    # Within the refresh interval the set we hold is authoritative: refused...
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(new_token)
    assert info.value.reason is AuthFailureReason.UNKNOWN_KEY
    clock.now += 30
    # ...after it, one refresh finds it; the old key is still published.
    assert (await verifier.verify(new_token))["sub"]
    assert set(verifier.jwks.keys) == {old_kid, new_kid}  # type: ignore[union-attr]
    assert (await verifier.verify_uncached(old_token))["sub"]
    # Revocation: the provider drops the old key, we purge.
    idp.provider.drop_key(old_kid)
    verifier.purge()
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(old_token)
    assert info.value.reason is AuthFailureReason.UNKNOWN_KEY
    assert set(verifier.jwks.keys) == {new_kid}  # type: ignore[union-attr]
    await verifier.aclose()


async def test_provider_down_keeps_the_cached_key_set(idp: IdentityProviderServer) -> None:
    clock = Clock()
    verifier = make_verifier(idp.url, clock=clock, ttl=60)
    token = idp.provider.mint_token()
    await verifier.verify(token)
    await idp.stop()
    verifier.token_cache.clear()
    assert (await verifier.verify(token))["sub"]  # keys still cached
    # Past the TTL the stale set keeps serving while the refresh fails in the background.
    clock.now += 3600
    verifier.token_cache.clear()
    assert (await verifier.verify(token))["sub"]
    await asyncio.sleep(0.05)
    for _ in range(100):
        if verifier.jwks.last_error:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    assert verifier.jwks.last_error  # type: ignore[union-attr]
    assert verifier.jwks.keys  # type: ignore[union-attr]
    # An unknown kid with the provider down: cannot decide, stale set kept.
    clock.now += 30
    with pytest.raises(CannotDecide):
        await verifier.verify(idp.provider.mint_token(headers={"kid": "unknown"}))
    assert verifier.jwks.keys  # type: ignore[union-attr]
    # The provider comes back (same port): the next allowed refresh recovers.
    await idp.start()
    clock.now += 30
    assert await verifier.jwks.refresh()  # type: ignore[union-attr]
    assert verifier.jwks.last_error is None  # type: ignore[union-attr]
    await verifier.aclose()


async def test_bad_jwks_answers_keep_the_stale_set() -> None:
    async with JWKSServer() as server:
        clock = Clock()
        verifier = make_verifier(server.url, clock=clock)
        assert await verifier.jwks.refresh()  # type: ignore[union-attr]
        server.status = 500
        clock.now += 30
        assert not await verifier.jwks.refresh()  # type: ignore[union-attr]
        assert "HTTP 500" in (verifier.jwks.last_error or "")  # type: ignore[union-attr]
        assert "rsa" in verifier.jwks.keys  # type: ignore[union-attr]
        await verifier.aclose()


async def test_aclose_cancels_a_refresh_in_flight(idp: IdentityProviderServer) -> None:
    idp.provider.delay = 5
    verifier = make_verifier(idp.url)
    task = asyncio.ensure_future(verifier.jwks.refresh())  # type: ignore[union-attr]
    await asyncio.sleep(0.05)
    await asyncio.wait_for(verifier.aclose(), 1)
    with pytest.raises(asyncio.CancelledError):
        await task
    await verifier.aclose()  # idempotent


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=token_attacks())
async def test_forged_tokens_are_never_accepted(
    idp: IdentityProviderServer, recipe: tuple[Any, ...]
) -> None:
    verifier = make_verifier(idp.url)
    token = forge(recipe, idp.provider)
    with pytest.raises((TokenRejected, CannotDecide)):
        await verifier.verify(token)
    await verifier.aclose()


def test_token_cache_lifetime_and_keys() -> None:
    mono, wall = Clock(), Clock()
    cache: TokenCache[str] = TokenCache(ttl=60, max_size=2, clock=mono, wall_clock=wall)
    token = "h." + "p" * 40 + ".signature-bytes-0123456789"
    cache.put(token, "user", wall.now + 10)  # exp in 10 s: lives 10 s, not 60
    assert cache.get(token) == "user"
    assert cache.get("x" + token[1:]) is None  # another token, another key
    # Keyed by the Authorization value that carries the token, as a server parsed it.
    assert cache.get_credential(b"Bearer " + token.encode()) == "user"
    assert credential(token) == b"Bearer " + token.encode()
    assert cache.get_credential(b"Bearer  " + token.encode()) is None
    mono.now += 10
    assert cache.get(token) is None
    cache.put(token, "user", wall.now + 3600)  # lives the cache's 60 s at most
    mono.now += 59
    assert cache.get(token) == "user"
    mono.now += 1
    assert cache.get(token) is None
    cache.put(token, "user", wall.now - 1)  # already expired: not stored
    cache.put("short", "user", wall.now + 60)  # not a JWT: not stored
    cache.put(token, "user", "soon")  # exp not a number: not stored
    assert len(cache) == 0
    for i in range(3):
        cache.put(f"{i}{token}", "u", wall.now + 60)
    assert len(cache) == 2  # LRU-bounded
    assert cache.get(f"0{token}") is None


# --- adversarial review: inputs a forger controls -------------------------------------


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["alg", "kid", "crit", "typ", "b64"]),
    value=json_values,
)
async def test_header_values_of_any_json_type_are_refused_cleanly(
    idp: IdentityProviderServer, name: str, value: Any
) -> None:
    # Regression: `alg` as a list or object made `alg not in frozenset` raise
    # TypeError (unhashable), a 500 instead of a 401.
    verifier = make_verifier(idp.url)
    valid = idp.provider.mint_token()
    head_b64, body_b64, sig_b64 = valid.split(".")
    header = orjson.loads(unb64(head_b64))
    if header.get(name) == value:
        return  # unchanged header: that is the valid token
    header[name] = value
    token = f"{encode_json(header)}.{body_b64}.{sig_b64}"
    with pytest.raises((TokenRejected, CannotDecide)):
        await verifier.verify(token)
    await verifier.aclose()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["exp", "nbf", "iat", "aud", "iss", "sub"]), value=json_values)
async def test_claim_values_of_any_json_type_never_raise_anything_else(
    idp: IdentityProviderServer, name: str, value: Any
) -> None:
    verifier = make_verifier(idp.url)
    valid = idp.provider.mint_token()
    claims = orjson.loads(unb64(valid.split(".")[1])) | {name: value}
    # Signed with the provider's real key (PyJWT's encode would refuse odd claims).
    token = jwt.PyJWS().encode(
        orjson.dumps(claims),
        idp.provider.signing_key(),
        algorithm="ES256",
        headers={"kid": idp.provider.signing_kid},
    )
    try:
        await verifier.verify(token)
    except (TokenRejected, CannotDecide):
        pass
    else:  # accepted: then the claim was acceptable by the rules, check them here
        claims = orjson.loads(unb64(token.split(".")[1]))
        assert type(claims["exp"]) in (int, float)
        assert claims["exp"] > time.time() - 10
        assert isinstance(claims["sub"], str)
        assert claims["sub"]
        assert claims["iss"] == verifier.issuer
        aud = claims["aud"]
        assert aud == "authenticated" or (isinstance(aud, list) and "authenticated" in aud)
    await verifier.aclose()


@given(tail=st.integers(1, 15))
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_non_canonical_signature_encodings_are_refused(
    idp: IdentityProviderServer, tail: int
) -> None:
    # base64url of a 64-byte ES256 signature is 86 characters carrying 516 bits:
    # the last character has 4 unused bits. A lenient decoder ignores them, so
    # one valid token would have 16 spellings, each its own cache entry and
    # signature check, and a denylist keyed by the token string is bypassed.
    verifier = make_verifier(idp.url)
    valid = idp.provider.mint_token()
    head_b64, body_b64, sig_b64 = valid.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig_b64[-1])
    variant = sig_b64[:-1] + alphabet[last ^ tail]  # flips only the unused low bits
    assert unb64(variant) == unb64(sig_b64)
    assert (await verifier.verify(valid))["sub"]
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(f"{head_b64}.{body_b64}.{variant}")
    assert info.value.reason is AuthFailureReason.MALFORMED
    await verifier.aclose()


async def test_duplicated_member_names_are_refused_even_when_validly_signed(
    idp: IdentityProviderServer,
) -> None:
    # RFC 7515 §4 and RFC 7519 §4 let a parser keep the last duplicate; orjson
    # does. A token the provider's key signed with two `sub` (or `kid`, `exp`,
    # `role`...) then reads differently to a parser keeping the first, which
    # is how one layer authorises a user another layer never saw: refuse them.
    verifier = make_verifier(idp.url)
    valid = idp.provider.mint_token()
    head_b64, body_b64, _ = valid.split(".")
    # The hand signing is sound: the same bytes without a duplicate verify.
    assert (await verifier.verify(sign_raw(idp.provider, unb64(head_b64), unb64(body_b64))))["sub"]
    accepted: list[str] = []
    for name, token in duplicated_member_tokens(idp.provider):
        try:
            await verifier.verify(token)
        except TokenRejected as exc:
            assert exc.reason is AuthFailureReason.MALFORMED, (name, exc.reason, exc.message)
            assert "duplicate" in exc.message, (name, exc.message)
        else:
            accepted.append(name)
    assert accepted == []
    await verifier.aclose()


@settings(max_examples=200)
@given(
    value=st.dictionaries(st.text(max_size=5), json_values, min_size=1, max_size=4),
    ascii_only=st.booleans(),
    spaced=st.booleans(),
    nested=st.booleans(),
    data=st.data(),
)
def test_duplicate_names_are_found_at_any_depth_in_any_spelling(
    value: dict[str, Any], ascii_only: bool, spaced: bool, nested: bool, data: st.DataObject
) -> None:
    separators = (", ", ": ") if spaced else (",", ":")
    text = json.dumps(value, ensure_ascii=ascii_only, separators=separators).encode()
    name = json.dumps(data.draw(st.sampled_from(sorted(value))), ensure_ascii=ascii_only)
    doubled = b"{" + name.encode() + b":null," + text[1:]
    if nested:
        text, doubled = b'{"x":[' + text + b"]}", b'{"x":[' + doubled + b"]}"
    assert not _has_duplicate_names(text, orjson.loads(text))
    assert _has_duplicate_names(doubled, orjson.loads(doubled))


@contextlib.asynccontextmanager
async def chunked_server(body: bytes, *, chunk: int = 64) -> AsyncIterator[str]:
    """Serves a JWKS (or any body) in small chunks with pauses: a real proxy does that."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), chunk):
            await resp.write(body[i : i + chunk])
            await asyncio.sleep(0.002)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get(f"{ISSUER_PATH}/.well-known/jwks.json", handler)
    async with serve(app) as url:
        try:
            yield url
        finally:
            await http.close_all_clients()


async def test_a_jwks_sent_in_several_chunks_is_read_whole() -> None:
    # Regression: `resp.content.read(n)` returns what is buffered, not n bytes:
    # a chunked JWKS was cut after its first chunk and every refresh "failed".
    keys = JWKSServer()
    async with chunked_server(orjson.dumps(keys.jwks())) as url:
        verifier = make_verifier(url)
        assert await verifier.jwks.refresh(), verifier.jwks.last_error  # type: ignore[union-attr]
        assert set(verifier.jwks.keys) == {"ec", "rsa", "ed"}  # type: ignore[union-attr]
        await verifier.aclose()


async def test_a_jwks_over_one_mib_is_refused_even_in_chunks() -> None:
    body = b'{"keys": [], "pad": "' + b"x" * (1 << 20) + b'"}'
    async with chunked_server(body, chunk=256 * 1024) as url:
        verifier = make_verifier(url)
        assert not await verifier.jwks.refresh()  # type: ignore[union-attr]
        assert "larger than 1 MiB" in (verifier.jwks.last_error or "")  # type: ignore[union-attr]
        await verifier.aclose()


# --- issue 10: unknown keys decided locally, useless key sets, claim wording ----------


async def loaded(idp: IdentityProviderServer, clock: Clock | None = None) -> JWTVerifier[Any]:
    """A verifier that holds the provider's key set, fetched just now."""
    verifier = make_verifier(idp.url, clock=clock)
    assert await verifier.jwks.refresh()  # type: ignore[union-attr]
    return verifier


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(alg=st.sampled_from(ASYMMETRIC_ALGS), kid=kid_headers)
async def test_an_unknown_kid_is_refused_locally_while_the_key_set_is_fresh(
    idp: IdentityProviderServer, alg: str, kid: dict[str, Any]
) -> None:
    # Reproduces issue 10: such tokens were CannotDecide, i.e. one provider call each.
    clock = Clock()
    verifier = await loaded(idp, clock)
    fetches = idp.provider.requests["jwks"]
    token = with_header(idp.provider.mint_token(), {"alg": alg, "typ": "JWT"} | kid)
    clock.now += 29  # still within JWKS_MIN_REFRESH_INTERVAL of the fetch
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(token)
    assert info.value.reason is AuthFailureReason.UNKNOWN_KEY
    assert idp.provider.requests["jwks"] == fetches  # no refresh needed to say no
    assert verifier.stats()["unknown_kid_refusals"] == 1
    await verifier.aclose()


async def test_an_unknown_kid_after_the_interval_refreshes_once_then_is_refused(
    idp: IdentityProviderServer,
) -> None:
    clock = Clock()
    verifier = await loaded(idp, clock)
    clock.now += 30
    token = with_header(idp.provider.mint_token(), {"alg": "ES256", "kid": "standby-not-yet"})
    results = await asyncio.gather(
        *(verifier.verify(token) for _ in range(50)), return_exceptions=True
    )
    assert {type(r) for r in results} == {TokenRejected}
    assert idp.provider.requests["jwks"] == 2  # one refresh shared by all fifty
    await verifier.aclose()


async def test_an_unknown_kid_cannot_be_decided_while_no_key_set_can_be_fetched(
    idp: IdentityProviderServer,
) -> None:
    clock = Clock()
    verifier = await loaded(idp, clock)
    await idp.stop()
    clock.now += 30  # the held set is no longer fresh and the refresh fails
    token = with_header(idp.provider.mint_token(), {"alg": "ES256", "kid": "rotated"})
    with pytest.raises(CannotDecide):
        await verifier.verify(token)
    # Still a known kid verifies from the stale set.
    assert (await verifier.verify(idp.provider.mint_token()))["sub"]
    await verifier.aclose()


async def test_a_caller_bounding_its_wait_leaves_the_fetch_running_for_others(
    idp: IdentityProviderServer,
) -> None:
    idp.provider.delay = 0.6  # a slow provider
    verifier = make_verifier(idp.url)
    token = idp.provider.mint_token()
    other = asyncio.ensure_future(verifier.verify(idp.provider.mint_token()))
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await verifier.verify(token)
    assert time.monotonic() - start < 0.5
    assert verifier.jwks.stats()["refreshing"]  # type: ignore[union-attr]
    assert (await other)["sub"]  # the shared fetch finished for the one still waiting
    assert idp.provider.requests["jwks"] == 1
    await verifier.aclose()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_a_key_set_with_no_usable_key_keeps_the_held_keys(
    idp: IdentityProviderServer, data: st.DataObject, caplog: pytest.LogCaptureFixture
) -> None:
    # Reproduces issue 10: such a document counted as a successful refresh and
    # replaced the held keys with none; every valid token then needed the provider.
    idp.provider.jwks_document = None  # the real set again (the last example poisoned it)
    clock = Clock()
    verifier = await loaded(idp, clock)
    held = dict(verifier.jwks.keys)  # type: ignore[union-attr]
    public = idp.provider.jwks()["keys"][0]
    idp.provider.jwks_document = data.draw(poisoned_key_sets(public))
    clock.now += 30
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ghar_core.jwt_verification"):
        assert not await verifier.jwks.refresh()  # type: ignore[union-attr]
    assert dict(verifier.jwks.keys) == held  # type: ignore[union-attr]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "no usable key" in message
    for entry in idp.provider.jwks_document["keys"]:
        if isinstance(entry, dict) and isinstance(entry.get("kid"), str) and entry["kid"]:
            assert repr(entry["kid"][:40]) in message  # each skipped key is named
    # Valid tokens are still verified locally, with the held keys.
    checks = verifier.signature_checks
    assert (await verifier.verify(idp.provider.mint_token()))["sub"]
    assert verifier.signature_checks == checks + 1
    assert verifier.jwks.stats()["last_error"]  # type: ignore[union-attr]
    await verifier.aclose()


async def test_partly_usable_key_set_names_what_it_skipped_in_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with JWKSServer() as server:
        verifier = make_verifier(server.url)
        with caplog.at_level(logging.WARNING, logger="ghar_core.jwt_verification"):
            assert await verifier.jwks.refresh()  # type: ignore[union-attr]
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        for kid in ("sym", "broken", "enc"):
            assert repr(kid) in warnings[0]
        await verifier.aclose()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sub=non_uuid_subs)
async def test_a_sub_that_is_not_a_uuid_is_refused_and_never_cached(
    idp: IdentityProviderServer, sub: str
) -> None:
    # Reproduces issue 10: `sub: "admin"` (correctly signed) was verified and
    # cached, and failed later in the users sync as a 422.
    verifier = await loaded(idp)
    valid = idp.provider.mint_token()
    claims = orjson.loads(unb64(valid.split(".")[1])) | {"sub": sub}
    token = jwt.PyJWS().encode(
        orjson.dumps(claims),
        idp.provider.signing_key(),
        algorithm="ES256",
        headers={"kid": idp.provider.signing_kid},
    )
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(token)
    assert info.value.reason is AuthFailureReason.INVALID_CLAIMS
    assert "`sub`" in info.value.message
    assert verifier.cached(token) is None
    await verifier.aclose()


@pytest.mark.parametrize(
    ("claims", "wording"),
    [
        ({"nbf": "soon"}, "`nbf` is not a number"),
        ({"iat": "yesterday"}, "`iat` is not a number"),
        ({"nbf": [1]}, "`nbf` is not a number"),
        ({"iat": True}, "`iat` is not a number"),
        ({"nbf": 3600}, "not valid yet"),
        ({"iat": 3600}, "`iat` is in the future"),
        ({"exp": "later"}, "`exp` is missing or not a number"),
    ],
)
async def test_claim_messages_say_what_is_wrong(
    idp: IdentityProviderServer, claims: dict[str, Any], wording: str
) -> None:
    now = int(time.time())
    adjusted = {k: now + v if type(v) is int else v for k, v in claims.items()}
    verifier = make_verifier(idp.url)
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(idp.provider.mint_token(claims=adjusted))
    assert info.value.reason is AuthFailureReason.INVALID_CLAIMS
    assert wording in info.value.message
    if "not a number" in wording:
        assert "future" not in info.value.message
        assert "yet" not in info.value.message


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _reference_header_refusal(segment: str) -> str:
    """The message of the header check before its three scans became one translate."""
    if not segment.isascii():  # the whole token is refused
        return "the token is not a JWT (header.payload.signature)"
    segment = segment.partition(".")[0]  # the token's first segment
    if not segment:
        return "the token is not a JWT (header.payload.signature)"
    if "+" in segment or "/" in segment or "=" in segment:
        return "the token is not a JWT (header.payload.signature)"
    try:
        std = segment.encode().translate(bytes.maketrans(b"-_", b"+/"))
        value = orjson.loads(binascii.a2b_base64(std + b"=" * (-len(std) % 4), strict_mode=True))
    except (binascii.Error, ValueError):
        return "the token header is not base64url JSON"
    assert not isinstance(value, dict)
    return "the token header is not a JSON object"


@settings(max_examples=300)
@given(
    segment=st.one_of(
        st.text(alphabet="ABCXYZabcxyz0189-_+/=. \n\x00é", max_size=40),
        st.builds(lambda v: b64(orjson.dumps(v)), json_values),
        # padded, or in the standard alphabet: what a JWT segment must not be
        st.builds(lambda v: base64.urlsafe_b64encode(orjson.dumps({"k": v})).decode(), json_values),
        st.builds(lambda v: base64.b64encode(orjson.dumps({"k": v})).decode(), json_values),
    )
)
def test_the_header_is_read_exactly_when_it_is_base64url_of_a_json_object(segment: str) -> None:
    # The header check has no regex (it is the whole cost of an unknown-kid
    # refusal); it must accept exactly what base64url-then-JSON-object does.
    token = f"{segment}.e30.c2ln"
    expected: object = None
    if _B64URL.fullmatch(segment) and len(segment) % 4 != 1:
        try:
            expected = orjson.loads(unb64(segment))
        except ValueError:
            expected = None
    try:
        got: object = _header(token)[1]
    except TokenRejected as exc:
        assert exc.reason is AuthFailureReason.MALFORMED
        # The same words as the three-scan check it replaced (the reference below).
        assert exc.message == _reference_header_refusal(segment)
        got = None
    assert got == (expected if isinstance(expected, dict) else None)
