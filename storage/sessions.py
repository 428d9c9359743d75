"""Practice sessions: creation, owner-scoped reads, cursor pages, client-secret bookkeeping.

Owner scoping lives in the queries themselves: a session that belongs to someone else is simply not
found, so no caller can turn a permission check into an existence oracle by forgetting it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage import audit, jobs
from storage.models import AudioRecording, ClientSecret, Session, SessionStatus, TranscriptSegment, utcnow
from storage.ports import Speaker

__all__ = [
    "InvalidCursor",
    "Page",
    "Redemption",
    "create_session",
    "final_transcript",
    "get_owned_session",
    "list_owned_sessions",
    "record_client_secret",
    "recordings",
    "redeem_client_secret",
    "transcript_segments",
    "transition",
]


class InvalidCursor(ValueError):
    """A pagination cursor that Parley did not hand out."""


@dataclass(frozen=True, slots=True)
class Page:
    sessions: Sequence[Session]
    next_cursor: str | None


class Redemption(StrEnum):
    OK = "ok"
    USED = "used"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


async def create_session(
    s: AsyncSession, *, user_id: str, topic_id: str, user_hash: str, session_id: str | None = None
) -> Session:
    """A new private session in ``created``, with its audit event, in the caller's transaction.

    ``session_id`` when the caller reserved one already (a live slot is admitted under it)."""
    session = Session(user_id=user_id, topic_id=topic_id, status=SessionStatus.CREATED, visibility="private")
    if session_id is not None:
        session.id = session_id
    s.add(session)
    await s.flush()
    audit.record(s, "session.created", session_id=session.id, user_hash=user_hash, to_status=session.status)
    return session


async def get_owned_session(s: AsyncSession, session_id: str, user_id: str) -> Session | None:
    query = select(Session).where(Session.id == session_id, Session.user_id == user_id)
    return (await s.execute(query)).scalar_one_or_none()


def _encode_cursor(session: Session) -> str:
    raw = f"{session.created_at.isoformat()}|{session.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, session_id = raw.split("|", 1)
        when = datetime.fromisoformat(created)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor(cursor) from None
    if when.tzinfo is None or not session_id:
        raise InvalidCursor(cursor)
    return when, session_id


async def list_owned_sessions(s: AsyncSession, user_id: str, *, limit: int, cursor: str | None) -> Page:
    """The user's sessions, newest first, ``limit`` at a time; ties on time are ordered by id."""
    query = select(Session).where(Session.user_id == user_id)
    if cursor is not None:
        when, last_id = _decode_cursor(cursor)
        query = query.where(
            or_(Session.created_at < when, and_(Session.created_at == when, Session.id < last_id))
        )
    query = query.order_by(Session.created_at.desc(), Session.id.desc()).limit(limit + 1)
    rows = (await s.execute(query)).scalars().all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, _encode_cursor(rows[-1]) if more and rows else None)


async def record_client_secret(s: AsyncSession, *, jti: str, session_id: str, expires_at: datetime) -> None:
    """Remember a minted secret by its id and expiry only; the token itself is never stored."""
    s.add(ClientSecret(jti=jti, session_id=session_id, scope="webrtc", expires_at=expires_at))
    await s.flush()


async def mark_used(s: AsyncSession, *, jti: str, session_id: str, scope: str) -> bool:
    """Mark a stored secret of ``scope`` used, atomically: of two concurrent calls exactly one gets
    True; False when it is unknown, already used, expired, or another session's or scope's."""
    now = utcnow()
    result = await s.execute(
        update(ClientSecret)
        .where(
            ClientSecret.jti == jti,
            ClientSecret.session_id == session_id,
            ClientSecret.scope == scope,  # the table holds WebRTC secrets and publication confirmations
            ClientSecret.used_at.is_(None),
            ClientSecret.expires_at > now,
        )
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def redeem_client_secret(s: AsyncSession, *, jti: str, session_id: str) -> Redemption:
    """Mark a secret used, atomically: of two concurrent redemptions exactly one gets ``OK``."""
    if await mark_used(s, jti=jti, session_id=session_id, scope="webrtc"):
        return Redemption.OK
    row = (
        await s.execute(
            select(ClientSecret).where(
                ClientSecret.jti == jti, ClientSecret.session_id == session_id, ClientSecret.scope == "webrtc"
            )
        )
    ).scalar_one_or_none()
    if row is None:
        return Redemption.UNKNOWN
    if row.used_at is not None:
        return Redemption.USED
    return Redemption.EXPIRED


async def transition(
    s: AsyncSession,
    session_id: str,
    to_status: str,
    *,
    user_hash: str | None = None,
    code: str | None = None,
    node_id: str | None = None,
) -> str | None:
    """Move a session to ``to_status`` with its audit event; returns the previous status (None if gone).

    Sets ``started_at`` on the first ``live`` and ``ended_at``/``duration_ms`` on ``ended``. Moving
    to ``ended`` also enqueues the session's ``finalize`` job (post-processing) in the same
    transaction, so no ended session is ever left without one.
    """
    session = (
        await s.execute(select(Session).where(Session.id == session_id).with_for_update())
    ).scalar_one_or_none()
    if session is None:
        return None
    previous = session.status
    if previous == to_status:
        return previous
    now = utcnow()
    session.status = to_status
    if node_id is not None:
        session.node_id = node_id
    if to_status == SessionStatus.LIVE and session.started_at is None:
        session.started_at = now
    if to_status in (SessionStatus.ENDED, SessionStatus.FAILED, SessionStatus.INTERRUPTED):
        session.ended_at = now
        session.end_reason = code
        if session.started_at is not None:
            session.duration_ms = int((now - session.started_at).total_seconds() * 1000)
    audit.record(
        s,
        "session.state",
        session_id=session_id,
        user_hash=user_hash,
        from_status=previous,
        to_status=to_status,
        code=code,
    )
    if to_status == SessionStatus.ENDED:
        await jobs.enqueue(s, jobs.FINALIZE, session_id)
    return previous


async def transcript_segments(s: AsyncSession, session_id: str) -> Sequence[TranscriptSegment]:
    """Final segments of a session in conversation order (position, then start time)."""
    rows = await s.execute(
        select(TranscriptSegment)
        .where(TranscriptSegment.session_id == session_id)
        .order_by(TranscriptSegment.seq, TranscriptSegment.start_ms, TranscriptSegment.id)
    )
    return rows.scalars().all()


async def final_transcript(s: AsyncSession, session_id: str) -> list[tuple[Speaker, str]]:
    """Who said what, final text only, in conversation order: what the model is replayed."""
    rows = (
        await s.execute(
            select(TranscriptSegment.speaker, TranscriptSegment.text)
            .where(TranscriptSegment.session_id == session_id, TranscriptSegment.final.is_(True))
            .order_by(TranscriptSegment.seq, TranscriptSegment.start_ms)
        )
    ).all()
    return [(Speaker(speaker), text) for speaker, text in rows]


async def recordings(s: AsyncSession, session_ids: Sequence[str]) -> dict[str, list[AudioRecording]]:
    """The audio tracks of several sessions at once (for Session views), by session id."""
    if not session_ids:
        return {}
    rows = await s.execute(
        select(AudioRecording)
        .where(AudioRecording.session_id.in_(session_ids))
        .order_by(AudioRecording.track)
    )
    found: dict[str, list[AudioRecording]] = {}
    for rec in rows.scalars():
        found.setdefault(rec.session_id, []).append(rec)
    return found
