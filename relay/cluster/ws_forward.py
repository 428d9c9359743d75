"""Event-feed WebSockets for a session live on another node: relayed to its owner.

A subscriber may reach any node, but a session's events exist only in the process that holds it
(``sessions.node_id``). ``relay/api/events.py`` checks the caller and the session here, as for a
local feed, so refusals stay local; then, when another alive node owns the session (the rule of
:func:`relay.api.forwarding.route_to_owner`), it calls :func:`forward_feed`, which

1. opens a WebSocket to the owner's internal URL with the same path and query, the caller's
   ``Authorization`` header and offered subprotocols (``parley.bearer.<token>``), and
   :data:`~relay.cluster.routing.FORWARDED_HEADER` so the owner never forwards it again;
2. answers the client only then: the owner's own HTTP answer (status, problem+json body) if it
   refused, 503 ``node_unreachable`` if it could not be reached, else the upgrade;
3. relays messages both ways (:class:`FeedProxy`) and ends as the owner ends: its close code and
   reason go to the client as they are (1000, 4008, 4009, ...).

When the owner's connection breaks without a close frame (the node died, or stopped answering
pings) the client is closed with :data:`CLOSE_OWNER_GONE`, 1012 "Service Restart" in IANA's
WebSocket close code registry: the service the client was using went away and a new connection
will be served (by whichever node then holds or recovers the session), which is what the client
should do, resuming with ``?after=<last seq>``. 1011 "Internal Error" would say the server hit an
unexpected condition while serving the request: a bug, not a node going away. RFC 6455 leaves
both codes to the registry; a client treats either as "reconnect", 1012 tells it nothing is wrong
with its request.

The upstream is a ``websockets`` client rather than aiohttp's: on a refused handshake it keeps the
owner's answer (status, headers and body), which aiohttp's ``ws_connect`` drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Close
from websockets.typing import Subprotocol

from relay.cluster.routing import NODE_HEADER, OwnerRouter, answer_headers, owner_unreachable
from relay.observability.logging import ContextLogger, log_failure
from storage.nodes import Owner

__all__ = ["CLOSE_OWNER_GONE", "FeedProxy", "close_client", "forward_feed", "hand_over", "relay_feed"]

log = logging.getLogger("relay.cluster.ws_forward")

#: The client's close code when the owner's connection broke (see the module docstring).
CLOSE_OWNER_GONE: Final = 1012
OWNER_GONE_REASON: Final = "node_unreachable"
#: A handshake with the owner is one database read there; longer means it is not answering.
OPEN_TIMEOUT_S: Final = 10.0
#: How often the owner is pinged, and how long its pong may take: a node that vanished without
#: closing its sockets (a network partition) is noticed within their sum.
PING_INTERVAL_S: Final = 15.0
PING_TIMEOUT_S: Final = 15.0
#: A close waits this long for the other side's answer; then the connection is dropped.
CLOSE_TIMEOUT_S: Final = 10.0
#: Events are JSON of a few KiB at most (a long transcript segment); this only bounds a broken owner.
MAX_OWNER_MESSAGE: Final = 2**20
_UNREACHABLE: Final = (OSError, TimeoutError, InvalidHandshake)
# Codes that may not appear in a close frame (RFC 6455 7.4.1): they describe what a side saw locally.
_UNSENDABLE: Final = frozenset({1005, 1006, 1015})


async def forward_feed(
    request: web.Request,
    client: web.WebSocketResponse,
    router: OwnerRouter,
    owner: Owner,
    *,
    subprotocols: list[str],
) -> web.StreamResponse:
    """Serve ``request`` (a feed subscription already checked here) from ``owner``'s feed.

    ``client``: the not yet prepared response, configured like a local feed's (heartbeat,
    message limit). Returns the owner's refusal as its HTTP answer, or ``client`` once the relayed
    feed ended; raises :class:`~relay.errors.DependencyError` ``node_unreachable`` (503) when the
    owner could not be reached. The client's socket is upgraded only after the owner accepted.
    """
    session_id = request.match_info["session_id"]
    slog = ContextLogger(log, {"session_id": session_id, "node_id": owner.node_id})
    try:
        upstream = await open_upstream(router, request, owner, subprotocols)
    except InvalidStatus as refused:
        answer = refused.response
        slog.info("events.forward_refused", extra={"http_status": answer.status_code})
        return web.Response(
            status=answer.status_code,
            body=bytes(answer.body or b""),
            headers=answer_headers(answer.headers.raw_items()),
        )
    except _UNREACHABLE as exc:
        raise owner_unreachable(exc, owner, session_id, event="events.forward_failed") from None

    # The upgrade names the node that serves the feed, as a forwarded answer does.
    owner_node = upstream.response.headers.get(NODE_HEADER) if upstream.response else None
    if owner_node is not None:
        client.headers[NODE_HEADER] = owner_node
    await relay_feed(request, client, router, upstream, owner)
    return client


async def hand_over(
    request: web.Request,
    client: web.WebSocketResponse,
    router: OwnerRouter,
    owner: Owner,
    *,
    subprotocols: list[str],
) -> int:
    """Go on serving an open ``client`` from ``owner``'s feed (its session went live there after the
    client subscribed here); the client's close code. An owner that refuses or cannot be reached
    closes the client with :data:`CLOSE_OWNER_GONE`: reconnecting reaches the owner's feed directly."""
    try:
        upstream = await open_upstream(router, request, owner, subprotocols)
    except (InvalidStatus, *_UNREACHABLE) as exc:
        log_failure(
            log, "events.hand_over_failed", exc, expected=(InvalidStatus, *_UNREACHABLE),
            extra={"session_id": request.match_info.get("session_id"), "node_id": owner.node_id},
        )  # fmt: skip
        await close_client(request, client, CLOSE_OWNER_GONE, OWNER_GONE_REASON.encode())
        return CLOSE_OWNER_GONE
    return await relay_feed(request, client, router, upstream, owner)


async def relay_feed(
    request: web.Request,
    client: web.WebSocketResponse,
    router: OwnerRouter,
    upstream: ClientConnection,
    owner: Owner,
) -> int:
    """Relay ``upstream`` to ``client`` (upgraded here if it is not yet) until either ends; closes both.

    Returns the client's close code.
    """
    slog = ContextLogger(log, {"session_id": request.match_info.get("session_id"), "node_id": owner.node_id})
    proxy = FeedProxy(request, client, upstream)
    router.hold(proxy)
    started = time.monotonic()
    try:
        if not client.prepared:
            await client.prepare(request)
        slog.info("events.forwarded")
        await proxy.run()
    finally:  # also when aiohttp cancels the handler, or the client left before the upgrade
        router.release(proxy)
        await proxy.aclose()
        slog.info(
            "events.forward_closed",
            extra={
                "close_code": proxy.close_code,
                "count": proxy.relayed,
                "duration_ms": round((time.monotonic() - started) * 1000),
            },
        )
    return proxy.close_code


async def open_upstream(
    router: OwnerRouter, request: web.Request, owner: Owner, subprotocols: list[str]
) -> ClientConnection:
    """A WebSocket to ``owner`` for ``request``; raises ``InvalidStatus`` with its answer if it refused.

    Raises ``OSError``, ``TimeoutError`` or ``InvalidHandshake`` when it could not be reached.
    """
    url = router.url_for(owner, request.rel_url.path_qs)
    # PARLEY_NODE_URL is http(s)://; the same host and port speak ws(s)://.
    url = "ws" + url.removeprefix("http") if url.startswith("http") else url
    return await connect(
        url,
        additional_headers=router.forward_headers(request),
        subprotocols=[Subprotocol(p) for p in subprotocols] or None,
        # The hop is node to node: never through an HTTP proxy named in the environment (the default).
        proxy=None,
        compression=None,  # as the client side: events are small, a deflate context costs more
        open_timeout=OPEN_TIMEOUT_S,
        ping_interval=PING_INTERVAL_S,
        ping_timeout=PING_TIMEOUT_S,
        close_timeout=CLOSE_TIMEOUT_S,
        max_size=MAX_OWNER_MESSAGE,
    )


class FeedProxy:
    """One client's feed relayed from the owner's: a task per direction, closed as the first side ends.

    :meth:`run` is called once by the handler that owns the proxy; :meth:`going_away` (shutdown)
    and :meth:`aclose` are idempotent and safe from other tasks.
    """

    def __init__(
        self, request: web.Request, client: web.WebSocketResponse, upstream: ClientConnection
    ) -> None:
        self._request = request
        self._client = client
        self._upstream = upstream
        self._leaving: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done = asyncio.Event()
        self.close_code = 1006  # until known: the connection broke
        self.relayed = 0  # messages from the owner sent on to the client

    async def run(self) -> None:
        """Relay until the owner ends the feed, the client leaves, or this node shuts down; then close
        the other side with the matching code."""
        name = f"events-forward:{self._request.match_info.get('session_id')}"
        down = asyncio.create_task(self._down(), name=f"{name}:down")
        up = asyncio.create_task(self._up(), name=f"{name}:up")
        gone = asyncio.create_task(self._upstream.wait_closed(), name=f"{name}:gone")
        try:
            waits: list[asyncio.Future[Any]] = [down, up, gone, self._leaving]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if gone.done() and not down.done() and not self._leaving.done():
                # The owner's connection closed, but what it sent before may still be on its way to the
                # client (or stuck behind a client that stopped reading): let it go out, for a while.
                waits.remove(gone)
                await asyncio.wait(waits, timeout=CLOSE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if self._leaving.done():
                code, reason = 1001, "going_away"
            elif down.done() and down.exception() is None:
                rcvd = down.result()
                code, reason = _relayed_close(rcvd)
                if rcvd is None:
                    log.warning("events.owner_lost", extra={"session_id": self._session_id})
            elif up.done() or self._client.closed:
                code, reason = 1000, ""  # the client left: nothing to tell it
            elif down.done():  # the client's connection broke under a send
                code, reason = 1011, ""
            else:  # the owner's connection closed and the client takes nothing: cut it, with the
                # owner's code if its close frame came before the connection went
                code, reason = _relayed_close(self._upstream.protocol.close_rcvd)
            # Stop reading the client before closing it, so that close() reads the client's answer;
            # the down task stays while it may wait on a send the close frame must follow (events.py).
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
            if self._client.closed:  # the client closed first (or its connection broke): its code
                self.close_code = self._client.close_code or 1006
            else:
                self.close_code = code
                await close_client(self._request, self._client, code, reason.encode())
        finally:
            for task in (down, up, gone):
                task.cancel()
            await asyncio.gather(down, up, gone, return_exceptions=True)
            await self.aclose()

    @property
    def _session_id(self) -> str | None:
        return self._request.match_info.get("session_id")

    async def _down(self) -> Close | None:
        """Send the owner's messages to the client until the owner closes: its close frame, or None
        when the connection broke without one."""
        while True:
            try:
                message = await self._upstream.recv()
            except ConnectionClosed as closed:
                return closed.rcvd
            if isinstance(message, str):
                await self._client.send_str(message)
            else:
                await self._client.send_bytes(message)
            self.relayed += 1

    async def _up(self) -> None:
        """Send the client's messages to the owner, which applies the feed's rules to them (it ignores
        text and closes with 1003 on binary); returns when the client is gone."""
        async for msg in self._client:
            if msg.type is WSMsgType.ERROR:  # e.g. a message over the limit: aiohttp closed already
                return
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                # If the owner went, _down returns with how it went, which decides the client's close.
                with contextlib.suppress(ConnectionClosed):
                    await self._upstream.send(msg.data)

    async def going_away(self) -> None:
        """Close the client with 1001 (this node shuts down) and the owner's side; returns once done."""
        if not self._leaving.done():
            self._leaving.set_result(None)
        async with asyncio.timeout(2 * CLOSE_TIMEOUT_S):
            await self._done.wait()

    async def aclose(self) -> None:
        """Close the owner's side (1000, or what the close already said); idempotent."""
        try:
            # websockets bounds the closing handshake by close_timeout, then drops the connection.
            await self._upstream.close()
        finally:
            self._done.set()


def _relayed_close(rcvd: Close | None) -> tuple[int, str]:
    """The client's close code and reason for the owner's close frame (None: the connection broke)."""
    if rcvd is None:
        return CLOSE_OWNER_GONE, OWNER_GONE_REASON
    if rcvd.code in _UNSENDABLE:  # 1005: the owner closed without a code
        return 1000, rcvd.reason
    return rcvd.code, rcvd.reason


async def close_client(request: web.Request, ws: web.WebSocketResponse, code: int, reason: bytes) -> None:
    """Close with ``code``; a client that takes nothing more (a full buffer) is cut after a timeout."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await ws.close(code=code, message=reason)
    except TimeoutError:
        pass
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # Not this task's cancellation: a send cancelled while it waited for the drain the close
        # needed too (aiohttp shares the waiter). The close frame is written; give up on the rest.
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size() > 0:
        # A client that never took its data would hold the buffer for as long as TCP lets it.
        transport.abort()
