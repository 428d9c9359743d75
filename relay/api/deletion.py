"""Delete a session or a whole account: fenced, a live session ended, then storage deletes.

Per session, in this order: the tombstone is committed (:func:`storage.deletion.fence`), so every
writer still in flight (a transcript write, an upload, an export) stops from now on instead of
writing into what is being deleted; a live session is ended (its recorder closes, its last writes
are refused by the fence); the uploader is given up to :data:`UPLOAD_SETTLE_S` to finish what it has
in flight for the session (an upload that raced the fence removes its own object); then rows,
objects and spool files are removed and the sweep verifies that nothing is left. A dependency that is
down makes the delete a retryable 503 (``delete_incomplete``), never a 204 with something left.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from relay.api.deps import current_principal, owned_session
from relay.api.forwarding import route_to_owner
from relay.errors import DependencyError
from relay.keys import DATABASE, OBJECTS, RECORDERS, REGISTRY, ROUTER, SETTINGS
from relay.observability.logging import hash_id
from storage import nodes
from storage.db import DatabaseUnavailable
from storage.deletion import DeletionReport, delete_session, delete_user, fence
from storage.models import Session
from storage.objects import ObjectStoreError
from storage.recorder import SpoolRecorderFactory

__all__ = ["routes"]

log = logging.getLogger("relay.api.deletion")
routes = web.RouteTableDef()

#: How long a delete waits for the uploader to settle what it has in flight for the session.
UPLOAD_SETTLE_S: Final = 5.0
_INCOMPLETE: Final = "Deletion could not be verified complete; please try again."
_UNAVAILABLE: Final = (ObjectStoreError, DatabaseUnavailable, OperationalError, InterfaceError)


async def _fence_and_end(app: web.Application, session_id: str) -> None:
    """Fence the session, end it if it is live here, and let in-flight uploads notice the fence."""
    await fence(app[DATABASE], session_id)
    live = app[REGISTRY].get(session_id)
    if live is not None:
        await live.end("deleted")
    recorders = app[RECORDERS]
    if isinstance(recorders, SpoolRecorderFactory):
        await recorders.uploader.wait_session(session_id, UPLOAD_SETTLE_S)


async def _delete_on_owners(request: web.Request, user_id: str) -> None:
    """Sessions held by another alive node are deleted there (``DELETE /v1/sessions/{id}`` with the
    caller's token), as a single session's delete is: only that node can end its live call and
    remove its spool files. Anything but 204 (or 404: already gone) stops the account's deletion."""
    app = request.app
    router = app[ROUTER]
    owners = await nodes.alive_owners_of_user(app[DATABASE], user_id, stale_after=router.stale_after)
    headers = router.forward_headers(request)
    for session_id, owner in owners.items():
        if app[REGISTRY].get(session_id) is not None or not router.held_elsewhere(owner):
            continue
        status, _, _ = await router.send(
            owner, "DELETE", f"/v1/sessions/{session_id}", headers, session_id=session_id
        )
        if status not in (204, 404):
            log.warning("account.delete_failed", extra={"session_id": session_id, "http_status": status})
            raise DependencyError(_INCOMPLETE, code="delete_incomplete")


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def _check(reports: list[DeletionReport]) -> None:
    """A deletion that left something behind is an error the learner must see (and may retry)."""
    if any(not r.complete for r in reports):
        raise DependencyError(_INCOMPLETE, code="delete_incomplete")


@routes.delete("/v1/sessions/{session_id}")
async def delete_one(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    session_id = request.match_info["session_id"]
    app = request.app
    async with app[DATABASE].sessions() as s:
        await owned_session(s, session_id, principal.user_id)
    # Live on another node: that node ends it, removes its spool files, and deletes the rest.
    if (forwarded := await route_to_owner(request, session_id)) is not None:
        return forwarded
    try:
        await _fence_and_end(app, session_id)
        report = await delete_session(
            app[DATABASE], app[OBJECTS], app[SETTINGS].spool_dir, session_id,
            user_hash=hash_id(principal.user_id),
        )  # fmt: skip
    except _UNAVAILABLE as exc:
        log.warning("session.delete_failed", extra={"session_id": session_id, "error_type": _name(exc)})
        raise DependencyError(_INCOMPLETE, code="delete_incomplete") from exc
    _check([report])
    return web.Response(status=204)


@routes.delete("/v1/me")
async def delete_me(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    app = request.app
    await _delete_on_owners(request, principal.user_id)
    async with app[DATABASE].sessions() as s:
        session_ids = list(
            (await s.execute(select(Session.id).where(Session.user_id == principal.user_id))).scalars()
        )
    try:
        for session_id in session_ids:
            await _fence_and_end(app, session_id)
        reports = await delete_user(
            app[DATABASE], app[OBJECTS], app[SETTINGS].spool_dir, principal.user_id, session_ids,
            user_hash=hash_id(principal.user_id),
        )  # fmt: skip
    except _UNAVAILABLE as exc:
        user = hash_id(principal.user_id)
        log.warning("account.delete_failed", extra={"user": user, "error_type": _name(exc)})
        raise DependencyError(_INCOMPLETE, code="delete_incomplete") from exc
    _check(reports)
    log.info("account.deleted", extra={"user": hash_id(principal.user_id), "sessions": len(reports)})
    return web.Response(status=204)
