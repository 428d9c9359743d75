"""Signalling for a session live on another node goes to that node (its owner) over HTTP.

The handlers that act on a live session (a reconnect offer, hanging up a peer, ending, deleting)
call :func:`relay.api.forwarding.route_to_owner` once they know the caller may ask. If the session
is not live in this process and ``sessions.node_id`` names another node that is alive, the request
is sent on to that node's internal URL (same method, path, query, body, ``Authorization`` and
``Content-Type``, plus :data:`FORWARDED_HEADER`, so it is never sent on twice) and the owner's
answer is returned as it is. Otherwise the local handler goes on: a dead owner's session is not live anywhere.
The event feed WebSocket follows the same rule, relayed for as long as it lasts (relay/cluster/ws_forward.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Final, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from relay.cluster.identity import machine_of
from relay.errors import DependencyError
from relay.observability.logging import log_failure
from storage import nodes
from storage.db import Database
from storage.nodes import Owner

__all__ = [
    "FORWARDED_HEADER",
    "NODE_HEADER",
    "ForwardedStream",
    "OwnerRouter",
    "answer_headers",
    "owner_unreachable",
]

log = logging.getLogger("relay.cluster.routing")

#: On a forwarded request: the id of the node that forwarded it.
FORWARDED_HEADER: Final = "x-parley-forwarded"
#: On every answer: the node that produced it (a forwarded answer keeps its owner's).
NODE_HEADER: Final = "x-parley-node"
#: Ending or deleting waits for the recording to finalize on the owner; an offer for its answer.
FORWARD_TIMEOUT_S: Final = 20.0
_REQUEST_HEADERS: Final = ("Authorization", "Content-Type")
# Connection-level headers describe the hop between the nodes, not the answer.
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "date", "server", "te",
     "trailer", "proxy-authenticate", "proxy-authorization"}
)  # fmt: skip
_LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_UNREACHABLE: Final = (aiohttp.ClientError, TimeoutError)


class ForwardedStream(Protocol):
    """A long-lived forwarded connection (an event feed, relay/cluster/ws_forward.py) that this node
    must end itself when it shuts down: aiohttp waits for open handlers before anything else closes."""

    async def going_away(self) -> None:
        """Close the client's side with 1001 and the owner's; idempotent, returns once closed."""
        ...


def answer_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """An owner's answer headers worth passing on: connection-level ones describe the hop between nodes."""
    return CIMultiDict((k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP)


def owner_unreachable(
    exc: BaseException, owner: Owner, session_id: str | None, *, event: str
) -> DependencyError:
    """Log that ``owner`` gave no answer (expected: it died or is restarting) and the 503
    ``node_unreachable`` for the caller, who may retry: by then it answers or counts as dead."""
    log_failure(
        log, event, exc, expected=(type(exc),), extra={"session_id": session_id, "node_id": owner.node_id}
    )
    return DependencyError(
        "The node holding this session did not answer; try again shortly.", code="node_unreachable"
    )


class OwnerRouter:
    """Finds a session's owner and forwards requests to it; owns one HTTP client pool.

    It also knows the forwarded streams still open (:meth:`hold`), so that shutdown can end them
    (:meth:`streams_going_away`); their handlers own them. :meth:`aclose` is idempotent.
    """

    def __init__(
        self, db: Database, node_id: str, *, stale_after_s: float, timeout_s: float = FORWARD_TIMEOUT_S
    ) -> None:
        self._db = db
        self.node_id = node_id
        self.stale_after = timedelta(seconds=stale_after_s)
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=False
        )
        self._streams: set[ForwardedStream] = set()

    async def owner(self, session_id: str) -> Owner | None:
        """The node the session went live on, if one is recorded."""
        return await nodes.owner_of(self._db, session_id, stale_after=self.stale_after)

    def held_elsewhere(self, owner: Owner | None) -> bool:
        """Whether ``owner`` is another node that is alive and reachable from here."""
        if owner is None or owner.node_id == self.node_id or not owner.alive or owner.url is None:
            return False
        # A node without PARLEY_NODE_URL is reached on loopback, which means it only on its machine.
        loopback = urlsplit(owner.url).hostname in _LOOPBACK_NAMES
        return not loopback or machine_of(owner.node_id) == machine_of(self.node_id)

    async def owner_elsewhere(self, session_id: str) -> Owner | None:
        """The session's owner when it is another alive node reachable from here, else None."""
        owner = await self.owner(session_id)
        return owner if self.held_elsewhere(owner) else None

    def url_for(self, owner: Owner, path_qs: str) -> str:
        """The owner's internal URL for a path (with its query): a request's own, to forward it."""
        assert owner.url is not None
        return owner.url.rstrip("/") + path_qs

    def forward_headers(self, request: web.Request) -> dict[str, str]:
        """The request headers the owner needs, plus :data:`FORWARDED_HEADER` naming this node."""
        headers = {h: request.headers[h] for h in _REQUEST_HEADERS if h in request.headers}
        headers[FORWARDED_HEADER] = self.node_id
        return headers

    def hold(self, stream: ForwardedStream) -> None:
        """Count ``stream`` among the open forwarded streams until :meth:`release`."""
        self._streams.add(stream)

    def release(self, stream: ForwardedStream) -> None:
        self._streams.discard(stream)

    async def streams_going_away(self) -> None:
        """End every forwarded stream still open (1001 to its client); for ``on_shutdown``."""
        await asyncio.gather(*(stream.going_away() for stream in list(self._streams)), return_exceptions=True)

    async def forward(self, request: web.Request, owner: Owner, body: bytes | None = None) -> web.Response:
        """Send ``request`` to ``owner`` and return its answer; 503 ``node_unreachable`` if it
        gives none in time (the caller may retry: by then the owner answers or counts as dead)."""
        data = body if body is not None else await request.read()
        status, payload, answer = await self.send(
            owner, request.method, request.rel_url.path_qs, self.forward_headers(request), data,
            session_id=request.match_info.get("session_id"),
        )  # fmt: skip
        return web.Response(status=status, body=payload, headers=answer)

    async def send(
        self,
        owner: Owner,
        method: str,
        path_qs: str,
        headers: dict[str, str],
        data: bytes = b"",
        *,
        session_id: str | None,
    ) -> tuple[int, bytes, CIMultiDict[str]]:
        """One request to ``owner``'s internal URL (``headers`` from :meth:`forward_headers`): its
        status, body and the headers worth passing on; :class:`DependencyError` if it gives none."""
        url = self.url_for(owner, path_qs)
        try:
            # No body, no Content-Type: aiohttp would otherwise label an empty one octet-stream.
            async with self._http.request(
                method, url, data=data or None, headers=headers, allow_redirects=False
            ) as resp:
                payload = await resp.read()
                status = resp.status
                answer = answer_headers(resp.headers.items())
        except _UNREACHABLE as exc:
            raise owner_unreachable(exc, owner, session_id, event="cluster.forward_failed") from None
        log.info(
            "cluster.forwarded",
            extra={"session_id": session_id, "node_id": owner.node_id, "method": method,
                   "http_status": status},
        )  # fmt: skip
        return status, payload, answer

    async def aclose(self) -> None:
        await self.streams_going_away()  # none by now unless on_shutdown did not run
        if not self._http.closed:
            await self._http.close()
