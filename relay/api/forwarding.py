"""Handlers' side of routing signalling to a session's owner node (relay/cluster/routing.py)."""

from __future__ import annotations

from aiohttp import web

from relay.cluster.routing import FORWARDED_HEADER, NODE_HEADER
from relay.keys import NODE, REGISTRY, ROUTER

__all__ = ["route_to_owner", "stamp_node"]


async def route_to_owner(
    request: web.Request, session_id: str, *, body: bytes | None = None
) -> web.Response | None:
    """The owner's answer when another alive node holds ``session_id``; None: handle it here.

    Call it after checking that the caller may act on the session (so refusals stay local and
    cheap), before acting. ``body``: the request body if the handler already read it.
    """
    if FORWARDED_HEADER in request.headers or request.app[REGISTRY].get(session_id) is not None:
        return None
    router = request.app[ROUTER]
    owner = await router.owner(session_id)
    if owner is None or not router.held_elsewhere(owner):
        return None
    return await router.forward(request, owner, body)


async def stamp_node(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: name the node that answered (a forwarded answer keeps the owner's)."""
    if NODE_HEADER not in response.headers:
        response.headers[NODE_HEADER] = request.app[NODE].id
