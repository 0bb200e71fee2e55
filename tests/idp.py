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
