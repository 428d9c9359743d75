"""Continuation sessions: a conversation whose relay died goes on in a fresh session linked to it.

A session whose node died is recovered as ``interrupted`` (its audio and transcript are kept as
they are, finalized like any other). A reconnect offer for it within the reconnect window opens a
*continuation*: a new session of the same learner and topic whose ``continued_from_id`` names the
interrupted one, so the recording of each stays whole and the history shows the link. The model
hears the conversation so far (:func:`conversation_history`), so the coach picks up the thread.

A session continues at most once (a unique index): of two racing offers one opens the
continuation and the other is refused.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage import audit, sessions
from storage.models import Session, SessionStatus
from storage.ports import Speaker

__all__ = ["AlreadyContinued", "continuable", "conversation_history", "create_continuation"]

#: How many earlier sessions a continuation's history reaches back through (a chain of crashes).
MAX_LINKS: Final = 16


class AlreadyContinued(Exception):
    """The session already has its continuation."""


def continuable(session: Session, *, now: datetime, window: timedelta) -> bool:
    """Whether a reconnect may continue ``session``: interrupted (its relay died) within ``window``.

    Other ends (the learner ended it, the grace window ran out, a fatal upstream error) are final:
    the client starts a new session instead."""
    if session.status != SessionStatus.INTERRUPTED or session.ended_at is None:
        return False
    return now - session.ended_at <= window


async def create_continuation(
    s: AsyncSession, previous: Session, *, session_id: str, user_hash: str
) -> Session:
    """The continuation of ``previous`` in ``created``, with its audit event, in the caller's
    transaction (a savepoint, so a lost race leaves the transaction usable).

    Raises :class:`AlreadyContinued` if ``previous`` has one already."""
    session = Session(
        id=session_id,
        user_id=previous.user_id,
        topic_id=previous.topic_id,
        status=SessionStatus.CREATED,
        visibility="private",  # publishing is a per-session, confirmed choice: never inherited
        continued_from_id=previous.id,
    )
    try:
        async with s.begin_nested():
            s.add(session)
            await s.flush()
    except IntegrityError:
        raise AlreadyContinued(previous.id) from None
    audit.record(
        s, "session.created", session_id=session.id, user_hash=user_hash, to_status=session.status,
        code="continuation",
    )  # fmt: skip
    return session


async def conversation_history(s: AsyncSession, session_id: str) -> list[tuple[Speaker, str]]:
    """The final transcript of ``session_id`` and the sessions it continues, oldest first."""
    chain: list[str] = []
    current: str | None = session_id
    while current is not None and len(chain) < MAX_LINKS and current not in chain:
        chain.append(current)
        current = (
            await s.execute(select(Session.continued_from_id).where(Session.id == current))
        ).scalar_one_or_none()
    history: list[tuple[Speaker, str]] = []
    for sid in reversed(chain):
        history.extend(await sessions.final_transcript(s, sid))
    return history
