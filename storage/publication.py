"""Publishing a session: confirmation bookkeeping, the public slug, and the published read side.

Publishing takes two requests (API.md). The first records a confirmation's ``jti`` and expiry (never
the token) in ``client_secrets`` under the scope ``publication``; the second redeems it, once, and
publishes in the same transaction, so a refused or failed second step publishes nothing and leaves
the token unused. Withdrawing clears the slug and voids every outstanding confirmation at once.

A slug is 32 URL-safe characters from :func:`secrets.token_urlsafe` (192 random bits) and is new on
every publication, so a link that was withdrawn never comes back to life.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Final

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage import audit
from storage.models import AudioChunk, AudioRecording, ClientSecret, Session, SessionStatus, utcnow
from storage.sessions import mark_used

__all__ = [
    "CONFIRMATION_SCOPE",
    "PUBLISHABLE",
    "not_publishable_reason",
    "publish",
    "published_session",
    "record_confirmation",
    "redeem_confirmation",
    "tracks_with_audio",
    "unpublish",
]

CONFIRMATION_SCOPE: Final = "publication"
#: States in which nothing more will be recorded: the conversation is over and its recorder finalized
#: (``interrupted`` is final too: the relay died and recovery finalized what was left).
PUBLISHABLE: Final = frozenset(
    {
        SessionStatus.ENDED,
        SessionStatus.PROCESSING,
        SessionStatus.PROCESSED,
        SessionStatus.PROCESSING_FAILED,
        SessionStatus.INTERRUPTED,
    }
)
SLUG_BYTES: Final = 24


async def not_publishable_reason(s: AsyncSession, session: Session) -> str | None:
    """Why ``session`` cannot be published now (``None`` when it can).

    A session must be in a :data:`PUBLISHABLE` state and none of its tracks may still be recording.
    """
    if session.status not in PUBLISHABLE:
        return f"the session is {session.status}"
    recording = (
        await s.execute(
            select(AudioRecording.id)
            .where(AudioRecording.session_id == session.id, AudioRecording.status == "recording")
            .limit(1)
        )
    ).first()
    if recording is not None:
        return "its recording is not finalized yet"
    return None


async def record_confirmation(
    s: AsyncSession, *, jti: str, session_id: str, expires_at: datetime, user_hash: str | None
) -> None:
    """Remember a minted confirmation by its id and expiry only, with its audit event."""
    s.add(ClientSecret(jti=jti, session_id=session_id, scope=CONFIRMATION_SCOPE, expires_at=expires_at))
    audit.record(s, "session.publication_requested", session_id=session_id, user_hash=user_hash)
    await s.flush()


async def redeem_confirmation(s: AsyncSession, *, jti: str, session_id: str) -> bool:
    """Mark a confirmation used, atomically; False when it is unknown, used, expired or another's."""
    return await mark_used(s, jti=jti, session_id=session_id, scope=CONFIRMATION_SCOPE)


async def publish(s: AsyncSession, session_id: str, *, user_hash: str | None) -> str:
    """Make the session public and return its slug (the current one if it is public already)."""
    session = (
        await s.execute(select(Session).where(Session.id == session_id).with_for_update())
    ).scalar_one()
    if session.visibility == "public" and session.public_slug:
        return session.public_slug
    session.visibility = "public"
    session.public_slug = secrets.token_urlsafe(SLUG_BYTES)
    session.published_at = utcnow()
    audit.record(s, "session.published", session_id=session_id, user_hash=user_hash, code="public")
    await s.flush()
    return session.public_slug


async def unpublish(s: AsyncSession, session_id: str, *, user_hash: str | None) -> bool:
    """Make the session private at once and void its unused confirmations; True if it was public."""
    now = utcnow()
    await s.execute(
        update(ClientSecret)
        .where(
            ClientSecret.session_id == session_id,
            ClientSecret.scope == CONFIRMATION_SCOPE,
            ClientSecret.used_at.is_(None),
        )
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    session = (
        await s.execute(select(Session).where(Session.id == session_id).with_for_update())
    ).scalar_one()
    was_public = session.visibility == "public" or session.public_slug is not None
    session.visibility = "private"
    session.public_slug = None
    session.published_at = None
    if was_public:
        audit.record(s, "session.unpublished", session_id=session_id, user_hash=user_hash, code="private")
    await s.flush()
    return was_public


async def published_session(s: AsyncSession, slug: str) -> Session | None:
    """The session published under ``slug``, or ``None`` (unknown, or private again)."""
    query = select(Session).where(Session.public_slug == slug, Session.visibility == "public")
    return (await s.execute(query)).scalar_one_or_none()


async def tracks_with_audio(s: AsyncSession, session_id: str) -> Sequence[str]:
    """The tracks of a session that have stored audio (segments or an assembled file), sorted."""
    with_chunks = (
        select(AudioRecording.track)
        .join(AudioChunk, AudioChunk.recording_id == AudioRecording.id)
        .where(AudioRecording.session_id == session_id)
    )
    with_file = select(AudioRecording.track).where(
        AudioRecording.session_id == session_id, AudioRecording.final_object_key.is_not(None)
    )
    rows = await s.execute(with_chunks.union(with_file))
    return sorted({str(track) for (track,) in rows})
