"""Parley's own tokens: round trips, lifetimes, API keys, and the negative token suite.

The negative suite builds its tokens by hand (``tests.jwks``), signed with the service's real key
where the point is a claim or header, so each case is refused by the check it is about (``reason``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from relay.config import Secret
from relay.errors import Unauthorized
from relay.security import tokens
from relay.security.tokens import (
    CLIENT_SECRET_EXPIRED,
    CLIENT_SECRET_INVALID,
    CLIENT_SECRET_USED,
    GENERIC_DETAIL,
    ClientSecretError,
    TokenError,
    TokenService,
    hash_api_key,
    new_api_key,
    unverified_issuer,
)
from tests.jwks import KeyPool, OidcProvider, b64url, build_jwt, hmac_signer, jwk_to_pem

SECRET = Secret("unit-test-signing-key-" + "x" * 32)
KEY = tokens._derive_signing_key(SECRET)  # the HS256 key TokenService signs with
NOW = 1_900_000_000
SESSION = "ses_0001"
USER = "usr_0001"
HS256 = {"alg": "HS256", "typ": "JWT"}


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(clock: Clock) -> TokenService:
    return TokenService(SECRET, clock=clock)


# --------------------------------------------------------------------------------------------------
# Round trips and lifetimes


def test_access_token_round_trip(service: TokenService) -> None:
    """A minted access token verifies to the same user, jti and times."""
    token, claims = service.mint_access(USER)
    assert service.verify_access(token) == claims
    assert claims.user_id == USER
    assert claims.issued_at == datetime.fromtimestamp(NOW, UTC)
    assert claims.expires_at == datetime.fromtimestamp(NOW + 3600, UTC)


def test_access_token_has_exactly_the_documented_header_and_claims(service: TokenService) -> None:
    """The access token's header is {alg: HS256, typ: JWT} and it carries iss/aud/sub/iat/exp/jti/typ."""
    token, claims = service.mint_access(USER)
    header, payload = (json.loads(tokens._b64url_decode(p)) for p in token.split(".")[:2])
    assert header == HS256
    assert payload == {
        "iss": "parley",
        "aud": "parley-api",
        "sub": USER,
        "iat": NOW,
        "exp": NOW + 3600,
        "jti": claims.jti,
        "typ": "access",
    }


def test_client_secret_round_trip(service: TokenService) -> None:
    """A minted client secret verifies for its session, with scope webrtc and a 60 s lifetime."""
    token, claims = service.mint_client_secret(USER, SESSION)
    assert service.verify_client_secret(token, session_id=SESSION) == claims
    assert (claims.user_id, claims.session_id, claims.scope) == (USER, SESSION, "webrtc")
    assert claims.expires_at == datetime.fromtimestamp(NOW + 60, UTC)
    payload = json.loads(tokens._b64url_decode(token.split(".")[1]))
    assert (payload["aud"], payload["typ"], payload["sid"]) == ("parley-webrtc", "client_secret", SESSION)


def test_every_token_gets_a_fresh_jti(service: TokenService) -> None:
    """Two tokens minted in the same second differ in jti (and therefore as strings)."""
    jtis = {service.mint_access(USER)[1].jti for _ in range(50)}
    jtis |= {service.mint_client_secret(USER, SESSION)[1].jti for _ in range(50)}
    assert len(jtis) == 100
    assert all(len(jti) <= 64 for jti in jtis)


def test_configured_ttls_are_used(clock: Clock) -> None:
    """access_ttl_s and client_secret_ttl_s set the tokens' lifetimes."""
    service = TokenService(SECRET, access_ttl_s=120, client_secret_ttl_s=600, clock=clock)
    _, access = service.mint_access(USER)
    _, secret = service.mint_client_secret(USER, SESSION)
    assert (access.expires_at - access.issued_at).total_seconds() == 120
    assert secret.expires_at == datetime.fromtimestamp(NOW + 600, UTC)


@pytest.mark.parametrize("ttl", [0, -1, 601, 3600], ids=lambda t: f"ttl={t}")
def test_client_secret_ttl_is_capped_at_ten_minutes(ttl: int) -> None:
    """A client secret lifetime outside 1..600 s is refused at construction."""
    with pytest.raises(ValueError, match="client_secret_ttl_s"):
        TokenService(SECRET, client_secret_ttl_s=ttl)


def test_bad_construction_is_refused() -> None:
    """An empty key, an empty issuer or a non-positive access lifetime are refused."""
    for kwargs in ({"signing_key": Secret("")}, {"issuer": ""}, {"access_ttl_s": 0}):
        with pytest.raises(ValueError):
            TokenService(**{"signing_key": SECRET, **kwargs})  # type: ignore[arg-type]


def test_minting_needs_ids(service: TokenService) -> None:
    """Minting without a user or session id is a programming error (ValueError)."""
    with pytest.raises(ValueError):
        service.mint_access("")
    with pytest.raises(ValueError):
        service.mint_client_secret(USER, "")


def test_expiry_allows_thirty_seconds_of_skew(service: TokenService, clock: Clock) -> None:
    """A token is accepted up to 30 s past exp (clock skew) and refused from then on."""
    token, _ = service.mint_access(USER)
    clock.now = NOW + 3600 + 29
    service.verify_access(token)
    clock.now = NOW + 3600 + 30
    with pytest.raises(TokenError) as info:
        service.verify_access(token)
    assert info.value.reason == "exp"


def test_iat_and_nbf_allow_thirty_seconds_of_skew(service: TokenService) -> None:
    """iat and nbf up to 30 s in the future are accepted (a peer's clock running ahead)."""
    claims = _access(iat=NOW + 30, nbf=NOW + 30)
    service.verify_access(_sign(claims))


def test_expired_client_secret_says_expired(service: TokenService, clock: Clock) -> None:
    """A client secret used after its lifetime gets client_secret_expired (still the generic detail)."""
    token, _ = service.mint_client_secret(USER, SESSION)
    clock.now = NOW + 60 + 30
    with pytest.raises(ClientSecretError) as info:
        service.verify_client_secret(token, session_id=SESSION)
    assert info.value.code == CLIENT_SECRET_EXPIRED
    assert info.value.detail == GENERIC_DETAIL


def test_another_services_tokens_are_refused(service: TokenService) -> None:
    """A token from a service with another key, or another issuer name, is refused."""
    other_key, _ = TokenService(Secret("another-signing-key-" + "y" * 32), clock=lambda: NOW).mint_access(
        USER
    )
    other_iss, _ = TokenService(SECRET, issuer="elsewhere", clock=lambda: NOW).mint_access(USER)
    for token, reason in ((other_key, "signature"), (other_iss, "iss")):
        with pytest.raises(TokenError) as info:
            service.verify_access(token)
        assert info.value.reason == reason


def test_client_secret_used_code_is_defined() -> None:
    """The redeem step's code client_secret_used exists here, as a ClientSecretError code."""
    exc = ClientSecretError("replay", code=CLIENT_SECRET_USED)
    assert (exc.code, exc.reason, exc.detail) == ("client_secret_used", "replay", GENERIC_DETAIL)
    assert isinstance(exc, Unauthorized)


def test_token_error_never_shows_its_reason() -> None:
    """str() and repr() of a TokenError carry only the generic text, never the reason code."""
    exc = TokenError("signature")
    assert str(exc) == GENERIC_DETAIL
    assert "signature" not in repr(exc)
    assert exc.code == "invalid_token"


def test_service_repr_hides_the_key() -> None:
    """The signing key never appears in the service's repr."""
    assert SECRET.reveal() not in repr(TokenService(SECRET))


# --------------------------------------------------------------------------------------------------
# The negative token suite


def _claims(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {**base, **overrides}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP: Any = object()


def _access(**overrides: Any) -> dict[str, Any]:
    base = {
        "iss": "parley",
        "aud": "parley-api",
        "sub": USER,
        "iat": NOW,
        "exp": NOW + 3600,
        "jti": "jti-0001",
        "typ": "access",
    }
    return _claims(base, overrides)


def _secret(**overrides: Any) -> dict[str, Any]:
    base = {
        "iss": "parley",
        "aud": "parley-webrtc",
        "sub": USER,
        "iat": NOW,
        "exp": NOW + 60,
        "jti": "jti-0002",
        "typ": "client_secret",
        "sid": SESSION,
        "scope": "webrtc",
    }
    return _claims(base, overrides)


def _sign(
    claims: dict[str, Any] | bytes, header: dict[str, Any] | bytes | None = None, key: bytes = KEY
) -> str:
    header = HS256 if header is None else header
    alg = header.get("alg", "HS256") if isinstance(header, dict) else "HS256"
    return build_jwt(header, claims, hmac_signer(key, alg if alg in ("HS256", "HS384", "HS512") else "HS256"))


def _with_header(**extra: Any) -> str:
    return _sign(_access(), {**HS256, **extra})


def _with_header_case(name: str, value: Any, ctx: Ctx) -> str:
    return _with_header(**{name: value})


def _tamper_payload(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(tokens._b64url_decode(payload))
    claims["sub"] = "usr_admin"
    return ".".join([header, b64url(json.dumps(claims).encode()), signature])


def _flip_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    raw = bytearray(tokens._b64url_decode(signature))
    raw[0] ^= 0x01
    return ".".join([header, payload, b64url(bytes(raw))])


def _non_canonical_signature(token: str) -> str:
    # 32 bytes -> 43 chars with 2 unused trailing bits; setting one spells the same bytes differently.
    header, payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet[alphabet.index(signature[-1]) ^ 0x01]
    return ".".join([header, payload, signature[:-1] + last])


@dataclass(frozen=True)
class Ctx:
    service: TokenService
    pool: KeyPool


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Ctx], str]
    reason: str
    kind: str = "access"  # or "client_secret"
    code: str | None = None  # default: invalid_token / client_secret_invalid


def _rsa_pem_hs256(ctx: Ctx) -> str:
    """HS256 'signed' with the PEM text of the OIDC provider's RSA public key."""
    pem = ctx.pool.rsa(0).public_pem()
    return build_jwt(HS256, _access(), hmac_signer(pem))


CASES = [
    # alg games
    Case("alg-none-unsigned", lambda c: build_jwt({"alg": "none", "typ": "JWT"}, _access()), "alg"),
    Case(
        "alg-none-with-signature",
        lambda c: build_jwt({"alg": "none", "typ": "JWT"}, _access(), hmac_signer(KEY)),
        "alg",
    ),
    Case("alg-None-capitalised", lambda c: build_jwt({"alg": "None"}, _access()), "alg"),
    Case("alg-hs384", lambda c: _sign(_access(), {"alg": "HS384", "typ": "JWT"}), "alg"),
    Case("alg-hs512", lambda c: _sign(_access(), {"alg": "HS512", "typ": "JWT"}), "alg"),
    Case("alg-lowercase-hs256", lambda c: _sign(_access(), {"alg": "hs256", "typ": "JWT"}), "alg"),
    Case("alg-missing", lambda c: _sign(_access(), {"typ": "JWT"}), "alg"),
    Case("alg-as-list", lambda c: _sign(_access(), {"alg": ["HS256"], "typ": "JWT"}), "alg"),
    Case("rs256-label-hs-signature", lambda c: _sign(_access(), {"alg": "RS256", "typ": "JWT"}), "alg"),
    Case("es256-label-hs-signature", lambda c: _sign(_access(), {"alg": "ES256", "typ": "JWT"}), "alg"),
    Case("hs256-signed-with-rsa-public-pem", _rsa_pem_hs256, "signature"),
    # signatures
    Case("signed-with-another-key", lambda c: _sign(_access(), key=b"k" * 32), "signature"),
    Case("signed-with-the-raw-secret", lambda c: _sign(_access(), key=SECRET.reveal().encode()), "signature"),
    Case("tampered-payload", lambda c: _tamper_payload(c.service.mint_access(USER)[0]), "signature"),
    Case("tampered-signature", lambda c: _flip_signature(c.service.mint_access(USER)[0]), "signature"),
    Case("signature-stripped", lambda c: c.service.mint_access(USER)[0].rsplit(".", 1)[0] + ".", "signature"),
    # required claims and their values
    Case("exp-missing", lambda c: _sign(_access(exp=_DROP)), "exp"),
    Case("exp-past", lambda c: _sign(_access(iat=NOW - 4000, exp=NOW - 31)), "exp"),
    Case("exp-as-string", lambda c: _sign(_access(exp=str(NOW + 3600))), "exp"),
    Case("exp-as-bool", lambda c: _sign(_access(exp=True)), "exp"),
    Case("exp-nan", lambda c: _sign(b'{"exp":NaN}'), "claims"),
    Case("nbf-future", lambda c: _sign(_access(nbf=NOW + 31)), "nbf"),
    Case("iat-future", lambda c: _sign(_access(iat=NOW + 31)), "iat"),
    Case("iat-missing", lambda c: _sign(_access(iat=_DROP)), "iat"),
    Case("aud-wrong", lambda c: _sign(_access(aud="someone-else")), "aud"),
    Case("aud-missing", lambda c: _sign(_access(aud=_DROP)), "aud"),
    Case("aud-as-list", lambda c: _sign(_access(aud=["parley-api"])), "aud"),
    Case("iss-wrong", lambda c: _sign(_access(iss="https://evil.example")), "iss"),
    Case("iss-missing", lambda c: _sign(_access(iss=_DROP)), "iss"),
    Case("sub-missing", lambda c: _sign(_access(sub=_DROP)), "sub"),
    Case("sub-empty", lambda c: _sign(_access(sub="")), "sub"),
    Case("sub-not-a-string", lambda c: _sign(_access(sub=42)), "sub"),
    Case("jti-missing", lambda c: _sign(_access(jti=_DROP)), "jti"),
    Case("jti-too-long", lambda c: _sign(_access(jti="j" * 65)), "jti"),
    Case("typ-missing", lambda c: _sign(_access(typ=_DROP)), "typ"),
    Case("typ-wrong", lambda c: _sign(_access(typ="refresh")), "typ"),
    # one kind of token where the other is expected
    Case("client-secret-as-access-token", lambda c: c.service.mint_client_secret(USER, SESSION)[0], "aud"),
    Case("access-token-as-client-secret", lambda c: c.service.mint_access(USER)[0], "aud", "client_secret"),
    Case(
        "access-typ-with-client-secret-aud",
        lambda c: _sign(_secret(typ="access")),
        "typ",
        "client_secret",
    ),
    Case(
        "client-secret-typ-with-access-aud",
        lambda c: _sign(_access(typ="client_secret", sid=SESSION, scope="webrtc")),
        "typ",
    ),
    # client secrets
    Case(
        "client-secret-for-another-session",
        lambda c: c.service.mint_client_secret(USER, "ses_other")[0],
        "sid",
        "client_secret",
    ),
    Case("client-secret-sid-missing", lambda c: _sign(_secret(sid=_DROP)), "sid", "client_secret"),
    Case("client-secret-scope-wrong", lambda c: _sign(_secret(scope="admin")), "scope", "client_secret"),
    Case("client-secret-scope-missing", lambda c: _sign(_secret(scope=_DROP)), "scope", "client_secret"),
    Case(
        "client-secret-expired",
        lambda c: _sign(_secret(iat=NOW - 120, exp=NOW - 31)),
        "exp",
        "client_secret",
        CLIENT_SECRET_EXPIRED,
    ),
    Case(
        "client-secret-expired-for-another-session",
        lambda c: _sign(_secret(iat=NOW - 120, exp=NOW - 31, sid="ses_other")),
        "sid",
        "client_secret",
    ),
    # headers
    *(
        Case(f"header-{name}", functools.partial(_with_header_case, name, value), "header")
        for name, value in (
            ("jku", "https://evil.example/jwks.json"),
            ("x5u", "https://evil.example/cert.pem"),
            ("jwk", {"kty": "oct", "k": b64url(b"k" * 32)}),
            ("x5c", ["MIIB..."]),
            ("crit", ["exp"]),
            ("zip", "DEF"),
            ("enc", "A256GCM"),
            ("b64", False),
            ("cty", "JWT"),
            ("kid", "parley-1"),
            ("x-unknown", 1),
        )
    ),
    Case("header-typ-not-jwt", lambda c: _with_header(typ="JWE"), "header"),
    Case("header-duplicate-alg", lambda c: _sign(_access(), b'{"alg":"none","alg":"HS256"}'), "header"),
    Case("header-not-json", lambda c: _sign(_access(), b"not json"), "header"),
    Case("header-json-array", lambda c: _sign(_access(), b'["HS256"]'), "header"),
    Case("header-not-utf8", lambda c: _sign(_access(), b'{"alg":"HS256","typ":"\xff"}'), "header"),
    # payloads that are signed but not a claims object
    Case("payload-not-json", lambda c: _sign(b"hello"), "claims"),
    Case("payload-json-array", lambda c: _sign(b'["sub"]'), "claims"),
    Case(
        "payload-duplicate-sub",
        lambda c: _sign(json.dumps(_access()).replace('"sub"', '"sub": "usr_admin", "sub"').encode()),
        "claims",
    ),
    Case("payload-deeply-nested", lambda c: _sign(b"[" * 2500 + b"]" * 2500), "claims"),
    # shape and encoding
    Case("empty-string", lambda c: "", "format"),
    Case("garbage", lambda c: "not a token at all", "format"),
    Case("not-a-string", lambda c: b"eyJ.eyJ.sig", "format"),  # type: ignore[return-value,arg-type]
    Case("two-segments", lambda c: c.service.mint_access(USER)[0].rsplit(".", 1)[0], "format"),
    Case("four-segments", lambda c: c.service.mint_access(USER)[0] + ".AAAA", "format"),
    Case(
        "jwe-five-segments",
        lambda c: ".".join(
            [b64url(b'{"alg":"dir","enc":"A256GCM"}'), "", "AAAAAAAAAAAAAAAA", "AAAA", "AAAA"]
        ),
        "format",
    ),
    Case(
        "non-base64-segment", lambda c: "eyJ@@@." + c.service.mint_access(USER)[0].split(".", 1)[1], "format"
    ),
    Case("base64-padding", lambda c: c.service.mint_access(USER)[0] + "=", "format"),
    Case(
        "non-canonical-base64", lambda c: _non_canonical_signature(c.service.mint_access(USER)[0]), "format"
    ),
    Case("surrounding-whitespace", lambda c: " " + c.service.mint_access(USER)[0] + "\n", "format"),
    Case("non-ascii", lambda c: c.service.mint_access(USER)[0] + "é", "format"),
    Case("over-8-kib", lambda c: _sign(_access(pad="p" * 6200)), "size"),
]


@pytest.fixture
def ctx(service: TokenService, oidc_keys: KeyPool) -> Ctx:
    return Ctx(service, oidc_keys)


def test_negative_suite_is_large_and_uniquely_named() -> None:
    """The negative suite has at least 25 cases, each with its own readable id."""
    ids = [case.id for case in CASES]
    assert len(ids) >= 25
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_rejected(case: Case, ctx: Ctx, caplog: pytest.LogCaptureFixture) -> None:
    """Every forged, malformed or misused token is a 401 with the generic detail and a reason code."""
    token = case.make(ctx)
    caplog.set_level(logging.DEBUG, logger="relay")
    with pytest.raises(TokenError) as info:
        if case.kind == "access":
            ctx.service.verify_access(token)
        else:
            ctx.service.verify_client_secret(token, session_id=SESSION)
    exc = info.value
    assert isinstance(exc, Unauthorized)
    assert exc.detail == GENERIC_DETAIL
    assert str(exc) == GENERIC_DETAIL
    assert exc.reason == case.reason
    if case.kind == "client_secret":
        assert isinstance(exc, ClientSecretError)
        assert exc.code == (case.code or CLIENT_SECRET_INVALID)
    else:
        assert exc.code == (case.code or "invalid_token")
    # Logged as a reason code only: never the token or any part of it.
    records = [r for r in caplog.records if r.getMessage() == "token.rejected"]
    assert [(r.kind, r.reason) for r in records] == [(case.kind, case.reason)]  # type: ignore[attr-defined]
    if isinstance(token, str) and len(token) > 8:
        for record in caplog.records:
            dumped = repr(vars(record))
            assert all(part not in dumped for part in token.split(".") if len(part) > 8)


async def test_hs256_token_keyed_with_a_pem_from_the_live_jwks_is_refused(
    oidc_provider: OidcProvider,
) -> None:
    """An HS256 token keyed with the PEM of an RSA key fetched from the OIDC JWKS is refused."""
    async with aiohttp.ClientSession() as http, http.get(oidc_provider.jwks_url) as resp:
        jwks = await resp.json(content_type=None)
    service = TokenService(SECRET, clock=lambda: NOW)
    rsa_jwks = [k for k in jwks["keys"] if k["kty"] == "RSA"]
    assert rsa_jwks
    for jwk in rsa_jwks:
        for pem in (jwk_to_pem(jwk), jwk_to_pem(jwk).strip()):
            token = build_jwt(HS256, _access(), hmac_signer(pem))
            with pytest.raises(TokenError) as info:
                service.verify_access(token)
            assert info.value.reason == "signature"


# --------------------------------------------------------------------------------------------------
# Routing helper and API keys


def test_unverified_issuer_reads_iss_without_trusting_it(service: TokenService) -> None:
    """unverified_issuer returns iss of any JWT-shaped token, signed or not, and None otherwise."""
    assert unverified_issuer(service.mint_access(USER)[0]) == "parley"
    assert (
        unverified_issuer(build_jwt({"alg": "none"}, {"iss": "https://idp.example"})) == "https://idp.example"
    )
    for bad in (
        "",
        "garbage",
        "a.b",
        "a.b.c.d.e",
        build_jwt({"alg": "none"}, {"iss": 42}),
        build_jwt({"alg": "none"}, {"sub": "x"}),
        build_jwt({"alg": "none"}, b"not json"),
        build_jwt(b"[]", {"iss": "parley"}),
        build_jwt({"alg": "none"}, {"iss": "parley", "pad": "p" * 9000}),
    ):
        assert unverified_issuer(bad) is None


def test_new_api_key_format() -> None:
    """API keys are pk_ plus 40 URL-safe characters, and never repeat."""
    keys = {new_api_key() for _ in range(200)}
    assert len(keys) == 200
    assert all(re.fullmatch(r"pk_[A-Za-z0-9_-]{40}", key) for key in keys)


def test_hash_api_key_is_sha256_hex() -> None:
    """An API key is stored as the SHA-256 hex digest of its text."""
    key = new_api_key()
    assert hash_api_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert hash_api_key(key) == hash_api_key(key)
    assert hash_api_key(key) != hash_api_key(new_api_key())
