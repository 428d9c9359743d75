"""A local OpenID Connect provider for tests, and hand-made JWTs.

Tokens here are built and signed with ``cryptography`` and ``hmac`` directly, never with
python-jose: the tests check Parley's verifier against an independent implementation, and can build
tokens no library would (``alg: none``, duplicate members, odd encodings).

* :class:`KeyPool` generates RSA-2048 and EC P-256 keys on first use and keeps them, so a test
  session pays for each key once (see the session fixture ``oidc_keys``).
* :class:`OidcProvider` serves ``/.well-known/openid-configuration`` and ``/jwks.json`` on
  ``127.0.0.1`` (a free port), mints tokens with its current keys, rotates them, counts fetches,
  and can be slowed down (``jwks_delay_s``, ``jwks_gate``), made to fail (``failing``) or stopped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

Signer = Callable[[bytes], bytes]
KeyKind = Literal["rsa", "ec"]

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_HMAC_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def b64url(raw: bytes) -> str:
    """Unpadded base64url, as in a compact JWS."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _segment(part: Mapping[str, Any] | bytes) -> str:
    if isinstance(part, bytes):
        return b64url(part)
    return b64url(json.dumps(part, separators=(",", ":")).encode())


def build_jwt(
    header: Mapping[str, Any] | bytes, payload: Mapping[str, Any] | bytes, signer: Signer | None = None
) -> str:
    """A compact JWS of ``header`` and ``payload`` (mappings become JSON, bytes are taken as they are),
    signed by ``signer`` over ``header.payload``; an empty signature without one."""
    signing_input = f"{_segment(header)}.{_segment(payload)}"
    signature = signer(signing_input.encode("ascii")) if signer is not None else b""
    return f"{signing_input}.{b64url(signature)}"


def hmac_signer(key: bytes, alg: str = "HS256") -> Signer:
    return lambda data: hmac.new(key, data, _HMAC_DIGESTS[alg]).digest()


def rsa_signer(key: rsa.RSAPrivateKey, alg: str = "RS256") -> Signer:
    digest = _HASHES[alg[2:]]()
    if alg.startswith("PS"):
        pad: padding.AsymmetricPadding = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
    else:
        pad = padding.PKCS1v15()
    return lambda data: key.sign(data, pad, digest)


def ec_signer(key: ec.EllipticCurvePrivateKey, alg: str = "ES256") -> Signer:
    digest = _HASHES[alg[2:]]()
    size = (key.curve.key_size + 7) // 8

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return sign


def _b64_uint(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8 or 1, "big"))


@dataclass(frozen=True)
class SigningKey:
    """A private key with its kid; ``jwk()`` is the public JWK the provider publishes."""

    kid: str
    kind: KeyKind
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @property
    def default_alg(self) -> str:
        return "RS256" if self.kind == "rsa" else "ES256"

    def jwk(self, *, alg: str | None = None) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kid": self.kid, "use": "sig", "alg": alg or self.default_alg}
        if isinstance(self.private, rsa.RSAPrivateKey):
            numbers = self.private.public_key().public_numbers()
            jwk |= {"kty": "RSA", "n": _b64_uint(numbers.n), "e": _b64_uint(numbers.e)}
        else:
            point = self.private.public_key().public_numbers()
            size = (self.private.curve.key_size + 7) // 8
            jwk |= {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url(point.x.to_bytes(size, "big")),
                "y": b64url(point.y.to_bytes(size, "big")),
            }
        return jwk

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def signer(self, alg: str | None = None) -> Signer:
        alg = alg or self.default_alg
        if isinstance(self.private, rsa.RSAPrivateKey):
            return rsa_signer(self.private, alg)
        return ec_signer(self.private, alg)


class KeyPool:
    """Keys generated on first use and kept: ``rsa(i)`` / ``ec(i)`` return the same key every time."""

    def __init__(self) -> None:
        self._keys: dict[tuple[KeyKind, int], SigningKey] = {}

    def get(self, kind: KeyKind, index: int) -> SigningKey:
        if (kind, index) not in self._keys:
            private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
            if kind == "rsa":
                private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            else:
                private = ec.generate_private_key(ec.SECP256R1())
            self._keys[kind, index] = SigningKey(f"{kind}-{index}-{secrets.token_hex(4)}", kind, private)
        return self._keys[kind, index]

    def rsa(self, index: int = 0) -> SigningKey:
        return self.get("rsa", index)

    def ec(self, index: int = 0) -> SigningKey:
        return self.get("ec", index)


class OidcProvider:
    """A real HTTP OIDC provider on 127.0.0.1 (discovery + JWKS) that mints tokens for tests."""

    audience = "parley-test"

    def __init__(self, pool: KeyPool) -> None:
        self.pool = pool
        self._generation = 0
        self.current: dict[KeyKind, SigningKey] = {"rsa": pool.rsa(0), "ec": pool.ec(0)}
        self.published: list[SigningKey] = list(self.current.values())
        #: Extra raw JWK entries appended to the served JWKS (e.g. a symmetric key, a broken key).
        self.extra_jwks: list[Any] = []
        #: Overrides of the served JWK ``alg`` by kid (``None`` drops the member).
        self.jwk_alg: dict[str, str | None] = {}
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.jwks_delay_s = 0.0
        #: Set on every JWKS request; while ``jwks_gate`` is set to an unset Event, JWKS answers wait for it.
        self.jwks_requested = asyncio.Event()
        self.jwks_gate: asyncio.Event | None = None
        self.failing = False
        self.discovery_issuer: str | None = None  # None: the real issuer
        self._runner: web.AppRunner | None = None
        self.port = 0

    # the server

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks.json", self._jwks)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Shut the server: connections are refused from now on (an IdP outage)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks.json"

    def jwks(self) -> dict[str, Any]:
        keys = []
        for key in self.published:
            jwk = key.jwk()
            if key.kid in self.jwk_alg:
                alg = self.jwk_alg[key.kid]
                if alg is None:
                    del jwk["alg"]
                else:
                    jwk["alg"] = alg
            keys.append(jwk)
        return {"keys": keys + self.extra_jwks}

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        if self.failing:
            return web.Response(status=503)
        return web.json_response(
            {
                "issuer": self.discovery_issuer or self.issuer,
                "jwks_uri": self.jwks_url,
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        self.jwks_requested.set()
        if self.jwks_gate is not None:
            await self.jwks_gate.wait()
        if self.jwks_delay_s:
            await asyncio.sleep(self.jwks_delay_s)
        if self.failing:
            return web.Response(status=503)
        return web.json_response(self.jwks(), content_type="application/jwk-set+json")

    # keys and tokens

    def rotate(self, *, keep_old: bool = False) -> None:
        """Switch to the next keys of the pool and publish them (the old ones too if ``keep_old``)."""
        self._generation += 1
        old = list(self.published)
        self.current = {"rsa": self.pool.rsa(self._generation), "ec": self.pool.ec(self._generation)}
        self.published = list(self.current.values()) + (old if keep_old else [])

    def public_pem(self, key: KeyKind = "rsa") -> bytes:
        """The PEM text of a published public key (the raw material of the HS256 confusion attack)."""
        return self.current[key].public_pem()

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "oidc-user-1",
            "iat": now,
            "exp": now + 300,
            "email": "learner@example.test",
            "email_verified": True,
        }
        return _merge(claims, overrides)

    def mint(
        self,
        *,
        claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
        key: KeyKind = "rsa",
        alg: str | None = None,
        signer: Signer | None = None,
    ) -> str:
        """A token from the current ``key``. ``claims``/``headers`` are merged over the defaults (a
        value of None removes the member); ``signer`` replaces the key's own signature."""
        signing_key = self.current[key]
        alg = alg or signing_key.default_alg
        header = _merge({"alg": alg, "typ": "JWT", "kid": signing_key.kid}, dict(headers or {}))
        return build_jwt(header, self.claims(**dict(claims or {})), signer or signing_key.signer(alg))


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in overrides.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def jwk_to_pem(jwk: Mapping[str, Any]) -> bytes:
    """The PEM text of an RSA public JWK, as an attacker would compute it from a public JWKS."""
    n = int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=" * (-len(jwk["n"]) % 4)), "big")
    e = int.from_bytes(base64.urlsafe_b64decode(jwk["e"] + "=" * (-len(jwk["e"]) % 4)), "big")
    return (
        rsa.RSAPublicNumbers(e, n)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
