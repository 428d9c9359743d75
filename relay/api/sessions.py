"""Session resources: create, mint client secrets, list, read, change retention. Always owner-scoped.

``PATCH /v1/sessions/{id}`` takes ``{"retain": bool}`` and/or ``{"retention_days": 1..3650 | null}``
(``null``: the deployment's ``PARLEY_RETENTION_DAYS`` applies again) and answers the Session, whose
``retention`` field says when it will be deleted (:mod:`storage.retention`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Final

from aiohttp import web
from pydantic import Field

from relay.api.body import Schema, read_json
from relay.api.deps import current_principal, owned_session
from relay.api.views import iso, session_view
from relay.config import MAX_RETENTION_DAYS
from relay.errors import BadRequest, Conflict, NotFound, RateLimited
from relay.keys import DATABASE, LIMITS, SETTINGS, TOKENS
from relay.observability.logging import hash_id
from relay.security.principals import Principal
from relay.security.turn import ice_servers_for
from storage import continuation, ratings, retention, sessions, topics
from storage.models import SessionStatus, utcnow

__all__ = ["routes"]

log = logging.getLogger("relay.api.sessions")
routes = web.RouteTableDef()

DEFAULT_PAGE: Final = 20
MAX_PAGE: Final = 100
# A secret can only start or resume a conversation that is still going.
MINTABLE: Final = frozenset(
    {SessionStatus.CREATED, SessionStatus.CONNECTING, SessionStatus.LIVE, SessionStatus.RECONNECTING}
)
NOT_FOUND: Final = "No such session."


class NewSession(Schema):
    topic_id: str = Field(min_length=1, max_length=64)


class RetentionChange(Schema):
    """Strict types: ``"true"``, ``1`` or ``7.0`` are 422, not quietly converted."""

    retain: bool = Field(default=False, strict=True)
    retention_days: int | None = Field(default=None, ge=1, le=MAX_RETENTION_DAYS, strict=True)


async def _mint_secret(request: web.Request, principal: Principal, session_id: str) -> dict[str, Any]:
    """Mint a client secret and record its jti, inside the caller's checks."""
    wait = request.app[LIMITS].secret_minting.hit(principal.user_id)
    if wait:
        raise RateLimited("Too many client secrets; slow down.", retry_after_s=wait)
    token, claims = request.app[TOKENS].mint_client_secret(principal.user_id, session_id)
    async with request.app[DATABASE].sessions.begin() as s:
        await sessions.record_client_secret(
            s, jti=claims.jti, session_id=session_id, expires_at=claims.expires_at
        )
    settings = request.app[SETTINGS]
    ice_servers = ice_servers_for(
        configured=settings.ice_servers,
        turn_urls=settings.turn_urls,
        secret=None if settings.turn_secret is None else settings.turn_secret.reveal(),
        label=hash_id(principal.user_id),
        ttl_s=settings.turn_ttl_s,
    )
    return {"value": token, "expires_at": iso(claims.expires_at), "ice_servers": ice_servers}


@routes.post("/v1/sessions")
async def create_session(request: web.Request) -> web.Response:
    """A private session in ``created`` and a client secret to connect it."""
    principal = await current_principal(request)
    body = await read_json(request, NewSession)
    wait = request.app[LIMITS].session_creation.hit(principal.user_id)
    if wait:
        raise RateLimited("Too many new sessions; try again shortly.", retry_after_s=wait)
    async with request.app[DATABASE].sessions.begin() as s:
        if await topics.get_topic(s, body.topic_id) is None:
            raise BadRequest("topic_id: no such topic", code="invalid_request", field="topic_id")
        session = await sessions.create_session(
            s, user_id=principal.user_id, topic_id=body.topic_id, user_hash=hash_id(principal.user_id)
        )
    log.info("session.created", extra={"session_id": session.id, "user": hash_id(principal.user_id)})
    secret = await _mint_secret(request, principal, session.id)
    return web.json_response(
        {
            "session": session_view(session, default_retention_days=request.app[SETTINGS].retention_days),
            "client_secret": secret,
        },
        status=201,
        headers={"Location": f"/v1/sessions/{session.id}", "Cache-Control": "no-store"},
    )


@routes.post("/v1/sessions/{session_id}/client-secret")
async def mint_client_secret(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    async with request.app[DATABASE].sessions() as s:
        session = await owned_session(s, request.match_info["session_id"], principal.user_id)
    window = timedelta(seconds=request.app[SETTINGS].reconnect_grace_s)
    # An interrupted session (its relay died) takes one more offer for a while: it continues anew.
    if session.status not in MINTABLE and not continuation.continuable(session, now=utcnow(), window=window):
        raise Conflict("The session has ended.", code="session_ended")
    secret = await _mint_secret(request, principal, session.id)
    return web.json_response(secret, status=201, headers={"Cache-Control": "no-store"})


@routes.get("/v1/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    raw_limit = request.query.get("limit", str(DEFAULT_PAGE))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise BadRequest(
            f"limit: must be an integer from 1 to {MAX_PAGE}", code="invalid_request", field="limit"
        )
    cursor = request.query.get("cursor") or None
    try:
        async with request.app[DATABASE].sessions() as s:
            page = await sessions.list_owned_sessions(
                s, principal.user_id, limit=int(raw_limit), cursor=cursor
            )
            ids = [x.id for x in page.sessions]
            audio = await sessions.recordings(s, ids)
            rated = await ratings.ratings_for(s, ids)
    except sessions.InvalidCursor:
        raise BadRequest(
            "cursor: not a cursor this API handed out", code="invalid_request", field="cursor"
        ) from None
    return web.json_response(
        {
            "sessions": [
                session_view(
                    x,
                    audio.get(x.id, ()),
                    default_retention_days=request.app[SETTINGS].retention_days,
                    rating=rated.get(x.id),
                )
                for x in page.sessions
            ],
            "next_cursor": page.next_cursor,
        }
    )


@routes.get("/v1/sessions/{session_id}")
async def get_session(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    async with request.app[DATABASE].sessions() as s:
        session = await owned_session(s, request.match_info["session_id"], principal.user_id)
        audio = await sessions.recordings(s, [session.id])
        rating = await ratings.get_rating(s, session.id)
    return web.json_response(
        session_view(
            session,
            audio.get(session.id, ()),
            default_retention_days=request.app[SETTINGS].retention_days,
            rating=rating,
        )
    )


@routes.patch("/v1/sessions/{session_id}")
async def change_session(request: web.Request) -> web.Response:
    """The learner's retention choice: keep forever (``retain``) and/or a limit of its own."""
    principal = await current_principal(request)
    body = await read_json(request, RetentionChange)
    given = body.model_fields_set
    if not given:
        raise BadRequest(
            "Nothing to change: send retain and/or retention_days.", code="invalid_request", field="$"
        )
    async with request.app[DATABASE].sessions.begin() as s:
        session = await owned_session(s, request.match_info["session_id"], principal.user_id)
        changed = await retention.set_retention(
            s,
            session,
            retain=body.retain if "retain" in given else None,
            retention_days=body.retention_days if "retention_days" in given else retention.Keep.UNCHANGED,
            user_hash=hash_id(principal.user_id),
        )
        if not changed:  # being deleted
            raise NotFound(NOT_FOUND)
        audio = await sessions.recordings(s, [session.id])
        rating = await ratings.get_rating(s, session.id)
    log.info(
        "session.retention",
        extra={
            "session_id": session.id,
            "user": hash_id(principal.user_id),
            "outcome": retention.policy(session),
        },
    )
    return web.json_response(
        session_view(
            session,
            audio.get(session.id, ()),
            default_retention_days=request.app[SETTINGS].retention_days,
            rating=rating,
        )
    )
