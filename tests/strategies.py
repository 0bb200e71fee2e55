"""Hypothesis strategies shared by the test modules (one place, reused everywhere)."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import strategies as st

from ghar_core.config import Secret

# Text that can live in a UTF-8 file and a process environment.
safe_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
_host = st.builds(lambda parts: ".".join(parts), st.lists(_label, min_size=1, max_size=3))
_path = st.builds(lambda parts: "".join("/" + p for p in parts), st.lists(_label, max_size=3))


def url(schemes: tuple[str, ...]) -> st.SearchStrategy[str]:
    """URLs our URL settings accept (no trailing slash on http ones)."""
    port = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
    user = st.one_of(st.just(""), _label.map(lambda u: f"{u}@"), _label.map(lambda u: f"{u}:pw@"))
    return st.builds(
        lambda scheme, u, host, p, path: f"{scheme}://{u}{host}{p}{path}",
        st.sampled_from(schemes or ("https",)),
        user,
        _host,
        port,
        _path,
    )


def setting_value(name: str, spec: Any) -> st.SearchStrategy[Any]:
    """Typed values that are valid for the setting described by ``spec``."""
    kind = spec.kind
    if kind == "str":
        base = safe_text.filter(lambda s: s.strip() != "")
    elif kind == "secret":
        base = safe_text.map(Secret)
    elif kind == "bool":
        base = st.booleans()
    elif kind == "int":
        lo = int(spec.minimum) if spec.minimum is not None else -(2**40)
        hi = int(spec.maximum) if spec.maximum is not None else 2**40
        base = st.integers(lo, hi)
    elif kind == "float":
        base = st.floats(spec.minimum, spec.maximum, allow_nan=False, allow_infinity=False)
    elif kind == "choice":
        base = st.sampled_from(spec.choices)
    elif kind == "list":
        base = st.lists(safe_text, max_size=5).map(tuple)
    elif kind == "url":
        base = url(spec.schemes)
    elif kind == "prefix":
        base = st.one_of(st.just(""), _path.filter(bool))
    else:  # pragma: no cover
        raise AssertionError(kind)
    if spec.optional:
        # Blank text means "unset" for optional settings, so a blank value
        # comes back as None by design.
        if kind == "secret":
            base = base.filter(lambda s: s.get_secret_value().strip() != "")
        return st.one_of(st.none(), base)
    return base


def env_text() -> st.SearchStrategy[str]:
    """Env-file-like text: mostly KEY=value lines with quotes, comments and junk."""
    key = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
    value = st.one_of(
        safe_text.filter(lambda s: "\n" not in s),
        safe_text.map(lambda s: '"' + s.replace("\n", "") + '"'),
        safe_text.map(lambda s: "'" + s.replace("\n", "") + "'"),
    )
    line = st.one_of(
        st.builds(lambda k, v: f"{k}={v}", key, value),
        st.builds(lambda k, v: f"export {k}={v}", key, value),
        safe_text.map(lambda s: "# " + s.replace("\n", " ")),
        safe_text.filter(lambda s: "\n" not in s),
        st.just(""),
    )
    return st.lists(line, max_size=8).map("\n".join)


# --- token attacks (tests/idp.py `forge` turns a recipe into a token) ---------

_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=20)
)


def token_attacks() -> st.SearchStrategy[tuple[Any, ...]]:
    """Recipes for tokens that must be refused: garbage, tampering, bad claims."""
    return st.one_of(
        st.tuples(st.just("random"), st.text(max_size=300)),
        st.tuples(
            st.just("random"),
            st.lists(st.text("abcXYZ019-_", max_size=40), min_size=1, max_size=5).map(".".join),
        ),
        st.tuples(st.just("flip_signature"), st.integers(0, 200), st.integers(1, 255)),
        st.tuples(
            st.just("edit_claim"),
            st.sampled_from(["sub", "exp", "aud", "iss", "role", "email", "nbf", "iat"]),
            _json_scalar,
        ),
        st.tuples(
            st.just("edit_header"),
            st.sampled_from(["alg", "kid", "typ", "crit", "jku"]),
            _json_scalar | st.sampled_from(["none", "HS256", "RS256", "EdDSA", "ES512"]),
        ),
        st.tuples(st.just("swap_segments")),
        st.tuples(st.just("alg_none"), st.sampled_from(["none", "None", "NONE", ""])),
        st.tuples(st.just("hs256_public_key")),
        st.tuples(st.just("expired"), st.integers(11, 10**6)),
        st.tuples(st.just("future_nbf"), st.integers(11, 10**6)),
        st.tuples(st.just("future_iat"), st.integers(11, 10**6)),
        st.tuples(st.just("wrong_aud"), st.text(max_size=20) | st.just(["anon"])),
        st.tuples(st.just("wrong_iss"), st.text(max_size=40)),
        st.tuples(st.just("no_sub"), st.sampled_from(["", None, 0, []])),
        st.tuples(st.just("huge"), st.integers(12_000, 40_000)),
        st.tuples(
            st.just("non_ascii"),
            st.integers(0, 1000),
            st.text(st.characters(min_codepoint=128), min_size=1, max_size=3),
        ),
    )


# --- HTTP request parts (ASGI tests) ---------------------------------------------------

http_methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=10),
)
"""Standard methods and made-up upper-case tokens."""

_path_char = st.characters(blacklist_categories=("Cs",))
request_paths = st.one_of(
    st.sampled_from(["/", "/items/1", "/items/x", "/echo", "/raw", "/q", "/health", "/items/"]),
    st.text(_path_char, max_size=40).map(lambda t: "/" + t),
    st.lists(st.sampled_from(["%2F", "%00", "%", "..", "é", "items", "1", "\r\n", "~"])).map(
        lambda parts: "/" + "/".join(parts)
    ),
    st.integers(1_000, 12_000).map(lambda n: "/" + "a" * n),
)
"""ASGI (already decoded) paths: percent signs, unicode, control characters, very long."""

latin1_values = st.one_of(
    st.text(st.characters(max_codepoint=255), max_size=64),
    st.integers(1, 10_240).map(lambda n: "v" * n),
    st.sampled_from(["a\r\nSet-Cookie: x=1", "\n", "\x00", " ", "x" * 129, "ok-id_1.2"]),
)
"""Header values as a hostile client could put on the wire (CR/LF, 10 KB, NUL)."""

header_names = st.one_of(
    st.sampled_from(["x-request-id", "content-type", "origin", "accept", "content-length"]),
    st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20),
)


def _dump_json(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)


json_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"{", b"[1,", b'{"a":}', b"nul", b"\xff\xfe", b"[" * 2000, b"1e999999", b""]),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=10)),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=10,
    ).map(_dump_json),
    st.integers(3_000, 20_000).map(lambda n: b'{"big": "' + b"x" * n + b'"}'),
)
"""Request bodies: random bytes, malformed JSON, valid JSON, and bodies over a small limit."""


# --- JWT header/claim values of every JSON type (adversarial review of auth) ---------

json_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
        st.sampled_from(["ES256", "RS256", "EdDSA", "HS256", "none", "es256", "Es256"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
"""Any JSON value orjson can write: what a forged header or claim may carry."""


# --- what the provider never issued (issue 10: decide locally, budget the rest) --------

ASYMMETRIC_ALGS = ("ES256", "RS256", "EdDSA")

kid_headers: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.just({}),
    st.just({"kid": None}),
    st.just({"kid": ""}),
    st.text(max_size=60).map(lambda k: {"kid": k}),
    st.uuids().map(lambda u: {"kid": str(u)}),
)
"""The ``kid`` part of a header no key of the provider has: absent, null, empty, random."""

_UUID = "0f6c7e43-5b1a-4f0e-9a3c-2d8b7e6f5a41"
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")

non_uuid_subs: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(
        [
            "admin",
            _UUID + "\x00",
            "{" + _UUID + "}",
            "urn:uuid:" + _UUID,
            _UUID.replace("-", ""),
            " " + _UUID,
            _UUID + "\n",
            _UUID[:-1],
            _UUID + "0",
            _UUID[:8] + "_" + _UUID[9:],
            _UUID.replace("f", "g"),
            "00000000-0000-0000-0000-00000000000",
        ]
    ),
    st.text(max_size=40).filter(lambda s: _UUID_RE.fullmatch(s) is None),
)
"""``sub`` values that are not a provider user id (the provider's ids are UUIDs)."""


def poisoned_key_sets(public_jwk: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """JWKS documents that parse but hold no key we may use (built around a real EC key)."""
    kid = st.text(min_size=1, max_size=20)
    without_kid = {k: v for k, v in public_jwk.items() if k != "kid"}
    entry = st.one_of(
        kid.map(lambda k: {"kty": "oct", "kid": k, "k": "c2VjcmV0", "alg": "HS256"}),
        st.tuples(kid, st.sampled_from(["RS256", "HS256", "ES512", "PS256", "none", "EdDSA"])).map(
            lambda t: public_jwk | {"kid": t[0], "alg": t[1]}
        ),
        st.tuples(kid, json_values.filter(lambda v: isinstance(v, (list, dict)))).map(
            lambda t: public_jwk | {"kid": t[0], "alg": t[1]}
        ),
        kid.map(lambda k: public_jwk | {"kid": k, "use": "enc"}),
        st.sampled_from([{}, {"kid": ""}, {"kid": 5}, {"kid": None}]).map(
            lambda extra: without_kid | extra
        ),
        kid.map(lambda k: {"kty": "EC", "kid": k, "crv": "P-256", "x": "AA", "y": "AA"}),
        kid.map(lambda k: public_jwk | {"kid": k, "crv": "P-384"}),
        st.sampled_from([5, "key", None, [], True]),
    )
    return st.lists(entry, max_size=6).map(lambda keys: {"keys": keys})


# Last-Event-ID values a client may send back: well-formed ids of any epoch and
# position (ours rarely), and arbitrary text (malformed, hostile, too long).
event_ids = st.one_of(
    st.builds(
        lambda epoch, position: f"{epoch}:{position}",
        st.text("abcdef0123456789", min_size=1, max_size=12),
        st.integers(0, 10**18),
    ),
    st.text(max_size=40),
)


# --- raw HTTP/1.1 requests, mutated byte by byte (the reliability suite) ---------------------

_HTTP_BASE = (
    b"POST /api/v1/writes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 15\r\n\r\n"
    b'{"payload":"x"}'
)
_http_bytes = st.sampled_from(list(b"\x00\r\n :;,/\\\"'%\x7f\xff\t-0123456789AZaz{}"))


def _mutate(ops: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(_HTTP_BASE)
    for op, at, byte in ops:
        at %= len(data) + 1
        if op == "insert":
            data[at:at] = bytes([byte])
        elif at < len(data):
            if op == "replace":
                data[at] = byte
            else:
                del data[at]
    return bytes(data)


#: A valid unauthenticated write request with a few bytes inserted, replaced or deleted.
mutated_http_requests = st.lists(
    st.tuples(st.sampled_from(["insert", "replace", "delete"]), st.integers(0, 200), _http_bytes),
    min_size=1,
    max_size=6,
).map(_mutate)


# --- JSON nested to an exact depth (issue 11: parse and encode limits agree) -------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)


@st.composite
def nested_json(draw: st.DrawFn, depth: int) -> Any:
    """A JSON value exactly ``depth`` containers deep (0: a scalar).

    One spine of random lists and objects, each level with at most one
    scalar sibling, so a few draws per level keep deep values cheap.
    """
    value = draw(_json_leaf)
    for _ in range(depth):
        sibling = draw(st.one_of(st.just(None), _json_leaf.map(lambda v: (v,))))
        if draw(st.booleans()):
            value = [value] if sibling is None else [sibling[0], value]
        else:
            key = draw(st.text(max_size=4))
            value = {key: value} if sibling is None else {key: value, key + "_": sibling[0]}
    return value


parsed_header_fields = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from([b"Host", b"HOST", b"host", b"Expect", b"X-Host", b"Hosts"]),
            st.binary(min_size=1, max_size=12),
        ),
        st.one_of(
            st.sampled_from([b"100-continue", b"100-Continue \t", b"a.example ", b" \t", b""]),
            st.binary(max_size=24),
        ),
    ),
    max_size=8,
)
"""Header fields as httptools hands them to ``on_header`` (any case, trailing whitespace)."""
