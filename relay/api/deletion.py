"""Delete a session or a whole account: a live session is ended first, then storage deletes."""

from __future__ import annotations

import logging

from aiohttp import web
from sqlalchemy import select

from relay.api.deps import current_principal, owned_session
from relay.errors import DependencyError
from relay.keys import DATABASE, OBJECTS, REGISTRY, SETTINGS
from relay.observability.logging import hash_id
from storage.deletion import DeletionReport, delete_session, delete_user
from storage.models import Session

__all__ = ["routes"]

log = logging.getLogger("relay.api.deletion")
routes = web.RouteTableDef()


async def _end_if_live(app: web.Application, session_id: str) -> None:
    live = app[REGISTRY].get(session_id)
    if live is not None:
        await live.end("deleted")


def _check(reports: list[DeletionReport]) -> None:
    """A deletion that left something behind is an error the learner must see (and may retry)."""
    if any(not r.complete for r in reports):
        raise DependencyError(
            "Deletion could not be verified complete; please try again.", code="delete_incomplete"
        )


@routes.delete("/v1/sessions/{session_id}")
async def delete_one(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    session_id = request.match_info["session_id"]
    app = request.app
    async with app[DATABASE].sessions() as s:
        await owned_session(s, session_id, principal.user_id)
    await _end_if_live(app, session_id)
    report = await delete_session(
        app[DATABASE], app[OBJECTS], app[SETTINGS].spool_dir, session_id, user_hash=hash_id(principal.user_id)
    )
    _check([report])
    return web.Response(status=204)


@routes.delete("/v1/me")
async def delete_me(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    app = request.app
    async with app[DATABASE].sessions() as s:
        session_ids = list(
            (await s.execute(select(Session.id).where(Session.user_id == principal.user_id))).scalars()
        )
    for session_id in session_ids:
        await _end_if_live(app, session_id)
    reports = await delete_user(
        app[DATABASE], app[OBJECTS], app[SETTINGS].spool_dir, principal.user_id, session_ids,
        user_hash=hash_id(principal.user_id),
    )  # fmt: skip
    _check(reports)
    log.info("account.deleted", extra={"user": hash_id(principal.user_id), "sessions": len(reports)})
    return web.Response(status=204)
