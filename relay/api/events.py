"""``GET /v1/sessions/{id}/events``: a session's live events over a WebSocket (API.md, integrations).

Each message is one event of the browser's ``events`` data channel (``session.state``,
``transcript.delta``, ``transcript.final``, ``coach.speaking``/``coach.done``, ``error``) as JSON
with an added ``seq``: 1, 2, ... in publishing order, never repeated. Several subscribers may
watch one session; none of them can slow it (``relay/session/feed.py``).

Handshake:

- Credentials: ``Authorization: Bearer <token>`` (an access token, an OIDC token or an API key), or,
  for browsers, which cannot set headers, the subprotocol ``parley.bearer.<token>``. A client using
  the subprotocol offers ``parley.events`` next to it (``new WebSocket(url, ["parley.bearer." +
  token, "parley.events"])``) and the server answers ``parley.events``, never echoing the token. A
  client that offers subprotocols at all must offer ``parley.events``.
- ``?after=<seq>`` resumes after the last event the client saw: every event still held (the last
  1024) with a greater ``seq``, then live ones. Without ``after``, the feed starts at the oldest
  event still held: the whole session unless it was long. A subscriber may connect while the session
  is still ``created`` and see it become ``connecting`` and ``live``.
- Refusals come before the upgrade, as problem+json: 400 ``invalid_subprotocol`` or
  ``websocket_required``; 401 ``unauthorized``; 404 ``not_found`` (missing or someone else's);
  422 ``invalid_request`` (``after`` not an integer >= 0, or beyond the last event published);
  409 ``session_ended`` (the session ended and its feed is no longer held).

A session live on another node (``sessions.node_id``, alive) is served from that node: after the
checks above, this node relays the owner's feed (``relay/cluster/ws_forward.py``), so the client
sees the same events, ``seq`` and close codes as on the owner. The owner's refusals (e.g. 422 for
an ``after`` beyond its last event) come back as its own answer, 503 ``node_unreachable`` when it
cannot be reached, and 1012 closes a relayed feed whose owner went away mid-stream: reconnect
with ``after`` (to any node). A subscriber that connected while the session was still ``created``
keeps its socket when the session goes live on another node: within ``UNSTARTED_CHECK_S`` this node
starts relaying that node's feed to it, from the first event.

Close codes: 1000 the session ended and every event was sent; 1001 the server is shutting down;
1003 the client sent a binary message; 1009 a client message over 4 KiB; 4008 ``slow_consumer``: the
client fell more than 256 events behind (resume with ``after`` = its last ``seq``); 4009
``resume_gap``: events after ``after`` are no longer held (read ``GET /v1/sessions/{id}/transcript``,
then connect without ``after``). The server pings every 15 s and closes a connection whose pong does
not come. Text messages from the client are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from aiohttp import WSMsgType, web

from relay.api.deps import owned_session
from relay.cluster.routing import FORWARDED_HEADER
from relay.cluster.ws_forward import close_client, forward_feed, hand_over
from relay.errors import BadRequest, Conflict
from relay.keys import AUTHENTICATOR, DATABASE, FEEDS, NODE, REGISTRY, ROUTER
from relay.observability.logging import ContextLogger, log_failure
from relay.session.feed import EventFeed, Outcome, ResumeAhead, ResumeGap, Subscription
from storage import sessions
from storage.models import Session, SessionStatus
from storage.nodes import Owner
from storage.uploader import RETRYABLE

__all__ = ["CLOSE_RESUME_GAP", "CLOSE_SLOW_CONSUMER", "SUBPROTOCOL", "routes"]

log = logging.getLogger("relay.api.events")
routes = web.RouteTableDef()

SUBPROTOCOL: Final = "parley.events"
BEARER_PREFIX: Final = "parley.bearer."
CLOSE_SLOW_CONSUMER: Final = 4008
CLOSE_RESUME_GAP: Final = 4009
CLOSE_UNSUPPORTED: Final = 1003
HEARTBEAT_S: Final = 15.0
# The client has nothing to say; this only bounds what a misbehaving one makes the server buffer.
MAX_CLIENT_MESSAGE: Final = 4096
# How often a subscriber of a session that has not started checks that it was not ended meanwhile.
UNSTARTED_CHECK_S: Final = 2.0

_CLOSES: Final = {
    Outcome.ENDED: (1000, b"session_ended"),
    Outcome.SLOW_CONSUMER: (CLOSE_SLOW_CONSUMER, b"slow_consumer"),
    Outcome.GOING_AWAY: (1001, b"going_away"),
}


@routes.get("/v1/sessions/{session_id}/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Stream the session's events to an owner until the session ends."""
    session_id = request.match_info["session_id"]
    offered = _offered_protocols(request)
    principal = await request.app[AUTHENTICATOR].authenticate(_authorization(request, offered))
    db = request.app[DATABASE]
    async with db.sessions() as s:
        row = await owned_session(s, session_id, principal.user_id)
    after = _after(request)
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        heartbeat=HEARTBEAT_S,
        max_msg_size=MAX_CLIENT_MESSAGE,
        # Events are small and few; a deflate context per subscriber would cost far more memory.
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        raise BadRequest(
            "This endpoint is a WebSocket: connect with an Upgrade request.", code="websocket_required"
        )
    owner = await _owner_elsewhere(request, row)
    if owner is not None:
        return await forward_feed(request, ws, request.app[ROUTER], owner, subprotocols=offered)

    feeds = request.app[FEEDS]
    if feeds.get(session_id) is None and row.status != SessionStatus.CREATED:
        raise Conflict("The session has ended.", code="session_ended")
    slog = ContextLogger(log, {"session_id": session_id})
    try:
        sub: Subscription | None = feeds.subscribe(session_id, after)
    except ResumeAhead:
        raise BadRequest(
            "after: beyond the last event of this session", code="invalid_request", field="after"
        ) from None
    except ResumeGap as gap:
        slog.info("events.resume_gap", extra={"after": gap.after, "oldest": gap.oldest})
        sub = None
    try:
        await ws.prepare(request)
        if sub is None:
            await close_client(request, ws, CLOSE_RESUME_GAP, b"resume_gap")
            return ws
        slog.info("events.subscribed", extra={"after": after, "via": principal.via})
        started = time.monotonic()
        stream = _Stream(request, ws, sub, principal.user_id)
        try:
            await stream.run()
        finally:  # also when aiohttp cancels the handler as the closed connection goes
            elapsed_ms = round((time.monotonic() - started) * 1000)
            slog.info(
                "events.closed",
                extra={"close_code": stream.close_code, "sent": sub.taken, "duration_ms": elapsed_ms},
            )
    finally:
        if sub is not None:
            sub.close()
    return ws


async def _owner_elsewhere(request: web.Request, row: Session) -> Owner | None:
    """The node to relay the feed from: another alive node holding the session, by the rule of
    :func:`relay.api.forwarding.route_to_owner`; None: serve it here."""
    if FORWARDED_HEADER in request.headers or request.app[REGISTRY].get(row.id) is not None:
        return None
    if row.node_id is None or row.node_id == request.app[NODE].id:
        return None  # not started, or started here: no need to look the owner up
    return await request.app[ROUTER].owner_elsewhere(row.id)


def _offered_protocols(request: web.Request) -> list[str]:
    headers = request.headers.getall("Sec-WebSocket-Protocol", [])
    return [p.strip() for header in headers for p in header.split(",") if p.strip()]


def _authorization(request: web.Request, offered: list[str]) -> str | None:
    """The Authorization header, else a bearer token carried as a subprotocol (browsers)."""
    if offered and SUBPROTOCOL not in offered:
        # A browser fails a handshake whose answer picks none of its subprotocols; refuse clearly
        # instead (and aiohttp would log the offered list, which may hold a token).
        raise BadRequest(
            f"Offer the subprotocol {SUBPROTOCOL} (next to {BEARER_PREFIX}<token> when used).",
            code="invalid_subprotocol",
        )
    header = request.headers.get("Authorization")
    if header is not None:
        return header
    tokens = [p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)]
    return f"Bearer {tokens[0]}" if len(tokens) == 1 else None


def _after(request: web.Request) -> int | None:
    raw = request.query.get("after")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest(
            "after: must be the seq of an event, an integer >= 0", code="invalid_request", field="after"
        )
    return int(raw)


class _Stream:
    """One subscriber's socket: a pump task sends the events, a reader task watches the client."""

    def __init__(
        self, request: web.Request, ws: web.WebSocketResponse, sub: Subscription, user_id: str
    ) -> None:
        self._request = request
        self._ws = ws
        self._sub = sub
        self._user_id = user_id
        self.close_code = 1006  # until known: the connection broke

    async def run(self) -> None:
        """Send events until the feed ends, the subscriber is cut off, or the client goes; then close."""
        ws, sub = self._ws, self._sub
        name = f"events:{sub.feed.session_id}"
        pump = asyncio.create_task(_pump(ws, sub), name=f"{name}:pump")
        reader = asyncio.create_task(_read(ws), name=f"{name}:reader")
        tasks: list[asyncio.Future[Any]] = [pump, reader]
        watch: asyncio.Task[Owner | None] | None = None
        if not sub.feed.claimed:
            watching = _watch_unstarted(self._request, sub.feed, self._user_id)
            watch = asyncio.create_task(watching, name=f"{name}:unstarted")
            tasks.append(watch)
        try:
            moved_to = await self._first_end(pump, reader, watch)
            if moved_to is not None and sub.outcome is None and not reader.done():
                # The session went live on another node after this client subscribed: nothing was
                # published here, so the owner's feed from the same `after` is exactly what it missed.
                pump.cancel()  # idle: nothing is published to a feed no session claimed
                reader.cancel()  # the relay reads the client from now on
                await asyncio.gather(pump, reader, return_exceptions=True)
                sub.close()
                router = self._request.app[ROUTER]
                offered = _offered_protocols(self._request)
                self.close_code = await hand_over(self._request, ws, router, moved_to, subprotocols=offered)
                return
            if sub.outcome is not None:
                code, reason = _CLOSES[sub.outcome]
            elif reader.done():
                code, reason = reader.result() or (1000, b"")
            else:  # the pump failed: the connection broke under a send
                code, reason = 1011, b""
            # Stop the reader first, so that close() reads the client's answer itself. The pump
            # stays: it may wait for a full send buffer to drain, and cancelling that wait would
            # also cancel the drain the close frame needs (aiohttp shares one waiter).
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if ws.closed:  # the client closed first (or the connection broke): its code, not ours
                self.close_code = ws.close_code or 1006
                return
            self.close_code = code
            await close_client(self._request, ws, code, reason)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _first_end(
        self, pump: asyncio.Task[None], reader: asyncio.Task[Any], watch: asyncio.Task[Owner | None] | None
    ) -> Owner | None:
        """Wait until the pump or the reader ends or the subscription stops; or until ``watch`` finds
        the session live on another node: that node. A watcher that closed the feed instead is no end
        by itself (the subscription stops next, as the pump takes the end)."""
        waits: list[asyncio.Future[Any]] = [pump, reader, self._sub.stopped]
        if watch is not None:
            waits.append(watch)
        while True:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if watch is not None and watch.done() and watch in waits:
                waits.remove(watch)
                moved_to = watch.result()
                if moved_to is not None:
                    return moved_to
            if any(w.done() for w in waits):
                return None


async def _pump(ws: web.WebSocketResponse, sub: Subscription) -> None:
    async for event in sub:
        await ws.send_str(event.text)


async def _read(ws: web.WebSocketResponse) -> tuple[int, bytes] | None:
    """Read the client until it closes (``None``) or sends binary (the close code and reason to use)."""
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            return CLOSE_UNSUPPORTED, b"binary messages are not accepted"
        if msg.type is WSMsgType.ERROR:  # e.g. a message over the limit: aiohttp closed already
            return None
    return None


async def _watch_unstarted(request: web.Request, feed: EventFeed, user_id: str) -> Owner | None:
    """End the unclaimed feed of a session that was ended or deleted before it ever went live.

    Nothing else would: only a live session closes its feed. A session that went live on another
    alive node instead returns that node, for this subscriber to be served from there (the feed is
    left to the other subscribers' watchers, each of which does the same).
    """
    db = request.app[DATABASE]
    while not feed.claimed and not feed.closed:
        await asyncio.sleep(UNSTARTED_CHECK_S)
        try:
            async with db.sessions() as s:
                row = await sessions.get_owned_session(s, feed.session_id, user_id)
            owner = None
            if row is not None and not feed.claimed and row.status != SessionStatus.CREATED:
                owner = await _owner_elsewhere(request, row)
        except Exception as exc:  # the database is briefly down: check again later
            log_failure(
                log, "events.check_failed", exc, expected=RETRYABLE, extra={"session_id": feed.session_id}
            )
            continue
        if owner is not None:
            return owner
        if not feed.claimed and (row is None or row.status != SessionStatus.CREATED):
            feed.close()
    return None
