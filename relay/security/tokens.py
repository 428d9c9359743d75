"""Parley's own tokens (HS256 JWTs), the strict JWS gate shared with OIDC, and API-key helpers.

Parley mints three kinds of token, each with its own ``aud`` and ``typ`` so that none can stand in
for another: access tokens, WebRTC client secrets, and publication confirmations.

This is the only module in Parley that imports python-jose. python-jose has a history of
algorithm-confusion and resource-exhaustion bugs, so no token reaches it before :func:`parse_compact`
has checked it: at most 8 KiB; exactly three canonical base64url segments (a JWE has five); a
header that is a JSON object without duplicate members, whose ``alg`` is exactly one of the pinned
algorithms and which carries none of the headers that let a token choose its own key or change how
it is processed (``jku``, ``x5u``, ``jwk``, ``x5c``, ``crit``, ``zip``, ``enc``, ``b64``, ``cty``).
python-jose then only checks the signature, with a key object built here for exactly one algorithm;
every claim, and every time check (against the injected clock), is done here.

Rejections raise :class:`TokenError`: a 401 whose client-facing ``detail`` is the same generic text
whatever failed. The failed check is kept in ``reason`` for logs and tests, never sent to clients.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jose import jws
from jose.backends.cryptography_backend import CryptographyECKey, CryptographyHMACKey, CryptographyRSAKey

from relay.config import Secret
from relay.errors import Unauthorized

__all__ = [
    "ACCESS_AUDIENCE",
    "ASYMMETRIC_ALGORITHMS",
    "CLIENT_SECRET_AUDIENCE",
    "CLIENT_SECRET_EXPIRED",
    "CLIENT_SECRET_INVALID",
    "CLIENT_SECRET_SCOPE",
    "CLIENT_SECRET_USED",
    "GENERIC_DETAIL",
    "LEEWAY_S",
    "MAX_CLIENT_SECRET_TTL_S",
    "MAX_TOKEN_BYTES",
    "PUBLICATION_CONFIRMATION_TTL_S",
    "PUBLICATION_SCOPE",
    "AccessClaims",
    "ClientSecretClaims",
    "ClientSecretError",
    "ConfirmationClaims",
    "ParsedJws",
    "PublicJwk",
    "TokenError",
    "TokenService",
    "check_times",
    "decode_claims",
    "hash_api_key",
    "new_api_key",
    "parse_compact",
    "unverified_issuer",
    "verify_with_jwk",
]

log = logging.getLogger("relay.security.tokens")

GENERIC_DETAIL: Final = "The token is invalid or expired."
MAX_TOKEN_BYTES: Final = 8 * 1024
LEEWAY_S: Final = 30
MAX_CLIENT_SECRET_TTL_S: Final = 600

PARLEY_ALGORITHM: Final = "HS256"
ACCESS_AUDIENCE: Final = "parley-api"
ACCESS_TYP: Final = "access"
CLIENT_SECRET_AUDIENCE: Final = "parley-webrtc"  # noqa: S105 (an audience name, not a secret)
CLIENT_SECRET_TYP: Final = "client_secret"  # noqa: S105
CLIENT_SECRET_SCOPE: Final = "webrtc"  # noqa: S105

PUBLICATION_AUDIENCE: Final = "parley-publication"
PUBLICATION_TYP: Final = "publication_confirmation"
PUBLICATION_SCOPE: Final = "publication"
#: Lifetime of a publication confirmation token. A module constant for now (no setting yet): long
#: enough to read a confirmation dialog, short enough that a forgotten token is soon worthless.
PUBLICATION_CONFIRMATION_TTL_S: Final = 300

CLIENT_SECRET_INVALID: Final = "client_secret_invalid"  # noqa: S105 (API error codes)
CLIENT_SECRET_EXPIRED: Final = "client_secret_expired"  # noqa: S105
CLIENT_SECRET_USED: Final = "client_secret_used"  # noqa: S105

#: Asymmetric signature algorithms accepted from an OIDC issuer. PS* are verified with
#: ``cryptography`` directly because python-jose 3.5.0 does not implement them.
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)

#: Headers that let a token pick its own key, demand extensions, or change how it is processed.
FORBIDDEN_HEADERS: Final = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "zip", "enc", "b64", "cty"})
_PARLEY_HEADERS: Final = frozenset({"alg", "typ"})

_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_MAX_NUMERIC_DATE: Final = 10**11  # year ~5138; anything beyond is nonsense, and datetime overflows
_MAX_JTI_CHARS: Final = 64  # storage.models.ClientSecret.jti
_MAX_ID_CHARS: Final = 255
_MIN_RSA_BITS: Final = 2048
_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_CURVES: Final[Mapping[str, tuple[str, type[ec.EllipticCurve]]]] = {
    # alg -> (JWK crv, curve): RFC 7518 3.4 ties each ES* algorithm to one curve.
    "ES256": ("P-256", ec.SECP256R1),
    "ES384": ("P-384", ec.SECP384R1),
    "ES512": ("P-521", ec.SECP521R1),
}
_CURVES_BY_CRV: Final[Mapping[str, type[ec.EllipticCurve]]] = {crv: c for crv, c in _EC_CURVES.values()}


class TokenError(Unauthorized):
    """A bearer token or client secret was refused (401).

    ``detail`` is always :data:`GENERIC_DETAIL`; ``reason`` is a short code naming the failed check
    (``"size"``, ``"format"``, ``"header"``, ``"alg"``, ``"signature"``, ``"exp"``, ``"aud"``, ...),
    for logs and tests only: it must never reach a client.
    """

    code = "invalid_token"

    def __init__(self, reason: str = "invalid", *, code: str | None = None) -> None:
        super().__init__(GENERIC_DETAIL, code=code)
        self.reason = reason


class ClientSecretError(TokenError):
    """A client secret was refused: ``client_secret_invalid``, ``_expired`` or ``_used`` (API.md)."""

    code = CLIENT_SECRET_INVALID


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    jti: str
    issued_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ClientSecretClaims:
    user_id: str
    session_id: str
    jti: str
    scope: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ConfirmationClaims:
    """A publication confirmation: who asked to publish which session, until when."""

    user_id: str
    session_id: str
    jti: str
    expires_at: datetime


# --------------------------------------------------------------------------------------------------
# The strict gate in front of python-jose


@dataclass(frozen=True, slots=True)
class ParsedJws:
    """A compact JWS that passed :func:`parse_compact`; nothing in it is trusted yet."""

    token: str
    header: Mapping[str, Any]
    alg: str
    kid: str | None
    signing_input: bytes
    payload: bytes
    signature: bytes


def _b64url_decode(segment: str) -> bytes:
    """Strict, canonical base64url without padding; ValueError for anything else."""
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    # Unused trailing bits must be zero, so one token has exactly one spelling.
    if _b64url_encode(raw) != segment:
        raise ValueError("non-canonical base64url")
    return raw


def _b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate member")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """``raw`` as a strict JSON object (UTF-8, no duplicate members, no NaN); None otherwise."""
    try:
        value = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _split(token: object) -> tuple[str, str, str] | None:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def parse_compact(
    token: str,
    *,
    algorithms: Collection[str],
    kid: bool,
    typ: Collection[str] = ("JWT",),
    allowed_headers: Collection[str] | None = None,
) -> ParsedJws:
    """Structural checks on a compact JWS before any cryptography; raises :class:`TokenError`.

    ``algorithms`` pins ``alg`` (compared exactly); ``kid`` says whether a ``kid`` header is required
    (True) or forbidden (False); ``typ`` lists the accepted ``typ`` header values (case-insensitive,
    the header is optional); ``allowed_headers``, when given, is the complete set of allowed members.
    """
    if not isinstance(token, str):
        raise TokenError("format")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError("size")
    parts = _split(token)
    if parts is None:
        raise TokenError("format")
    try:
        header_raw = _b64url_decode(parts[0])
        payload = _b64url_decode(parts[1])
        signature = _b64url_decode(parts[2])
    except (ValueError, binascii.Error):
        raise TokenError("format") from None
    header = _json_object(header_raw)
    if header is None:
        raise TokenError("header")
    if any(name in header for name in FORBIDDEN_HEADERS):
        raise TokenError("header")
    if allowed_headers is not None and not set(header) <= set(allowed_headers):
        raise TokenError("header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        raise TokenError("alg")
    if "typ" in header:
        typ_value = header["typ"]
        accepted = {t.lower() for t in typ}
        if not isinstance(typ_value, str) or typ_value.lower().removeprefix("application/") not in accepted:
            raise TokenError("header")
    kid_value = header.get("kid")
    if kid:
        if not isinstance(kid_value, str) or not kid_value or len(kid_value) > _MAX_ID_CHARS:
            raise TokenError("kid")
    elif "kid" in header:
        raise TokenError("header")
    if not signature:
        raise TokenError("signature")
    return ParsedJws(
        token=token,
        header=header,
        alg=alg,
        kid=kid_value if kid else None,
        signing_input=f"{parts[0]}.{parts[1]}".encode("ascii"),
        payload=payload,
        signature=signature,
    )


def decode_claims(parsed: ParsedJws) -> dict[str, Any]:
    """The payload of a verified JWS as a strict JSON object; :class:`TokenError` otherwise."""
    claims = _json_object(parsed.payload)
    if claims is None:
        raise TokenError("claims")
    return claims


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    if name not in claims:
        if required:
            raise TokenError(name)
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(name)
    if not math.isfinite(value) or not 0 <= value < _MAX_NUMERIC_DATE:
        raise TokenError(name)
    return float(value)


def check_times(
    claims: Mapping[str, Any], now: float, *, require_iat: bool, leeway_s: int = LEEWAY_S
) -> tuple[float | None, float]:
    """Check ``exp`` (required), ``nbf`` (if present) and ``iat``; returns ``(iat, exp)``.

    The reason of a failure is the claim's name; a lapsed ``exp`` is checked last so that
    ``reason == "exp"`` means "a token that was otherwise fine has expired".
    """
    if not 0 <= leeway_s <= LEEWAY_S:
        raise ValueError(f"leeway_s must be between 0 and {LEEWAY_S}")
    exp = _numeric_date(claims, "exp", required=True)
    assert exp is not None
    iat = _numeric_date(claims, "iat", required=require_iat)
    nbf = _numeric_date(claims, "nbf", required=False)
    if iat is not None and iat > now + leeway_s:
        raise TokenError("iat")
    if nbf is not None and nbf > now + leeway_s:
        raise TokenError("nbf")
    if now - leeway_s >= exp:
        raise TokenError("exp")
    return iat, exp


# --------------------------------------------------------------------------------------------------
# Public keys from a JWKS


PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class PublicJwk:
    """One usable signature-verification key from a JWKS (RSA or EC, public parts only)."""

    kid: str
    kty: str
    alg: str | None
    crv: str | None
    key: PublicKey

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> PublicJwk:
        """Build from a JWK; ValueError when the key is not one Parley may verify signatures with.

        Only the public members are read: a JWK that also holds ``d`` is still used as a public key.
        """
        kid = jwk.get("kid")
        kty = jwk.get("kty")
        alg = jwk.get("alg")
        if not isinstance(kid, str) or not kid or len(kid) > _MAX_ID_CHARS:
            raise ValueError("kid")
        if alg is not None and (not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS):
            raise ValueError("alg")
        if jwk.get("use", "sig") != "sig":
            raise ValueError("use")
        key_ops = jwk.get("key_ops")
        if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
            raise ValueError("key_ops")
        if kty == "RSA":
            n = _b64_int(jwk.get("n"))
            e = _b64_int(jwk.get("e"))
            rsa_key = rsa.RSAPublicNumbers(e, n).public_key()
            if rsa_key.key_size < _MIN_RSA_BITS:
                raise ValueError("RSA key too small")
            return cls(kid, "RSA", alg, None, rsa_key)
        if kty == "EC":
            crv = jwk.get("crv")
            if not isinstance(crv, str) or crv not in _CURVES_BY_CRV:
                raise ValueError("crv")
            numbers = ec.EllipticCurvePublicNumbers(
                _b64_int(jwk.get("x")), _b64_int(jwk.get("y")), _CURVES_BY_CRV[crv]()
            )
            return cls(kid, "EC", alg, crv, numbers.public_key())  # checks the point is on the curve
        raise ValueError("kty")

    def allows(self, alg: str) -> bool:
        """True when a token with ``alg`` may be verified with this key (kty, crv and JWK alg agree)."""
        if alg not in ASYMMETRIC_ALGORITHMS or (self.alg is not None and self.alg != alg):
            return False
        if self.kty == "RSA":
            return alg[:2] in ("RS", "PS")
        return alg in _EC_CURVES and _EC_CURVES[alg][0] == self.crv


def _b64_int(value: object) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError("missing member")
    return int.from_bytes(_b64url_decode(value), "big")


def verify_with_jwk(parsed: ParsedJws, key: PublicJwk) -> None:
    """Verify the signature of ``parsed`` with ``key``; :class:`TokenError` when it does not hold."""
    alg = parsed.alg
    if not key.allows(alg):
        raise TokenError("kty")
    ok = False
    try:
        if alg.startswith("PS"):
            assert isinstance(key.key, rsa.RSAPublicKey)
            digest = _HASHES[alg[2:]]()
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            try:
                key.key.verify(parsed.signature, parsed.signing_input, pss, digest)
                ok = True
            except InvalidSignature:
                ok = False
        else:
            jose_key = (
                CryptographyRSAKey(key.key, alg) if key.kty == "RSA" else CryptographyECKey(key.key, alg)
            )
            jws.verify(parsed.token, jose_key, algorithms=[alg])
            ok = True
    except Exception:  # python-jose raises JWSError, and sometimes anything else; all mean "no"
        ok = False
    if not ok:
        raise TokenError("signature")


# --------------------------------------------------------------------------------------------------
# Parley's own tokens


def _derive_signing_key(secret: Secret) -> bytes:
    """A key for token signatures only, so the configured secret can serve other purposes safely."""
    return hmac.new(secret.reveal().encode("utf-8"), b"parley/tokens/HS256/v1", hashlib.sha256).digest()


def _when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _string_claim(claims: Mapping[str, Any], name: str, *, max_chars: int = _MAX_ID_CHARS) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value or len(value) > max_chars:
        raise TokenError(name)
    return value


class TokenService:
    """Mints and verifies Parley's access tokens, WebRTC client secrets and publication confirmations."""

    def __init__(
        self,
        signing_key: Secret,
        *,
        issuer: str = "parley",
        access_ttl_s: int = 3600,
        client_secret_ttl_s: int = 60,
        publication_ttl_s: int = PUBLICATION_CONFIRMATION_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not signing_key.reveal():
            raise ValueError("signing_key must not be empty")
        if not issuer:
            raise ValueError("issuer must not be empty")
        if access_ttl_s < 1:
            raise ValueError("access_ttl_s must be at least 1")
        if not 1 <= client_secret_ttl_s <= MAX_CLIENT_SECRET_TTL_S:
            raise ValueError(f"client_secret_ttl_s must be between 1 and {MAX_CLIENT_SECRET_TTL_S}")
        if not 1 <= publication_ttl_s <= MAX_CLIENT_SECRET_TTL_S:
            raise ValueError(f"publication_ttl_s must be between 1 and {MAX_CLIENT_SECRET_TTL_S}")
        self.issuer = issuer
        self.access_ttl_s = access_ttl_s
        self.client_secret_ttl_s = client_secret_ttl_s
        self.publication_ttl_s = publication_ttl_s
        self._clock = clock
        self._key = CryptographyHMACKey(_derive_signing_key(signing_key), PARLEY_ALGORITHM)

    def __repr__(self) -> str:
        return f"TokenService(issuer={self.issuer!r})"

    # minting

    def _mint(self, claims: dict[str, Any]) -> str:
        token: str = jws.sign(claims, self._key, algorithm=PARLEY_ALGORITHM)
        return token

    def mint_access(self, user_id: str) -> tuple[str, AccessClaims]:
        """A bearer token for the REST API, valid for ``access_ttl_s``."""
        if not user_id:
            raise ValueError("user_id must not be empty")
        iat = int(self._clock())
        claims = AccessClaims(user_id, _new_jti(), _when(iat), _when(iat + self.access_ttl_s))
        token = self._mint(
            {
                "iss": self.issuer,
                "aud": ACCESS_AUDIENCE,
                "sub": user_id,
                "iat": iat,
                "exp": iat + self.access_ttl_s,
                "jti": claims.jti,
                "typ": ACCESS_TYP,
            }
        )
        return token, claims

    def mint_client_secret(self, user_id: str, session_id: str) -> tuple[str, ClientSecretClaims]:
        """A single-use secret for one session's WebRTC offer, valid for ``client_secret_ttl_s``."""
        if not user_id or not session_id:
            raise ValueError("user_id and session_id must not be empty")
        iat = int(self._clock())
        exp = iat + self.client_secret_ttl_s
        claims = ClientSecretClaims(user_id, session_id, _new_jti(), CLIENT_SECRET_SCOPE, _when(exp))
        token = self._mint(
            {
                "iss": self.issuer,
                "aud": CLIENT_SECRET_AUDIENCE,
                "sub": user_id,
                "iat": iat,
                "exp": exp,
                "jti": claims.jti,
                "typ": CLIENT_SECRET_TYP,
                "sid": session_id,
                "scope": CLIENT_SECRET_SCOPE,
            }
        )
        return token, claims

    def mint_publication_confirmation(self, user_id: str, session_id: str) -> tuple[str, ConfirmationClaims]:
        """A token confirming that ``user_id`` wants ``session_id`` public, valid ``publication_ttl_s``.

        Signature and claims only: the caller stores the ``jti`` and enforces single use against it.
        """
        if not user_id or not session_id:
            raise ValueError("user_id and session_id must not be empty")
        iat = int(self._clock())
        exp = iat + self.publication_ttl_s
        claims = ConfirmationClaims(user_id, session_id, _new_jti(), _when(exp))
        token = self._mint(
            {
                "iss": self.issuer,
                "aud": PUBLICATION_AUDIENCE,
                "sub": user_id,
                "iat": iat,
                "exp": exp,
                "jti": claims.jti,
                "typ": PUBLICATION_TYP,
                "sid": session_id,
                "scope": PUBLICATION_SCOPE,
            }
        )
        return token, claims

    # verification

    def _verified_claims(self, token: str, *, typ: str, audience: str) -> dict[str, Any]:
        """Signature, then every claim except the times (see :func:`check_times`)."""
        parsed = parse_compact(
            token, algorithms=(PARLEY_ALGORITHM,), kid=False, allowed_headers=_PARLEY_HEADERS
        )
        try:
            jws.verify(parsed.token, self._key, algorithms=[PARLEY_ALGORITHM])
        except Exception:  # JWSError, or anything python-jose lets escape: all mean "no"
            raise TokenError("signature") from None
        claims = decode_claims(parsed)
        if claims.get("iss") != self.issuer:
            raise TokenError("iss")
        if claims.get("aud") != audience:  # a string, exactly: Parley never mints audience lists
            raise TokenError("aud")
        if claims.get("typ") != typ:
            raise TokenError("typ")
        _string_claim(claims, "sub")
        _string_claim(claims, "jti", max_chars=_MAX_JTI_CHARS)
        return claims

    def verify_access(self, token: str) -> AccessClaims:
        """The claims of a valid access token; :class:`TokenError` otherwise."""
        try:
            claims = self._verified_claims(token, typ=ACCESS_TYP, audience=ACCESS_AUDIENCE)
            iat, exp = check_times(claims, self._clock(), require_iat=True)
        except TokenError as exc:
            _log_rejection("access", exc.reason)
            raise
        assert iat is not None
        return AccessClaims(claims["sub"], claims["jti"], _when(iat), _when(exp))

    def verify_client_secret(self, token: str, *, session_id: str) -> ClientSecretClaims:
        """The claims of a client secret for ``session_id``; :class:`ClientSecretError` otherwise.

        Signature and claims only: single use is enforced by the caller against the stored ``jti``.
        A secret that is valid in every respect but has lapsed gets ``client_secret_expired``.
        """
        try:
            claims = self._verified_claims(token, typ=CLIENT_SECRET_TYP, audience=CLIENT_SECRET_AUDIENCE)
            sid = _string_claim(claims, "sid")
            if not session_id or not hmac.compare_digest(sid.encode(), session_id.encode()):
                raise TokenError("sid")
            if claims.get("scope") != CLIENT_SECRET_SCOPE:
                raise TokenError("scope")
            _, exp = check_times(claims, self._clock(), require_iat=True)
        except TokenError as exc:
            _log_rejection("client_secret", exc.reason)
            code = CLIENT_SECRET_EXPIRED if exc.reason == "exp" else CLIENT_SECRET_INVALID
            raise ClientSecretError(exc.reason, code=code) from None
        return ClientSecretClaims(claims["sub"], sid, claims["jti"], CLIENT_SECRET_SCOPE, _when(exp))

    def verify_publication_confirmation(
        self, token: str, *, user_id: str, session_id: str
    ) -> ConfirmationClaims:
        """The claims of a confirmation minted for this user and session; :class:`TokenError` otherwise.

        A lapsed token fails with ``reason == "exp"``. Single use is the caller's to enforce.
        """
        try:
            claims = self._verified_claims(token, typ=PUBLICATION_TYP, audience=PUBLICATION_AUDIENCE)
            for name, expected in (("sub", user_id), ("sid", session_id)):
                value = _string_claim(claims, name)
                if not expected or not hmac.compare_digest(value.encode(), expected.encode()):
                    raise TokenError(name)
            if claims.get("scope") != PUBLICATION_SCOPE:
                raise TokenError("scope")
            _, exp = check_times(claims, self._clock(), require_iat=True)
        except TokenError as exc:
            _log_rejection("publication", exc.reason)
            raise
        return ConfirmationClaims(user_id, session_id, claims["jti"], _when(exp))


def _new_jti() -> str:
    return secrets.token_urlsafe(18)


def _log_rejection(kind: str, reason: str) -> None:
    # Reason codes only: never the token, its claims, or anything derived from them.
    log.info("token.rejected", extra={"kind": kind, "reason": reason})


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` claim of a JWT-shaped ``token``, NOT verified: only for routing to a verifier.

    None for anything malformed (wrong shape, over 8 KiB, bad base64url/JSON, no string ``iss``).
    """
    parts = _split(token)
    if parts is None:
        return None
    try:
        header = _json_object(_b64url_decode(parts[0]))
        claims = _json_object(_b64url_decode(parts[1]))
    except (ValueError, binascii.Error):
        return None
    if header is None or claims is None:
        return None
    iss = claims.get("iss")
    return iss if isinstance(iss, str) and iss else None


# --------------------------------------------------------------------------------------------------
# Integration API keys

API_KEY_PREFIX: Final = "pk_"


def new_api_key() -> str:
    """A fresh integration API key: ``pk_`` and 40 URL-safe characters (240 random bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(30)


def hash_api_key(key: str) -> str:
    """The SHA-256 hex digest under which an API key is stored (the key itself never is)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
