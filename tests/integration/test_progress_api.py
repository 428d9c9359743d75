"""GET /v1/me/progress on both engines: exact weekly numbers, totals and trends, owner-only, validated.

Sessions are placed relative to the current ISO week (UTC), so the numbers below hold whenever the
test runs. The expected values follow storage/progress.py's definitions, worked out by hand.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from aiohttp.test_utils import TestClient

from relay.keys import DATABASE
from storage.models import Rating, Session, TranscriptSegment
from tests.api import Learner, problem, signup

TOPIC = "cafe-order"
NO_SCORES = {"fluency": None, "vocabulary": None, "grammar": None, "task": None}


def this_monday() -> datetime:
    today = datetime.now(UTC).date()
    return datetime.combine(today - timedelta(days=today.weekday()), time.min, tzinfo=UTC)


def week_name(monday: datetime) -> str:
    return monday.date().isoformat()


def scores(fluency: float, vocabulary: float, grammar: float, task: float) -> dict[str, float]:
    return {"fluency": fluency, "vocabulary": vocabulary, "grammar": grammar, "task": task}


async def add_session(
    client: TestClient,  # type: ignore[type-arg]
    user_id: str,
    *,
    status: str,
    started_at: datetime | None,
    learner_ms: tuple[tuple[int, int], ...] = (),
    rating: tuple[str, dict[str, Any]] | None = None,
) -> str:
    """A session row with learner transcript segments (start_ms, end_ms) and an optional rating.

    Every session also gets a coach segment and a non-final learner segment, which never count."""
    async with client.app[DATABASE].sessions.begin() as s:
        session = Session(user_id=user_id, topic_id=TOPIC, status=status, started_at=started_at)
        s.add(session)
        await s.flush()
        rows: list[Any] = [
            TranscriptSegment(session_id=session.id, seq=i, speaker="learner", text="I would like a tea",
                              start_ms=start, end_ms=end, item_id=f"item_l{i}")
            for i, (start, end) in enumerate(learner_ms)
        ]  # fmt: skip
        rows.append(TranscriptSegment(session_id=session.id, seq=100, speaker="coach", text="Sure",
                                      start_ms=0, end_ms=600_000, item_id="item_c"))  # fmt: skip
        rows.append(TranscriptSegment(session_id=session.id, seq=101, speaker="learner", text="and",
                                      start_ms=0, end_ms=600_000, final=False, item_id="item_p"))  # fmt: skip
        if rating is not None:
            status_, values = rating
            rows.append(Rating(session_id=session.id, status=status_, scores=values, model="test"))
        s.add_all(rows)
    return session.id


async def seed(client: TestClient) -> tuple[Learner, datetime]:  # type: ignore[type-arg]
    """The learner's history below, plus sessions that must never count.

    week W0 (current): s1 processed, done 80/70/60/90 (mean 75, positive), talk 30 s + 30 s
                       s2 processing_failed, rating failed, talk 45 s
                       s3 interrupted, no rating, talk 3 s (+ a segment ending before it starts)
    week W-1:          s4 processed at Sunday 23:59:59, done 50/50/50/50 (mean 50), talk 90 s
                       s5 ended, done 65/55/61/59 (mean exactly 60: positive), talk 15 s
                       s6 processed, pending rating with high scores (neither positive nor scored)
    week W-5:          s7 processed, done 40/40/40/40, talk 30 s
    """
    learner = await signup(client)
    monday = this_monday()
    last_week = monday - timedelta(weeks=1)
    never = ("done", scores(100, 100, 100, 100))
    history: list[tuple[str, datetime | None, tuple[tuple[int, int], ...], Any]] = [
        # (status, started_at, learner segments, rating)
        ("processed", monday, ((0, 30_000), (40_000, 70_000)), ("done", scores(80, 70, 60, 90))),
        ("processing_failed", monday + timedelta(days=1), ((1_000, 46_000),), ("failed", {})),
        ("interrupted", monday + timedelta(hours=3), ((5_000, 4_000), (10_000, 13_000)), None),
        ("processed", monday - timedelta(seconds=1), ((0, 90_000),), ("done", scores(50, 50, 50, 50))),
        ("ended", last_week + timedelta(days=2), ((0, 15_000),), ("done", scores(65, 55, 61, 59))),
        ("processed", last_week + timedelta(days=3), (), ("pending", scores(90, 90, 90, 90))),
        ("processed", monday - timedelta(weeks=5, days=-2), ((0, 30_000),), ("done", scores(40, 40, 40, 40))),
        # Never counted: not started, failed to start, still going, ended without going live.
        ("created", None, ((0, 60_000),), never),
        ("failed", monday, ((0, 60_000),), never),
        ("live", monday, ((0, 60_000),), never),
        ("reconnecting", monday, ((0, 60_000),), never),
        ("ended", None, ((0, 60_000),), never),
    ]
    for status, started_at, talk, rating in history:
        await add_session(
            client, learner.id, status=status, started_at=started_at, learner_ms=talk, rating=rating
        )
    # Someone else's rated, talkative session in the same week.
    other = await signup(client)
    await add_session(
        client, other.id, status="processed", started_at=monday, learner_ms=((0, 600_000),), rating=never
    )
    # A session the learner deleted: its rows are gone, so it never counts.
    deleted = await add_session(
        client, learner.id, status="processed", started_at=monday, learner_ms=((0, 600_000),), rating=never
    )
    resp = await client.delete(f"/v1/sessions/{deleted}", headers=learner.auth)
    assert resp.status == 204, await resp.text()
    return learner, monday


async def get_progress(client: TestClient, learner: Learner, **query: str) -> dict[str, Any]:  # type: ignore[type-arg]
    resp = await client.get("/v1/me/progress", params=query, headers=learner.auth)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_weekly_numbers_totals_and_trend(both_client: TestClient) -> None:  # type: ignore[type-arg]
    """Twelve weeks by default, oldest first, with exact per-week numbers, zero weeks and totals."""
    learner, monday = await seed(both_client)
    body = await get_progress(both_client, learner)
    weeks = body["weeks"]
    assert [w["week"] for w in weeks] == [week_name(monday - timedelta(weeks=11 - i)) for i in range(12)]
    assert weeks[-1] == {
        "week": week_name(monday),
        "sessions": 3,
        "minutes_spoken": 1.8,  # 60 + 45 + 3 s
        "positive_sessions": 1,
        "scores": scores(80.0, 70.0, 60.0, 90.0),
    }
    assert weeks[-2] == {
        "week": week_name(monday - timedelta(weeks=1)),
        "sessions": 3,
        "minutes_spoken": 1.8,  # 105 s = 1.75 min, rounded half up
        "positive_sessions": 1,
        "scores": scores(57.5, 52.5, 55.5, 54.5),
    }
    assert weeks[-6] == {
        "week": week_name(monday - timedelta(weeks=5)),
        "sessions": 1,
        "minutes_spoken": 0.5,
        "positive_sessions": 0,
        "scores": scores(40.0, 40.0, 40.0, 40.0),
    }
    for index in (-3, -4, -5, -7, -8, -9, -10, -11, -12):
        assert weeks[index] == {
            "week": weeks[index]["week"],
            "sessions": 0,
            "minutes_spoken": 0.0,
            "positive_sessions": 0,
            "scores": NO_SCORES,
        }
    assert body["totals"] == {
        "sessions": 7,
        "minutes_spoken": 4.1,  # 243 s = 4.05 min
        "positive_sessions": 2,
        "positive_share": 0.286,  # 2 / 7
        "rated_sessions": 4,
        "scores": scores(58.8, 53.8, 52.8, 59.8),  # means of 4 done ratings: 58.75, 53.75, ...
        # Last 4 weeks (s1, s4, s5) against the 4 before (s7): 65 - 40, 58.33 - 40, 57 - 40, 66.33 - 40.
        "trend": scores(25.0, 18.3, 17.0, 26.3),
    }


async def test_a_short_window_keeps_the_trend_of_eight_weeks(both_client: TestClient) -> None:  # type: ignore[type-arg]
    """?weeks=4 shows four weeks and their totals; the trend still compares the same eight weeks."""
    learner, monday = await seed(both_client)
    body = await get_progress(both_client, learner, weeks="4")
    assert [w["week"] for w in body["weeks"]] == [
        week_name(monday - timedelta(weeks=3 - i)) for i in range(4)
    ]
    assert [w["sessions"] for w in body["weeks"]] == [0, 0, 3, 3]
    totals = body["totals"]
    assert totals["sessions"] == 6 and totals["rated_sessions"] == 3
    assert totals["minutes_spoken"] == 3.6  # 213 s = 3.55 min
    assert totals["positive_share"] == 0.333
    assert totals["scores"] == scores(65.0, 58.3, 57.0, 66.3)
    assert totals["trend"] == scores(25.0, 18.3, 17.0, 26.3)
    one = await get_progress(both_client, learner, weeks="1")
    assert [w["week"] for w in one["weeks"]] == [week_name(monday)]
    assert one["totals"]["sessions"] == 3


async def test_a_new_learner_gets_a_full_series_of_zeros(both_client: TestClient) -> None:  # type: ignore[type-arg]
    """No session yet: every week present with zeros, no scores, no share and no trend."""
    learner = await signup(both_client)
    body = await get_progress(both_client, learner, weeks="104")
    assert len(body["weeks"]) == 104
    assert body["weeks"][-1]["week"] == week_name(this_monday())
    assert all(date.fromisoformat(w["week"]).weekday() == 0 for w in body["weeks"])
    assert {(w["sessions"], w["minutes_spoken"], w["positive_sessions"]) for w in body["weeks"]} == {
        (0, 0.0, 0)
    }
    assert body["totals"] == {
        "sessions": 0,
        "minutes_spoken": 0.0,
        "positive_sessions": 0,
        "positive_share": None,
        "rated_sessions": 0,
        "scores": NO_SCORES,
        "trend": NO_SCORES,
    }


async def test_other_learners_see_only_their_own_progress(both_client: TestClient) -> None:  # type: ignore[type-arg]
    """A learner beside the seeded ones sees their one session and nothing of anyone else's."""
    await seed(both_client)
    stranger = await signup(both_client)
    await add_session(both_client, stranger.id, status="processed", started_at=this_monday(),
                      learner_ms=((0, 6_000),), rating=("done", scores(70, 70, 70, 70)))  # fmt: skip
    totals = (await get_progress(both_client, stranger))["totals"]
    assert (totals["sessions"], totals["minutes_spoken"], totals["positive_sessions"]) == (1, 0.1, 1)
    assert totals["scores"] == scores(70.0, 70.0, 70.0, 70.0)


async def test_weeks_must_be_an_integer_from_1_to_104(both_client: TestClient) -> None:  # type: ignore[type-arg]
    """Bad ?weeks= values are problem+json naming the field, like ?limit= on GET /v1/sessions."""
    learner = await signup(both_client)
    for bad in ("0", "105", "ten", "", "1.5", "-1", "+4", "²"):
        resp = await both_client.get("/v1/me/progress", params={"weeks": bad}, headers=learner.auth)
        assert (await problem(resp, 422, "invalid_request"))["field"] == "weeks", bad


async def test_progress_needs_credentials(both_client: TestClient) -> None:  # type: ignore[type-arg]
    """No token or a bad one is 401, before the query is even looked at."""
    resp = await both_client.get("/v1/me/progress")
    await problem(resp, 401, "unauthorized")
    resp = await both_client.get(
        "/v1/me/progress", params={"weeks": "0"}, headers={"Authorization": "Bearer nonsense"}
    )
    await problem(resp, 401, "unauthorized")
