"""Local verification of the identity provider's JWTs against its JWKS.

Why local: checking a signature in-process costs tens of microseconds, a call
to the provider costs a network round trip and makes every request depend on
the provider being up. :class:`JWTVerifier` decides locally whenever it can
and says so with :class:`CannotDecide` when it cannot: a legacy HS256 token
and no ``SUPABASE_JWT_SECRET``, or an asymmetric token whose key we do not hold
while no key set could be fetched recently. The auth layer then asks the
provider (within a budget, see :mod:`ghar_core.auth`). A token that is
definitely bad raises :class:`TokenRejected` with an :class:`AuthFailureReason`,
and nobody else is asked; that includes an asymmetric token whose ``kid`` is
missing from a key set fetched within ``JWKS_MIN_REFRESH_INTERVAL``
(``AUTH_TOKEN_UNKNOWN_KEY``): the provider publishes every key it signs with,
standby keys included, so a storm of random kids costs no provider call.

Key set (:class:`JWKSCache`): fetched asynchronously through the shared
``supabase_auth`` client (a provider callable is injected, so this module only
needs ``aiohttp`` types), trusted for ``JWKS_CACHE_TTL``. The provider caches
its own JWKS for 10 minutes and asks apps to be able to purge theirs: our
default of one hour trades faster revocation for fewer fetches, so after
revoking a key call :meth:`JWKSCache.purge` (or :meth:`JWTVerifier.purge`).
An unknown ``kid`` triggers one refresh; fetches are single-flight (one task,
every waiter shares it) and at most one per ``JWKS_MIN_REFRESH_INTERVAL``, so
a stream of random kids costs one fetch per interval, not one per token. A
failed refresh keeps the stale key set: a provider outage does not log anyone
out whose key we already hold. A document that parses but yields no usable
key (every entry symmetric, of the wrong type, broken) is a failed refresh
too, and one warning names why each entry was skipped. An expired-but-known
key set is refreshed in the background while the stale keys keep serving.
Waiters share the fetch through :func:`asyncio.shield`, so a caller that
bounds its wait (the auth layer's one deadline per authentication, an
``asyncio.timeout`` around :meth:`JWTVerifier.verify`) gives up alone: the
fetch carries on for the others.

The algorithm comes from OUR key, never from the token: the token's ``alg``
must equal the alg of the key its ``kid`` names, ``none`` is never accepted,
and HS256 is checked only against ``SUPABASE_JWT_SECRET``, never against a
public key (the classic key-confusion attack).

Token cache (:class:`TokenCache`): verified tokens keyed by a keyed hash of
the ``Authorization`` value that carries the token, ``Bearer <token>`` as
bytes (we never keep raw tokens; the class says why not SHA-256), living
``min(TOKEN_CACHE_TTL, exp - now)``, at most ``TOKEN_CACHE_MAX_SIZE`` (the
oldest stored goes first). A hit is a hash, a dict lookup and a clock read:
no decoding, no parsing and no cryptography (``signature_checks`` counts).

Ownership: the verifier owns its key-set refresh task; :meth:`JWTVerifier.aclose`
cancels it. It does not own the HTTP session (the shared-clients module does).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, NamedTuple, TypeGuard, TypeVar

import aiohttp
import orjson
from jwt import PyJWK
from jwt.algorithms import get_default_algorithms

from ghar_core.cache import TTLCache
from ghar_core.http import ClientProvider, read_limited, resolve_session

if TYPE_CHECKING:
    from ghar_core.config import Settings

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "BEARER_PREFIX",
    "MAX_TOKEN_BYTES",
    "UNKNOWN_KEY_MESSAGES",
    "AuthFailureReason",
    "CannotDecide",
    "JWKSCache",
    "JWTVerifier",
    "TokenCache",
    "TokenRejected",
    "VerificationKey",
    "credential",
    "decode_unverified",
]

logger = logging.getLogger(__name__)

MAX_TOKEN_BYTES: Final = 16 * 1024
ASYMMETRIC_ALGORITHMS: Final = frozenset({"ES256", "RS256", "EdDSA"})
_ALGORITHMS: Final = get_default_algorithms()
_HS256: Final = "HS256"
# header.payload.signature, each base64url without padding. The header is
# validated alone first (a refusal by kid needs nothing else), then the rest.
_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_REST_RE: Final = re.compile(r"\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
_NOT_A_JWT: Final = "the token is not a JWT (header.payload.signature)"
_URLSAFE_TO_STD: Final = bytes.maketrans(b"-_", b"+/")
# The same, and the standard alphabet's own ``+``, ``/`` and ``=`` (never
# base64url) to ``*``, which strict ``a2b_base64`` refuses: one translate
# instead of three ``in`` scans before it.
_URLSAFE_ONLY_TO_STD: Final = bytes.maketrans(b"-_+/=", b"+/***")
_MAX_JWKS_BYTES: Final = 1 << 20
_KTY_OF: Final = {"ES256": "EC", "RS256": "RSA", "EdDSA": "OKP"}
_MAX_SKIP_REASONS: Final = 10
# The provider's user ids: canonical 8-4-4-4-12 hex (uuid.UUID would also take
# braces, a urn: prefix, no hyphens and underscores between digits).
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_TAIL: Final = 16  # characters of the signature an entry of the token cache keeps
# One JSON string of valid JSON (orjson has parsed the text before this runs).
_JSON_STRING_RE: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_DUPLICATE_NAME: Final = "the token {} names a member twice (duplicated JSON keys)"

T = TypeVar("T")


class AuthFailureReason(enum.Enum):
    """Why a token was not accepted; the value is the client-facing error code."""

    MISSING = "AUTH_TOKEN_MISSING"
    MALFORMED = "AUTH_TOKEN_MALFORMED"
    INVALID_SIGNATURE = "AUTH_TOKEN_INVALID_SIGNATURE"
    UNKNOWN_KEY = "AUTH_TOKEN_UNKNOWN_KEY"
    EXPIRED = "AUTH_TOKEN_EXPIRED"
    INVALID_CLAIMS = "AUTH_TOKEN_INVALID_CLAIMS"
    REJECTED = "AUTH_TOKEN_REJECTED"
    PROVIDER_UNREACHABLE = "AUTH_PROVIDER_UNREACHABLE"


class TokenRejected(Exception):
    """The token is definitely not acceptable; ``reason`` says why."""

    def __init__(self, reason: AuthFailureReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(message)

    def again(self) -> TokenRejected:
        """A new exception equal to this one, without running ``__init__`` (cheaper)."""
        copy = _new_exception(TokenRejected, self.message)
        copy.__dict__ = self.__dict__.copy()
        return copy


_new_exception: Final = Exception.__new__
#: The refusals of a kid the fresh key set lacks (:data:`UNKNOWN_KEY_MESSAGES`).
_UNKNOWN_KID: Final = TokenRejected(
    AuthFailureReason.UNKNOWN_KEY, "the token's key (`kid`) is not in the provider's key set"
)
_NO_KID: Final = TokenRejected(
    AuthFailureReason.UNKNOWN_KEY,
    "the token names no key (`kid`) and the provider's keys all have one",
)
#: The messages a refusal for an unknown key carries: constants, so a caller may
#: prebuild its own answer to each.
UNKNOWN_KEY_MESSAGES: Final = (_UNKNOWN_KID.message, _NO_KID.message)


class CannotDecide(Exception):
    """Local verification cannot tell (no usable key): ask the provider."""


class _Examined(NamedTuple):
    """A token checked in everything but its signature (see ``JWTVerifier._examine``)."""

    alg: str
    kid: str | None
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


class VerificationKey(NamedTuple):
    """One usable key: its id, the algorithm it dictates and the parsed key object."""

    kid: str
    alg: str
    key: Any


def _b64decode(segment: str) -> bytes:
    # Segments are regex-validated base64url before they get here, so the
    # stdlib's urlsafe wrapper (str checks, a translate, a copy) is not needed:
    # a third cheaper on every header, payload and signature.
    data = segment.encode("ascii").translate(_URLSAFE_TO_STD)
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4))


def _header_segment(token: str) -> str:
    """The validated first segment of ``token``; MALFORMED when there is none."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected(
            AuthFailureReason.MALFORMED, f"the token is larger than {MAX_TOKEN_BYTES} bytes"
        )
    dot = token.find(".")
    header = token[:dot]
    if dot <= 0 or not token.isascii() or _SEGMENT_RE.fullmatch(header) is None:
        raise TokenRejected(AuthFailureReason.MALFORMED, _NOT_A_JWT)
    return header


_PADDING: Final = (b"", b"===", b"==", b"=")  # by length % 4 (1 never decodes)
_a2b: Final = binascii.a2b_base64


def _header(token: str) -> tuple[str, dict[str, Any]]:
    """The first segment of ``token`` and the JSON object it encodes; MALFORMED otherwise.

    This is the whole cost of refusing a kid the key set lacks, so it is the
    cheapest complete check we know: one find, a strict base64 decode, orjson.
    Strict mode refuses every character outside the standard alphabet and its
    ``=`` padding; base64url swaps two of them, so ``+``, ``/`` and ``=`` are
    refused first (the same set ``_SEGMENT_RE`` accepts, without a regex).
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected(
            AuthFailureReason.MALFORMED, f"the token is larger than {MAX_TOKEN_BYTES} bytes"
        )
    dot = token.find(".")
    if dot <= 0 or not token.isascii():
        raise TokenRejected(AuthFailureReason.MALFORMED, _NOT_A_JWT)
    segment = token[:dot]
    try:
        data = _a2b(
            segment.encode().translate(_URLSAFE_ONLY_TO_STD) + _PADDING[dot & 3], strict_mode=True
        )
    except binascii.Error:
        # The cold path: "+", "/" or "=" (now "*") is not a JWT at all; the rest is bad base64.
        if "+" in segment or "/" in segment or "=" in segment:
            raise TokenRejected(AuthFailureReason.MALFORMED, _NOT_A_JWT) from None
        data = b"\xff"  # refused below with the message it always had
    try:
        value = orjson.loads(data)
    except ValueError:
        raise TokenRejected(
            AuthFailureReason.MALFORMED, "the token header is not base64url JSON"
        ) from None
    if type(value) is not dict:
        raise TokenRejected(AuthFailureReason.MALFORMED, "the token header is not a JSON object")
    if _has_duplicate_names(data, value):
        raise TokenRejected(AuthFailureReason.MALFORMED, _DUPLICATE_NAME.format("header"))
    return segment, value


def _rest(token: str, header: str) -> tuple[str, str]:
    """(payload, signature) segments after ``header``; MALFORMED unless exactly two follow."""
    match = _REST_RE.fullmatch(token, len(header))
    if match is None:
        raise TokenRejected(AuthFailureReason.MALFORMED, _NOT_A_JWT)
    return match.group(1), match.group(2)


def _split(token: str) -> tuple[str, str, str]:
    header = _header_segment(token)
    payload, signature = _rest(token, header)
    return header, payload, signature


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        data = _b64decode(segment)
        value = orjson.loads(data)
    except (binascii.Error, ValueError):
        raise TokenRejected(
            AuthFailureReason.MALFORMED, f"the token {what} is not base64url JSON"
        ) from None
    if not isinstance(value, dict):
        raise TokenRejected(AuthFailureReason.MALFORMED, f"the token {what} is not a JSON object")
    if _has_duplicate_names(data, value):
        raise TokenRejected(AuthFailureReason.MALFORMED, _DUPLICATE_NAME.format(what))
    return value


def _has_duplicate_names(data: bytes, value: dict[str, Any]) -> bool:
    """Whether the JSON text ``data`` (parsed to ``value``) names a member twice in an object.

    RFC 7515 §4 and RFC 7519 §4 allow a parser to keep the last duplicate, as
    orjson does; but then a token the provider signed with two ``sub`` (or
    ``kid``, ``exp``, ``role``) means one user to us and another to any layer
    keeping the first, so such a token is refused, at every depth. orjson
    keeps no duplicates, so the check counts: outside strings each ``:``
    separates one member, and a parsed object holds each name once; fewer
    parsed members than colons means a name came twice. Two shortcuts keep
    it cheap: a header without a colon in its values costs one ``count``, and
    compact JSON as the provider writes it is re-encoded identically (about
    a microsecond); only other spellings pay for the full count.
    """
    if data.count(b":") == len(value):
        return False  # no colon inside a string and none nested: each is one distinct member
    if orjson.dumps(value) == data:
        return False  # the same bytes from a dict, where every name is once
    members = 0
    pending: list[Any] = [value]
    while pending:  # iterative: a 16 KB token can nest deeper than the recursion limit
        item = pending.pop()
        if type(item) is dict:
            members += len(item)
            pending.extend(item.values())
        elif type(item) is list:
            pending.extend(item)
    return _JSON_STRING_RE.sub(b"", data).count(b":") != members


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) without any check of the signature: for routing only.

    Raises :class:`TokenRejected` (MALFORMED) when the token cannot be parsed.
    """
    header, payload, _ = _split(token)
    return _json_object(header, "header"), _json_object(payload, "payload")


def _is_number(value: object) -> TypeGuard[float]:
    return type(value) is int or type(value) is float


class TokenCache(Generic[T]):
    """Verified tokens, each kept ``min(ttl, exp - now)``; bounded, oldest out first.

    Keyed by the credential a client sends for the token, the ``Authorization``
    header value ``Bearer <token>`` as bytes (:func:`credential`), hashed with
    ``hash()``: CPython's bytes hash is SipHash-1-3 under a random per-process
    key, so the key is a keyed hash of the token and raw tokens are never
    stored. The ASGI layer looks a request up by the header bytes the server
    parsed (:meth:`get_credential`: no decoding, no copy); :meth:`get` takes
    the token as text and builds the same bytes first. Why not SHA-256: for a
    typical 800-byte token it costs 0.5-0.8 µs on our 2-core box, most of the
    1 µs budget of a whole cache hit; SipHash costs about 0.1 µs. A 64-bit key
    alone could collide, so each entry also keeps the credential's last 16
    bytes (signature characters, useless without the rest) and a hit must
    match them too: a forged token would need both an unpredictable 64-bit
    collision and the 96 signature bits of a token it does not know.

    A hit does not refresh an entry's place: when full, the entry stored
    first goes (each lives at most ``ttl`` anyway), so a hit is one dict
    lookup, one clock read and one comparison of the tail.

    Owned by its :class:`JWTVerifier`; holds only values, nothing to close.
    """

    __slots__ = ("_cache", "_clock", "_data", "_stats", "_wall")

    def __init__(
        self,
        *,
        ttl: float,
        max_size: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._cache: TTLCache[int, tuple[bytes, T]] = TTLCache(
            max_size=max_size, ttl=ttl, clock=clock
        )
        self._wall = wall_clock
        # The cache's own dict, clock and counters, bound here: attribute loads
        # fewer per request.
        self._data = self._cache._data
        self._clock = clock
        self._stats = self._cache.stats

    def get(self, token: str) -> T | None:
        """The cached value for ``token`` or ``None`` (see :meth:`get_credential`)."""
        return self.get_credential(credential(token))

    def get_credential(self, value: bytes) -> T | None:
        """The cached value for the header value ``Bearer <token>`` or ``None``.

        A hash (cached on ``value`` for every later lookup of the same
        request), one dict lookup, one clock read, the tail's comparison.
        """
        key = hash(value)
        entry = self._data.get(key)
        if entry is not None:
            if entry[0] > self._clock():
                found = entry[1]
                if value.endswith(found[0]):
                    self._stats.hits += 1
                    return found[1]
            else:
                del self._data[key]
                self._stats.expirations += 1
        self._stats.misses += 1
        return None

    def put(self, token: str, value: T, exp: object) -> None:
        """Cache ``value`` until ``exp`` (seconds since the epoch) at the latest."""
        if not _is_number(exp) or len(token) < 2 * _TAIL:
            return
        lifetime = float(exp) - self._wall()
        raw = credential(token)
        self._cache.set(hash(raw), (raw[-_TAIL:], value), lifetime)

    def remember(self, token: str, value: T) -> None:
        """Cache ``value`` for the cache's own TTL, whatever the token's ``exp``.

        For verdicts that outlive the token (a refusal stays a refusal).
        """
        if len(token) >= 2 * _TAIL:
            self.remember_credential(credential(token), value)

    def remember_credential(self, value: bytes, verdict: T) -> None:
        """:meth:`remember` by the header value ``Bearer <token>``, as the ASGI layer has it."""
        # TTLCache.set for the cache's own TTL, inlined: a random-kid storm
        # remembers one refusal per request.
        cache = self._cache
        data = self._data
        key = hash(value)
        if cache.ttl <= 0 or cache.max_size == 0:
            data.pop(key, None)
            return
        # A new key goes last; an old one keeps its place (oldest stored, first out).
        data[key] = (self._clock() + cache.ttl, (value[-_TAIL:], verdict))
        if len(data) > cache.max_size:
            data.popitem(last=False)
            self._stats.evictions += 1

    def clear(self) -> None:
        self._cache.clear()

    @property
    def ttl(self) -> float:
        """The longest an entry lives, in seconds."""
        return self._cache.ttl

    @property
    def stats(self) -> Any:
        return self._stats

    def __len__(self) -> int:
        return len(self._cache)


#: What a client sends before the token in its ``Authorization`` header (RFC 6750 2.1).
BEARER_PREFIX: Final = b"Bearer "


def credential(token: str) -> bytes:
    """The ``Authorization`` header value that carries ``token``: ``Bearer <token>``, as bytes.

    What :class:`TokenCache` is keyed by. ASGI servers decode header bytes as
    Latin-1, so those are the bytes; a token outside Latin-1 (never a JWT) is
    encoded as UTF-8 and so never matches header bytes: it takes the slow path.
    """
    try:
        return BEARER_PREFIX + token.encode("latin-1")
    except UnicodeEncodeError:
        return BEARER_PREFIX + token.encode("utf-8", "surrogatepass")


def _usable_key(jwk: object) -> VerificationKey | str:
    """The signing key a JWKS entry gives us, or why the entry is skipped."""
    if not isinstance(jwk, dict):
        return "not a JSON object"
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        return "no `kid`"
    if jwk.get("use", "sig") != "sig":
        return "not a signing key (`use` is not 'sig')"
    kty = jwk.get("kty")
    if kty == "oct":
        return "a symmetric (oct) key is never taken from a public key set"
    alg = jwk.get("alg")
    if alg is not None and (type(alg) is not str or alg not in ASYMMETRIC_ALGORITHMS):
        return f"algorithm {str(alg)[:20]!r} is not accepted"
    try:
        parsed = PyJWK(jwk)
    except Exception as exc:  # untrusted JSON: no entry may break the refresh
        return f"unusable {type(exc).__name__}: {str(exc)[:80]}"
    alg = parsed.algorithm_name
    if alg not in ASYMMETRIC_ALGORITHMS:
        return f"algorithm {alg} is not accepted"
    if kty != _KTY_OF[alg]:
        return f"key type {str(kty)[:10]!r} does not fit {alg}"
    if alg == "ES256" and getattr(getattr(parsed.key, "curve", None), "name", "") != "secp256r1":
        return "an ES256 key must be on P-256"
    return VerificationKey(kid, alg, parsed.key)


def _parse_jwks(body: bytes) -> tuple[dict[str, VerificationKey], list[str]]:
    """(usable signing keys, why each other entry was skipped) of a JWKS document.

    Raises :class:`ValueError` when nothing is usable: such a document must
    not replace the keys we hold.
    """
    document = orjson.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the JWKS document has no `keys` list")
    keys: dict[str, VerificationKey] = {}
    skipped: list[str] = []
    for index, jwk in enumerate(document["keys"]):
        found = _usable_key(jwk)
        if isinstance(found, VerificationKey):
            keys[found.kid] = found
            continue
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        label = f"kid {kid[:40]!r}" if isinstance(kid, str) and kid else f"entry {index}"
        skipped.append(f"{label}: {found}")
    if not keys:
        why = _reasons(skipped) if skipped else "the `keys` list is empty"
        raise ValueError(f"the JWKS document has no usable key ({why})")
    return keys, skipped


def _reasons(skipped: list[str]) -> str:
    shown = "; ".join(skipped[:_MAX_SKIP_REASONS])
    more = len(skipped) - _MAX_SKIP_REASONS
    return f"{shown}; and {more} more" if more > 0 else shown


class JWKSCache:
    """The provider's signing keys with TTL, single-flight, rate-limited refresh.

    ``client`` returns the shared aiohttp session (or an awaitable of it);
    ``clock`` is monotonic seconds. :meth:`aclose` cancels a refresh in flight.
    """

    def __init__(
        self,
        url: str,
        *,
        client: ClientProvider,
        ttl: float = 3600.0,
        min_refresh_interval: float = 30.0,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refresh_interval = min_refresh_interval
        self._client = client
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = dict(headers or {})
        self._clock = clock
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.fetch_count = 0
        self.failure_count = 0
        self.last_error: str | None = None

    @property
    def keys(self) -> Mapping[str, VerificationKey]:
        """The keys held now (possibly stale)."""
        return self._keys

    def peek(self, kid: str) -> VerificationKey | None:
        """The key for ``kid`` if held, without any I/O."""
        return self._keys.get(kid)

    def held(self, kid: str) -> VerificationKey | None:
        """The key for ``kid`` if held, without waiting.

        A set that outlived the TTL keeps serving while a background refresh
        runs (so call it from the event loop).
        """
        key = self._keys.get(kid)
        if key is not None:
            fetched_at = self._fetched_at
            if fetched_at is not None and self._clock() - fetched_at >= self.ttl:
                self._start_refresh()
        return key

    def is_fresh(self) -> bool:
        """Whether the held set was fetched within ``min_refresh_interval``.

        Such a set is authoritative: a kid it lacks is not the provider's
        (the provider publishes its keys before signing with them).
        """
        fetched_at = self._fetched_at
        return fetched_at is not None and self._clock() - fetched_at < self.min_refresh_interval

    async def get(self, kid: str) -> VerificationKey | None:
        """The key for ``kid``; ``None`` when the provider does not publish it.

        A known key whose set outlived the TTL is returned at once while a
        background refresh runs. An unknown kid is judged against a fresh set
        (:meth:`is_fresh`), refreshing once (rate-limited, single flight) when
        the held one is older; :class:`CannotDecide` when no fresh set can be
        had (the refresh failed or is not allowed yet).
        """
        key = self.held(kid)
        if key is not None:
            return key
        if not self.is_fresh():
            if not await self.refresh():
                why = self.last_error or "no refresh allowed yet"
                raise CannotDecide(f"no key {kid[:40]!r} held and no fresh key set ({why})")
            key = self._keys.get(kid)
        return key

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the key set unless one was tried within the minimum interval.

        Joins a fetch already in flight (shielded: a waiter cancelled or timed
        out leaves it running for the others). Returns whether the key set held
        now came from a fetch that succeeded (stale keys are kept on failure).
        """
        task = self._task if self._task is not None else self._start_refresh(force=force)
        if task is None:
            return False
        await asyncio.shield(task)
        return self.last_error is None

    def stats(self) -> dict[str, Any]:
        """Counters and state of the key set, as plain data."""
        fetched_at = self._fetched_at
        return {
            "keys": len(self._keys),
            "fetches": self.fetch_count,
            "failures": self.failure_count,
            "fresh": self.is_fresh(),
            "age": None if fetched_at is None else round(self._clock() - fetched_at, 3),
            "refreshing": self._task is not None,
            "last_error": self.last_error,
        }

    def _start_refresh(self, *, force: bool = False) -> asyncio.Task[None] | None:
        if self._task is not None:
            return self._task
        now = self._clock()
        last = self._last_attempt
        if not force and last is not None and now - last < self.min_refresh_interval:
            return None
        self._last_attempt = now
        self._task = asyncio.get_running_loop().create_task(self._fetch(), name="jwks-refresh")
        return self._task

    async def _fetch(self) -> None:
        self.fetch_count += 1
        try:
            session = await resolve_session(self._client)
            async with session.get(self.url, headers=self._headers, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"the provider answered HTTP {resp.status}")
                try:
                    body = await read_limited(resp, _MAX_JWKS_BYTES)
                except ValueError:
                    raise ValueError("the JWKS document is larger than 1 MiB") from None
            keys, skipped = _parse_jwks(body)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a background task must never die silently
            logger.exception("unexpected error refreshing the JWKS from %s", self.url)
            self._failed(f"{type(exc).__name__}: {exc}")
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            self.last_error = None
            if skipped:
                logger.warning(
                    "JWKS refreshed from %s: kids %s; skipped %s",
                    self.url,
                    sorted(keys),
                    _reasons(skipped),
                )
            else:
                logger.info("JWKS refreshed from %s: kids %s", self.url, sorted(keys))
        finally:
            self._task = None

    def _failed(self, error: str) -> None:
        self.failure_count += 1
        self.last_error = error
        logger.warning(
            "JWKS refresh from %s failed (%s); keeping %d cached key(s)",
            self.url,
            error,
            len(self._keys),
        )

    def purge(self) -> None:
        """Forget every key and the rate-limit window: the next use fetches anew."""
        self._keys = {}
        self._fetched_at = None
        self._last_attempt = None

    async def aclose(self) -> None:
        """Cancel a refresh in flight (idempotent)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if (current := asyncio.current_task()) is not None and current.cancelling():
                    raise


class JWTVerifier(Generic[T]):
    """Verify provider JWTs locally; cache what ``shape(claims)`` makes of them.

    Build it with :meth:`from_settings`. ``verify`` returns the cached value on
    a hit; on a miss it verifies, shapes, caches and returns. ``cached`` is the
    synchronous hit-only path for the hot request path.
    """

    def __init__(
        self,
        *,
        issuer: str,
        jwks: JWKSCache | None,
        shape: Callable[[dict[str, Any]], T],
        audience: str = "authenticated",
        leeway: float = 10.0,
        hs256_secret: str | None = None,
        token_cache_ttl: float = 60.0,
        token_cache_max_size: int = 5000,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.jwks = jwks
        self.token_cache: TokenCache[T] = TokenCache(
            ttl=token_cache_ttl, max_size=token_cache_max_size, clock=clock, wall_clock=wall_clock
        )
        self._shape = shape
        self._secret = hs256_secret.encode() if hs256_secret else None
        self._wall = wall_clock
        self.signature_checks = 0
        self.unknown_kid_refusals = 0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        client: ClientProvider,
        shape: Callable[[dict[str, Any]], T],
        timeout: float = 5.0,
    ) -> JWTVerifier[T]:
        """The verifier the settings describe; without ``SUPABASE_URL`` no key set.

        ``timeout`` bounds one key-set fetch, in seconds.
        """
        base = settings.SUPABASE_URL
        jwks: JWKSCache | None = None
        headers: dict[str, str] = {}
        if settings.SUPABASE_ANON_KEY:
            headers["apikey"] = settings.SUPABASE_ANON_KEY.get_secret_value()
        if base:
            jwks = JWKSCache(
                f"{base}/auth/v1/.well-known/jwks.json",
                client=client,
                ttl=settings.JWKS_CACHE_TTL,
                min_refresh_interval=settings.JWKS_MIN_REFRESH_INTERVAL,
                timeout=timeout,
                headers=headers,
            )
        secret = settings.SUPABASE_JWT_SECRET
        return cls(
            issuer=f"{base}/auth/v1" if base else "",
            jwks=jwks,
            shape=shape,
            audience=settings.JWT_AUDIENCE,
            leeway=settings.JWT_LEEWAY,
            hs256_secret=secret.get_secret_value() if secret else None,
            token_cache_ttl=settings.TOKEN_CACHE_TTL,
            token_cache_max_size=settings.TOKEN_CACHE_MAX_SIZE,
        )

    def cached(self, token: str) -> T | None:
        """The cached value for an already verified ``token``, or ``None``."""
        return self.token_cache.get(token)

    def verify_now(self, token: str) -> T | None:
        """Decide ``token`` without waiting: its shaped claims (cached), or raise.

        ``None`` means only that the key set must be fetched first (then
        ``await`` :meth:`verify`). Raises :class:`TokenRejected` and
        :class:`CannotDecide` like :meth:`verify`. This is the path every
        request takes: refusals never touch the event loop's timers.
        """
        if len(token) > MAX_TOKEN_BYTES:
            _header_segment(token)  # raises MALFORMED before hashing 16 KB of junk
        hit = self.token_cache.get(token)
        if hit is not None:
            return hit
        return self.decide_now(token)

    def decide_now(self, token: str) -> T | None:
        """:meth:`verify_now` for a token the caller just missed in the token cache.

        Saves the second lookup on the path a refusal takes (the auth layer
        checks its caches first).
        """
        verdict = self.judge_now(token)
        if isinstance(verdict, TokenRejected):
            raise verdict.again()
        return verdict

    def refusal_by_header(self, value: bytes, start: int = 0) -> TokenRejected | None:
        """The refusal of the token ``value[start:]`` if its header alone refuses it, else ``None``.

        That is an asymmetric token whose ``kid`` a fresh key set lacks: the
        random-kid storm, an attacker's cheapest traffic. The token comes as
        the bytes a client sent (the ASGI layer passes the ``Authorization``
        value and 7, past ``Bearer ``): nothing is decoded but the header
        segment, base64 and orjson, and nothing else is parsed. The returned
        refusal is a shared constant, as :meth:`judge_now`'s (raise a copy).
        ``None`` says nothing about the token: :meth:`judge_now` decides it,
        and gives this same verdict whenever this gives one (the checks that
        come first there, size, ASCII, header encoding, duplicated names,
        ``alg``, ``crit``, ``kid`` type, each make this return ``None``).
        """
        jwks = self.jwks
        if (
            jwks is None
            or (fetched_at := jwks._fetched_at) is None
            or jwks._clock() - fetched_at >= jwks.min_refresh_interval  # not fresh
            or len(value) - start > MAX_TOKEN_BYTES
            or not value.isascii()
        ):
            return None
        dot = value.find(b".", start)
        if dot <= start:
            return None
        try:
            data = _a2b(
                value[start:dot].translate(_URLSAFE_ONLY_TO_STD) + _PADDING[(dot - start) & 3],
                strict_mode=True,
            )
            header = orjson.loads(data)
        except ValueError:  # binascii.Error is one
            return None
        if type(header) is not dict:
            return None
        alg = header.get("alg")
        kid = header.get("kid")
        if (
            type(alg) is not str
            or alg not in ASYMMETRIC_ALGORITHMS
            or "crit" in header
            or (kid is not None and type(kid) is not str)
            or kid in jwks._keys
            # _has_duplicate_names, its first shortcut inlined (a compact header).
            or (data.count(b":") != len(header) and _has_duplicate_names(data, header))
        ):
            return None
        self.unknown_kid_refusals += 1  # _unknown_key, inlined
        return _UNKNOWN_KID if kid else _NO_KID

    def judge_now(self, token: str) -> T | TokenRejected | None:
        """:meth:`decide_now`, but a kid the fresh key set lacks is returned, not raised.

        That refusal is a shared constant: raise ``verdict.again()``, never it.
        A random-kid storm is the attacker's cheapest traffic, and raising
        through the verifier costs as much as parsing the header did; every
        other refusal raises :class:`TokenRejected` as usual.
        """
        examined = self._examine(token)
        if isinstance(examined, TokenRejected):
            return examined
        key = None
        if examined.alg != _HS256:
            key = self._jwks().held(examined.kid or "")
            if key is None:  # not held, and the set is not fresh (_examine refused that)
                return None
        return self._remember(token, self._finish(examined, key))

    async def verify(self, token: str) -> T:
        """Shaped claims of a valid token (from the cache when possible).

        Raises :class:`TokenRejected` for a bad token and :class:`CannotDecide`
        when only the provider can tell. The only wait is for a key-set
        refresh; bound it with ``asyncio.timeout`` (the fetch goes on for others).
        """
        value = self.verify_now(token)
        if value is not None:
            return value
        return self._remember(token, await self.verify_uncached(token))

    async def verify_uncached(self, token: str) -> dict[str, Any]:
        """Full verification with no cache: parse, key id, claims, key, signature."""
        examined = self._examine(token)
        if isinstance(examined, TokenRejected):
            raise examined.again()
        key = None
        if examined.alg != _HS256:
            # No kid is looked up as "": the key set never holds a key without one.
            key = await self._jwks().get(examined.kid or "")
        return self._finish(examined, key)

    def _remember(self, token: str, claims: dict[str, Any]) -> T:
        value = self._shape(claims)
        self.token_cache.put(token, value, claims["exp"])
        return value

    def _jwks(self) -> JWKSCache:
        if self.jwks is None:
            raise CannotDecide("no identity provider key set is configured")
        return self.jwks

    def _examine(self, token: str) -> _Examined | TokenRejected:
        """Everything but the signature: structure, header, key id, claims, encoding.

        The header comes first and alone: an asymmetric token whose kid a
        fresh key set lacks is refused before the payload is even validated,
        so a storm of random kids stays cheap (that refusal is returned, the
        shared constant of :meth:`_unknown_key`; the others raise).
        """
        header_b64, header = _header(token)
        alg = header.get("alg")
        kid = header.get("kid")
        # `type(...) is str` first: a list or object `alg` is unhashable and the
        # set lookup would raise TypeError (a 500) instead of refusing the token.
        if type(alg) is not str or (alg != _HS256 and alg not in ASYMMETRIC_ALGORITHMS):
            raise TokenRejected(
                AuthFailureReason.INVALID_SIGNATURE,
                f"the token's algorithm {str(alg)[:20]!r} is not accepted",
            )
        if "crit" in header:
            raise TokenRejected(AuthFailureReason.MALFORMED, "critical header extensions")
        if kid is not None and type(kid) is not str:
            raise TokenRejected(AuthFailureReason.MALFORMED, "the token's `kid` is not a string")
        jwks = self.jwks
        if (
            alg != _HS256
            and jwks is not None
            and kid not in jwks._keys
            and (fetched_at := jwks._fetched_at) is not None
            and jwks._clock() - fetched_at < jwks.min_refresh_interval  # is_fresh(), inlined
        ):
            return self._unknown_key(kid)
        payload_b64, signature_b64 = _rest(token, header_b64)
        claims = _json_object(payload_b64, "payload")
        self.check_claims(claims)
        if not signature_b64:
            raise TokenRejected(AuthFailureReason.INVALID_SIGNATURE, "the token is not signed")
        try:
            signature = _b64decode(signature_b64)
        except binascii.Error:
            raise TokenRejected(
                AuthFailureReason.MALFORMED, "the signature is not base64url"
            ) from None
        # Canonical encoding only (RFC 4648 §3.5): the decoder ignores the unused
        # low bits of the last character, so one signature has several spellings;
        # each would be another cache entry, and a denylist by token string misses them.
        if base64.urlsafe_b64encode(signature).rstrip(b"=") != signature_b64.encode():
            raise TokenRejected(
                AuthFailureReason.MALFORMED, "the signature is not canonical base64url"
            )
        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode()
        return _Examined(alg, kid, claims, signing_input, signature)

    def _finish(self, examined: _Examined, key: VerificationKey | None) -> dict[str, Any]:
        """The claims once the signature matches ``key`` (``None``: unknown kid; HS256: ours)."""
        alg, kid, claims, signing_input, signature = examined
        if alg == _HS256:
            ok = self._verify_hs256(kid, signing_input, signature)
        elif key is None:
            raise self._unknown_key(kid).again()
        elif key.alg != alg:
            raise TokenRejected(
                AuthFailureReason.INVALID_SIGNATURE, "the algorithm does not match the key"
            )
        else:
            self.signature_checks += 1
            try:
                ok = bool(_ALGORITHMS[alg].verify(signing_input, key.key, signature))
            except (ValueError, TypeError):
                ok = False
        if not ok:
            raise TokenRejected(AuthFailureReason.INVALID_SIGNATURE, "the signature does not match")
        return claims

    def _verify_hs256(self, kid: str | None, signing_input: bytes, signature: bytes) -> bool:
        if kid is not None and self.jwks is not None and self.jwks.peek(kid) is not None:
            # HS256 naming one of our public keys: the key-confusion attack.
            raise TokenRejected(
                AuthFailureReason.INVALID_SIGNATURE, "the algorithm does not match the key"
            )
        if self._secret is None:
            raise CannotDecide("a legacy HS256 token and no SUPABASE_JWT_SECRET")
        self.signature_checks += 1
        expected = hmac.new(self._secret, signing_input, hashlib.sha256).digest()
        return hmac.compare_digest(expected, signature)

    def _unknown_key(self, kid: str | None) -> TokenRejected:
        # Constant messages (the kid is the client's own, echoing it helps no one),
        # shared: whoever raises one raises a copy (again()).
        self.unknown_kid_refusals += 1
        return _UNKNOWN_KID if kid else _NO_KID

    def check_claims(self, claims: Mapping[str, Any]) -> None:
        """Registered claims: exp (required), nbf, iat, aud, iss, sub (required)."""
        now = self._wall()
        leeway = self.leeway
        exp = claims.get("exp")
        if not _is_number(exp):
            raise TokenRejected(
                AuthFailureReason.INVALID_CLAIMS, "`exp` is missing or not a number"
            )
        if exp <= now - leeway:
            raise TokenRejected(AuthFailureReason.EXPIRED, "the token has expired")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not _is_number(value):
                raise TokenRejected(AuthFailureReason.INVALID_CLAIMS, f"`{name}` is not a number")
            if value > now + leeway:
                raise TokenRejected(
                    AuthFailureReason.INVALID_CLAIMS,
                    "the token is not valid yet (`nbf` is in the future)"
                    if name == "nbf"
                    else "`iat` is in the future",
                )
        aud = claims.get("aud")
        if not (aud == self.audience or (isinstance(aud, list) and self.audience in aud)):
            raise TokenRejected(AuthFailureReason.INVALID_CLAIMS, "the token's audience is wrong")
        if claims.get("iss") != self.issuer or not self.issuer:
            raise TokenRejected(AuthFailureReason.INVALID_CLAIMS, "the token's issuer is wrong")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenRejected(AuthFailureReason.INVALID_CLAIMS, "`sub` is missing")
        if _UUID_RE.fullmatch(sub) is None:
            # Checked here, not in the users sync: a token is either the
            # provider's user (a UUID) or refused, and never cached as verified.
            raise TokenRejected(AuthFailureReason.INVALID_CLAIMS, "`sub` is not a UUID")

    def stats(self) -> dict[str, int]:
        """What local verification did: signature checks and unknown-kid refusals."""
        return {
            "signature_checks": self.signature_checks,
            "unknown_kid_refusals": self.unknown_kid_refusals,
        }

    def purge(self) -> None:
        """Forget the key set and every cached token (after revoking a key)."""
        if self.jwks is not None:
            self.jwks.purge()
        self.token_cache.clear()

    async def aclose(self) -> None:
        """Cancel the key-set refresh in flight; idempotent."""
        if self.jwks is not None:
            await self.jwks.aclose()
