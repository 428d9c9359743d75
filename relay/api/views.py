"""JSON shapes of API.md, built from rows. The only place that decides what a client sees."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from storage.models import AudioRecording, Rating, Session, Topic, TranscriptSegment, User
from storage.retention import expires_at

__all__ = [
    "iso",
    "public_segment_view",
    "public_session_view",
    "rating_view",
    "segment_view",
    "session_view",
    "topic_summary",
    "topic_view",
    "user_view",
]


def iso(when: datetime | None) -> str | None:
    """RFC 3339 UTC with a ``Z``, as API.md asks."""
    if when is None:
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def user_view(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "created_at": iso(user.created_at)}


def topic_view(topic: Topic, *, admin: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": topic.id,
        "title": topic.title,
        "prompts": list(topic.prompts),
        "difficulty": topic.difficulty,
        "hints": list(topic.hints),
    }
    if admin:
        view.update(
            instructions=topic.instructions,
            turn_detection=topic.turn_detection,
            retired_at=iso(topic.retired_at),
        )
    return view


def segment_view(row: TranscriptSegment) -> dict[str, Any]:
    return {
        "id": row.id,
        "speaker": row.speaker,
        "text": row.text,
        "start_ms": row.start_ms,
        "end_ms": row.end_ms,
        "final": row.final,
    }


def session_view(
    session: Session,
    recordings: Sequence[AudioRecording] = (),
    *,
    default_retention_days: int | None,
    rating: Rating | None = None,
) -> dict[str, Any]:
    """API.md's Session, plus ``retention``: the learner's choice and when the session will be deleted
    (``expires_at`` is ``null`` while it is kept: retained, no limit, or still going).

    ``default_retention_days`` is the deployment's ``PARLEY_RETENTION_DAYS`` (``None`` when off);
    ``rating`` is the session's rating row (``"rating": null`` until the rating job has begun).
    """
    return {
        "id": session.id,
        "topic_id": session.topic_id,
        "status": session.status,
        "visibility": session.visibility,
        "created_at": iso(session.created_at),
        "started_at": iso(session.started_at),
        "ended_at": iso(session.ended_at),
        "duration_ms": session.duration_ms,
        # The session this one continues after its relay died (storage/continuation.py), or null.
        "continued_from": session.continued_from_id,
        "audio": [
            {"track": r.track, "duration_ms": r.duration_ms, "format": r.format}
            for r in sorted(recordings, key=lambda r: r.track)
        ],
        "rating": None if rating is None else rating_view(rating),
        "retention": {
            "retain": session.retain,
            "retention_days": session.retention_days,
            "expires_at": iso(expires_at(session, default_retention_days)),
        },
    }


def rating_view(rating: Rating) -> dict[str, Any]:
    """API.md's Rating: ``pending`` carries the metrics while the model is asked, ``failed`` keeps them
    (the feedback could not be had); ``done`` adds the scores, feedback and model."""
    return {
        "status": rating.status,
        "scores": dict(rating.scores),
        "metrics": dict(rating.metrics),
        "feedback": rating.feedback,
        "model": rating.model,
    }


def topic_summary(topic: Topic) -> dict[str, Any]:
    """What a public page says about the topic: no coaching instructions, no admin fields."""
    return {"id": topic.id, "title": topic.title, "difficulty": topic.difficulty}


def public_session_view(
    session: Session, slug: str, recordings: Sequence[AudioRecording] = ()
) -> dict[str, Any]:
    """The Session shape for anyone holding the public link: nothing that identifies the owner.

    ``id`` is the public slug, not the session id; the times of day the learner practised are left
    out (``null``), the duration stays; ``rating`` and ``retention`` (the owner's business) are ``null``
    (the public sees transcript and audio).
    """
    view = session_view(session, recordings, default_retention_days=None)
    view.update(
        id=slug, visibility="public", created_at=None, started_at=None, ended_at=None, rating=None,
        retention=None,
    )  # fmt: skip
    return view


def public_segment_view(row: TranscriptSegment, position: int) -> dict[str, Any]:
    """A Segment whose ``id`` is its position in the public transcript, not the stored row's id."""
    return {**segment_view(row), "id": str(position)}
