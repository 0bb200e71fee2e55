"""Case 5a: the JWT attack catalogue against ``ghar-core serve``.

Every token below must be refused with a clean 4xx envelope (or, for a
header too large for the server, a 4xx or a closed connection), the server
must never fetch a key from a URL a token names (an attacker server on
loopback counts its hits), and a valid token must work afterwards. The
server has ``SUPABASE_JWT_SECRET`` set, so HS256 tokens are judged locally
too. Hypothesis adds tokens drawn by ``tests.strategies.token_attacks``.
"""

from __future__ import annotations

import base64
import datetime
import time
import uuid
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from jwt.algorithms import ECAlgorithm

from tests.idp import b64, duplicated_member_tokens, encode_json, forge, hs256, public_pem, unb64
from tests.reliability.rawhttp import clean, exchange
from tests.reliability.report import section
from tests.reliability.stack import Answer, Stack, bearer, call
from tests.strategies import token_attacks

TITLE = "Hostile input"


class Attacker:
    """A loopback server standing for an attacker's key URL: it must never be called."""

    def __init__(self) -> None:
        self.hits = 0
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "attacker-" + uuid.uuid4().hex[:8]
        self._runner: web.AppRunner | None = None
        self.url = ""

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return jwk | {"kid": self.kid, "alg": "ES256", "use": "sig"}

    def certificate_b64(self) -> str:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    async def _serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"keys": [self.jwk()]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def sign(self, claims: dict[str, Any], header: dict[str, Any]) -> str:
        # Signed by hand: PyJWT refuses to write some of the hostile headers.
        return _raw_es256_key(
            self.key, {"alg": "ES256", "typ": "JWT"} | header, orjson.dumps(claims)
        )


def _catalogue(stack: Stack, attacker: Attacker) -> list[tuple[str, str]]:
    """(name, token) for every attack the suite knows by name."""
    idp = stack.provider.provider
    valid = stack.provider.token()
    head_b64, body_b64, sig_b64 = valid.split(".")
    header = orjson.loads(unb64(head_b64))
    claims = orjson.loads(unb64(body_b64))
    kid = idp.signing_kid
    pem = public_pem(idp)
    jwk_json = orjson.dumps(ECAlgorithm.to_jwk(idp.signing_key().public_key(), as_dict=True))
    out: list[tuple[str, str]] = []
    for alg in ("none", "None", "NONE", "nOnE", ""):
        unsigned = f"{encode_json(header | {'alg': alg})}.{body_b64}"
        out += [
            (f"alg {alg!r}, no signature", unsigned + "."),
            (f"alg {alg!r}, old signature", f"{unsigned}.{sig_b64}"),
        ]
    out.append(("alg none, no kid", f"{encode_json({'alg': 'none', 'typ': 'JWT'})}.{body_b64}."))
    for alg, digest in (("HS256", "sha256"), ("HS384", "sha384"), ("HS512", "sha512")):
        out.append(
            (
                f"{alg} keyed with the public key PEM",
                _hmac(header | {"alg": alg}, claims, pem, digest),
            )
        )
    out.append(
        ("HS256 keyed with the public JWK JSON", hs256(header | {"alg": "HS256"}, claims, jwk_json))
    )
    out.append(
        (
            "HS256 keyed with the public PEM, no kid",
            hs256({"alg": "HS256", "typ": "JWT"}, claims, pem),
        )
    )
    out.append(
        ("HS256 keyed with an empty secret", hs256({"alg": "HS256", "typ": "JWT"}, claims, b""))
    )
    out.append(
        (
            "HS256 keyed with the anon key",
            hs256({"alg": "HS256", "typ": "JWT"}, claims, idp.anon_key.encode()),
        )
    )
    for name, bad_kid in (
        ("path traversal", "../../../../../../dev/null"),
        ("SQL", "' OR '1'='1' --"),
        ("NUL byte", kid + "\x00"),
        ("shell", "$(touch /tmp/pwned)"),
        ("URL", attacker.url + "/jwks.json"),
        ("5000 characters", "k" * 5000),
        ("an integer", 1),
        ("a list", [kid]),
        ("an object", {"$ne": None}),
        ("null", None),
    ):
        out.append(
            (
                f"kid injection: {name}",
                f"{encode_json(header | {'kid': bad_kid})}.{body_b64}.{sig_b64}",
            )
        )
        out.append(
            (f"kid injection, attacker-signed: {name}", attacker.sign(claims, {"kid": bad_kid}))
        )
    out.append(("attacker key under the real kid", attacker.sign(claims, {"kid": kid})))
    out.append(
        (
            "embedded jku",
            attacker.sign(claims, {"kid": attacker.kid, "jku": attacker.url + "/jwks.json"}),
        )
    )
    out.append(
        (
            "embedded jku, real kid",
            attacker.sign(claims, {"kid": kid, "jku": attacker.url + "/jwks.json"}),
        )
    )
    out.append(
        ("embedded jwk", attacker.sign(claims, {"kid": attacker.kid, "jwk": attacker.jwk()}))
    )
    out.append(
        (
            "embedded jwk, real kid",
            attacker.sign(claims, {"kid": kid, "jwk": attacker.jwk() | {"kid": kid}}),
        )
    )
    out.append(
        (
            "embedded x5c",
            attacker.sign(claims, {"kid": attacker.kid, "x5c": [attacker.certificate_b64()]}),
        )
    )
    out.append(
        (
            "embedded x5u",
            attacker.sign(claims, {"kid": attacker.kid, "x5u": attacker.url + "/cert.pem"}),
        )
    )
    out.append(
        (
            "crit extension we do not know",
            _resign(idp, claims, header | {"crit": ["exp"], "exp": 1}),
        )
    )
    out.append(
        (
            "oversize: 6 KB of claims, attacker-signed",
            attacker.sign(claims | {"pad": "x" * 6000}, {"kid": kid}),
        )
    )
    out.append(
        (
            "oversize: 60 KB header",
            f"{encode_json(header | {'pad': 'x' * 60_000})}.{body_b64}.{sig_b64}",
        )
    )
    out.append(("oversize: 1 MB token", "a" * 500_000 + "." + "b" * 500_000 + ".c"))
    dup_head = b'{"alg":"ES256","kid":"%s","alg":"none"}' % kid.encode()
    out.append(("duplicated alg (ES256 then none), unsigned", f"{b64(dup_head)}.{body_b64}."))
    other = str(uuid.uuid4())
    dup_body = orjson.dumps(claims)[:-1] + b',"sub":"%s"}' % other.encode()
    out.append(("duplicated sub, old signature", f"{head_b64}.{b64(dup_body)}.{sig_b64}"))
    dup_exp = orjson.dumps(claims)[:-1] + b',"exp":%d}' % (int(time.time()) + 10**8)
    out.append(
        ("duplicated exp (far future), old signature", f"{head_b64}.{b64(dup_exp)}.{sig_b64}")
    )
    out.append(
        (
            "duplicated sub, attacker-signed",
            _raw_es256(attacker, {"kid": kid, "alg": "ES256"}, dup_body),
        )
    )
    expired = idp.mint_token(claims={"exp": int(time.time()) - 3600})
    out.append(
        (
            "expired, then exp duplicated far in the future",
            _append_claim(expired, "exp", int(time.time()) + 10**8),
        )
    )
    out.append(("segments swapped", f"{body_b64}.{head_b64}.{sig_b64}"))
    out.append(("four segments", f"{valid}.{sig_b64}"))
    out.append(("JWE-shaped (five segments)", f"{head_b64}..{body_b64}.{sig_b64}.tag"))
    return out


def _hmac(header: dict[str, Any], claims: dict[str, Any], key: bytes, digest: str) -> str:
    import hashlib
    import hmac

    signing_input = f"{encode_json(header)}.{encode_json(claims)}"
    sig = hmac.new(key, signing_input.encode(), getattr(hashlib, digest)).digest()
    return f"{signing_input}.{b64(sig)}"


def _resign(idp: Any, claims: dict[str, Any], header: dict[str, Any]) -> str:
    """A token the provider's own key signed, with a header we chose."""
    return _raw_es256_key(idp.signing_key(), header | {"alg": "ES256"}, orjson.dumps(claims))


def _raw_es256(attacker: Attacker, header: dict[str, Any], body: bytes) -> str:
    return _raw_es256_key(attacker.key, header, body)


def _raw_es256_key(key: ec.EllipticCurvePrivateKey, header: dict[str, Any], body: bytes) -> str:
    signing_input = f"{encode_json(header)}.{b64(body)}".encode()
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input, key)
    return f"{signing_input.decode()}.{b64(signature)}"


def _append_claim(token: str, name: str, value: Any) -> str:
    head_b64, body_b64, sig_b64 = token.split(".")
    body = unb64(body_b64)[:-1] + b',"%s":%s}' % (name.encode(), orjson.dumps(value))
    return f"{head_b64}.{b64(body)}.{sig_b64}"


def clean_refusal(answer: Answer) -> bool:
    """A 4xx with the error envelope, or a closed connection (only for oversize headers)."""
    if answer.status == 0:
        return answer.error != "hang"
    body = answer.body
    return 400 <= answer.status < 500 and isinstance(body, dict) and "error" in body


async def test_the_jwt_attack_catalogue_is_refused(stack: Stack) -> None:
    attacker = Attacker()
    await attacker.start()
    try:
        catalogue = _catalogue(stack, attacker)
        results: list[tuple[str, Answer]] = []
        async with aiohttp.ClientSession(max_line_size=1 << 21, max_field_size=1 << 21) as session:
            for name, token in catalogue:
                answer = await call(session, "GET", f"{stack.url}/api/v1/me", headers=bearer(token))
                results.append((name, answer))
            # The provider's real key signed these: only refusing duplicates stops them.
            signed_duplicates = duplicated_member_tokens(stack.provider.provider)
            duplicates: list[tuple[str, Answer]] = []
            for name, token in signed_duplicates:
                answer = await call(session, "GET", f"{stack.url}/api/v1/me", headers=bearer(token))
                duplicates.append((name, answer))
            healthy = await call(
                session, "GET", f"{stack.url}/api/v1/me", headers=bearer(stack.provider.token())
            )
    finally:
        await attacker.stop()
    dup_codes: dict[str, int] = {}
    for _, answer in duplicates:
        code = answer.body["error"]["code"] if clean_refusal(answer) and answer.status else "-"
        label = f"{answer.status or answer.error} {code}"
        dup_codes[label] = dup_codes.get(label, 0) + 1
    dup_accepted = [name for name, a in duplicates if 200 <= a.status < 300]
    dup_other = [
        (name, a.status, a.body)
        for name, a in duplicates
        if not (clean_refusal(a) and a.status == 401)
        or a.body["error"]["code"] != "AUTH_TOKEN_MALFORMED"
    ]
    accepted = [name for name, a in results if 200 <= a.status < 300]
    unclean = [(name, a.status, a.error) for name, a in results if not clean_refusal(a)]
    codes: dict[str, int] = {}
    for _, answer in results:
        label = str(answer.status or answer.error)
        codes[label] = codes.get(label, 0) + 1
    report = section(5, TITLE)
    report.add("JWT attacks tried (named catalogue)", len(catalogue))
    report.add("JWT answers by status", dict(sorted(codes.items())))
    report.add("JWT attacks accepted", len(accepted))
    report.add(
        "duplicated member names, signed with the provider's real ES256 key",
        f"{len(signed_duplicates)} tokens; answers {dict(sorted(dup_codes.items()))}; "
        f"{len(dup_accepted)} accepted",
    )
    report.add("requests to the attacker's jku/x5u URLs", attacker.hits)
    report.add(
        "lost",
        f"nothing: {len(accepted) + len(dup_accepted)} hostile tokens accepted, "
        f"{len(unclean)} unclean answers",
    )
    report.note(
        "JWT catalogue: alg none (5 spellings, with and without a signature), HS256/384/512 "
        "keyed with the public key (PEM and JWK), an empty and the anon key as HMAC secret, "
        "kid injection (path, SQL, NUL, shell, URL, 5000 chars, int, list, object, null; "
        "replayed and attacker-signed), an attacker key under the real kid, embedded "
        "jku/jwk/x5c/x5u, an unknown crit, oversize (6 KB claims, 60 KB header, 1 MB token), "
        "duplicated alg/sub/exp, swapped, four and five segments"
    )
    report.note(
        "duplicated member names signed with the provider's own key (the bytes written by "
        "hand, the signature the provider's): two alg (none, HS256), two kid (one unknown), "
        "two sub (another user; once spelled s\\u0075b), two exp (an expired token made "
        "current, a current one expired), two aud, two role (service_role), app_metadata.role "
        "twice (admin): each once before and once after the genuine member, so whichever "
        "duplicate a parser keeps, one of the pair carries the hostile value"
    )
    assert accepted == []
    assert unclean == []
    assert dup_accepted == []
    assert dup_other == []
    assert attacker.hits == 0
    assert healthy.status == 200


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(recipe=token_attacks())
async def test_generated_token_attacks_are_refused(stack: Stack, recipe: tuple[Any, ...]) -> None:
    assert stack.server is not None
    token = forge(recipe, stack.provider.provider)
    # Over a raw socket: aiohttp will not send control characters, a hostile client will.
    raw = token.encode("utf-8").replace(b"\r", b"").replace(b"\n", b"")
    answer = await exchange(
        stack.server.port,
        b"GET /api/v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer " + raw + b"\r\n\r\n",
    )
    assert clean(answer), (recipe, answer.status, answer.head[:200], answer.body[:200])
    assert answer.status is None or 400 <= answer.status < 500
