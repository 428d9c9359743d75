"""Accounts: sign-up, password sign-in, and who am I."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Final

from aiohttp import web
from pydantic import AfterValidator, Field

from relay.api.body import Schema, read_json
from relay.api.deps import client_key, current_principal
from relay.api.views import user_view
from relay.errors import Conflict, RateLimited, Unauthorized
from relay.keys import DATABASE, LIMITS, PASSWORDS, TOKENS
from relay.observability.logging import hash_id
from storage import accounts

__all__ = ["routes"]

log = logging.getLogger("relay.api.auth")
routes = web.RouteTableDef()

_EMAIL: Final = re.compile(
    r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})+$"
)
BAD_LOGIN: Final = "The email or password is wrong."


def normalise_email(value: str) -> str:
    email = value.strip().lower()
    if len(email) > 254 or not _EMAIL.match(email):
        raise ValueError("not a valid email address")
    return email


Email = Annotated[str, AfterValidator(normalise_email)]


class SignupBody(Schema):
    email: Email
    password: str = Field(min_length=10, max_length=1024)


class TokenBody(Schema):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


def _token_response(request: web.Request, user_id: str, status: int, **extra: object) -> web.Response:
    token, claims = request.app[TOKENS].mint_access(user_id)
    expires_in = int((claims.expires_at - claims.issued_at).total_seconds())
    return web.json_response(
        {**extra, "access_token": token, "token_type": "Bearer", "expires_in": expires_in},
        status=status,
        headers={"Cache-Control": "no-store"},
    )


@routes.post("/v1/auth/signup")
async def signup(request: web.Request) -> web.Response:
    """Create a built-in account and sign it in."""
    limits = request.app[LIMITS]
    wait = limits.signups_per_address.hit(client_key(request))
    if wait:
        raise RateLimited("Too many sign-ups from this address; try again later.", retry_after_s=wait)
    body = await read_json(request, SignupBody)
    password_hash = await request.app[PASSWORDS].hash(body.password)
    try:
        async with request.app[DATABASE].sessions.begin() as s:
            user = await accounts.create_user(s, body.email, password_hash)
    except accounts.EmailTaken:
        raise Conflict("An account with this email exists already.", code="email_taken") from None
    log.info("auth.signup", extra={"user": hash_id(user.id)})
    return _token_response(request, user.id, 201, user={"id": user.id, "email": user.email})


@routes.post("/v1/auth/token")
async def token(request: web.Request) -> web.Response:
    """Exchange email and password for an access token; same answer and work for any failure."""
    body = await read_json(request, TokenBody)
    limits = request.app[LIMITS]
    try:
        email = normalise_email(body.email)
    except ValueError:
        email = body.email.strip().lower()
    address = client_key(request)
    wait = max(limits.failed_logins_per_account.retry_after(email),
               limits.failed_logins_per_address.retry_after(address))  # fmt: skip
    if wait:
        raise RateLimited("Too many failed sign-ins; try again later.", retry_after_s=wait)
    async with request.app[DATABASE].sessions() as s:
        user = await accounts.get_user_by_email(s, email)
    # An unknown email costs the same hash as a wrong password, so timing tells nothing.
    ok = await request.app[PASSWORDS].verify(body.password, user.password_hash if user else None)
    if not ok or user is None:
        limits.failed_logins_per_account.hit(email)
        limits.failed_logins_per_address.hit(address)
        log.info("auth.login_failed", extra={"code": "invalid_credentials"})
        raise Unauthorized(BAD_LOGIN, code="invalid_credentials")
    limits.failed_logins_per_account.reset(email)
    log.info("auth.login", extra={"user": hash_id(user.id)})
    return _token_response(request, user.id, 200)


@routes.get("/v1/me")
async def me(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    async with request.app[DATABASE].sessions() as s:
        user = await accounts.get_user(s, principal.user_id)
    if user is None:
        raise Unauthorized("Missing or invalid credentials.")
    return web.json_response(user_view(user))
