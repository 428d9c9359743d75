"""Who is calling: turns an ``Authorization`` header into a :class:`Principal`, or refuses with 401.

Three kinds of bearer credentials reach the REST API: Parley access tokens, OIDC tokens from the
configured issuer, and integration API keys. Every refusal carries the same generic message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from sqlalchemy.exc import IntegrityError

from relay.errors import Unauthorized
from relay.security.oidc import OidcVerifier
from relay.security.tokens import TokenError, TokenService, hash_api_key, unverified_issuer
from storage import accounts, api_keys
from storage.db import Database
from storage.models import User

__all__ = ["Authenticator", "Principal", "bearer_token"]

log = logging.getLogger("relay.security")

MAX_HEADER_CHARS: Final = 8 * 1024 + 16
GENERIC: Final = "Missing or invalid credentials."


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    via: str  # "access", "oidc" or "api_key"
    is_admin: bool = False


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header; 401 for anything else."""
    if not header or len(header) > MAX_HEADER_CHARS:
        raise Unauthorized(GENERIC)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized(GENERIC)
    return token


class Authenticator:
    """Verifies bearer credentials against Parley's keys, the OIDC issuer and the API-key table."""

    def __init__(
        self,
        tokens: TokenService,
        db: Database,
        *,
        oidc: OidcVerifier | None = None,
        admin_emails: frozenset[str] = frozenset(),
    ) -> None:
        self._tokens = tokens
        self._db = db
        self._oidc = oidc
        self._admins = admin_emails

    async def authenticate(self, header: str | None) -> Principal:
        """The caller behind ``header``; every kind of failure is the same 401 ``unauthorized``."""
        try:
            return await self._authenticate(bearer_token(header))
        except TokenError as exc:
            log.info("auth.rejected", extra={"reason": exc.reason})
            raise Unauthorized(GENERIC) from None

    async def _authenticate(self, token: str) -> Principal:
        if token.startswith("pk_"):
            return await self._api_key(token)
        if self._oidc is not None and unverified_issuer(token) == self._oidc.issuer:
            return await self._oidc_user(token)
        claims = self._tokens.verify_access(token)
        async with self._db.sessions() as s:
            user = await accounts.get_user(s, claims.user_id)
        if user is None:  # deleted since the token was minted
            raise Unauthorized(GENERIC)
        return Principal(user.id, "access", is_admin=self._is_admin(user))

    async def _api_key(self, key: str) -> Principal:
        async with self._db.sessions.begin() as s:
            row = await api_keys.find_by_hash(s, hash_api_key(key))
            if row is None:
                raise Unauthorized(GENERIC)
            await api_keys.touch(s, row)
            user = await accounts.get_user(s, row.user_id)
        if user is None:
            raise Unauthorized(GENERIC)
        return Principal(user.id, "api_key", is_admin=self._is_admin(user))

    async def _oidc_user(self, token: str) -> Principal:
        assert self._oidc is not None
        identity = await self._oidc.verify(token)
        for _ in range(2):  # a concurrent first sight of the same subject may win the insert
            try:
                async with self._db.sessions.begin() as s:
                    user = await accounts.get_oidc_user(s, identity.issuer, identity.subject)
                    if user is None:
                        user = await accounts.create_oidc_user(s, identity.issuer, identity.subject)
                        log.info("auth.oidc_user_created")
                    return Principal(user.id, "oidc")
            except IntegrityError:
                continue
        raise Unauthorized(GENERIC)

    def _is_admin(self, user: User) -> bool:
        return user.email is not None and user.email in self._admins
