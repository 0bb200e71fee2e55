"""A local identity provider speaking Supabase GoTrue's paths and shapes.

Why: development and the tests need a provider that behaves like the real one
over real HTTP (JWKS, introspection, the admin user API, errors with GoTrue's
``{"code", "error_code", "msg"}`` bodies) without a network or an account.
It is an aiohttp app; users and sessions live in memory.

Paths (all under ``/auth/v1``, as in GoTrue behind Supabase's gateway):

- ``GET /.well-known/jwks.json``: the public ES256 keys (every key not yet
  dropped, so tokens signed before a rotation keep verifying);
- ``GET /user``: introspection, ``Authorization: Bearer <token>`` + ``apikey``;
  a bad token is 403 ``bad_jwt``, a deleted user 403 ``user_not_found``, a
  revoked session 403 ``session_not_found``;
- ``POST|GET /admin/users``, ``GET|PUT|DELETE /admin/users/{id}`` with the
  service-role key (``page``/``per_page`` paging, ``X-Total-Count``, ``Link``);
- ``POST /dev/token`` (ours, service-role key): mint an access token for a
  user, creating the user when new; ``ghar-core token`` calls it.

Test knobs, set on :class:`LocalIdentityProvider`: ``fail_status`` (every
endpoint answers that status, e.g. 503 or 429) with an optional
``retry_after`` header, ``delay`` (seconds before answering; a large one is a
provider that hangs), ``jwks_document`` (served instead of the real key set:
poisoned or empty sets). Counters: ``requests`` per endpoint, ``in_flight`` and
``peak_in_flight`` per endpoint, and ``introspected``: how often ``GET /user``
saw each token, keyed by the token's SHA-256 (never the token itself).

Ownership: :class:`IdentityProviderServer` owns the aiohttp runner and its
socket; ``async with`` (or ``start``/``stop``) bounds its life.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from ghar_core.config import Secret

__all__ = [
    "DEV_ANON_KEY",
    "DEV_PROVIDER_URL",
    "DEV_SERVICE_ROLE_KEY",
    "IdentityProviderServer",
    "LocalIdentityProvider",
    "TokenRequestError",
    "build_app",
    "request_token",
]

DEV_PROVIDER_URL: Final = "http://127.0.0.1:54321"
DEV_ANON_KEY: Final = "dev-anon-key"
DEV_SERVICE_ROLE_KEY: Final = "dev-service-role-key"
_EMAIL_RE: Final = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_MAX_BODY: Final = 64 * 1024


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class _SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "alg": "ES256", "use": "sig", "key_ops": ["verify"]})
        return jwk


def _new_key() -> _SigningKey:
    return _SigningKey(kid=str(uuid.uuid4()), private_key=ec.generate_private_key(ec.SECP256R1()))


class _Problem(Exception):
    """A GoTrue-shaped error answer."""

    def __init__(self, status: int, error_code: str, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.error_code = error_code
        self.msg = msg


class LocalIdentityProvider:
    """Keys, users and sessions of the local provider, plus token minting.

    ``base_url`` is what the app calls ``SUPABASE_URL``; the issuer is
    ``<base_url>/auth/v1``. :class:`IdentityProviderServer` sets it once bound.
    """

    def __init__(
        self,
        *,
        base_url: str = DEV_PROVIDER_URL,
        anon_key: str = DEV_ANON_KEY,
        service_role_key: str = DEV_SERVICE_ROLE_KEY,
        audience: str = "authenticated",
        token_ttl: int = 3600,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.anon_key = anon_key
        self.service_role_key = service_role_key
        self.audience = audience
        self.token_ttl = token_ttl
        self._keys: list[_SigningKey] = [_new_key()]
        self.users: dict[str, dict[str, Any]] = {}
        self.revoked_sessions: set[str] = set()
        self.requests: collections.Counter[str] = collections.Counter()
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.peak_in_flight: collections.Counter[str] = collections.Counter()
        self.introspected: collections.Counter[str] = collections.Counter()
        self.fail_status: int | None = None
        self.retry_after: str | None = None
        self.delay = 0.0
        self.jwks_document: dict[str, Any] | None = None

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/auth/v1"

    @property
    def signing_kid(self) -> str:
        return self._keys[-1].kid

    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        """The current private key (tests forge tokens with it)."""
        return self._keys[-1].private_key

    # -- keys --------------------------------------------------------------------

    def rotate_key(self) -> str:
        """Sign with a new key from now on; the old one stays published."""
        key = _new_key()
        self._keys.append(key)
        return key.kid

    def drop_key(self, kid: str) -> None:
        """Stop publishing ``kid`` (revocation); the current signer cannot be dropped."""
        if kid == self.signing_kid:
            raise ValueError("cannot drop the current signing key; rotate first")
        self._keys = [k for k in self._keys if k.kid != kid]

    def jwks(self) -> dict[str, Any]:
        """What the JWKS endpoint serves: ``jwks_document`` when set, else the public keys."""
        if self.jwks_document is not None:
            return self.jwks_document
        return {"keys": [key.public_jwk() for key in self._keys]}

    def _public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        for key in self._keys:
            if key.kid == kid:
                return key.private_key.public_key()
        return None

    # -- users -------------------------------------------------------------------

    def create_user(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        """Create a user from admin-API attributes; raises the GoTrue errors."""
        email = attributes.get("email")
        phone = attributes.get("phone")
        if email is not None and (not isinstance(email, str) or not _EMAIL_RE.fullmatch(email)):
            raise _Problem(
                400, "validation_failed", "Unable to validate email address: invalid format"
            )
        if phone is not None and not isinstance(phone, str):
            raise _Problem(400, "validation_failed", "Invalid phone number format")
        for name in ("user_metadata", "app_metadata"):
            if attributes.get(name) is not None and not isinstance(attributes[name], dict):
                raise _Problem(400, "validation_failed", f"{name} must be an object")
        if email and any(u["email"] == email.lower() for u in self.users.values()):
            raise _Problem(
                422, "email_exists", "A user with this email address has already been registered"
            )
        if phone and any(u["phone"] == phone for u in self.users.values()):
            raise _Problem(
                422, "phone_exists", "A user with this phone number has already been registered"
            )
        user_id = attributes.get("id") or str(uuid.uuid4())
        try:
            user_id = str(uuid.UUID(str(user_id)))
        except ValueError:
            raise _Problem(400, "validation_failed", "id must be a UUID") from None
        if user_id in self.users:
            raise _Problem(422, "user_already_exists", "User already registered")
        now = _now_iso()
        confirmed = now if attributes.get("email_confirm") and email else None
        provider = "email" if email else "phone" if phone else "anonymous"
        user: dict[str, Any] = {
            "id": user_id,
            "aud": self.audience,
            "role": attributes.get("role") or "authenticated",
            "email": (email or "").lower(),
            "email_confirmed_at": confirmed,
            "phone": phone or "",
            "confirmed_at": confirmed,
            "last_sign_in_at": None,
            "app_metadata": {"provider": provider, "providers": [provider]}
            | dict(attributes.get("app_metadata") or {}),
            "user_metadata": dict(attributes.get("user_metadata") or {}),
            "identities": [],
            "created_at": now,
            "updated_at": now,
            "is_anonymous": bool(attributes.get("is_anonymous", False)),
        }
        self.users[user_id] = user
        return user

    def update_user(self, user_id: str, attributes: Mapping[str, Any]) -> dict[str, Any]:
        user = self._user(user_id)
        email = attributes.get("email")
        if email is not None:
            if not isinstance(email, str) or not _EMAIL_RE.fullmatch(email):
                raise _Problem(
                    400, "validation_failed", "Unable to validate email address: invalid format"
                )
            if any(u["email"] == email.lower() and u["id"] != user_id for u in self.users.values()):
                raise _Problem(
                    422,
                    "email_exists",
                    "A user with this email address has already been registered",
                )
            user["email"] = email.lower()
        if isinstance(attributes.get("phone"), str):
            user["phone"] = attributes["phone"]
        if isinstance(attributes.get("role"), str):
            user["role"] = attributes["role"]
        for name in ("user_metadata", "app_metadata"):
            value = attributes.get(name)
            if value is not None:
                if not isinstance(value, dict):
                    raise _Problem(400, "validation_failed", f"{name} must be an object")
                user[name] = {**user[name], **value}
        user["updated_at"] = _now_iso()
        return user

    def _user(self, user_id: str) -> dict[str, Any]:
        try:
            key = str(uuid.UUID(user_id))
        except ValueError:
            raise _Problem(400, "validation_failed", "user_id must be an UUID") from None
        user = self.users.get(key)
        if user is None:
            raise _Problem(404, "user_not_found", "User not found")
        return user

    # -- tokens ------------------------------------------------------------------

    def mint_token(
        self,
        sub: str | None = None,
        email: str | None = None,
        *,
        phone: str | None = None,
        expires_in: int | None = None,
        session_id: str | None = None,
        user_metadata: Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
        create_user: bool = True,
    ) -> str:
        """An access token like the provider's, for ``sub`` (a new user when omitted).

        ``claims`` and ``headers`` override anything (tests forge bad tokens).
        The user is created in memory unless it exists or ``create_user`` is off.
        """
        user_id = sub or str(uuid.uuid4())
        user = self.users.get(user_id)
        if user is None and create_user:
            attrs: dict[str, Any] = {"id": user_id, "email_confirm": True}
            if email:
                attrs["email"] = email
            if phone:
                attrs["phone"] = phone
            if user_metadata:
                attrs["user_metadata"] = dict(user_metadata)
            user = self.create_user(attrs)
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user_id,
            "aud": self.audience,
            "exp": now + (self.token_ttl if expires_in is None else expires_in),
            "iat": now,
            "email": (user or {}).get("email", email or ""),
            "phone": (user or {}).get("phone", phone or ""),
            "app_metadata": (user or {}).get("app_metadata", {}),
            "user_metadata": (user or {}).get("user_metadata", dict(user_metadata or {})),
            "role": (user or {}).get("role", "authenticated"),
            "aal": "aal1",
            "amr": [{"method": "password", "timestamp": now}],
            "session_id": session_id or str(uuid.uuid4()),
            "is_anonymous": (user or {}).get("is_anonymous", False),
        }
        payload.update(claims or {})
        key = self._keys[-1]
        head = {"kid": key.kid, "typ": "JWT"} | dict(headers or {})
        if user is not None:
            user["last_sign_in_at"] = _now_iso()
        return jwt.encode(payload, key.private_key, algorithm="ES256", headers=head)

    def check_token(self, token: str) -> dict[str, Any]:
        """What ``GET /user`` does: verify, then find the user and the session."""
        try:
            header = jwt.get_unverified_header(token)
            public = self._public_key(str(header.get("kid")))
            if public is None or header.get("alg") != "ES256":
                raise jwt.InvalidTokenError("unknown signing key")
            claims = jwt.decode(
                token,
                public,
                algorithms=["ES256"],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise _Problem(
                403,
                "bad_jwt",
                "invalid JWT: unable to parse or verify signature, token has invalid claims: "
                "token is expired",
            ) from None
        except jwt.InvalidTokenError as exc:
            raise _Problem(
                403, "bad_jwt", f"invalid JWT: unable to parse or verify signature, {exc}"
            ) from None
        user = self.users.get(str(claims.get("sub")))
        if user is None:
            raise _Problem(403, "user_not_found", "User from sub claim in JWT does not exist")
        if claims.get("session_id") in self.revoked_sessions:
            raise _Problem(
                403, "session_not_found", "Session from session_id claim in JWT does not exist"
            )
        return user


# -- HTTP ------------------------------------------------------------------------

_PROVIDER: Final = web.AppKey("provider", LocalIdentityProvider)


def _error(status: int, error_code: str, msg: str) -> web.Response:
    body = {"code": status, "error_code": error_code, "msg": msg}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _provider(request: web.Request) -> LocalIdentityProvider:
    return request.app[_PROVIDER]


@web.middleware
async def _gotrue_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    provider = _provider(request)
    route = request.match_info.route.name or request.path
    provider.requests[route] += 1
    provider.in_flight[route] += 1
    provider.peak_in_flight[route] = max(provider.peak_in_flight[route], provider.in_flight[route])
    try:
        if route == "user":
            token = _bearer(request) or ""
            provider.introspected[hashlib.sha256(token.encode()).hexdigest()] += 1
        if provider.delay:
            await asyncio.sleep(provider.delay)
        if provider.fail_status is not None:
            response = _error(
                provider.fail_status, "unexpected_failure", "simulated provider failure"
            )
            if provider.retry_after is not None:
                response.headers["Retry-After"] = provider.retry_after
            return response
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except _Problem as problem:
            return _error(problem.status, problem.error_code, problem.msg)
    finally:
        provider.in_flight[route] -= 1


def _require_apikey(request: web.Request) -> None:
    provider = _provider(request)
    key = request.headers.get("apikey")
    if key not in (provider.anon_key, provider.service_role_key):
        raise _Problem(401, "no_authorization", "No API key found in request")


def _require_admin(request: web.Request) -> None:
    token = _bearer(request)
    if token is None:
        raise _Problem(401, "no_authorization", "This endpoint requires a Bearer token")
    if token != _provider(request).service_role_key:
        raise _Problem(403, "not_admin", "User not allowed")


async def _body(request: web.Request) -> dict[str, Any]:
    # Read to the end: `content.read(n)` returns only what has arrived so far.
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > _MAX_BODY:
            raise _Problem(413, "request_timeout", "Request body too large")
        parts.append(chunk)
    raw = b"".join(parts)
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise _Problem(400, "bad_json", "Could not parse request body as JSON") from None
    if not isinstance(data, dict):
        raise _Problem(400, "bad_json", "Request body must be a JSON object")
    return data


async def _jwks(request: web.Request) -> web.Response:
    return _json(_provider(request).jwks(), headers={"Cache-Control": "public, max-age=600"})


async def _get_user(request: web.Request) -> web.Response:
    _require_apikey(request)
    token = _bearer(request)
    if token is None:
        raise _Problem(401, "no_authorization", "This endpoint requires a Bearer token")
    return _json(_provider(request).check_token(token))


async def _admin_create(request: web.Request) -> web.Response:
    _require_admin(request)
    return _json(_provider(request).create_user(await _body(request)))


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise _Problem(400, "validation_failed", f"Bad Pagination Parameters: {name}")
    return int(raw)


async def _admin_list(request: web.Request) -> web.Response:
    _require_admin(request)
    provider = _provider(request)
    page = _int_param(request, "page", 1)
    per_page = min(_int_param(request, "per_page", 50), 1000)
    users = sorted(provider.users.values(), key=lambda u: (u["created_at"], u["id"]))
    chunk = users[(page - 1) * per_page : page * per_page]
    links = []
    last = max(1, -(-len(users) // per_page))
    if page < last:
        links.append(f'</admin/users?page={page + 1}&per_page={per_page}>; rel="next"')
    links.append(f'</admin/users?page={last}&per_page={per_page}>; rel="last"')
    headers = {"X-Total-Count": str(len(users)), "Link": ", ".join(links)}
    return _json({"users": chunk, "aud": provider.audience}, headers=headers)


async def _admin_get(request: web.Request) -> web.Response:
    _require_admin(request)
    return _json(_provider(request)._user(request.match_info["user_id"]))


async def _admin_update(request: web.Request) -> web.Response:
    _require_admin(request)
    body = await _body(request)
    return _json(_provider(request).update_user(request.match_info["user_id"], body))


async def _admin_delete(request: web.Request) -> web.Response:
    _require_admin(request)
    provider = _provider(request)
    user = provider._user(request.match_info["user_id"])
    del provider.users[user["id"]]
    return _json({})


async def _dev_token(request: web.Request) -> web.Response:
    _require_admin(request)
    provider = _provider(request)
    body = await _body(request)
    sub, email = body.get("sub"), body.get("email")
    if sub is not None:
        try:
            sub = str(uuid.UUID(str(sub)))
        except ValueError:
            raise _Problem(400, "validation_failed", "sub must be a UUID") from None
    if sub is None and isinstance(email, str):
        sub = next((u["id"] for u in provider.users.values() if u["email"] == email.lower()), None)
    expires_in = body.get("expires_in", provider.token_ttl)
    if type(expires_in) is not int or not 1 <= expires_in <= 30 * 86400:
        raise _Problem(400, "validation_failed", "expires_in must be 1..2592000 seconds")
    token = provider.mint_token(
        sub,
        email if isinstance(email, str) else None,
        phone=body.get("phone") if isinstance(body.get("phone"), str) else None,
        expires_in=expires_in,
        user_metadata=body.get("user_metadata")
        if isinstance(body.get("user_metadata"), dict)
        else None,
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    return _json(
        {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": expires_in,
            "expires_at": claims["exp"],
            "user": provider.users[claims["sub"]],
        }
    )


async def _health(request: web.Request) -> web.Response:
    return _json({"version": "ghar-local", "name": "GoTrue", "description": "local provider"})


def build_app(provider: LocalIdentityProvider | None = None) -> web.Application:
    """The aiohttp app serving ``provider`` (a new one when omitted)."""
    app = web.Application(middlewares=[_gotrue_middleware], client_max_size=_MAX_BODY)
    app[_PROVIDER] = provider or LocalIdentityProvider()
    r = app.router
    r.add_get("/auth/v1/.well-known/jwks.json", _jwks, name="jwks")
    r.add_get("/auth/v1/user", _get_user, name="user")
    r.add_get("/auth/v1/health", _health, name="health")
    r.add_post("/auth/v1/admin/users", _admin_create, name="admin_create")
    r.add_get("/auth/v1/admin/users", _admin_list, name="admin_list")
    r.add_get("/auth/v1/admin/users/{user_id}", _admin_get, name="admin_get")
    r.add_put("/auth/v1/admin/users/{user_id}", _admin_update, name="admin_update")
    r.add_delete("/auth/v1/admin/users/{user_id}", _admin_delete, name="admin_delete")
    r.add_post("/auth/v1/dev/token", _dev_token, name="dev_token")
    return app


class IdentityProviderServer:
    """Run a :class:`LocalIdentityProvider` on a loopback port.

    ``port=0`` picks a free port; ``url`` (the app's ``SUPABASE_URL``) is known
    after ``start``. Use ``async with IdentityProviderServer() as server:``;
    ``stop`` closes the listening socket and open connections, and is idempotent.
    """

    def __init__(
        self,
        provider: LocalIdentityProvider | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.provider = provider or LocalIdentityProvider()
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        if self._runner is not None:
            return self.url
        runner = web.AppRunner(build_app(self.provider), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.provider.base_url = self.url
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> IdentityProviderServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def settings_overrides(self) -> dict[str, Any]:
        """Fields for ``dataclasses.replace(settings, **...)`` pointing at this provider."""
        return {
            "SUPABASE_URL": self.url,
            "SUPABASE_ANON_KEY": Secret(self.provider.anon_key),
            "SUPABASE_SERVICE_ROLE_KEY": Secret(self.provider.service_role_key),
        }


class TokenRequestError(Exception):
    """The local provider could not be reached or refused to mint a token."""


async def request_token(
    base_url: str,
    service_role_key: str,
    *,
    sub: str | None = None,
    email: str | None = None,
    expires_in: int = 3600,
) -> str:
    """Ask a running local provider (``POST /auth/v1/dev/token``) for an access token.

    Opens and closes its own short-lived session (a one-off CLI call).
    """
    body: dict[str, Any] = {"expires_in": expires_in}
    if sub:
        body["sub"] = sub
    if email:
        body["email"] = email
    url = f"{base_url.rstrip('/')}/auth/v1/dev/token"
    headers = {"Authorization": f"Bearer {service_role_key}", "apikey": service_role_key}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.post(url, data=orjson.dumps(body), headers=headers) as resp,
        ):
            raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TokenRequestError(
            f"cannot reach the local identity provider at {base_url} ({exc}); "
            "start it with `ghar-core identity-provider` or pass --provider-url"
        ) from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if resp.status != 200 or not isinstance(data, dict) or "access_token" not in data:
        detail = data.get("msg") if isinstance(data, dict) else raw[:200].decode(errors="replace")
        raise TokenRequestError(f"the provider answered HTTP {resp.status}: {detail}")
    return str(data["access_token"])
