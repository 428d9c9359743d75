"""Rating a finished session on both engines: metrics, the model's scores and feedback, and the
faults of the rating model (failing, timing out, invalid answers, refusals) never touching what was
recorded. Runs the worker with fast polls and backoff against a rating simulator each test controls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import event, update

from relay.config import ConfigError, Secret, Settings
from relay.keys import DATABASE, JOBS, OBJECTS, RATING
from relay.observability.metrics import Metrics
from relay.simulator.rating import RatingSimulator, RatingSimulatorOptions
from relay.worker.jobs import Worker
from relay.worker.kinds import default_kinds
from relay.worker.rating import METRICS_ONLY_MODEL, TOO_LITTLE_SPEECH
from relay.worker.rating_model import OPENAI_BASE_URL, RatingModel, open_rating_model
from relay.worker.speech import EXPLANATIONS
from storage import jobs, ratings, sessions
from storage.models import Job, Rating, SessionStatus, TranscriptSegment
from tests.api import Learner, signup
from tests.integration.recorded import PLANTED, add_transcript, new_session, record
from tests.integration.test_jobs import job_row, status_of, until

Client = TestClient[web.Request, web.Application]

MODEL = "gpt-4.1-mini"
#: Short enough to keep the timeout test quick, long enough for a loaded CI machine's good answers.
TIMEOUT_S = 1.0
MAX_ATTEMPTS = 3


@pytest.fixture
def app_env() -> dict[str, str]:
    """No worker in the app: each test runs its own, with fast polls and backoff."""
    return {"PARLEY_WORKERS_IN_PROCESS": "0"}


@pytest.fixture
async def sim() -> AsyncIterator[RatingSimulator]:
    async with RatingSimulator() as server:
        yield server


@pytest.fixture
async def model(sim: RatingSimulator) -> AsyncIterator[RatingModel]:
    rating = RatingModel(
        base_url=sim.base_url,
        api_key=Secret("sk-parley-test"),
        model=MODEL,
        timeout_s=TIMEOUT_S,
        kind="simulator",
    )
    yield rating
    await rating.aclose()


def worker_for(client: Client, model: RatingModel) -> Worker:
    return Worker(
        client.app[DATABASE],
        client.app[OBJECTS],
        default_kinds(model),
        metrics=Metrics(),
        poll_s=0.05,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
    )


def conversation(session_id: str) -> list[TranscriptSegment]:
    """Coach and learner lines; the learner's first one is the planted text (must never be logged)."""
    lines = [
        ("coach", "Hello! What would you like today?", 0, 1500),
        ("learner", PLANTED, 1800, 3000),
        ("coach", "Of course. Anything else?", 3200, 4400),
        ("learner", "Um, a croissant, please. How much is it?", 5000, 6500),
    ]
    return [
        TranscriptSegment(
            session_id=session_id, seq=i, speaker=who, text=text, start_ms=a, end_ms=b, item_id=f"item_{i}"
        )
        for i, (who, text, a, b) in enumerate(lines, 1)
    ]


async def end(client: Client, session_id: str) -> None:
    """End the session as the relay does: the same transaction enqueues its finalize job."""
    async with client.app[DATABASE].sessions.begin() as s:
        await sessions.transition(s, session_id, SessionStatus.ENDED, code="learner")


async def recorded_session(client: Client, learner: Learner, spool: Path, *, speech: bool = True) -> str:
    """A session with both tracks recorded and a transcript, ended (its finalize job queued)."""
    sid = await new_session(client, learner)
    await record(client, sid, spool)
    if speech:
        async with client.app[DATABASE].sessions.begin() as s:
            s.add_all(conversation(sid))
    else:
        await add_transcript(client, sid)  # three learner words: too little to rate
    await end(client, sid)
    return sid


async def kept(client: Client, learner: Learner, sid: str) -> tuple[Any, bytes, bytes]:
    """What the learner can read of the recording: the transcript and both audio tracks."""
    transcript = await client.get(f"/v1/sessions/{sid}/transcript", headers=learner.auth)
    assert transcript.status == 200
    tracks = []
    for track in ("learner", "coach"):
        resp = await client.get(f"/v1/sessions/{sid}/audio/{track}", headers=learner.auth)
        assert resp.status == 200, track
        tracks.append(await resp.read())
    assert all(tracks)
    return await transcript.json(), tracks[0], tracks[1]


async def session_json(client: Client, learner: Learner, sid: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/sessions/{sid}", headers=learner.auth)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def rating_row(client: Client, sid: str) -> Rating | None:
    async with client.app[DATABASE].sessions() as s:
        return await ratings.get_rating(s, sid)


async def fewer_attempts(client: Client, sid: str) -> None:
    async with client.app[DATABASE].sessions.begin() as s:
        await s.execute(update(Job).where(Job.session_id == sid).values(max_attempts=MAX_ATTEMPTS))


def assert_rated(view: dict[str, Any]) -> None:
    assert view["status"] == "done"
    assert set(view["metrics"]) == set(EXPLANATIONS)
    assert view["metrics"]["learner_words"] == 18 and view["metrics"]["learner_turns"] == 2
    assert set(view["scores"]) == set(ratings.DIMENSIONS)
    assert all(isinstance(v, int) and 0 <= v <= 100 for v in view["scores"].values())
    assert view["feedback"].startswith("Simulated rating.") and view["model"] == MODEL


@pytest.mark.parametrize("app_env", [{}])
async def test_the_apps_worker_rates_a_recorded_session(both_client: Client, tmp_path: Path) -> None:
    """`parley serve`'s own worker and built-in rating simulator: the session is processed and
    GET /v1/sessions/{id} and the list show the rating: metrics, four scores, feedback, model."""
    app = both_client.app
    assert app[RATING].kind == "simulator" and app[RATING].model == MODEL
    learner = await signup(both_client)
    sid = await recorded_session(both_client, learner, tmp_path / "spool")
    unrated = await new_session(both_client, learner)
    app[JOBS].wake()

    async def processed() -> bool:
        return (await session_json(both_client, learner, sid))["status"] == SessionStatus.PROCESSED

    await until(processed, timeout=10)
    assert_rated((await session_json(both_client, learner, sid))["rating"])
    listed = await both_client.get("/v1/sessions", headers=learner.auth)
    views = {v["id"]: v for v in (await listed.json())["sessions"]}
    assert_rated(views[sid]["rating"])
    assert views[unrated]["rating"] is None


async def test_the_session_list_reads_ratings_in_one_query(
    both_client: Client, tmp_path: Path, model: RatingModel
) -> None:
    """GET /v1/sessions costs as many queries for three rated sessions as for one (no N+1)."""
    learner = await signup(both_client)
    w = worker_for(both_client, model)
    engine = both_client.app[DATABASE].engine.sync_engine
    counts = []
    for _ in range(3):
        await recorded_session(both_client, learner, tmp_path / "spool")
        assert await w.run_once() is not None
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(args[2])  # noqa: B023 (read before the next loop turn)

        event.listen(engine, "before_cursor_execute", count)
        try:
            resp = await both_client.get("/v1/sessions", headers=learner.auth)
            body = await resp.json()
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert all(v["rating"]["status"] == "done" for v in body["sessions"])
        counts.append(len([q for q in statements if q.lstrip().upper().startswith("SELECT")]))
    assert len(body["sessions"]) == 3
    assert counts[0] == counts[1] == counts[2], counts


async def test_too_little_speech_is_rated_from_the_metrics_alone(
    both_client: Client, tmp_path: Path, sim: RatingSimulator, model: RatingModel
) -> None:
    """Under five learner words: done at once, every score 0, feedback saying why, no model call."""
    learner = await signup(both_client)
    sid = await recorded_session(both_client, learner, tmp_path / "spool", speech=False)
    assert await worker_for(both_client, model).run_once() is not None
    view = (await session_json(both_client, learner, sid))["rating"]
    assert view["status"] == "done" and view["model"] == METRICS_ONLY_MODEL
    assert view["scores"] == dict.fromkeys(ratings.DIMENSIONS, 0) and view["feedback"] == TOO_LITTLE_SPEECH
    assert view["metrics"]["learner_words"] == 3  # the non-final row is not counted
    assert sim.calls == 0
    assert await status_of(both_client.app[DATABASE], sid) == SessionStatus.PROCESSED


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (RatingSimulatorOptions(fail_status=500), "rating_model_unavailable"),
        (RatingSimulatorOptions(delay_s=TIMEOUT_S + 2), "rating_model_timeout"),
        (RatingSimulatorOptions(invalid_json=True), "rating_invalid_answer"),
    ],
    ids=["failing", "timing-out", "invalid-json"],
)
async def test_a_failing_rating_model_leaves_the_metrics_and_the_recording(
    both_client: Client,
    tmp_path: Path,
    sim: RatingSimulator,
    model: RatingModel,
    fault: RatingSimulatorOptions,
    code: str,
) -> None:
    """The model fails every time: the rating is pending with its metrics while the job retries, then
    failed with the code (metrics kept) and the session processing_failed; transcript and both audio
    tracks read the same as before. An operator's retry, once the model is back, rates it."""
    db = both_client.app[DATABASE]
    learner = await signup(both_client)
    sid = await recorded_session(both_client, learner, tmp_path / "spool")
    await fewer_attempts(both_client, sid)
    before = await kept(both_client, learner, sid)
    sim.options = fault
    w = worker_for(both_client, model)

    assert await w.run_once() is not None
    job = await job_row(db, sid)
    assert (job.status, job.last_error_code) == ("queued", code)
    assert await status_of(db, sid) == SessionStatus.PROCESSING
    pending = (await session_json(both_client, learner, sid))["rating"]
    assert pending["status"] == "pending" and pending["metrics"]["learner_words"] == 18
    assert (pending["scores"], pending["feedback"], pending["model"]) == ({}, "", "")

    async with asyncio.timeout(30):
        while (await job_row(db, sid)).status != "dead":
            if await w.run_once() is None:
                await asyncio.sleep(0.01)
    assert sim.calls == MAX_ATTEMPTS
    assert await status_of(db, sid) == SessionStatus.PROCESSING_FAILED
    view = await session_json(both_client, learner, sid)
    assert view["status"] == SessionStatus.PROCESSING_FAILED
    assert view["rating"]["status"] == "failed" and view["rating"]["metrics"] == pending["metrics"]
    row = await rating_row(both_client, sid)
    assert row is not None and row.error_code == code
    assert await kept(both_client, learner, sid) == before

    sim.options = RatingSimulatorOptions()
    assert await jobs.retry_dead(db, job.id)
    assert await w.run_once() is not None
    assert_rated((await session_json(both_client, learner, sid))["rating"])
    assert await status_of(db, sid) == SessionStatus.PROCESSED


async def test_a_refused_call_is_dead_at_once(
    both_client: Client, tmp_path: Path, sim: RatingSimulator, model: RatingModel
) -> None:
    """HTTP 401 from the model will not change on a retry: one call, job dead, rating failed."""
    db = both_client.app[DATABASE]
    learner = await signup(both_client)
    sid = await recorded_session(both_client, learner, tmp_path / "spool")
    before = await kept(both_client, learner, sid)
    sim.options = RatingSimulatorOptions(fail_status=401)
    assert await worker_for(both_client, model).run_once() is not None
    job = await job_row(db, sid)
    assert (job.status, job.attempts, job.last_error_code) == ("dead", 1, "rating_model_refused")
    assert sim.calls == 1
    assert await status_of(db, sid) == SessionStatus.PROCESSING_FAILED
    view = await session_json(both_client, learner, sid)
    assert view["rating"]["status"] == "failed" and view["rating"]["metrics"]["learner_words"] == 18
    assert await kept(both_client, learner, sid) == before


async def test_running_a_done_rating_again_changes_nothing(
    both_client: Client, tmp_path: Path, sim: RatingSimulator, model: RatingModel
) -> None:
    """A job run again after the rating was stored (a crash before `processed`, say) finishes the
    session without asking the model again or touching the rating, even while the model is down."""
    db = both_client.app[DATABASE]
    learner = await signup(both_client)
    sid = await recorded_session(both_client, learner, tmp_path / "spool")
    w = worker_for(both_client, model)
    assert await w.run_once() is not None
    first = await rating_row(both_client, sid)
    assert first is not None and first.status == "done" and sim.calls == 1

    sim.options = RatingSimulatorOptions(fail_status=500)
    async with db.sessions.begin() as s:
        await s.execute(update(Job).where(Job.session_id == sid).values(status="queued"))
        await sessions.transition(s, sid, SessionStatus.PROCESSING)
    assert await w.run_once() is not None
    again = await rating_row(both_client, sid)
    assert again is not None
    assert (again.status, again.scores, again.metrics, again.feedback, again.model, again.updated_at) == (
        first.status, first.scores, first.metrics, first.feedback, first.model, first.updated_at,
    )  # fmt: skip
    assert sim.calls == 1
    assert await status_of(db, sid) == SessionStatus.PROCESSED


# -- settings and where the model points -----------------------------------------------------------


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"PARLEY_DATA_DIR": str(tmp_path / "data"), **env}, dotenv=None)


def test_rating_settings_and_their_defaults(tmp_path: Path) -> None:
    """Defaults; values read; the key never shows in the settings' repr."""
    s = settings(tmp_path)
    assert (s.rating_model, s.rating_url, s.rating_timeout_s, s.rating_kind) == (
        MODEL,
        None,
        60.0,
        "simulator",
    )
    s = settings(
        tmp_path,
        PARLEY_RATING_MODEL="llama3.1:8b",
        PARLEY_RATING_URL="http://user:pw@127.0.0.1:11434/v1",
        PARLEY_RATING_TIMEOUT="2.5",
    )
    assert (s.rating_model, s.rating_timeout_s, s.rating_kind) == ("llama3.1:8b", 2.5, "openai")
    assert "pw" not in repr(s) and "llama3.1:8b" in repr(s)
    s = settings(tmp_path, OPENAI_API_KEY="sk-live-should-never-show-0123456789")
    assert s.rating_kind == "openai" and "sk-live" not in repr(s)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("PARLEY_RATING_TIMEOUT", "0"),
        ("PARLEY_RATING_TIMEOUT", "601"),
        ("PARLEY_RATING_TIMEOUT", "soon"),
        ("PARLEY_RATING_URL", "ftp://example.org/v1"),
        ("PARLEY_RATING_URL", "http://"),
        ("PARLEY_RATING_MODEL", "m" * 129),
    ],
)
def test_a_bad_rating_setting_names_its_variable(tmp_path: Path, variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, **{variable: raw})
    assert caught.value.variable == variable


async def test_the_default_target_is_the_simulator_without_a_key_and_openai_with_one(tmp_path: Path) -> None:
    """No key and no URL: the built-in simulator, answering; a key: OpenAI's API (not called here);
    a URL alone: that server with a placeholder key."""
    async with open_rating_model(settings(tmp_path, PARLEY_RATING_TIMEOUT="5")) as rating:
        assert rating.kind == "simulator"
        rated = await rating.rate(
            topic_title="T", difficulty="beginner", metrics={"learner_words": 9}, segments=conversation("s")
        )
        assert rated.model == MODEL
    async with open_rating_model(settings(tmp_path, OPENAI_API_KEY="sk-test-0123456789")) as rating:
        assert rating.kind == "openai"
        assert rating.base_url == OPENAI_BASE_URL
        assert rating._client.api_key == "sk-test-0123456789"
    async with open_rating_model(settings(tmp_path, PARLEY_RATING_URL="http://127.0.0.1:9/v1")) as rating:
        assert rating.kind == "openai" and rating.base_url == "http://127.0.0.1:9/v1"
        assert rating._client.api_key == "sk-parley-local"
