"""A learner's progress: per ISO week, how much they practised and how their sessions were rated.

The definitions behind ``GET /v1/me/progress`` (API.md), all over the learner's own sessions:

- **Counted session**: one that went live (``started_at`` is set) and is over: status ``ended``,
  ``processing``, ``processed``, ``processing_failed`` or ``interrupted``. Sessions that were
  created and never started, or ``failed`` to start, or are still going, are not counted. Deleted
  sessions are gone with their rows, so they never count.
- **Week**: the ISO week (Monday to Sunday, UTC) of the session's ``started_at``, named by its
  Monday's date. The window is the current week and the ``weeks - 1`` before it, oldest first,
  every week present (zeros when nothing happened), so charts get a continuous series.
- ``sessions``: counted sessions that week.
- ``minutes_spoken``: the learner's talk time, the sum of ``end_ms - start_ms`` of the learner's
  final transcript segments (a segment ending before it starts adds 0), in minutes, 1 decimal.
- ``positive_sessions``: counted sessions whose rating :func:`storage.ratings.is_positive`.
- ``scores``: per dimension (:data:`storage.ratings.DIMENSIONS`), the mean over the week's ``done``
  ratings that hold a number for it, 1 decimal; ``None`` when there is none.

Totals cover the whole window: the same ``sessions``, ``minutes_spoken`` (rounded once, from the
summed milliseconds), ``positive_sessions`` and ``scores`` (means over every done rating of the
window, not means of weekly means), plus ``rated_sessions`` (sessions with a ``done`` rating),
``positive_share`` (``positive_sessions / sessions``, 3 decimals, ``None`` with no session) and
``trend``: per dimension, the mean of the scores of the last :data:`TREND_WEEKS` weeks (the
current one included) minus the mean of the :data:`TREND_WEEKS` weeks before those, 1 decimal,
``None`` when either stretch has no score. The trend always compares those eight weeks, whatever
the window, so a short window (``weeks`` under 8) does not change its meaning.

Rounding is half up, on the unrounded value. The rows read are bounded by the window: one per
counted session (its rating and its summed talk time, aggregated in SQL); the per-week grouping
is done here because rating scores live in a JSON column, which the two engines read differently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Rating, Session, SessionStatus, TranscriptSegment, utcnow
from storage.ratings import DIMENSIONS, is_positive

__all__ = [
    "COUNTED",
    "DEFAULT_WEEKS",
    "MAX_WEEKS",
    "TREND_WEEKS",
    "Progress",
    "Totals",
    "WeekProgress",
    "user_progress",
    "week_of",
]

#: Statuses of a session that went live and is over.
COUNTED: Final = (
    SessionStatus.ENDED,
    SessionStatus.PROCESSING,
    SessionStatus.PROCESSED,
    SessionStatus.PROCESSING_FAILED,
    SessionStatus.INTERRUPTED,
)
DEFAULT_WEEKS: Final = 12
MAX_WEEKS: Final = 104
TREND_WEEKS: Final = 4
_MS_PER_MINUTE: Final = 60_000

Scores = dict[str, float | None]


@dataclass(frozen=True, slots=True)
class WeekProgress:
    week: date  # the Monday
    sessions: int
    minutes_spoken: float
    positive_sessions: int
    scores: Scores


@dataclass(frozen=True, slots=True)
class Totals:
    sessions: int
    minutes_spoken: float
    positive_sessions: int
    positive_share: float | None
    rated_sessions: int
    scores: Scores
    trend: Scores


@dataclass(frozen=True, slots=True)
class Progress:
    weeks: list[WeekProgress]  # oldest first, one per week of the window
    totals: Totals


@dataclass(slots=True)
class _Bucket:
    """What is summed up for one week (or one stretch of weeks) before rounding."""

    sessions: int = 0
    talk_ms: int = 0
    positive: int = 0
    rated: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS, 0))

    def add(self, other: _Bucket) -> None:
        self.sessions += other.sessions
        self.talk_ms += other.talk_ms
        self.positive += other.positive
        self.rated += other.rated
        for name in DIMENSIONS:
            self.sums[name] += other.sums[name]
            self.counts[name] += other.counts[name]

    def means(self) -> dict[str, float | None]:
        """Unrounded mean per dimension, ``None`` where no rating had a score for it."""
        return {n: self.sums[n] / self.counts[n] if self.counts[n] else None for n in DIMENSIONS}


def week_of(when: datetime) -> date:
    """The Monday (UTC) of the ISO week ``when`` falls in."""
    day = when.astimezone(UTC).date()
    return day - timedelta(days=day.weekday())


def _round(value: float, places: str = "0.1") -> float:
    """Half up, not half to even: 2.25 shows as 2.3, as a person would round it."""
    # + 0.0 turns a rounded -0.0 (a trend of -0.04) into 0.0.
    return float(Decimal(repr(value)).quantize(Decimal(places), rounding=ROUND_HALF_UP)) + 0.0


def _rounded(means: Mapping[str, float | None]) -> Scores:
    return {n: None if v is None else _round(v) for n, v in means.items()}


def _score(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _merge(buckets: Iterable[_Bucket]) -> _Bucket:
    total = _Bucket()
    for bucket in buckets:
        total.add(bucket)
    return total


async def user_progress(
    s: AsyncSession, user_id: str, *, weeks: int = DEFAULT_WEEKS, now: datetime | None = None
) -> Progress:
    """The progress of ``user_id`` over the ``weeks`` ISO weeks up to and including ``now``'s."""
    if not 1 <= weeks <= MAX_WEEKS:
        raise ValueError(f"weeks must be 1..{MAX_WEEKS}")
    current = week_of(now or utcnow())
    # Read at least the trend's eight weeks, however short the window shown.
    read_weeks = max(weeks, 2 * TREND_WEEKS)
    mondays = [current - timedelta(weeks=back) for back in range(read_weeks - 1, -1, -1)]
    start = datetime.combine(mondays[0], time.min, tzinfo=UTC)
    end = datetime.combine(current + timedelta(weeks=1), time.min, tzinfo=UTC)

    in_window = (
        Session.user_id == user_id,
        Session.status.in_(COUNTED),
        Session.started_at >= start,
        Session.started_at < end,
    )
    spoken = TranscriptSegment.end_ms - TranscriptSegment.start_ms
    talk = (
        select(
            TranscriptSegment.session_id.label("session_id"),
            func.sum(case((spoken > 0, spoken), else_=0)).label("talk_ms"),
        )
        .join(Session, Session.id == TranscriptSegment.session_id)
        .where(*in_window, TranscriptSegment.speaker == "learner", TranscriptSegment.final.is_(True))
        .group_by(TranscriptSegment.session_id)
        .subquery()
    )
    query = (
        select(Session.started_at, Rating.status, Rating.scores, talk.c.talk_ms)
        .outerjoin(Rating, Rating.session_id == Session.id)
        .outerjoin(talk, talk.c.session_id == Session.id)
        .where(*in_window)
    )
    buckets = {monday: _Bucket() for monday in mondays}
    for started_at, status, scores, talk_ms in (await s.execute(query)).all():
        bucket = buckets[week_of(started_at)]  # the WHERE keeps started_at inside these weeks
        bucket.sessions += 1
        bucket.talk_ms += int(talk_ms or 0)  # PostgreSQL's SUM of bigint is numeric
        if status is None:
            continue
        if is_positive(status, scores or {}):
            bucket.positive += 1
        if status == "done":
            bucket.rated += 1
            for name in DIMENSIONS:
                value = _score((scores or {}).get(name))
                if value is not None:
                    bucket.sums[name] += value
                    bucket.counts[name] += 1

    shown = mondays[-weeks:]
    series = [
        WeekProgress(
            week=monday,
            sessions=buckets[monday].sessions,
            minutes_spoken=_round(buckets[monday].talk_ms / _MS_PER_MINUTE),
            positive_sessions=buckets[monday].positive,
            scores=_rounded(buckets[monday].means()),
        )
        for monday in shown
    ]
    total = _merge(buckets[monday] for monday in shown)
    recent = _merge(buckets[monday] for monday in mondays[-TREND_WEEKS:]).means()
    before = _merge(buckets[monday] for monday in mondays[-2 * TREND_WEEKS : -TREND_WEEKS]).means()
    trend: Scores = {}
    for name in DIMENSIONS:
        now_mean, then_mean = recent[name], before[name]
        trend[name] = None if now_mean is None or then_mean is None else _round(now_mean - then_mean)
    totals = Totals(
        sessions=total.sessions,
        minutes_spoken=_round(total.talk_ms / _MS_PER_MINUTE),
        positive_sessions=total.positive,
        positive_share=_round(total.positive / total.sessions, "0.001") if total.sessions else None,
        rated_sessions=total.rated,
        scores=_rounded(total.means()),
        trend=trend,
    )
    return Progress(weeks=series, totals=totals)
