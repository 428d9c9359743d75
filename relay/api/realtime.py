"""``GET /v1/realtime?topic_id=...``: Parley as a drop-in OpenAI Realtime upstream (API.md, last section).

A client built for the OpenAI Realtime API (the ``openai`` SDK with ``websocket_base_url`` pointed
at Parley, a telephony bridge, a backend agent) connects with a Parley API key or access token in
``Authorization``. Before the upgrade, Parley checks the caller, the topic, the per-user session
rate and the node's admission; a refusal is an ordinary problem+json answer (401, 400, 429, 503).
Then it creates a private session owned by the caller, answers the handshake with its id in
``x-parley-session-id`` and relays the conversation through a
:class:`~relay.integrations.bridge.RealtimeBridge`, which records it exactly as a WebRTC session.
The SDK insists on a ``model`` query parameter; Parley's configured model is used whatever it says.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiohttp import web

from relay.api.deps import current_principal
from relay.api.session_states import state_writer
from relay.errors import BadRequest, RateLimited
from relay.integrations.bridge import RealtimeBridge, TopicConfig
from relay.keys import (
    DATABASE,
    FEEDS,
    LIMITS,
    LIVE,
    METRICS,
    NODE,
    RECORDERS,
    REGISTRY,
    SETTINGS,
    UPSTREAM,
)
from relay.observability.logging import hash_id
from storage import nodes, sessions, topics
from storage.models import new_id

__all__ = ["SESSION_HEADER", "routes"]

log = logging.getLogger("relay.api.realtime")
routes = web.RouteTableDef()

SESSION_HEADER: Final = "x-parley-session-id"
#: A 15 MiB ``input_audio_buffer.append`` (the API's limit) once base64-encoded, plus its JSON.
MAX_CLIENT_FRAME: Final = 21 * 1024 * 1024


@routes.get("/v1/realtime")
async def realtime_socket(request: web.Request) -> web.StreamResponse:
    principal = await current_principal(request)
    topic_id = request.query.get("topic_id", "")
    if not topic_id:
        raise BadRequest("topic_id: required", code="invalid_request", field="topic_id")
    ws = web.WebSocketResponse(max_msg_size=MAX_CLIENT_FRAME, autoping=True)
    if not ws.can_prepare(request).ok:
        raise BadRequest(
            "This endpoint is a WebSocket: connect with an Upgrade request.", code="websocket_required"
        )
    app = request.app
    db = app[DATABASE]
    async with db.sessions() as s:
        topic = await topics.get_topic(s, topic_id)
    if topic is None:
        raise BadRequest("topic_id: no such topic", code="invalid_request", field="topic_id")
    wait = app[LIMITS].session_creation.hit(principal.user_id)
    if wait:
        raise RateLimited("Too many new sessions; try again shortly.", retry_after_s=wait)

    registry = app[REGISTRY]
    session_id = new_id("ses")
    registry.admit(session_id)  # CapacityError -> 503 + Retry-After, before anything is created
    user_hash = hash_id(principal.user_id)
    try:
        async with db.sessions.begin() as s:
            await sessions.create_session(
                s, user_id=principal.user_id, topic_id=topic.id, user_hash=user_hash, session_id=session_id
            )
            await nodes.claim_session(s, session_id, app[NODE].id)  # live on this node
        ws.headers[SESSION_HEADER] = session_id
        await ws.prepare(request)
    except BaseException:
        registry.release(session_id)
        raise

    feed = app[FEEDS].open(session_id)
    bridge = RealtimeBridge(
        session_id,
        ws=ws,
        topic=TopicConfig(topic.instructions, topic.turn_detection),
        settings=app[SETTINGS],
        upstream=app[UPSTREAM],
        recorder=app[RECORDERS].open(session_id),
        metrics=app[METRICS],
        write_state=state_writer(app, principal.user_id),
        send=feed.publish,
        on_closed=lambda b: registry.discard(b.id),
    )
    registry.add(bridge)
    log.info("realtime.opened", extra={"session_id": session_id, "user": user_hash, "via": principal.via})
    # The bridge runs as its own task: aiohttp may cancel this handler when the client goes away,
    # and finalizing the recording must not be cut short by that.
    task = asyncio.create_task(bridge.run(), name=f"realtime:{session_id}")
    app[LIVE].add(task)
    task.add_done_callback(app[LIVE].discard)
    task.add_done_callback(lambda _: feed.close())  # after the final session.state, also if cancelled
    await asyncio.shield(task)
    return ws
