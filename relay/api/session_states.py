"""A live session's state changes, written where every handler that starts one writes them.

Both kinds of live session (a WebRTC call, relay/api/signaling.py; a Realtime socket,
relay/api/realtime.py) hand their state changes to the same writer: the status row and its audit
event in one transaction, then, on ``ended``, a nudge to this process's job worker, since ending
enqueued the session's finalize job in that transaction.
"""

from __future__ import annotations

from aiohttp import web

from relay.keys import DATABASE, JOBS
from relay.observability.logging import hash_id
from relay.session.registry import StateWriter
from storage import sessions
from storage.models import SessionStatus

__all__ = ["state_writer", "wake_jobs"]


def state_writer(app: web.Application, user_id: str) -> StateWriter:
    """The writer for one learner's live session (``user_id`` goes into audit events hashed)."""
    db = app[DATABASE]
    user_hash = hash_id(user_id)

    async def write_state(session_id: str, status: str, code: str | None) -> None:
        async with db.sessions.begin() as s:
            await sessions.transition(s, session_id, status, user_hash=user_hash, code=code)
        if status == SessionStatus.ENDED:
            wake_jobs(app)

    return write_state


def wake_jobs(app: web.Application) -> None:
    """Let this process's job worker (if it runs one) claim the job just enqueued without waiting."""
    worker = app.get(JOBS)
    if worker is not None:
        worker.wake()
