"""OIDC bearer tokens against a real local provider (tests.jwks): keys, caching, refresh, attacks."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from relay.errors import Unauthorized
from relay.security.oidc import OidcIdentity, OidcVerifier
from relay.security.tokens import GENERIC_DETAIL, TokenError, unverified_issuer
from tests.jwks import OidcProvider, b64url, build_jwt, hmac_signer, jwk_to_pem


class Clock:
    """Wall time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def verifier(oidc_provider: OidcProvider, clock: Clock) -> AsyncIterator[OidcVerifier]:
    """A verifier for the provider, found by discovery, with the test's clock and a 30 s refresh limit."""
    v = OidcVerifier(oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=None, clock=clock)
    yield v
    await v.aclose()


async def _refused(verifier: OidcVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        await verifier.verify(token)
    exc = info.value
    assert isinstance(exc, Unauthorized)
    assert exc.detail == GENERIC_DETAIL
    assert exc.code == "invalid_token"
    return exc


# --------------------------------------------------------------------------------------------------
# Valid tokens


async def test_valid_rsa_token_verifies(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """An RS256 token from the issuer's RSA key gives the issuer, subject and verified email."""
    identity = await verifier.verify(oidc_provider.mint(key="rsa"))
    assert identity == OidcIdentity(oidc_provider.issuer, "oidc-user-1", "learner@example.test", True)


async def test_valid_ec_token_verifies(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """An ES256 token from the issuer's P-256 key verifies."""
    identity = await verifier.verify(oidc_provider.mint(key="ec", claims={"sub": "ec-user"}))
    assert identity.subject == "ec-user"


@pytest.mark.parametrize(
    ("key", "alg"),
    [("rsa", "RS256"), ("rsa", "RS384"), ("rsa", "RS512"), ("rsa", "PS256"), ("rsa", "PS384"),
     ("rsa", "PS512"), ("ec", "ES256")],
)  # fmt: skip
async def test_every_supported_algorithm_verifies(
    oidc_provider: OidcProvider, verifier: OidcVerifier, key: Any, alg: str
) -> None:
    """RS256/384/512, PS256/384/512 and ES256 tokens verify against a JWK without an alg member."""
    oidc_provider.jwk_alg[oidc_provider.current[key].kid] = None
    identity = await verifier.verify(oidc_provider.mint(key=key, alg=alg))
    assert identity.issuer == oidc_provider.issuer


async def test_audience_may_be_one_of_several(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """An aud list that contains the configured audience is accepted."""
    token = oidc_provider.mint(claims={"aud": ["another-api", oidc_provider.audience]})
    assert (await verifier.verify(token)).subject == "oidc-user-1"


async def test_without_configured_audience_aud_is_optional(oidc_provider: OidcProvider) -> None:
    """With no audience configured, tokens with or without aud verify."""
    verifier = OidcVerifier(oidc_provider.issuer, audience=None, jwks_url=oidc_provider.jwks_url)
    try:
        await verifier.verify(oidc_provider.mint(claims={"aud": None}))
        await verifier.verify(oidc_provider.mint(claims={"aud": "anything"}))
    finally:
        await verifier.aclose()


async def test_email_is_flagged_unverified_unless_the_token_says_so(
    oidc_provider: OidcProvider, verifier: OidcVerifier
) -> None:
    """email_verified is True only when the token says true; a missing email is None."""
    unverified = await verifier.verify(oidc_provider.mint(claims={"email_verified": False}))
    assert (unverified.email, unverified.email_verified) == ("learner@example.test", False)
    stringly = await verifier.verify(oidc_provider.mint(claims={"email_verified": "true"}))
    assert stringly.email_verified is False
    none = await verifier.verify(oidc_provider.mint(claims={"email": None, "email_verified": None}))
    assert (none.email, none.email_verified) == (None, False)


async def test_unverified_issuer_routes_oidc_tokens(
    oidc_provider: OidcProvider, verifier: OidcVerifier
) -> None:
    """unverified_issuer of a provider token is the configured issuer (how principals routes it)."""
    assert unverified_issuer(oidc_provider.mint()) == verifier.issuer == oidc_provider.issuer


# --------------------------------------------------------------------------------------------------
# Finding and caching keys


async def test_discovery_finds_the_jwks(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """Without jwks_url the JWKS is found through the discovery document, once, then cached."""
    for _ in range(3):
        await verifier.verify(oidc_provider.mint())
        await verifier.verify(oidc_provider.mint(key="ec"))
    assert (oidc_provider.discovery_fetches, oidc_provider.jwks_fetches) == (1, 1)


async def test_explicit_jwks_url_skips_discovery(oidc_provider: OidcProvider) -> None:
    """With jwks_url set the discovery document is never fetched."""
    verifier = OidcVerifier(
        oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=oidc_provider.jwks_url
    )
    try:
        await verifier.verify(oidc_provider.mint())
    finally:
        await verifier.aclose()
    assert (oidc_provider.discovery_fetches, oidc_provider.jwks_fetches) == (0, 1)


async def test_discovery_for_another_issuer_is_refused(
    oidc_provider: OidcProvider, verifier: OidcVerifier
) -> None:
    """A discovery document naming another issuer is not trusted for keys."""
    oidc_provider.discovery_issuer = "https://evil.example"
    exc = await _refused(verifier, oidc_provider.mint())
    assert exc.reason == "jwks_unavailable"
    assert oidc_provider.jwks_fetches == 0


async def test_rotation_is_picked_up_on_an_unknown_kid(
    oidc_provider: OidcProvider, verifier: OidcVerifier, clock: Clock
) -> None:
    """After the IdP rotates, a token with a new kid refreshes the JWKS and verifies; the old kid is gone."""
    old = oidc_provider.mint()
    await verifier.verify(old)
    oidc_provider.rotate()
    clock.advance(31)
    await verifier.verify(oidc_provider.mint())
    assert oidc_provider.jwks_fetches == 2
    clock.advance(31)
    assert (await _refused(verifier, old)).reason == "kid"


async def test_unknown_kid_right_after_a_fetch_does_not_refetch(
    oidc_provider: OidcProvider, verifier: OidcVerifier, clock: Clock
) -> None:
    """Within refresh_min_interval_s of the last fetch an unknown kid is refused without a fetch."""
    await verifier.verify(oidc_provider.mint())
    oidc_provider.rotate(keep_old=True)
    clock.advance(29)
    assert (await _refused(verifier, oidc_provider.mint())).reason == "kid"
    assert oidc_provider.jwks_fetches == 1
    clock.advance(2)
    await verifier.verify(oidc_provider.mint())
    assert oidc_provider.jwks_fetches == 2


async def test_random_kids_cannot_make_us_hammer_the_idp(
    oidc_provider: OidcProvider, verifier: OidcVerifier, clock: Clock
) -> None:
    """A spray of random kids causes one JWKS fetch per refresh interval, no more."""
    for _ in range(50):
        token = oidc_provider.mint(headers={"kid": secrets.token_hex(8)})
        assert (await _refused(verifier, token)).reason == "kid"
    assert oidc_provider.jwks_fetches == 1
    clock.advance(31)
    for _ in range(50):
        await _refused(verifier, oidc_provider.mint(headers={"kid": secrets.token_hex(8)}))
    assert oidc_provider.jwks_fetches == 2
    await verifier.verify(oidc_provider.mint())  # the real keys were loaded all along
    assert oidc_provider.jwks_fetches == 2


async def test_concurrent_first_verifications_share_one_fetch(
    oidc_provider: OidcProvider, verifier: OidcVerifier
) -> None:
    """Many verifications racing on an empty cache cause exactly one discovery and one JWKS fetch."""
    oidc_provider.jwks_delay_s = 0.2
    tokens = [oidc_provider.mint(key="rsa" if i % 2 else "ec") for i in range(20)]
    identities = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert len(identities) == 20
    assert (oidc_provider.discovery_fetches, oidc_provider.jwks_fetches) == (1, 1)


async def test_concurrent_unknown_kid_after_rotation_shares_one_fetch(
    oidc_provider: OidcProvider, verifier: OidcVerifier, clock: Clock
) -> None:
    """Concurrent verifications of a token with a new kid cause exactly one refresh, and all succeed."""
    await verifier.verify(oidc_provider.mint())
    oidc_provider.rotate()
    clock.advance(31)
    oidc_provider.jwks_delay_s = 0.2
    token = oidc_provider.mint()
    identities = await asyncio.gather(*(verifier.verify(token) for _ in range(25)))
    assert {i.subject for i in identities} == {"oidc-user-1"}
    assert oidc_provider.jwks_fetches == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(
    oidc_provider: OidcProvider, verifier: OidcVerifier
) -> None:
    """A verification cancelled while the JWKS loads leaves the fetch to finish for the others."""
    oidc_provider.jwks_delay_s = 0.2
    token = oidc_provider.mint()
    first = asyncio.create_task(verifier.verify(token))
    second = asyncio.create_task(verifier.verify(token))
    await asyncio.sleep(0.05)
    first.cancel()
    assert (await second).subject == "oidc-user-1"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert oidc_provider.jwks_fetches == 1


async def test_old_keys_are_refreshed_in_the_background(oidc_provider: OidcProvider, clock: Clock) -> None:
    """Keys older than max_key_age_s stay usable while a background refresh drops withdrawn ones."""
    verifier = OidcVerifier(
        oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=oidc_provider.jwks_url,
        max_key_age_s=600, clock=clock,
    )  # fmt: skip
    try:
        old = oidc_provider.mint(claims={"exp": int(time.time()) + 3600})
        await verifier.verify(old)
        oidc_provider.rotate()  # the IdP withdraws the old key
        clock.advance(601)
        await verifier.verify(old)  # still cached: accepted while the refresh runs
        deadline = time.monotonic() + 5
        while True:  # the background refresh lands: the withdrawn key stops working
            try:
                await verifier.verify(old)
            except TokenError as exc:
                assert exc.reason == "kid"
                break
            assert time.monotonic() < deadline, "the background refresh never replaced the keys"
            await asyncio.sleep(0.01)
        assert oidc_provider.jwks_fetches == 2
        await verifier.verify(oidc_provider.mint(claims={"exp": int(time.time()) + 3600}))
    finally:
        await verifier.aclose()


async def test_unusable_jwks_entries_are_skipped(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """Malformed, symmetric, encryption and unknown-type JWKs are ignored; the good keys still work."""
    oidc_provider.extra_jwks = [
        {"kid": "short-rsa", "kty": "RSA", "n": b64url(b"\x01" * 64), "e": "AQAB"},
        {
            "kid": "off-curve",
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(b"\x01" * 32),
            "y": b64url(b"\x02" * 32),
        },
        {"kid": "okp", "kty": "OKP", "crv": "Ed25519", "x": b64url(b"\x00" * 32)},
        {**oidc_provider.current["rsa"].jwk(), "kid": "enc", "use": "enc"},
        {"kid": "sym", "kty": "oct", "k": b64url(b"s" * 32)},
        "not an object",
    ]
    await verifier.verify(oidc_provider.mint())
    await verifier.verify(oidc_provider.mint(key="ec"))
    enc = oidc_provider.mint(headers={"kid": "enc"})  # signed by the right key, but the JWK is for encryption
    assert (await _refused(verifier, enc)).reason == "kid"


# --------------------------------------------------------------------------------------------------
# Attacks and bad tokens


async def test_hs256_signed_with_the_public_key_pem_is_refused(
    oidc_provider: OidcProvider, verifier: OidcVerifier
) -> None:
    """The classic confusion: HS256 keyed with the PEM text of the JWKS's RSA key is refused."""
    await verifier.verify(oidc_provider.mint())  # the keys are cached: the attack gets every chance
    async with aiohttp.ClientSession() as http, http.get(oidc_provider.jwks_url) as resp:
        jwk = next(k for k in (await resp.json(content_type=None))["keys"] if k["kty"] == "RSA")
    for pem in (jwk_to_pem(jwk), oidc_provider.public_pem("rsa")):
        for alg in ("HS256", "HS384", "HS512"):
            token = oidc_provider.mint(alg=alg, signer=hmac_signer(pem, alg))
            assert (await _refused(verifier, token)).reason == "alg"


async def test_hs256_with_a_symmetric_key_from_the_jwks_is_refused(
    oidc_provider: OidcProvider, verifier: OidcVerifier
) -> None:
    """Even an oct key published in the JWKS cannot verify an HS256 token."""
    secret = b"s" * 32
    oidc_provider.extra_jwks = [{"kid": "sym", "kty": "oct", "k": b64url(secret), "alg": "HS256"}]
    token = oidc_provider.mint(alg="HS256", headers={"kid": "sym"}, signer=hmac_signer(secret))
    assert (await _refused(verifier, token)).reason == "alg"


async def test_alg_must_match_the_key_type(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """An ES256 header on an RSA kid, RS256/PS256 on an EC kid, or ES384 on a P-256 key is refused."""
    rsa_kid = oidc_provider.current["rsa"].kid
    ec_kid = oidc_provider.current["ec"].kid
    cases = [
        oidc_provider.mint(key="ec", headers={"kid": rsa_kid}),  # ES256, signed by the EC key
        oidc_provider.mint(key="rsa", headers={"kid": ec_kid}),  # RS256, signed by the RSA key
        oidc_provider.mint(key="rsa", alg="PS256", headers={"kid": ec_kid}),
        oidc_provider.mint(key="ec", alg="ES384"),  # P-256 key, SHA-384: the wrong curve for ES384
    ]
    for token in cases:
        assert (await _refused(verifier, token)).reason == "kty"


async def test_alg_must_match_the_jwk_alg(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """A key published for RS256 does not verify an RS512 or PS256 token, even one it signed."""
    for alg in ("RS512", "PS256"):
        assert (await _refused(verifier, oidc_provider.mint(alg=alg))).reason == "kty"


def _expired(p: OidcProvider) -> str:
    now = int(time.time())
    return p.mint(claims={"iat": now - 600, "exp": now - 31})


BAD_TOKENS = [
    ("iss-wrong", lambda p: p.mint(claims={"iss": "https://evil.example"}), "iss"),
    ("iss-trailing-slash", lambda p: p.mint(claims={"iss": p.issuer + "/"}), "iss"),
    ("iss-missing", lambda p: p.mint(claims={"iss": None}), "iss"),
    ("aud-wrong", lambda p: p.mint(claims={"aud": "another-api"}), "aud"),
    ("aud-list-without-us", lambda p: p.mint(claims={"aud": ["a", "b"]}), "aud"),
    ("aud-missing", lambda p: p.mint(claims={"aud": None}), "aud"),
    ("aud-not-a-string", lambda p: p.mint(claims={"aud": 7}), "aud"),
    ("expired", _expired, "exp"),
    ("exp-missing", lambda p: p.mint(claims={"exp": None}), "exp"),
    ("nbf-future", lambda p: p.mint(claims={"nbf": int(time.time()) + 120}), "nbf"),
    ("iat-future", lambda p: p.mint(claims={"iat": int(time.time()) + 120}), "iat"),
    ("sub-missing", lambda p: p.mint(claims={"sub": None}), "sub"),
    ("sub-empty", lambda p: p.mint(claims={"sub": ""}), "sub"),
    ("sub-too-long", lambda p: p.mint(claims={"sub": "s" * 256}), "sub"),
    ("alg-none", lambda p: p.mint(alg="none", signer=lambda data: b""), "alg"),
    ("kid-missing", lambda p: p.mint(headers={"kid": None}), "kid"),
    ("kid-not-a-string", lambda p: p.mint(headers={"kid": 1}), "kid"),
    ("jku-header", lambda p: p.mint(headers={"jku": "https://evil.example/jwks.json"}), "header"),
    ("x5u-header", lambda p: p.mint(headers={"x5u": "https://evil.example/c.pem"}), "header"),
    ("embedded-jwk-header", lambda p: p.mint(headers={"jwk": p.current["rsa"].jwk()}), "header"),
    ("x5c-header", lambda p: p.mint(headers={"x5c": ["MIIB"]}), "header"),
    ("crit-header", lambda p: p.mint(headers={"crit": ["exp"]}), "header"),
    ("typ-header-wrong", lambda p: p.mint(headers={"typ": "JWE"}), "header"),
    ("other-key-same-kid", lambda p: p.mint(signer=p.pool.rsa(99).signer()), "signature"),
    ("signature-stripped", lambda p: p.mint().rsplit(".", 1)[0] + ".", "signature"),
    ("jwe", lambda p: "eyJhbGciOiJSU0EtT0FFUCJ9.AAAA.AAAA.AAAA.AAAA", "format"),
    ("over-8-kib", lambda p: p.mint(claims={"pad": "p" * 7000}), "size"),
    ("garbage", lambda p: "garbage", "format"),
    ("payload-not-json", lambda p: build_jwt(
        {"alg": "RS256", "kid": p.current["rsa"].kid}, b"nope", p.current["rsa"].signer()), "claims"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in BAD_TOKENS], ids=[c[0] for c in BAD_TOKENS])
async def test_bad_tokens_are_refused(
    oidc_provider: OidcProvider, verifier: OidcVerifier, make: Any, reason: str
) -> None:
    """Wrong iss/aud, expired, missing sub/exp, forbidden headers, foreign signatures: generic 401."""
    assert (await _refused(verifier, make(oidc_provider))).reason == reason


async def test_at_jwt_typ_is_accepted(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """RFC 9068 access tokens (typ at+jwt) are accepted like typ JWT."""
    for typ in ("at+jwt", "application/at+jwt", "jwt", None):
        await verifier.verify(oidc_provider.mint(headers={"typ": typ}))


# --------------------------------------------------------------------------------------------------
# An unavailable IdP


async def test_idp_down_fails_quickly(oidc_provider: OidcProvider, clock: Clock) -> None:
    """With the IdP unreachable and nothing cached, verification fails fast with the generic 401."""
    token = oidc_provider.mint()
    verifier = OidcVerifier(oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=None, clock=clock)
    await oidc_provider.stop()
    try:
        started = time.monotonic()
        assert (await _refused(verifier, token)).reason == "jwks_unavailable"
        assert (await _refused(verifier, token)).reason == "jwks_unavailable"  # no new attempt yet
        assert time.monotonic() - started < 2.0
    finally:
        await verifier.aclose()


async def test_idp_errors_fail_generic(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """An IdP answering 503 gives the same generic 401."""
    oidc_provider.failing = True
    assert (await _refused(verifier, oidc_provider.mint())).reason == "jwks_unavailable"


async def test_oversized_jwks_is_refused(oidc_provider: OidcProvider, verifier: OidcVerifier) -> None:
    """A JWKS over 256 KiB is not read, and nothing verifies against it."""
    oidc_provider.extra_jwks = [{"kid": "big", "kty": "RSA", "n": "A" * 300_000, "e": "AQAB"}]
    assert (await _refused(verifier, oidc_provider.mint())).reason == "jwks_unavailable"


async def test_cached_keys_keep_working_while_the_idp_is_down(
    oidc_provider: OidcProvider, verifier: OidcVerifier, clock: Clock
) -> None:
    """Once keys are cached an IdP outage changes nothing for them; unknown kids fail fast."""
    rsa_token, ec_token = oidc_provider.mint(), oidc_provider.mint(key="ec")
    await verifier.verify(rsa_token)
    await oidc_provider.stop()
    started = time.monotonic()
    await verifier.verify(rsa_token)
    await verifier.verify(ec_token)
    unknown = oidc_provider.mint(headers={"kid": "rotated-away"})
    assert (await _refused(verifier, unknown)).reason == "kid"
    clock.advance(31)
    assert (await _refused(verifier, unknown)).reason == "jwks_unavailable"  # tried, and failed
    await verifier.verify(rsa_token)
    assert time.monotonic() - started < 2.0


async def test_stale_keys_survive_a_failed_background_refresh(
    oidc_provider: OidcProvider, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Past max_key_age_s with the IdP failing, the cached keys are still used."""
    caplog.set_level(logging.INFO, logger="relay")
    verifier = OidcVerifier(
        oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=oidc_provider.jwks_url,
        max_key_age_s=60, clock=clock,
    )  # fmt: skip
    try:
        token = oidc_provider.mint()
        await verifier.verify(token)
        oidc_provider.failing = True
        clock.advance(61)
        await verifier.verify(token)  # starts a background refresh, which fails
        deadline = time.monotonic() + 5
        while not any(r.getMessage() == "oidc.jwks_unavailable" for r in caplog.records):
            assert time.monotonic() < deadline, "the background refresh never finished"
            await asyncio.sleep(0.01)
        await verifier.verify(token)
        assert oidc_provider.jwks_fetches == 2
    finally:
        await verifier.aclose()


# --------------------------------------------------------------------------------------------------
# Lifecycle and hygiene


async def test_aclose_is_idempotent_and_keeps_a_borrowed_session(oidc_provider: OidcProvider) -> None:
    """aclose twice is fine; a session passed in stays open; a closed verifier refuses everything."""
    async with aiohttp.ClientSession() as http:
        verifier = OidcVerifier(
            oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=None, session=http
        )
        token = oidc_provider.mint()
        await verifier.verify(token)
        await verifier.aclose()
        await verifier.aclose()
        assert not http.closed
        assert (await _refused(verifier, token)).reason == "closed"


async def test_aclose_during_a_fetch_refuses_the_waiting_verification(oidc_provider: OidcProvider) -> None:
    """A verification waiting on a JWKS fetch that aclose() stops gets a 401, not a CancelledError."""
    oidc_provider.jwks_gate = asyncio.Event()
    verifier = OidcVerifier(
        oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=oidc_provider.jwks_url
    )
    pending = asyncio.create_task(verifier.verify(oidc_provider.mint()))
    await oidc_provider.jwks_requested.wait()
    await verifier.aclose()
    oidc_provider.jwks_gate.set()
    with pytest.raises(TokenError) as info:
        await pending
    assert info.value.reason == "closed"


async def test_aclose_closes_its_own_session(oidc_provider: OidcProvider) -> None:
    """A verifier that created its HTTP session closes it (no 'Unclosed client session' leak)."""
    verifier = OidcVerifier(oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=None)
    await verifier.verify(oidc_provider.mint())
    session = verifier._session
    assert session is not None
    await verifier.aclose()
    assert session.closed


def test_bad_configuration_is_refused() -> None:
    """An empty or non-http(s) issuer or JWKS URL, or an empty audience, is refused at construction."""
    for issuer, jwks_url, audience in (
        ("", None, None),
        ("ftp://idp.example", None, None),
        ("https://idp.example", "file:///etc/jwks.json", None),
        ("https://idp.example", None, ""),
    ):
        with pytest.raises(ValueError):
            OidcVerifier(issuer, audience=audience, jwks_url=jwks_url)


async def test_logs_hold_reason_codes_only(
    oidc_provider: OidcProvider, verifier: OidcVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    """Rejections log kind and reason; no token, subject or email reaches a log record."""
    caplog.set_level(logging.DEBUG, logger="relay")
    good = oidc_provider.mint(claims={"sub": "subject-canary", "email": "canary@example.test"})
    await verifier.verify(good)
    bad = oidc_provider.mint(claims={"sub": "subject-canary", "email": "canary@example.test", "aud": "x"})
    await _refused(verifier, bad)
    rejected = [r for r in caplog.records if r.getMessage() == "token.rejected"]
    assert [(r.kind, r.reason) for r in rejected] == [("oidc", "aud")]  # type: ignore[attr-defined]
    for record in caplog.records:
        dumped = repr(vars(record))
        for canary in ("subject-canary", "canary@example.test", good.split(".")[2], bad.split(".")[2]):
            assert canary not in dumped
