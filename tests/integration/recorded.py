"""Build sessions with recorded audio and transcript rows on the app's own stores, for API tests."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient
from sqlalchemy import select, update

from relay.keys import DATABASE, OBJECTS
from storage.models import AudioChunk, AudioRecording, Session, TranscriptSegment
from storage.ports import Speaker
from storage.recorder import SpoolRecorderFactory
from tests.api import Learner
from tests.storage.test_recorder import feed

#: A transcript line that must never appear where it is not meant to (HTML, logs).
PLANTED = "My <b>secret</b> & \"quoted\" <script>alert('x')</script> sentence"


async def new_session(client: TestClient, learner: Learner, topic_id: str = "cafe-order") -> str:  # type: ignore[type-arg]
    resp = await client.post("/v1/sessions", json={"topic_id": topic_id}, headers=learner.auth)
    assert resp.status == 201, await resp.text()
    session_id: str = (await resp.json())["session"]["id"]
    return session_id


async def record(
    client: TestClient,  # type: ignore[type-arg]
    session_id: str,
    spool: Path,
    *,
    learner_ms: int = 3000,
    coach_ms: int = 2000,
    segment_ms: int = 1000,
) -> None:
    """Learner and coach audio through the real recorder (segments uploaded, manifest written)."""
    factory = SpoolRecorderFactory(client.app[DATABASE], client.app[OBJECTS], spool, segment_ms=segment_ms)
    factory.max_buffer_ms = 600_000
    rec = factory.open(session_id)
    try:
        feed(rec, Speaker.LEARNER, 0, learner_ms)
        if coach_ms:
            feed(rec, Speaker.COACH, learner_ms + 200, learner_ms + 200 + coach_ms)
        await rec.aclose()
    finally:
        await factory.aclose()


async def add_transcript(client: TestClient, session_id: str) -> list[str]:  # type: ignore[type-arg]
    """Three rows (one of them planted text, one not final); returns their ids in conversation order."""
    rows = [
        TranscriptSegment(session_id=session_id, seq=1, speaker="learner", text="A coffee, please",
                          start_ms=100, end_ms=1500, item_id="item_l1"),
        TranscriptSegment(session_id=session_id, seq=2, speaker="coach", text=PLANTED,
                          start_ms=1700, end_ms=2900, item_id="item_c1"),
        TranscriptSegment(session_id=session_id, seq=3, speaker="learner", text="Thanks",
                          start_ms=3000, end_ms=3400, item_id="item_l2", final=False),
    ]  # fmt: skip
    async with client.app[DATABASE].sessions.begin() as s:
        s.add_all(rows)
    return [r.id for r in rows]


async def set_status(
    client: TestClient,  # type: ignore[type-arg]
    session_id: str,
    status: str,
    *,
    recording_status: str | None = None,
) -> None:
    """Put a session (and optionally every track's recording) in a state directly."""
    async with client.app[DATABASE].sessions.begin() as s:
        await s.execute(update(Session).where(Session.id == session_id).values(status=status))
        if recording_status is not None:
            await s.execute(
                update(AudioRecording)
                .where(AudioRecording.session_id == session_id)
                .values(status=recording_status)
            )


async def manifest(client: TestClient, session_id: str) -> dict[str, list[AudioChunk]]:  # type: ignore[type-arg]
    """The committed segments of each track, in order."""
    async with client.app[DATABASE].sessions() as s:
        rows = (
            await s.execute(
                select(AudioRecording.track, AudioChunk)
                .join(AudioChunk, AudioChunk.recording_id == AudioRecording.id)
                .where(AudioRecording.session_id == session_id)
                .order_by(AudioRecording.track, AudioChunk.seq)
            )
        ).all()
    found: dict[str, list[AudioChunk]] = {}
    for track, chunk in rows:
        found.setdefault(track, []).append(chunk)
    return found


async def finished_session(
    client: TestClient,  # type: ignore[type-arg]
    learner: Learner,
    spool: Path,
    **recording: int,
) -> tuple[str, list[str]]:
    """An ended session with both tracks recorded and a transcript; returns (id, transcript row ids)."""
    sid = await new_session(client, learner)
    await record(client, sid, spool, **recording)
    rows = await add_transcript(client, sid)
    await set_status(client, sid, "ended")
    return sid, rows
