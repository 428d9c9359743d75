"""What an export holds, read in one short unit of work: the rows, and the object keys to stream.

The manifest lists only committed segments (a chunk row is written after its upload succeeded), so
an export of a live session holds everything committed so far and says it is ``partial``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    AudioChunk,
    AudioGap,
    AudioRecording,
    Rating,
    Session,
    SessionStatus,
    Topic,
    TranscriptSegment,
)
from storage.sessions import transcript_segments

__all__ = ["INCOMPLETE_STATUSES", "SessionBundle", "TrackBundle", "load_bundle", "partial_reasons"]

#: Session states whose recording is, or may still become, more than what is stored.
INCOMPLETE_STATUSES: Final = frozenset(
    {
        SessionStatus.CREATED,
        SessionStatus.CONNECTING,
        SessionStatus.LIVE,
        SessionStatus.RECONNECTING,
        SessionStatus.ENDING,
        SessionStatus.INTERRUPTED,
    }
)


@dataclass(frozen=True, slots=True)
class TrackBundle:
    recording: AudioRecording
    chunks: Sequence[AudioChunk]
    gaps: Sequence[AudioGap]


@dataclass(frozen=True, slots=True)
class SessionBundle:
    """Everything of one session an export needs, detached from the database session that read it."""

    session: Session
    topic: Topic | None
    segments: Sequence[TranscriptSegment]
    tracks: dict[str, TrackBundle] = field(default_factory=dict)
    rating: Rating | None = None


async def load_bundle(s: AsyncSession, session: Session) -> SessionBundle:
    """Read the transcript rows, recordings with their manifests and gaps, rating and topic."""
    topic = await s.get(Topic, session.topic_id)
    segments = await transcript_segments(s, session.id)
    recordings = (
        (await s.execute(select(AudioRecording).where(AudioRecording.session_id == session.id)))
        .scalars()
        .all()
    )
    tracks: dict[str, TrackBundle] = {}
    for rec in sorted(recordings, key=lambda r: r.track):
        chunks = (
            (
                await s.execute(
                    select(AudioChunk).where(AudioChunk.recording_id == rec.id).order_by(AudioChunk.seq)
                )
            )
            .scalars()
            .all()
        )
        gaps = (
            (
                await s.execute(
                    select(AudioGap).where(AudioGap.recording_id == rec.id).order_by(AudioGap.start_ms)
                )
            )
            .scalars()
            .all()
        )
        tracks[rec.track] = TrackBundle(rec, chunks, gaps)
    rating = (await s.execute(select(Rating).where(Rating.session_id == session.id))).scalar_one_or_none()
    return SessionBundle(session, topic, segments, tracks, rating)


def partial_reasons(bundle: SessionBundle) -> list[str]:
    """Why this session's stored recording may not be the whole conversation (empty when final).

    ``live``: the session has not ended; ``interrupted``: the relay died and recovery finalized what
    was left; ``recording``: a track's recorder has not finalized yet. Audio the recorder declared
    lost (``lost_ms``) and gaps are listed per track in ``session.json``, not counted here.
    """
    reasons: list[str] = []
    status = bundle.session.status
    if status == SessionStatus.INTERRUPTED:
        reasons.append("interrupted")
    elif status in INCOMPLETE_STATUSES:
        reasons.append("live")
    tracks = bundle.tracks.values()
    if any(t.recording.status == "recording" for t in tracks):
        reasons.append("recording")
    if any(t.recording.status == "interrupted" for t in tracks) and "interrupted" not in reasons:
        reasons.append("interrupted")
    return reasons
