"""Integration API keys: ``POST /v1/api-keys`` shows a key once, ``DELETE`` revokes it at once.

A key is a bearer credential for the REST API and both WebSockets, acting as its owner. Only its
SHA-256 is stored. Keys manage nothing themselves: creating, listing and revoking keys needs the
owner's own sign-in (an access or OIDC token), so a leaked key cannot mint a successor that
outlives its revocation.
"""

from __future__ import annotations

import logging

from aiohttp import web
from pydantic import Field, field_validator

from relay.api.body import Schema, read_json
from relay.api.deps import current_principal
from relay.api.views import iso
from relay.errors import Conflict, Forbidden, NotFound
from relay.keys import DATABASE
from relay.observability.logging import hash_id
from relay.security.principals import Principal
from relay.security.tokens import hash_api_key, new_api_key
from storage import api_keys, audit
from storage.models import ApiKey

__all__ = ["routes"]

log = logging.getLogger("relay.api.api_keys")
routes = web.RouteTableDef()


class NewApiKey(Schema):
    name: str = Field(min_length=1, max_length=200)

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip() or any(ord(c) < 32 for c in value):
            raise ValueError("must be printable text")
        return value.strip()


def key_view(row: ApiKey) -> dict[str, str | None]:
    return {
        "id": row.id,
        "name": row.name,
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
    }


async def _signed_in(request: web.Request) -> Principal:
    principal = await current_principal(request)
    if principal.via == "api_key":
        raise Forbidden(
            "API keys are managed with your own sign-in, not with a key.", code="api_key_not_allowed"
        )
    return principal


@routes.post("/v1/api-keys")
async def create_api_key(request: web.Request) -> web.Response:
    """201 ``{"id", "name", "key", "created_at"}``: the only time the key is shown."""
    principal = await _signed_in(request)
    body = await read_json(request, NewApiKey)
    key = new_api_key()
    async with request.app[DATABASE].sessions.begin() as s:
        if await api_keys.count_keys(s, principal.user_id) >= api_keys.MAX_KEYS_PER_USER:
            raise Conflict(
                f"You have {api_keys.MAX_KEYS_PER_USER} API keys; revoke one first.", code="too_many_api_keys"
            )
        row = await api_keys.create_key(s, principal.user_id, body.name, hash_api_key(key))
        audit.record(s, "api_key.created", user_hash=hash_id(principal.user_id))
    log.info("api_key.created", extra={"key_id": row.id})
    view = key_view(row)
    view["key"] = key
    return web.json_response(view, status=201, headers={"Cache-Control": "no-store"})


@routes.get("/v1/api-keys")
async def list_api_keys(request: web.Request) -> web.Response:
    """200 ``{"api_keys": [{"id", "name", "created_at", "last_used_at"}]}``, never a key."""
    principal = await _signed_in(request)
    async with request.app[DATABASE].sessions() as s:
        rows = await api_keys.list_keys(s, principal.user_id)
    return web.json_response({"api_keys": [key_view(r) for r in rows]})


@routes.delete("/v1/api-keys/{key_id}")
async def revoke_api_key(request: web.Request) -> web.Response:
    """204; the key stops working with the next request. Someone else's key is 404."""
    principal = await _signed_in(request)
    key_id = request.match_info["key_id"]
    async with request.app[DATABASE].sessions.begin() as s:
        if not await api_keys.revoke_key(s, key_id, principal.user_id):
            raise NotFound("No such API key.")
        audit.record(s, "api_key.revoked", user_hash=hash_id(principal.user_id))
    log.info("api_key.revoked", extra={"key_id": key_id})
    return web.Response(status=204)
