"""Helpers for tests that need the identity provider: a real one on loopback.

The local provider (``ghar_core.devtools``) runs on a free loopback port; the
code under test talks to it over real HTTP through the shared client.
:func:`forge` applies one "attack recipe" (drawn by
``tests.strategies.token_attacks``) to a valid token from that provider.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import time
import uuid
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import ECAlgorithm

from ghar_core.config import Settings, load_settings
from ghar_core.devtools import IdentityProviderServer, LocalIdentityProvider


def settings_for(server: IdentityProviderServer, **overrides: Any) -> Settings:
    """Test settings pointing at ``server`` (process environment ignored)."""
    base = load_settings(app_env="test", environ={})
    return dataclasses.replace(base, **(server.settings_overrides() | overrides))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def encode_json(value: Any) -> str:
    return b64(orjson.dumps(value))


def hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{encode_json(header)}.{encode_json(payload)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def public_pem(provider: LocalIdentityProvider) -> bytes:
    return (
        provider.signing_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def forge(recipe: tuple[Any, ...], provider: LocalIdentityProvider) -> str:
    """A token that must never be accepted, built by ``recipe`` from a valid one."""
    kind = recipe[0]
    valid = provider.mint_token()
    head_b64, body_b64, sig_b64 = valid.split(".")
    header = orjson.loads(unb64(head_b64))
    payload = orjson.loads(unb64(body_b64))
    if kind == "random":
        return str(recipe[1])
    if kind == "flip_signature":
        sig = bytearray(unb64(sig_b64))
        sig[recipe[1] % len(sig)] ^= recipe[2]
        return f"{head_b64}.{body_b64}.{b64(bytes(sig))}"
    if kind == "edit_claim":
        _, name, value = recipe
        if payload.get(name) == value:
            value = [value, "changed"]
        payload[name] = value
        return f"{head_b64}.{encode_json(payload)}.{sig_b64}"
    if kind == "edit_header":
        _, name, value = recipe
        if header.get(name) == value:
            value = [value, "changed"]
        header[name] = value
        return f"{encode_json(header)}.{body_b64}.{sig_b64}"
    if kind == "swap_segments":
        return f"{body_b64}.{head_b64}.{sig_b64}"
    if kind == "alg_none":
        return f"{encode_json(header | {'alg': recipe[1]})}.{body_b64}."
    if kind == "hs256_public_key":
        return hs256(header | {"alg": "HS256"}, payload, public_pem(provider))
    if kind == "expired":
        return provider.mint_token(claims={"exp": payload["iat"] - recipe[1]})
    if kind == "future_nbf":
        return provider.mint_token(claims={"nbf": payload["iat"] + recipe[1]})
    if kind == "future_iat":
        return provider.mint_token(claims={"iat": payload["iat"] + recipe[1]})
    if kind == "wrong_aud":
        return provider.mint_token(claims={"aud": recipe[1]})
    if kind == "wrong_iss":
        return provider.mint_token(claims={"iss": recipe[1]})
    if kind == "no_sub":
        return provider.mint_token(claims={"sub": recipe[1]})
    if kind == "huge":
        return provider.mint_token(claims={"pad": "x" * recipe[1]})
    if kind == "non_ascii":
        return valid[: recipe[1] % len(valid)] + recipe[2] + valid[recipe[1] % len(valid) :]
    raise AssertionError(f"unknown recipe {kind}")


def fingerprint(token: str) -> str:
    """How the local provider's ``introspected`` counter names a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def legacy_token(provider: LocalIdentityProvider, secret: bytes = b"legacy", **claims: Any) -> str:
    """An HS256 token for ``provider``'s issuer: without our secret only the provider can judge."""
    payload = {
        "iss": provider.issuer,
        "aud": "authenticated",
        "sub": str(uuid.uuid4()),
        "exp": int(time.time()) + 600,
    } | claims
    return hs256({"alg": "HS256", "typ": "JWT"}, payload, secret)


def with_header(token: str, header: dict[str, Any]) -> str:
    """``token`` with its header replaced (the signature no longer matches)."""
    _, body_b64, sig_b64 = token.split(".")
    return f"{encode_json(header)}.{body_b64}.{sig_b64}"


def sign_raw(provider: LocalIdentityProvider, header: bytes, payload: bytes) -> str:
    """A token whose exact header and payload bytes the provider's own key signed (ES256).

    For JSON no encoder writes (duplicated member names): the bytes are ours,
    the signature is the provider's, so only the parser can refuse it.
    """
    signing_input = f"{b64(header)}.{b64(payload)}".encode()
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input, provider.signing_key())
    return f"{signing_input.decode()}.{b64(signature)}"


def _member(obj: bytes, member: bytes, *, first: bool) -> bytes:
    """``obj`` (a JSON object) with ``member`` (``"name":value``) added first or last."""
    return b"{" + member + b"," + obj[1:] if first else obj[:-1] + b"," + member + b"}"


def duplicated_member_tokens(provider: LocalIdentityProvider) -> list[tuple[str, str]]:
    """(name, token): a member name twice in the header or the payload, each validly signed.

    Every duplicate comes once before and once after the genuine member, so
    whichever of the two a JSON parser keeps (the first, the last), one token
    of each pair carries the hostile value: two ``alg`` (none, HS256), two
    ``kid`` (an unknown one), two ``sub`` (another user), two ``exp`` (an
    expired token made current), two ``aud``, two ``role`` (service_role), one
    name spelled with an escape (``"s\\u0075b"``), one inside ``app_metadata``.
    """
    valid = provider.mint_token()
    head_b64, body_b64, _ = valid.split(".")
    header, payload = unb64(head_b64), unb64(body_b64)
    now = int(time.time())
    expired_claims = orjson.loads(payload) | {"exp": now - 3600}
    expired = orjson.dumps(expired_claims)
    other = str(uuid.uuid4()).encode()
    unknown_kid = str(uuid.uuid4()).encode()
    out: list[tuple[str, str]] = []
    for first in (True, False):
        where = "before" if first else "after"
        for what, member in (
            ("alg none", b'"alg":"none"'),
            ("alg HS256", b'"alg":"HS256"'),
            ("an unknown kid", b'"kid":"' + unknown_kid + b'"'),
        ):
            out.append(
                (
                    f"header: {what} {where} the real one",
                    sign_raw(provider, _member(header, member, first=first), payload),
                )
            )
        for what, obj, member in (
            ("sub of another user", payload, b'"sub":"' + other + b'"'),
            ("exp far in the future, on an expired token", expired, b'"exp":%d' % (now + 10**8)),
            ("exp in the past", payload, b'"exp":%d' % (now - 3600)),
            ("aud anon", payload, b'"aud":"anon"'),
            ("role service_role", payload, b'"role":"service_role"'),
            ("sub spelled s\\u0075b", payload, b'"s\\u0075b":"' + other + b'"'),
        ):
            out.append(
                (
                    f"payload: {what} {where} the real one",
                    sign_raw(provider, header, _member(obj, member, first=first)),
                )
            )
        # A nested object (apps read roles from app_metadata): admin first or last.
        roles = (b'"admin","role":"user"', b'"user","role":"admin"')[0 if first else 1]
        nested = orjson.loads(payload) | {"app_metadata": {"provider": "email", "role": "r"}}
        raw = orjson.dumps(nested).replace(b'"role":"r"', b'"role":' + roles)
        out.append(
            (
                f"payload: app_metadata.role twice, admin {'first' if first else 'last'}",
                sign_raw(provider, header, raw),
            )
        )
    return out
