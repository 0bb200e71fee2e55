"""Authentication against the identity provider (Supabase GoTrue).

``verify_supabase_token(token)`` returns the user in one shape
(:class:`SupabaseUser`) whichever path decided:

1. the positive token cache (a hash and a dict lookup);
2. the negative cache: a token the provider refused within
   ``TOKEN_NEGATIVE_CACHE_TTL`` is refused again at once (keyed like the
   token cache, by a keyed hash, never the raw token);
3. local verification against the provider's JWKS (:mod:`ghar_core.jwt_verification`);
   a token that is definitely bad (bad signature, expired, wrong audience,
   issuer or subject, an asymmetric token whose ``kid`` a fresh key set lacks)
   is refused without calling the provider;
4. only what the local side truly cannot judge (an HS256 token without
   ``SUPABASE_JWT_SECRET``, any token while no key set could be fetched): the
   provider's introspection, ``GET <SUPABASE_URL>/auth/v1/user`` with the anon
   key as ``apikey``, within a budget. Identical concurrent requests share one
   call (single flight); at most ``AUTH_PROVIDER_MAX_IN_FLIGHT`` distinct calls
   are in flight per process (past it: 503, ``Retry-After: 1``); a provider 429
   opens a short circuit: until its ``Retry-After`` (1 to 300 s, 5 when absent
   or unreadable) introspection is answered 503 with what remains of it,
   without calling.

One deadline per authentication: waiting for a key-set refresh and the
introspection share ``timeout`` seconds (the auth client's timeout), so a
slow provider costs a request at most that, then 503 + ``Retry-After: 5``.

The provider answers a bad token with 403 (``bad_jwt``, ``user_not_found``,
``session_not_found``), 401 or 400: all of these are our 401 (and remembered).
Only network errors, timeouts, 429 and 5xx are an outage: 503 with
``Retry-After`` and ``AUTH_PROVIDER_UNREACHABLE``, so clients can tell an
outage from a bad token. :meth:`SupabaseAuth.stats` shows every part of it.

Ownership: :class:`SupabaseAuth` is the app's ``"auth"`` resource. It owns the
verifier (key set, refresh task, token cache) and closes it in ``stop``; the
HTTP session belongs to the ``"http_clients"`` resource (:mod:`ghar_core.http`),
which starts before it and stops after it. The module-level functions use the
running app's resource; outside a running app they raise: nothing builds an
auth object (and its refresh task) that no one would close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal, NamedTuple, TypedDict

import aiohttp
import orjson

from ghar_core.cache import TTLCache
from ghar_core.config import Settings
from ghar_core.exceptions import (
    BadRequestException,
    BaseAPIException,
    ExternalServiceError,
    ServiceUnavailableException,
    UnauthorizedException,
    UserNotFoundException,
    ValidationException,
)
from ghar_core.http import (
    ClientProvider,
    get_supabase_auth_http_client,
    read_limited,
    resolve_session,
)
from ghar_core.jwt_verification import _TAIL as _TAIL  # the tail a cache entry keeps
from ghar_core.jwt_verification import (
    BEARER_PREFIX,
    UNKNOWN_KEY_MESSAGES,
    AuthFailureReason,
    CannotDecide,
    JWTVerifier,
    TokenCache,
    TokenRejected,
    VerificationKey,
    credential,
    decode_unverified,
)

__all__ = [
    "AmbiguousCredentialsException",
    "AuthFailureReason",
    "AuthProviderUnavailableException",
    "AuthenticationException",
    "SupabaseAuth",
    "SupabaseUser",
    "UserPage",
    "auth_failure",
    "get_auth",
    "set_default_auth",
    "token_from_authorization",
    "user_from_claims",
    "verify_supabase_token",
]

logger = logging.getLogger(__name__)

_MAX_PROVIDER_BODY: Final = 1 << 20
_OUTAGE_RETRY_AFTER: Final = 5
_BUSY_RETRY_AFTER: Final = 1
_MAX_RETRY_AFTER: Final = 300
_MESSAGES: Final = {
    AuthFailureReason.MISSING: "Authentication is required: send `Authorization: Bearer <token>`.",
    AuthFailureReason.MALFORMED: "The access token is malformed.",
    AuthFailureReason.INVALID_SIGNATURE: "The access token's signature is invalid.",
    AuthFailureReason.UNKNOWN_KEY: (
        "The access token was signed with a key the identity provider does not publish."
    ),
    AuthFailureReason.EXPIRED: "The access token has expired; refresh the session.",
    AuthFailureReason.INVALID_CLAIMS: "The access token's claims are not valid for this API.",
    AuthFailureReason.REJECTED: "The identity provider rejected the access token.",
    AuthFailureReason.PROVIDER_UNREACHABLE: "The identity provider is unreachable; retry shortly.",
}


class SupabaseUser(TypedDict):
    """The authenticated user, the same shape from the cache, the JWT or the provider."""

    id: str
    email: str | None
    phone: str | None
    role: str | None
    aud: str | None
    app_metadata: dict[str, Any]
    user_metadata: dict[str, Any]
    is_anonymous: bool
    session_id: str | None


class AuthenticationException(UnauthorizedException):
    """401 for a token that is missing or not acceptable; the code names the reason.

    Carries ``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750), or a
    bare ``Bearer`` challenge when no token was sent at all (RFC 6750 §3.1).
    """

    def __init__(self, reason: AuthFailureReason, detail: str | None = None) -> None:
        # The attributes BaseAPIException.__init__ would set, set directly: a
        # refused token is an attacker's hot path and this halves its cost
        # (tests/test_auth.py keeps the two in step). Keyed by the reason's
        # code: an Enum member hashes in Python, its ``_value_`` str does not.
        message, headers = _PARTS[reason._value_]
        Exception.__init__(self, message)
        self.message = message
        self.error_code = reason._value_
        self.details = {"reason": detail} if detail else None
        self.headers = headers.copy()
        self.reason = reason

    def again(self) -> AuthenticationException:
        """A new exception equal to this one, without running ``__init__``.

        The negative cache keeps one refusal per token and raises a copy of it
        on every hit: a third of the cost of building one (never the same
        instance twice: its traceback, context and headers are per request).
        """
        copy = _new_exception(AuthenticationException, self.message)
        # One dict copy replaces the instance dict (cheaper than filling a new one).
        attributes = self.__dict__.copy()
        attributes["headers"] = self.headers.copy()
        copy.__dict__ = attributes
        return copy


_new_exception: Final = Exception.__new__
_PARTS: Final = {
    reason.value: (
        message,
        {
            "WWW-Authenticate": "Bearer"
            if reason is AuthFailureReason.MISSING
            else 'Bearer error="invalid_token"'
        },
    )
    for reason, message in _MESSAGES.items()
}

_INVALID_TOKEN_CHALLENGE: Final = _PARTS[AuthFailureReason.UNKNOWN_KEY.value][1]["WWW-Authenticate"]


class _ConstantRefusal(AuthenticationException):
    """A 401 whose fields all live on its class but ``headers``: the cheapest copy.

    The refusals of an unknown kid are constants (their messages name no
    token) and a random-kid storm builds one per request. A copy of a plain
    401 fills a new instance dict; a copy of this is the exception and its own
    ``WWW-Authenticate`` dict in a slot, nothing else. Each message is a
    subclass (:func:`_constant_refusal`) carrying what ``__init__`` would set.
    """

    __slots__ = ("headers",)

    def again(self) -> AuthenticationException:
        copy = _new_exception(type(self), self.message)
        copy.headers = {"WWW-Authenticate": _INVALID_TOKEN_CHALLENGE}
        return copy


def _constant_refusal(reason: AuthFailureReason, detail: str) -> AuthenticationException:
    """The 401 of ``reason`` and ``detail``, as a :class:`_ConstantRefusal`."""
    template = AuthenticationException(reason, detail)
    fields = {name: value for name, value in vars(template).items() if name != "headers"}
    kind = type("AuthenticationException", (_ConstantRefusal,), {"__slots__": (), **fields})
    refusal: AuthenticationException = kind(reason, detail)
    assert refusal.headers == template.headers  # again() builds the same challenge
    return refusal


#: The 401 of each constant local refusal, built once (see _ConstantRefusal.again).
_LOCAL_REFUSALS: Final = {
    message: _constant_refusal(AuthFailureReason.UNKNOWN_KEY, message)
    for message in UNKNOWN_KEY_MESSAGES
}


class AuthProviderUnavailableException(ServiceUnavailableException):
    """503 + ``Retry-After: 5``: the provider is down, the token may be fine."""

    error_code = AuthFailureReason.PROVIDER_UNREACHABLE.value
    message = _MESSAGES[AuthFailureReason.PROVIDER_UNREACHABLE]
    reason = AuthFailureReason.PROVIDER_UNREACHABLE


class AmbiguousCredentialsException(BadRequestException):
    """400: the request carries more than one credential, and we never guess which counts.

    Several ``Authorization`` headers, or a header and an ``access_token``
    query parameter that differ: a proxy that reads another one than we do
    would decide otherwise. RFC 6750 (2, 3.1) calls it ``invalid_request``.
    """

    error_code = "AUTH_CREDENTIALS_AMBIGUOUS"
    message = (
        "Send exactly one access token: one `Authorization: Bearer` header "
        "or, where allowed, one `access_token` query parameter."
    )
    default_headers = {"WWW-Authenticate": 'Bearer error="invalid_request"'}


def token_from_authorization(value: bytes) -> str | None:
    """The token an ``Authorization`` header value carries, or ``None`` for none.

    Another scheme (``Basic ...``) counts as no token: RFC 6750 (3.1) asks
    for a plain ``Bearer`` challenge, without an error code, when a client
    used an unsupported method. The scheme's case does not matter; ``Bearer``
    followed by a tab or another separator than one space raises the
    malformed-token 401.
    """
    scheme = value[:7]
    if scheme == BEARER_PREFIX or scheme.lower() == b"bearer ":
        return value[7:].decode("latin-1").strip() or None
    if scheme[:6].lower() == b"bearer" and scheme[6:].isspace():
        raise AuthenticationException(
            AuthFailureReason.MALFORMED,
            "the Authorization header must be `Bearer <token>`, one space after `Bearer`",
        )
    return None


def auth_failure(reason: AuthFailureReason, detail: str | None = None) -> BaseAPIException:
    """The client-facing exception for ``reason`` (401, or 503 for an outage)."""
    if reason is AuthFailureReason.PROVIDER_UNREACHABLE:
        return AuthProviderUnavailableException(details={"reason": detail} if detail else None)
    return AuthenticationException(reason, detail)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _mapping(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def user_from_claims(claims: Mapping[str, Any]) -> SupabaseUser:
    """The user carried by verified claims (``sub`` is the user id)."""
    aud = claims.get("aud")
    return {
        "id": claims["sub"].lower(),  # a UUID (checked by the verifier), one spelling
        "email": _text(claims.get("email")),
        "phone": _text(claims.get("phone")),
        "role": _text(claims.get("role")),
        "aud": aud[0] if isinstance(aud, list) and aud else _text(aud),
        "app_metadata": _mapping(claims.get("app_metadata")),
        "user_metadata": _mapping(claims.get("user_metadata")),
        "is_anonymous": claims.get("is_anonymous") is True,
        "session_id": _text(claims.get("session_id")),
    }


def _user_from_provider(user: Mapping[str, Any], claims: Mapping[str, Any]) -> SupabaseUser | None:
    """The user the provider vouched for, or ``None`` when its answer has no user id."""
    raw_id = user.get("id")
    try:
        user_id = str(uuid.UUID(raw_id)) if isinstance(raw_id, str) and len(raw_id) == 36 else None
    except ValueError:
        user_id = None
    if user_id is None:
        return None
    return {
        "id": user_id,
        "email": _text(user.get("email")),
        "phone": _text(user.get("phone")),
        "role": _text(user.get("role")),
        "aud": _text(user.get("aud")),
        "app_metadata": _mapping(user.get("app_metadata")),
        "user_metadata": _mapping(user.get("user_metadata")),
        "is_anonymous": user.get("is_anonymous") is True,
        # /user does not echo the session; the provider has just vouched for the token.
        "session_id": _text(claims.get("session_id")),
    }


@dataclass(frozen=True, slots=True)
class UserPage:
    """One page of the admin user list; ``next_page`` is ``None`` on the last."""

    users: list[dict[str, Any]]
    page: int
    per_page: int
    total: int | None
    next_page: int | None


def _provider_error(body: bytes) -> tuple[str | None, str | None]:
    """(error_code, message) from a GoTrue error body ``{code, error_code, msg}``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    message = data.get("msg") or data.get("message") or data.get("error_description")
    return _text(data.get("error_code")), _text(message)


def _retry_after(value: str | None) -> int:
    """Seconds a 429's ``Retry-After`` asks for (delta-seconds or HTTP-date).

    Clamped to 1..300 so a proxy's odd header cannot lock logins out for
    long; 5 when absent or unreadable.
    """
    if not value:
        return _OUTAGE_RETRY_AFTER
    text = value.strip()
    if text.isascii() and text.isdigit():
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return _OUTAGE_RETRY_AFTER
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    return int(min(max(math.ceil(seconds), 1), _MAX_RETRY_AFTER))


class _Verdict(NamedTuple):
    """What one shared provider call found; every waiter makes its own answer of it."""

    kind: Literal["user", "refused", "unavailable"]
    user: SupabaseUser | None = None
    detail: str = ""
    retry_after: int = _OUTAGE_RETRY_AFTER


def _user_id(user_id: str) -> str:
    try:
        return str(uuid.UUID(str(user_id)))
    except ValueError:
        raise ValidationException(
            "The user id must be a UUID.", details={"user_id": str(user_id)[:100]}
        ) from None


class SupabaseAuth:
    """The app's ``"auth"`` resource: token verification and the admin user API.

    ``client`` returns the HTTP session for the provider (default: the running
    app's ``supabase_auth`` client; the default resources pass
    ``clients.provider("supabase_auth")``); ``timeout`` is the one deadline of an
    authentication (key-set wait plus introspection) and bounds each admin
    call, in seconds; ``clock`` (monotonic seconds) times the 429 circuit.
    ``stop`` cancels the key-set refresh and the introspections in flight and
    drops the caches; it is idempotent. ``check`` never fails: a provider
    outage is reported per request as 503, it is no reason to pull the instance.
    """

    name = "auth"

    def __init__(
        self,
        settings: Settings,
        *,
        client: ClientProvider | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.deadline = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._client: ClientProvider = client or get_supabase_auth_http_client
        self.base_url = f"{settings.SUPABASE_URL}/auth/v1" if settings.SUPABASE_URL else None
        anon = settings.SUPABASE_ANON_KEY
        service = settings.SUPABASE_SERVICE_ROLE_KEY
        self._anon_key = anon.get_secret_value() if anon else None
        self._service_key = service.get_secret_value() if service else None
        self.verifier: JWTVerifier[SupabaseUser] = JWTVerifier.from_settings(
            settings, client=self._client, shape=user_from_claims, timeout=timeout
        )
        #: ``cached_user(token)``: the user of an already verified token or ``None``;
        #: no I/O, no crypto (the token cache's own lookup, bound once).
        self.cached_user: Callable[[str], SupabaseUser | None] = self.verifier.token_cache.get
        #: ``cached_credential(header)``: the same by the raw ``Authorization`` header
        #: value (``b"Bearer <token>"``), as the ASGI server parsed it: the hot path,
        #: a hash and a dict lookup without decoding the token.
        self.cached_credential: Callable[[bytes], SupabaseUser | None] = (
            self.verifier.token_cache.get_credential
        )
        # The token cache's dict, clock and counters, for decide_request's inlined lookup.
        token_cache = self.verifier.token_cache
        self._tokens = token_cache._data
        self._tokens_clock = token_cache._clock
        self._token_stats = token_cache._stats
        # The introspection budget: provider "no"s by fingerprint, calls in flight
        # by SHA-256 of the token (single flight), the cap and the 429 circuit.
        # Each entry is the 401 itself, built once: a hit raises a copy of it.
        self.refusals: TokenCache[AuthenticationException] = TokenCache(
            ttl=settings.TOKEN_NEGATIVE_CACHE_TTL, max_size=settings.TOKEN_CACHE_MAX_SIZE
        )
        # Tokens refused locally for a kid the key set lacks, with the key set
        # that lacked it: a repeat is a hit while that same set is still fresh
        # (the verdict could not change), so a replayed token skips the parse.
        # Apart from the provider's "no"s: a random-kid storm must not evict those.
        self.local_refusals: TokenCache[
            tuple[AuthenticationException, Mapping[str, VerificationKey]]
        ] = TokenCache(
            ttl=max(settings.JWKS_MIN_REFRESH_INTERVAL, 0.0),
            max_size=settings.TOKEN_CACHE_MAX_SIZE,
        )
        # Both caches' dicts, clocks and counters, for _refusal_of's inlined lookups.
        self._refused_entries = self.refusals._data
        self._refused_clock = self.refusals._clock
        self._refused_stats = self.refusals._stats
        self._local_entries = self.local_refusals._data
        self._local_clock = self.local_refusals._clock
        self._local_stats = self.local_refusals._stats
        # What remember_credential reads (TTL, 0 when off; size), for decide_request's
        # inlined store. One attribute, not two: this object has 29, and at 30
        # CPython 3.11's shared instance-dict keys fill up (SHARED_KEYS_MAX_SIZE),
        # which made every attribute load slower (callgrind: a cache hit +3%).
        local_cache = self.local_refusals._cache
        self._local_limits = (
            local_cache.ttl if local_cache.max_size > 0 else 0.0,
            local_cache.max_size,
        )
        self.max_in_flight = settings.AUTH_PROVIDER_MAX_IN_FLIGHT
        self._in_flight: dict[bytes, asyncio.Task[_Verdict]] = {}
        self._circuit_until = -math.inf
        self.introspections = 0
        self._counts = dict.fromkeys(
            (
                "shared",
                "peak_in_flight",
                "busy_refusals",
                "rate_limited",
                "circuit_refusals",
                "deadline_exceeded",
            ),
            0,
        )
        # Users rows the ASGI layer synced, by provider user id (see asgi/auth.py).
        self.user_rows: TTLCache[str, dict[str, Any]] = TTLCache(
            max_size=settings.TOKEN_CACHE_MAX_SIZE, ttl=settings.TOKEN_CACHE_TTL
        )

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if _default_auth is None:
            set_default_auth(self)

    async def stop(self) -> None:
        if _default_auth is self:
            set_default_auth(None)
        await self.verifier.aclose()
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        self._circuit_until = -math.inf
        self.verifier.token_cache.clear()
        self.refusals.clear()
        self.local_refusals.clear()
        self.user_rows.clear()

    async def check(self) -> None:
        return None

    def purge(self) -> None:
        """Forget the key set and cached tokens (after the provider revoked a key)."""
        self.verifier.purge()
        self.local_refusals.clear()

    def stats(self) -> dict[str, Any]:
        """Every part of authentication as plain data: caches, key set, local checks, budget."""
        token_cache, refusals = self.verifier.token_cache, self.refusals
        jwks = self.verifier.jwks
        counts = self._counts
        return {
            "token_cache": {"size": len(token_cache), **dataclasses.asdict(token_cache.stats)},
            "negative_cache": {
                "size": len(refusals),
                "ttl": refusals.ttl,
                **dataclasses.asdict(refusals.stats),
            },
            "unknown_kid_cache": {
                "size": len(self.local_refusals),
                **dataclasses.asdict(self.local_refusals.stats),
            },
            "local": self.verifier.stats(),
            "jwks": jwks.stats() if jwks is not None else None,
            "provider": {
                "introspections": self.introspections,
                "shared": counts["shared"],
                "in_flight": len(self._in_flight),
                "peak_in_flight": counts["peak_in_flight"],
                "max_in_flight": self.max_in_flight,
                "busy_refusals": counts["busy_refusals"],
                "rate_limited": counts["rate_limited"],
                "circuit_open_for": round(max(0.0, self._circuit_until - self._clock()), 3),
                "circuit_refusals": counts["circuit_refusals"],
                "deadline_exceeded": counts["deadline_exceeded"],
            },
        }

    # -- verification ----------------------------------------------------------

    def remember_refusal(self, token: str, detail: str) -> None:
        """Refuse ``token`` locally for ``TOKEN_NEGATIVE_CACHE_TTL`` (the provider said no)."""
        self.refusals.remember(token, AuthenticationException(AuthFailureReason.REJECTED, detail))

    def verify_now(self, token: str | None) -> SupabaseUser | None:
        """Decide ``token`` after a :attr:`cached_user` miss, at once: the user or the 401.

        ``None`` means the key set or the provider must be asked first: then
        ``await`` :meth:`verify_token`. (A token already in the token cache is
        verified again here: check :attr:`cached_user` first, as
        :meth:`verify_token` does.) Everything an attacker can send that we
        refuse on our own (a token refused before, a kid the fresh key set
        lacks, a bad signature or claims) is refused here, synchronously, with
        no coroutine, timer or log line on the way.
        """
        verdict = self.decide(token)
        if isinstance(verdict, BaseAPIException):
            try:
                raise verdict
            finally:
                # The traceback holds this frame: had it kept the exception in a
                # local, every refusal would leave a reference cycle for the GC.
                del verdict
        return verdict

    def decide(self, token: str | None) -> SupabaseUser | BaseAPIException | None:
        """:meth:`verify_now` with the refusal returned instead of raised.

        The returned exception is a fresh copy for this request: raise it.
        The cheap refusals (negative cache, an unknown kid, replayed or not)
        raise nothing on the way, so the caller's one ``raise`` is the only
        traceback a refused request builds.
        """
        if not token:
            return AuthenticationException(AuthFailureReason.MISSING)
        raw = credential(token)
        return self._refusal_of(raw) or self._judge(token, raw)

    def decide_request(
        self, headers: Iterable[tuple[bytes, bytes]]
    ) -> SupabaseUser | BaseAPIException | None:
        """The user a request's raw ASGI headers authenticate, or the refusal, at once.

        ``None`` means the key set or the provider must be asked first: then
        ``await`` :meth:`verify_token` with the token. The refusal (a token
        refused before, a kid the fresh key set lacks, a bad token, a missing
        header, more than one) is returned, a fresh exception for this
        request: the caller's ``raise`` is the only one. This is every
        request's path, so it is one call: one pass over the headers, then
        the caches by the ``Authorization`` value's raw bytes (``Bearer
        <token>``), which is how they are keyed. A cache hit decodes nothing:
        a hash, one dict lookup, one clock read, the tail's comparison (the
        token cache's own lookup, inlined). A remembered refusal is one more
        lookup and a copy of its 401; another spelling (``bearer``, extra
        spaces) is decoded first and looked up as the usual one.
        """
        header: bytes | None = None
        for name, value in headers:
            if name == b"authorization":
                if header is not None:
                    return AmbiguousCredentialsException(
                        details={"reason": "more than one Authorization header"}
                    )
                header = value
        if header is None:
            return AuthenticationException(AuthFailureReason.MISSING)
        key = hash(header)  # cached on the bytes: the lookups below hash nothing
        entry = self._tokens.get(key)
        if entry is not None:
            if entry[0] > self._tokens_clock():
                found = entry[1]
                if header[-_TAIL:] == found[0]:
                    self._token_stats.hits += 1
                    return found[1]
            else:
                del self._tokens[key]
                self._token_stats.expirations += 1
        self._token_stats.misses += 1
        refusal = self._refusal_of(header)
        if refusal is not None:
            return refusal
        if header[:7] == BEARER_PREFIX:
            # A kid the fresh key set lacks, told from the header segment alone.
            verifier = self.verifier
            rejected = verifier.refusal_by_header(header, 7)
            if rejected is not None and (jwks := verifier.jwks) is not None:
                known = _LOCAL_REFUSALS[rejected.message]
                # local_refusals.remember_credential(header, (known, jwks._keys)),
                # inlined: a random-kid storm remembers one refusal per request.
                ttl, max_size = self._local_limits
                if ttl > 0:
                    local = self._local_entries
                    local[key] = (
                        self._local_clock() + ttl,
                        (header[-_TAIL:], (known, jwks._keys)),
                    )
                    if len(local) > max_size:
                        local.popitem(False)
                        self._local_stats.evictions += 1
                return known.again()
        try:
            token = token_from_authorization(header)
        except AuthenticationException as exc:
            return exc
        if token is None:
            return AuthenticationException(AuthFailureReason.MISSING)
        if len(header) == len(token) + 7 and header[:7] == BEARER_PREFIX:
            return self._judge(token, header)  # the usual spelling: the header is the key
        raw = credential(token)
        return self.cached_credential(raw) or self._refusal_of(raw) or self._judge(token, raw)

    def _refusal_of(self, raw: bytes) -> AuthenticationException | None:
        """A copy of the 401 remembered for the credential ``raw``, else ``None``.

        Both refusal caches' lookups inlined (TokenCache.get_credential, same
        counters): a replayed refusal is the attacker's cheapest request.
        """
        key = hash(raw)
        entry = self._refused_entries.get(key)
        if entry is not None and entry[1][0] == raw[-_TAIL:]:
            if entry[0] > self._refused_clock():
                self._refused_stats.hits += 1
                return entry[1][1].again()
            del self._refused_entries[key]
            self._refused_stats.expirations += 1
        self._refused_stats.misses += 1
        local = self._local_entries.get(key)
        if local is not None and local[1][0] == raw[-_TAIL:]:
            if local[0] <= self._local_clock():
                del self._local_entries[key]
                self._local_stats.expirations += 1
            else:
                refusal, keys = local[1][1]
                jwks = self.verifier.jwks
                if (
                    jwks is not None
                    and jwks._keys is keys
                    and (fetched_at := jwks._fetched_at) is not None
                    and jwks._clock() - fetched_at < jwks.min_refresh_interval  # is_fresh()
                ):
                    self._local_stats.hits += 1
                    return refusal.again()
        self._local_stats.misses += 1
        return None

    def _judge(self, token: str, raw: bytes) -> SupabaseUser | BaseAPIException | None:
        """The local verdict on ``token`` (credential ``raw``) no cache knew."""
        if self.base_url is None:
            return AuthProviderUnavailableException(
                "The identity provider is not configured (set SUPABASE_URL)."
            )
        try:
            verdict = self.verifier.judge_now(token)
        except TokenRejected as exc:
            return AuthenticationException(exc.reason, exc.message)
        except CannotDecide:
            return None
        if not isinstance(verdict, TokenRejected):
            return verdict
        # A kid the fresh key set lacks (returned, not raised: the storm's path).
        known = _LOCAL_REFUSALS[verdict.message]
        jwks = self.verifier.jwks
        if jwks is not None:
            self.local_refusals.remember_credential(raw, (known, jwks._keys))
        return known.again()

    async def verify_token(self, token: str | None) -> SupabaseUser:
        """The user the token belongs to; raises the 401/503 exceptions above."""
        user = (self.cached_user(token) if token else None) or self.verify_now(token)
        if user is not None:
            return user
        assert token  # verify_now refused a missing one
        # The key set must be fetched first, or only the provider can tell.
        return await self._within_deadline(self._authenticate, token)

    async def introspect(self, token: str) -> SupabaseUser:
        """Ask the provider who ``token`` belongs to (``GET /auth/v1/user``), within the budget."""
        return await self._within_deadline(self._ask_provider, token)

    async def _within_deadline(
        self, step: Callable[[str, float], Awaitable[SupabaseUser]], token: str
    ) -> SupabaseUser:
        if self.base_url is None:
            raise AuthProviderUnavailableException(
                "The identity provider is not configured (set SUPABASE_URL)."
            )
        deadline = asyncio.get_running_loop().time() + self.deadline
        try:
            async with asyncio.timeout_at(deadline):
                return await step(token, deadline)
        except TimeoutError:
            self._counts["deadline_exceeded"] += 1
            raise AuthProviderUnavailableException(
                details={
                    "reason": f"no answer from the identity provider within {self.deadline:g} s"
                }
            ) from None

    async def _authenticate(self, token: str, deadline: float) -> SupabaseUser:
        try:
            return await self.verifier.verify(token)
        except TokenRejected as exc:
            raise AuthenticationException(exc.reason, exc.message) from None
        except CannotDecide as exc:
            logger.debug("local verification cannot decide (%s); asking the provider", exc)
        return await self._ask_provider(token, deadline)

    async def _ask_provider(self, token: str, deadline: float) -> SupabaseUser:
        """Introspection within the budget: negative cache, single flight, circuit, cap."""
        try:
            _, claims = decode_unverified(token)
        except TokenRejected as exc:
            raise AuthenticationException(exc.reason, exc.message) from None
        refusal = self.refusals.get(token)
        if refusal is not None:
            raise refusal.again()
        key = hashlib.sha256(token.encode()).digest()
        task = self._in_flight.get(key)
        if task is not None:
            self._counts["shared"] += 1
        else:
            self._check_budget()
            task = asyncio.get_running_loop().create_task(
                self._introspect_once(token, claims, deadline), name="auth-introspection"
            )
            self._in_flight[key] = task
            task.add_done_callback(functools.partial(self._call_done, key))
            self.introspections += 1
            counts = self._counts
            counts["peak_in_flight"] = max(counts["peak_in_flight"], len(self._in_flight))
        # Shielded: a waiter that gives up (deadline, disconnect) leaves the call to the rest.
        try:
            verdict = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this waiter itself was cancelled
            # The shared call was cancelled (stop()): an outage to this request.
            verdict = _Verdict("unavailable", detail="the auth resource is stopping")
        if verdict.user is not None:
            return verdict.user
        if verdict.kind == "refused":
            raise AuthenticationException(AuthFailureReason.REJECTED, verdict.detail)
        raise AuthProviderUnavailableException(
            details={"reason": verdict.detail}, headers={"Retry-After": str(verdict.retry_after)}
        )

    def _check_budget(self) -> None:
        """Raise the 503 a new provider call would get now: circuit open, or the cap reached."""
        left = self._circuit_until - self._clock()
        if left > 0:
            self._counts["circuit_refusals"] += 1
            raise AuthProviderUnavailableException(
                "The identity provider asked us to slow down; retry later.",
                details={"reason": "the provider answered HTTP 429; not asking it until it said"},
                headers={"Retry-After": str(max(1, math.ceil(left)))},
            )
        if len(self._in_flight) >= self.max_in_flight:
            self._counts["busy_refusals"] += 1
            raise AuthProviderUnavailableException(
                "The identity provider is busy; retry shortly.",
                details={"reason": f"{self.max_in_flight} provider calls are in flight already"},
                headers={"Retry-After": str(_BUSY_RETRY_AFTER)},
            )

    def _call_done(self, key: bytes, task: asyncio.Task[_Verdict]) -> None:
        if self._in_flight.get(key) is task:
            del self._in_flight[key]
        if not task.cancelled():
            task.exception()  # retrieved: a call nobody waits for any more logs nothing

    async def _introspect_once(
        self, token: str, claims: Mapping[str, Any], deadline: float
    ) -> _Verdict:
        """One ``GET /user``, shared by every waiter for ``token``; never raises."""
        headers = {"Authorization": f"Bearer {token}"}
        if self._anon_key:
            headers["apikey"] = self._anon_key
        try:
            async with asyncio.timeout_at(deadline):
                status, body, resp_headers = await self._call("GET", "/user", headers=headers)
        except TimeoutError:
            return _Verdict("unavailable", detail="no answer from the identity provider in time")
        except AuthProviderUnavailableException as exc:
            reason = exc.details.get("reason") if isinstance(exc.details, dict) else None
            return _Verdict("unavailable", detail=str(reason or exc.message))
        if status == 200:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                data = None
            user = _user_from_provider(data, claims) if isinstance(data, dict) else None
            if user is None:
                # The provider misbehaves (a proxy's HTML page, a truncated or
                # odd body); the token may be fine. Same answer as an outage,
                # so clients retry instead of logging the user out (401) or
                # seeing a third kind of failure (502).
                return _Verdict("unavailable", detail="the provider answered 200 without a user")
            self.verifier.token_cache.put(token, user, claims.get("exp"))
            return _Verdict("user", user=user)
        if status == 429:
            seconds = _retry_after(resp_headers.get("Retry-After"))
            self._counts["rate_limited"] += 1
            self._circuit_until = max(self._circuit_until, self._clock() + seconds)
            logger.warning("the identity provider answered 429: not asking it for %d s", seconds)
            return _Verdict(
                "unavailable", detail="the provider answered HTTP 429", retry_after=seconds
            )
        if status >= 500:
            return _Verdict("unavailable", detail=f"the provider answered HTTP {status}")
        error_code, _ = _provider_error(body)
        detail = f"provider said {error_code or f'HTTP {status}'}"
        self.remember_refusal(token, detail)  # a "no" is answered locally from now on
        return _Verdict("refused", detail=detail)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One request to the provider; network trouble becomes a 503."""
        url = f"{self.base_url}{path}"
        data = orjson.dumps(json) if json is not None else None
        send_headers = dict(headers)
        if data is not None:
            send_headers["Content-Type"] = "application/json"
        try:
            session = await resolve_session(self._client)
            async with session.request(
                method,
                url,
                headers=send_headers,
                data=data,
                params=params,
                timeout=self._timeout,
            ) as resp:
                # The whole body: `content.read(n)` would stop at what is buffered.
                body = await read_limited(resp, _MAX_PROVIDER_BODY)
                return resp.status, body, resp.headers
        except ValueError as exc:  # over the limit: not an answer we can use
            raise AuthProviderUnavailableException(details={"reason": str(exc)}) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            logger.warning("identity provider %s %s failed: %r", method, path, exc)
            raise AuthProviderUnavailableException(
                details={"reason": f"{type(exc).__name__} talking to the identity provider"}
            ) from exc

    @staticmethod
    def _json(body: bytes) -> Any:
        try:
            return orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            raise ExternalServiceError("The identity provider returned invalid JSON.") from None

    # -- admin API -------------------------------------------------------------

    async def _admin(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[Any, Mapping[str, str]]:
        if self.base_url is None or not self._service_key:
            raise ServiceUnavailableException(
                "The admin user API needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY.",
                error_code="AUTH_ADMIN_NOT_CONFIGURED",
            )
        headers = {"Authorization": f"Bearer {self._service_key}", "apikey": self._service_key}
        status, body, resp_headers = await self._call(
            method, f"/admin{path}", headers=headers, json=json, params=params
        )
        if 200 <= status < 300:
            return self._json(body), resp_headers
        error_code, message = _provider_error(body)
        details = {"provider_error_code": error_code} if error_code else None
        if status == 404:
            raise UserNotFoundException(details=details)
        if status in (400, 422):
            raise ValidationException(
                message or "The identity provider refused the user data.", details=details
            )
        if status in (401, 403):
            raise ExternalServiceError(
                "The identity provider refused the service-role key "
                "(check SUPABASE_SERVICE_ROLE_KEY).",
                details=details,
            )
        if status == 429 or status >= 500:
            raise AuthProviderUnavailableException(
                details={"reason": f"the provider answered HTTP {status}"}
            )
        raise ExternalServiceError(
            f"The identity provider answered HTTP {status}.", details=details
        )

    @staticmethod
    def _user(data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise ExternalServiceError("The identity provider returned a malformed user.")
        return data

    async def create_user(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        """Create a user (``POST /admin/users``): email, phone, password, metadata..."""
        data, _ = await self._admin("POST", "/users", json=dict(attributes))
        return self._user(data)

    async def get_user(self, user_id: str) -> dict[str, Any]:
        """The provider's full record of one user; 404 is :class:`UserNotFoundException`."""
        data, _ = await self._admin("GET", f"/users/{_user_id(user_id)}")
        return self._user(data)

    async def update_user(self, user_id: str, attributes: Mapping[str, Any]) -> dict[str, Any]:
        """Change a user (``PUT /admin/users/{id}``) and return the new record."""
        key = _user_id(user_id)
        data, _ = await self._admin("PUT", f"/users/{key}", json=dict(attributes))
        # Our own write: drop the synced users row now instead of serving it stale for a TTL.
        self.user_rows.pop(key)
        return self._user(data)

    async def delete_user(self, user_id: str) -> None:
        """Delete a user; its users row is forgotten here at once.

        Tokens already issued stay valid until their ``exp`` (they are verified
        locally, statelessly), so the ASGI layer may sync the row again until then.
        """
        key = _user_id(user_id)
        await self._admin("DELETE", f"/users/{key}")
        self.user_rows.pop(key)

    async def list_users(self, *, page: int = 1, per_page: int = 50) -> UserPage:
        """One page of users (1-based ``page``, ``per_page`` 1..1000)."""
        if page < 1 or not 1 <= per_page <= 1000:
            raise ValidationException(
                "page must be >= 1 and per_page between 1 and 1000.",
                details={"page": page, "per_page": per_page},
            )
        data, headers = await self._admin(
            "GET", "/users", params={"page": str(page), "per_page": str(per_page)}
        )
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, list):
            raise ExternalServiceError("The identity provider returned a malformed user list.")
        raw_total = headers.get("X-Total-Count", "")
        total = int(raw_total) if raw_total.isdigit() else None
        more = len(users) == per_page if total is None else page * per_page < total
        return UserPage(
            users=[self._user(u) for u in users],
            page=page,
            per_page=per_page,
            total=total,
            next_page=page + 1 if more else None,
        )


_default_auth: SupabaseAuth | None = None


def set_default_auth(auth: SupabaseAuth | None) -> SupabaseAuth | None:
    """Install the process default (the app's resource does on start); returns the old one."""
    global _default_auth
    previous, _default_auth = _default_auth, auth
    return previous


def get_auth() -> SupabaseAuth:
    """The running app's ``"auth"`` resource; :class:`RuntimeError` when none runs.

    It never builds one: an auth object owns a key-set refresh task, and one
    made here would have no owner to close it.
    """
    if _default_auth is None:
        raise RuntimeError(
            "no auth resource is running: verify tokens inside a started app "
            "(create_app's defaults include SupabaseAuth), or start your own "
            "SupabaseAuth(settings) and call its verify_token"
        )
    return _default_auth


async def verify_supabase_token(token: str | None) -> SupabaseUser:
    """Verify ``token`` with the process default (see the module docstring)."""
    return await get_auth().verify_token(token)
