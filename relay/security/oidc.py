"""Bearer tokens from a configured OpenID Connect issuer, verified against its JWKS.

* Keys come from ``jwks_url`` or, without it, from the ``jwks_uri`` of
  ``{issuer}/.well-known/openid-configuration`` (whose ``issuer`` must match exactly). They are
  fetched with aiohttp (5 s timeout, no redirects, at most 256 KiB) and cached.
* An unknown ``kid`` refreshes the JWKS, at most once per ``refresh_min_interval_s``: a caller
  spraying random kids cannot make Parley hammer the IdP. Concurrent refreshes share one fetch.
  Keys older than ``max_key_age_s`` are refreshed in the background while the cached ones keep
  working, so a key the IdP withdrew stops being accepted, and an IdP outage breaks nothing that
  was working.
* Only asymmetric algorithms (RS*, PS*, ES*) are accepted, and the token's ``alg`` must agree with
  the key's ``kty`` (and ``crv``, and the JWK's ``alg`` when it has one): an HS256 token "signed"
  with the issuer's public key, or an ES256 header on an RSA ``kid``, is refused before any
  signature check. The strict header gate is :func:`relay.security.tokens.parse_compact`.
* Claims: ``iss`` exactly the issuer; ``aud`` holding the audience when one is configured; ``exp``
  required; ``nbf`` and ``iat`` checked when present (30 s leeway); ``sub`` required, non-empty.

Every failure is a :class:`~relay.security.tokens.TokenError` with the generic message; only its
reason code is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp

from relay.security.tokens import (
    ASYMMETRIC_ALGORITHMS,
    ParsedJws,
    PublicJwk,
    TokenError,
    check_times,
    decode_claims,
    parse_compact,
    verify_with_jwk,
)

__all__ = ["OidcIdentity", "OidcVerifier"]

log = logging.getLogger("relay.security.oidc")

FETCH_TIMEOUT_S: Final = 5.0
MAX_DOCUMENT_BYTES: Final = 256 * 1024
MAX_KEYS: Final = 100
_MAX_SUBJECT_CHARS: Final = 255  # OIDC Core 2: sub is at most 255 ASCII characters
_MAX_EMAIL_CHARS: Final = 320
#: ``typ`` headers seen on OIDC tokens: ID tokens and most access tokens say JWT, RFC 9068 at+jwt.
_TYPS: Final = ("JWT", "at+jwt")


@dataclass(frozen=True, slots=True)
class OidcIdentity:
    """Who an OIDC token speaks for. ``email`` is as the IdP sent it; ``email_verified`` is True
    only when the token said so explicitly: do not link accounts by an unverified email."""

    issuer: str
    subject: str
    email: str | None
    email_verified: bool = False


class _FetchError(Exception):
    """The discovery document or JWKS could not be fetched or used; ``reason`` is a log code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OidcVerifier:
    """Verifies bearer tokens issued by one OIDC issuer."""

    def __init__(
        self,
        issuer: str,
        *,
        audience: str | None,
        jwks_url: str | None,
        session: aiohttp.ClientSession | None = None,
        refresh_min_interval_s: float = 30.0,
        max_key_age_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuer:
            raise ValueError("issuer must not be empty")
        for url in (issuer, jwks_url):
            if url is not None and (
                urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc
            ):
                raise ValueError("issuer and jwks_url must be http(s) URLs")
        if audience == "":
            raise ValueError("audience must be None or non-empty")
        if refresh_min_interval_s < 0 or max_key_age_s <= 0:
            raise ValueError("refresh_min_interval_s must be >= 0 and max_key_age_s > 0")
        self._issuer = issuer
        self._audience = audience
        self._configured_jwks_url = jwks_url
        self._discovered_jwks_url: str | None = None
        self._session = session
        self._owns_session = session is None
        self._refresh_interval = refresh_min_interval_s
        self._max_key_age = max_key_age_s
        self._clock = clock
        self._keys: dict[str, tuple[PublicJwk, ...]] = {}
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._last_fetch_failed = False
        self._inflight: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def audience(self) -> str | None:
        return self._audience

    def __repr__(self) -> str:
        return f"OidcVerifier(issuer={self._issuer!r}, audience={self._audience!r})"

    # verification

    async def verify(self, token: str) -> OidcIdentity:
        """The identity a valid token speaks for; :class:`TokenError` (generic 401) otherwise."""
        try:
            if self._closed:
                raise TokenError("closed")
            parsed = parse_compact(token, algorithms=ASYMMETRIC_ALGORITHMS, kid=True, typ=_TYPS)
            assert parsed.kid is not None
            candidates = await self._keys_for(parsed.kid, parsed.alg)
            # Several keys under one kid (a sloppy rotation): any of them may have signed.
            if not any(_signed_by(parsed, key) for key in candidates):
                raise TokenError("signature")
            return self._identity(decode_claims(parsed))
        except TokenError as exc:
            log.info("token.rejected", extra={"kind": "oidc", "reason": exc.reason})
            raise

    def _identity(self, claims: Mapping[str, Any]) -> OidcIdentity:
        if claims.get("iss") != self._issuer:
            raise TokenError("iss")
        aud = claims.get("aud")
        if "aud" in claims and not _valid_aud(aud):
            raise TokenError("aud")
        if self._audience is not None and not (
            aud == self._audience or (isinstance(aud, list) and self._audience in aud)
        ):
            raise TokenError("aud")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUBJECT_CHARS:
            raise TokenError("sub")
        check_times(claims, self._clock(), require_iat=False)
        email = claims.get("email")
        if not isinstance(email, str) or not email or len(email) > _MAX_EMAIL_CHARS:
            email = None
        verified = email is not None and claims.get("email_verified") is True
        return OidcIdentity(self._issuer, sub, email, verified)

    async def _keys_for(self, kid: str, alg: str) -> list[PublicJwk]:
        """The cached keys under ``kid`` usable with ``alg``, refreshing the JWKS if allowed."""
        now = self._clock()
        keys = self._keys.get(kid)
        if keys is None:
            if self._inflight is not None or self._may_refresh(now):
                await self._refresh()
            keys = self._keys.get(kid)
            if keys is None:
                raise TokenError("jwks_unavailable" if self._last_fetch_failed else "kid")
        elif self._stale(now) and self._inflight is None and self._may_refresh(now):
            self._start_refresh()  # in the background: the cached keys stay usable meanwhile
        usable = [k for k in keys if k.allows(alg)]
        if not usable:
            raise TokenError("kty")
        return usable

    # the JWKS cache

    def _stale(self, now: float) -> bool:
        return self._loaded_at is not None and now - self._loaded_at >= self._max_key_age

    def _may_refresh(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= self._refresh_interval

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._last_attempt = self._clock()
            task = asyncio.create_task(self._fetch_keys(), name="oidc-jwks-refresh")
            task.add_done_callback(self._refresh_done)
            self._inflight = task
        return self._inflight

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _refresh(self) -> None:
        # shield: a caller that gives up (cancelled) does not cancel the fetch others are waiting on.
        try:
            await asyncio.shield(self._start_refresh())
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this caller was cancelled
            raise TokenError("closed") from None  # the fetch was, by aclose(): not the caller's problem

    async def _fetch_keys(self) -> None:
        """Replace the cached keys with the IdP's current ones; on failure keep the old ones."""
        try:
            session = self._client()
            url = self._configured_jwks_url or self._discovered_jwks_url or await self._discover(session)
            try:
                keys = _parse_jwks(await _get_json(session, url))
            except _FetchError:
                self._discovered_jwks_url = None  # the IdP may have moved it: discover again next time
                raise
        except _FetchError as exc:
            self._last_fetch_failed = True
            log.warning("oidc.jwks_unavailable", extra={"reason": exc.reason})
            return
        except Exception as exc:  # a bug must not escape into every waiting request (or a lost task)
            self._last_fetch_failed = True
            log.error(
                "oidc.jwks_unavailable", extra={"reason": "unexpected", "error_type": type(exc).__name__}
            )
            return
        self._keys = keys
        self._loaded_at = self._clock()
        self._last_fetch_failed = False
        log.info("oidc.jwks_loaded", extra={"count": sum(len(v) for v in keys.values())})

    async def _discover(self, session: aiohttp.ClientSession) -> str:
        doc = await _get_json(session, self._issuer.rstrip("/") + "/.well-known/openid-configuration")
        if doc.get("issuer") != self._issuer:  # OIDC Discovery 4.3
            raise _FetchError("discovery_issuer")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("http", "https"):
            raise _FetchError("discovery_jwks_uri")
        self._discovered_jwks_url = jwks_uri
        return jwks_uri

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
        return self._session

    async def aclose(self) -> None:
        """Stop any refresh and close the HTTP session if this verifier created it. Idempotent."""
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _signed_by(parsed: ParsedJws, key: PublicJwk) -> bool:
    try:
        verify_with_jwk(parsed, key)
    except TokenError:
        return False
    return True


def _valid_aud(aud: object) -> bool:
    if isinstance(aud, str):
        return bool(aud)
    return isinstance(aud, list) and bool(aud) and all(isinstance(a, str) and a for a in aud)


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """GET ``url`` as a JSON object of at most :data:`MAX_DOCUMENT_BYTES`; :class:`_FetchError` else."""
    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S),
            allow_redirects=False,
            headers={"Accept": "application/json, application/jwk-set+json"},
        ) as resp:
            if resp.status != 200:
                raise _FetchError(f"http_{resp.status}")
            if resp.content_length is not None and resp.content_length > MAX_DOCUMENT_BYTES:
                raise _FetchError("too_large")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise _FetchError("too_large")
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        raise _FetchError("unreachable") from None
    try:
        doc = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise _FetchError("not_json") from None
    if not isinstance(doc, dict):
        raise _FetchError("not_json")
    return doc


def _parse_jwks(doc: Mapping[str, Any]) -> dict[str, tuple[PublicJwk, ...]]:
    """The usable signature keys of a JWKS by kid; keys Parley cannot use are skipped."""
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise _FetchError("jwks_shape")
    by_kid: dict[str, list[PublicJwk]] = {}
    skipped = 0
    for entry in entries[:MAX_KEYS]:
        try:
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            key = PublicJwk.from_jwk(entry)
        except Exception:  # ValueError, or anything cryptography raises for a bad key: skip the key
            skipped += 1
            continue
        by_kid.setdefault(key.kid, []).append(key)
    if skipped:
        log.info("oidc.jwks_keys_skipped", extra={"count": skipped})
    if not by_kid:
        raise _FetchError("jwks_empty")
    return {kid: tuple(keys) for kid, keys in by_kid.items()}
