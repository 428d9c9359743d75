"""JSON shapes of API.md, built from rows. The only place that decides what a client sees."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from storage.models import AudioRecording, Session, Topic, TranscriptSegment, User

__all__ = ["iso", "segment_view", "session_view", "topic_view", "user_view"]


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


def session_view(session: Session, recordings: Sequence[AudioRecording] = ()) -> dict[str, Any]:
    return {
        "id": session.id,
        "topic_id": session.topic_id,
        "status": session.status,
        "visibility": session.visibility,
        "created_at": iso(session.created_at),
        "started_at": iso(session.started_at),
        "ended_at": iso(session.ended_at),
        "duration_ms": session.duration_ms,
        "audio": [
            {"track": r.track, "duration_ms": r.duration_ms, "format": r.format}
            for r in sorted(recordings, key=lambda r: r.track)
        ],
        "rating": None,
    }
