"""Ratings: what counts as a positively rated session (the business measure of progress and metrics),
and the reads and writes of the rating job (:mod:`relay.worker.rating`).

A session has at most one rating row. Its life::

    (none)  --start_rating--> pending --finish_rating--> done    (kept as it is from then on)
    pending --fail_rating---> failed                             (the job died; metrics kept)
    failed  --start_rating--> pending                            (an operator's retry)

The writes take the caller's session (the job's fenced transaction); none of them ever changes a
``done`` rating, which is what makes running the job twice harmless.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import AudioRecording, Rating, Session, Topic, TranscriptSegment, utcnow
from storage.sessions import recordings, transcript_segments

__all__ = [
    "DIMENSIONS",
    "DONE",
    "FAILED",
    "PENDING",
    "POSITIVE_MEAN",
    "RatingInputs",
    "fail_rating",
    "finish_rating",
    "get_rating",
    "is_positive",
    "rating_inputs",
    "ratings_for",
    "start_rating",
]

#: The four scores of API.md's Rating, each 0-100.
DIMENSIONS: Final = ("fluency", "vocabulary", "grammar", "task")
#: A done rating whose four scores average at least this is "rated positively" (SC-005).
POSITIVE_MEAN: Final = 60.0
PENDING: Final = "pending"
DONE: Final = "done"
FAILED: Final = "failed"
_CODE_LEN: Final = 64


def is_positive(status: str, scores: Mapping[str, object]) -> bool:
    """True for a ``done`` rating whose four scores average :data:`POSITIVE_MEAN` or more."""
    if status != "done":
        return False
    values = [scores.get(name) for name in DIMENSIONS]
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(DIMENSIONS):
        return False
    return sum(numbers) / len(numbers) >= POSITIVE_MEAN


@dataclass(frozen=True, slots=True)
class RatingInputs:
    """What a session's rating is computed from."""

    topic_title: str
    difficulty: str
    #: The final transcript rows, in conversation order.
    segments: Sequence[TranscriptSegment]
    recordings: Sequence[AudioRecording]


async def rating_inputs(s: AsyncSession, session_id: str) -> RatingInputs | None:
    """The session's topic, final transcript rows and recorded tracks; None when the session is gone."""
    found = (
        await s.execute(
            select(Topic.title, Topic.difficulty)
            .join(Session, Session.topic_id == Topic.id)
            .where(Session.id == session_id)
        )
    ).first()
    if found is None:
        return None
    rows = [row for row in await transcript_segments(s, session_id) if row.final]
    tracks = (await recordings(s, [session_id])).get(session_id, [])
    return RatingInputs(found.title, found.difficulty, rows, tracks)


async def get_rating(s: AsyncSession, session_id: str) -> Rating | None:
    return (await s.execute(select(Rating).where(Rating.session_id == session_id))).scalar_one_or_none()


async def ratings_for(s: AsyncSession, session_ids: Sequence[str]) -> dict[str, Rating]:
    """The ratings of several sessions at once (for Session views), by session id."""
    if not session_ids:
        return {}
    rows = await s.execute(select(Rating).where(Rating.session_id.in_(session_ids)))
    return {row.session_id: row for row in rows.scalars()}


async def start_rating(s: AsyncSession, session_id: str, metrics: Mapping[str, Any]) -> Rating:
    """Create the session's rating as ``pending`` with ``metrics``, or make a ``failed`` one
    ``pending`` again with fresh metrics; a ``done`` rating is returned unchanged."""
    row = (
        await s.execute(select(Rating).where(Rating.session_id == session_id).with_for_update())
    ).scalar_one_or_none()
    if row is None:
        row = Rating(
            session_id=session_id, status=PENDING, scores={}, metrics=dict(metrics), feedback="", model=""
        )
        s.add(row)
        await s.flush()
    elif row.status != DONE:
        row.status, row.metrics, row.error_code = PENDING, dict(metrics), None
        await s.flush()
    return row


async def finish_rating(
    s: AsyncSession, session_id: str, *, scores: Mapping[str, int], feedback: str, model: str
) -> bool:
    """``pending`` -> ``done`` with the scores, feedback and model; False when it was not pending."""
    result = await s.execute(
        update(Rating)
        .where(Rating.session_id == session_id, Rating.status == PENDING)
        .values(
            status=DONE,
            scores=dict(scores),
            feedback=feedback,
            model=model,
            error_code=None,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def fail_rating(s: AsyncSession, session_id: str, code: str) -> bool:
    """``pending`` -> ``failed`` with ``code`` (its metrics stay); False when it was not pending."""
    result = await s.execute(
        update(Rating)
        .where(Rating.session_id == session_id, Rating.status == PENDING)
        .values(status=FAILED, error_code=code[:_CODE_LEN], updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]
