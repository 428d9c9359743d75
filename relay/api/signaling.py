"""WebRTC signalling: an SDP offer in, an SDP answer out (API.md, Sessions: webrtc rows).

The offer is validated before aiortc sees it, and before the client secret is spent: a bad offer
costs the learner nothing. A new offer for a live or reconnecting session is a reconnect. A new
offer for a session whose relay died (``interrupted``, within the reconnect window) starts a
continuation session linked to it (storage/continuation.py): the answer's ``Location`` names it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from datetime import timedelta
from typing import Final

from aiohttp import web

from relay.api.body import read_body
from relay.api.deps import current_principal, owned_session
from relay.api.forwarding import route_to_owner
from relay.api.realtime import SESSION_HEADER
from relay.api.session_states import state_writer, wake_jobs
from relay.api.views import session_view
from relay.browser.sdp import InvalidOffer, validate_offer
from relay.errors import Conflict, NotFound
from relay.keys import (
    DATABASE,
    FEEDS,
    LIVE,
    METRICS,
    NODE,
    RECORDERS,
    REGISTRY,
    ROUTER,
    SETTINGS,
    TOKENS,
    UPSTREAM,
)
from relay.model.protocol import HistoryItem
from relay.observability.logging import hash_id
from relay.security.principals import bearer_token
from relay.security.tokens import (
    CLIENT_SECRET_EXPIRED,
    CLIENT_SECRET_USED,
    ClientSecretClaims,
    ClientSecretError,
)
from relay.session.registry import Live
from relay.session.session import OPEN_STATES, LiveSession, SessionSpec
from storage import continuation, nodes, sessions, topics
from storage.models import Session, SessionStatus, Topic, new_id, utcnow
from storage.sessions import Redemption

__all__ = ["routes"]

log = logging.getLogger("relay.api.signaling")
routes = web.RouteTableDef()

MAX_OFFER_BYTES: Final = 64 * 1024
CONNECTABLE: Final = frozenset({SessionStatus.CREATED, *OPEN_STATES})


def _remote_allow(request: web.Request) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    allow = request.app[SETTINGS].rtc_remote_allow
    return [ipaddress.ip_network(n, strict=False) for n in allow] if allow else None


@routes.post("/v1/sessions/{session_id}/webrtc")
async def offer(request: web.Request) -> web.Response:
    """Answer an SDP offer for a session, authorised by a single-use client secret."""
    session_id = request.match_info["session_id"]
    claims = request.app[TOKENS].verify_client_secret(
        bearer_token(request.headers.get("Authorization")), session_id=session_id
    )
    if request.content_type != "application/sdp":
        raise InvalidOffer("the offer must be sent as application/sdp")
    try:
        raw = await read_body(request, MAX_OFFER_BYTES)
    except Exception:
        raise InvalidOffer("the offer is over 64 KiB") from None
    sdp = validate_offer(raw, remote_allow=_remote_allow(request))

    db = request.app[DATABASE]
    async with db.sessions() as s:
        row = await sessions.get_owned_session(s, session_id, claims.user_id)
        if row is None:
            raise ClientSecretError("session")
        topic = await topics.get_topic(s, row.topic_id, include_retired=True)
    assert topic is not None  # sessions.topic_id is a RESTRICT foreign key
    # Only an open session is anyone's to answer: an interrupted one is continued here, even while
    # its dead owner's heartbeat is not stale yet.
    forwarded = await route_to_owner(request, session_id, body=raw) if row.status in CONNECTABLE else None
    if forwarded is not None:
        return forwarded  # a reconnect for a session live on another node, answered there
    if row.status in CONNECTABLE and await _owner_lost(request.app, row, claims.user_id):
        async with db.sessions() as s:
            row = await sessions.get_owned_session(s, session_id, claims.user_id)
        assert row is not None  # deleting a session fences it first; it cannot be gone yet
    if row.status not in CONNECTABLE:
        if _continuable(request.app, row):
            return await _continue(request, row, claims, topic, sdp)
        raise Conflict("The session has ended.", code="session_ended")

    registry = request.app[REGISTRY]
    live = _webrtc_session(registry.get(session_id))
    # Admission before redemption: a refused learner keeps a secret to retry with.
    reserved = live is None
    if reserved:
        registry.admit(session_id)  # CapacityError -> 503 + Retry-After
    try:
        async with db.sessions.begin() as s:
            redeemed = await sessions.redeem_client_secret(s, jti=claims.jti, session_id=session_id)
            if redeemed is Redemption.OK and live is None:
                await nodes.claim_session(s, session_id, request.app[NODE].id)  # it goes live here
        _check_redeemed(redeemed)
        if live is None:
            spec = SessionSpec(session_id, claims.user_id, topic.instructions, topic.turn_detection)
            live = _start_live(request.app, spec)
    except BaseException:
        if reserved:
            registry.release(session_id)
        raise
    peer_id, answer = await live.connect_peer(sdp)
    log.info("signaling.answered", extra={"session_id": session_id, "peer_id": peer_id})
    return web.Response(
        status=201,
        text=answer,
        content_type="application/sdp",
        headers={"Location": f"/v1/sessions/{session_id}/webrtc/{peer_id}", "Cache-Control": "no-store"},
    )


def _continuable(app: web.Application, row: Session) -> bool:
    window = timedelta(seconds=app[SETTINGS].reconnect_grace_s)
    return continuation.continuable(row, now=utcnow(), window=window)


async def _continue(
    request: web.Request, previous: Session, claims: ClientSecretClaims, topic: Topic, sdp: str
) -> web.Response:
    """Answer a reconnect offer for a session whose relay died with a fresh session continuing it.

    The answer is that of a first offer, for the new session: its ``Location`` (and
    ``x-parley-session-id``) name it, and the client uses that id from then on. The secret of the
    interrupted session is spent on it; a refused offer (capacity, already continued) spends nothing.
    """
    app = request.app
    db = app[DATABASE]
    registry = app[REGISTRY]
    session_id = new_id("ses")
    user_hash = hash_id(claims.user_id)
    registry.admit(session_id)  # CapacityError -> 503 + Retry-After
    try:
        async with db.sessions.begin() as s:
            redeemed = await sessions.redeem_client_secret(s, jti=claims.jti, session_id=previous.id)
            _check_redeemed(redeemed)
            try:
                await continuation.create_continuation(
                    s, previous, session_id=session_id, user_hash=user_hash
                )
            except continuation.AlreadyContinued:
                raise Conflict(
                    "The session was continued in another session already.", code="session_ended"
                ) from None
            await nodes.claim_session(s, session_id, app[NODE].id)
            earlier = await continuation.conversation_history(s, previous.id)
        spec = SessionSpec(
            session_id, claims.user_id, topic.instructions, topic.turn_detection,
            earlier=tuple(HistoryItem(speaker=speaker.value, text=text) for speaker, text in earlier),
        )  # fmt: skip
        live = _start_live(app, spec)
    except BaseException:
        registry.release(session_id)
        raise
    peer_id, answer = await live.connect_peer(sdp)
    log.info(
        "signaling.continued",
        extra={"session_id": session_id, "continued_from": previous.id, "peer_id": peer_id,
               "count": len(earlier)},
    )  # fmt: skip
    return web.Response(
        status=201,
        text=answer,
        content_type="application/sdp",
        headers={
            "Location": f"/v1/sessions/{session_id}/webrtc/{peer_id}",
            SESSION_HEADER: session_id,
            "Cache-Control": "no-store",
        },
    )


def _check_redeemed(redeemed: Redemption) -> None:
    if redeemed is Redemption.USED:
        raise ClientSecretError("replay", code=CLIENT_SECRET_USED)
    if redeemed is Redemption.EXPIRED:
        raise ClientSecretError("exp", code=CLIENT_SECRET_EXPIRED)
    if redeemed is not Redemption.OK:
        raise ClientSecretError("jti")


async def _owner_lost(app: web.Application, row: Session, user_id: str) -> bool:
    """Whether the session was open on another node that is dead now; if so it is recorded as
    ``interrupted`` (its spool is recovered where that node ran). Nothing holds it any more: it is
    not live here, and signalling for it was not forwarded."""
    if row.status not in OPEN_STATES or row.node_id in (None, app[NODE].id):
        return False
    if app[REGISTRY].get(row.id) is not None:
        return False
    owner = await app[ROUTER].owner(row.id)
    if owner is not None and owner.alive:
        return False  # alive but not reachable from here (no URL): not ours to decide
    interrupted = await nodes.interrupt_if_open(
        app[DATABASE], row.id, OPEN_STATES, user_hash=hash_id(user_id), code="node_lost"
    )
    log.warning(
        "signaling.owner_lost",
        extra={
            "session_id": row.id,
            "node_id": row.node_id,
            "outcome": "interrupted" if interrupted else "closed",
        },
    )
    return True


def _webrtc_session(live: Live | None) -> LiveSession | None:
    """The live WebRTC session; a session live on the Realtime socket takes no offers."""
    if live is not None and not isinstance(live, LiveSession):
        raise Conflict("The session is connected through the Realtime socket.", code="session_not_webrtc")
    return live


def _start_live(app: web.Application, spec: SessionSpec) -> LiveSession:
    registry = app[REGISTRY]
    feed = app[FEEDS].open(spec.session_id)
    live = LiveSession(
        spec,
        settings=app[SETTINGS],
        upstream=app[UPSTREAM],
        recorder=app[RECORDERS].open(spec.session_id),
        metrics=app[METRICS],
        write_state=state_writer(app, spec.user_id),
        publish=feed.publish,
        on_closed=lambda s: registry.discard(s.id),
    )
    registry.add(live)
    task = asyncio.create_task(live.run(), name=f"session:{spec.session_id}")
    app[LIVE].add(task)
    task.add_done_callback(app[LIVE].discard)
    # After the final session.state, also when the task is cancelled before it ran.
    task.add_done_callback(lambda _: feed.close())
    return live


@routes.delete("/v1/sessions/{session_id}/webrtc/{peer_id}")
async def hang_up(request: web.Request) -> web.Response:
    """Close one browser leg; the session waits for a reconnect, then ends."""
    session_id = request.match_info["session_id"]
    await _authorise_peer_control(request, session_id)
    if (forwarded := await route_to_owner(request, session_id)) is not None:
        return forwarded
    live = request.app[REGISTRY].get(session_id)
    if not isinstance(live, LiveSession):
        raise NotFound("No such peer.", code="peer_not_found")
    await live.close_peer(request.match_info["peer_id"])
    return web.Response(status=204)


async def _authorise_peer_control(request: web.Request, session_id: str) -> None:
    """The owner's access token, or a client secret of this session (used or not, not expired)."""
    token = bearer_token(request.headers.get("Authorization"))
    try:
        request.app[TOKENS].verify_client_secret(token, session_id=session_id)
        return
    except ClientSecretError:
        pass
    principal = await current_principal(request)
    async with request.app[DATABASE].sessions() as s:
        await owned_session(s, session_id, principal.user_id)


@routes.post("/v1/sessions/{session_id}/end")
async def end_session(request: web.Request) -> web.Response:
    """End a session now: a live one is closed and its recording finalized."""
    principal = await current_principal(request)
    session_id = request.match_info["session_id"]
    db = request.app[DATABASE]
    async with db.sessions() as s:
        row = await owned_session(s, session_id, principal.user_id)
    if (forwarded := await route_to_owner(request, session_id)) is not None:
        return forwarded
    live = request.app[REGISTRY].get(session_id)
    if live is not None:
        await live.end("ended_by_user")
    elif await _owner_lost(request.app, row, principal.user_id):
        pass  # its node died: now interrupted, which is as ended as it gets
    elif row.status in (SessionStatus.CREATED, SessionStatus.CONNECTING):
        async with db.sessions.begin() as s:
            await sessions.transition(
                s, session_id, SessionStatus.ENDED, user_hash=hash_id(principal.user_id), code="ended_by_user"
            )
        wake_jobs(request.app)
    async with db.sessions() as s:
        row = await owned_session(s, session_id, principal.user_id)
        audio = await sessions.recordings(s, [row.id])
    return web.json_response(
        session_view(row, audio.get(row.id, ()), default_retention_days=request.app[SETTINGS].retention_days)
    )
