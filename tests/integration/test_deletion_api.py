"""Delete means gone: rows, objects and spool files, behind a fence that in-flight writers respect.

Every test runs on SQLite + the local object store and on PostgreSQL + S3 (``both_client``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import ClientPayloadError, web
from aiohttp.test_utils import TestClient
from sqlalchemy import func, select

from relay.keys import DATABASE, OBJECTS, SETTINGS
from storage.deletion import delete_session, fence, session_prefix
from storage.models import (
    AudioChunk,
    AudioRecording,
    AuditEvent,
    ClientSecret,
    Session,
    SessionTombstone,
    TranscriptSegment,
    User,
)
from storage.ports import Speaker, TranscriptEvent
from storage.recorder import SpoolRecorderFactory
from storage.spool import Spool
from storage.uploader import upload_segment
from tests.api import problem, signup
from tests.integration.recorded import PLANTED, finished_session, new_session
from tests.integration.test_export_api import Gate
from tests.storage.test_recorder import feed

Client = TestClient[web.Request, web.Application]


async def objects_of(client: Client, session_id: str) -> list[str]:
    return [info.key async for info in client.app[OBJECTS].list(session_prefix(session_id))]


async def rows_of(client: Client, session_id: str) -> dict[str, int]:
    """How many rows of each kind still reference the session."""
    recordings = select(AudioRecording.id).where(AudioRecording.session_id == session_id)
    queries = {
        "sessions": select(func.count()).select_from(Session).where(Session.id == session_id),
        "segments": select(func.count())
        .select_from(TranscriptSegment)
        .where(TranscriptSegment.session_id == session_id),
        "recordings": select(func.count()).select_from(recordings.subquery()),
        "chunks": select(func.count()).select_from(AudioChunk).where(AudioChunk.recording_id.in_(recordings)),
        "secrets": select(func.count(ClientSecret.jti)).where(ClientSecret.session_id == session_id),
    }
    async with client.app[DATABASE].sessions() as s:
        return {name: int((await s.execute(query)).scalar_one()) for name, query in queries.items()}


async def test_delete_session_removes_rows_objects_and_spool_and_keeps_a_contentless_audit(
    both_client: Client, tmp_path: Path
) -> None:
    """After DELETE: 204, no row, no object under the session's prefix, no spool file; 404 afterwards."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")
    other, _ = await finished_session(both_client, learner, tmp_path / "spool2")
    spool_dir = both_client.app[SETTINGS].spool_dir / sid / "learner"
    spool_dir.mkdir(parents=True)
    (spool_dir / "000099.ogg").write_bytes(b"OggS leftover")  # a segment still waiting for upload
    assert await objects_of(both_client, sid)

    resp = await both_client.delete(f"/v1/sessions/{sid}", headers=learner.auth)
    assert resp.status == 204, await resp.text()

    assert await objects_of(both_client, sid) == []
    assert set((await rows_of(both_client, sid)).values()) == {0}
    assert not (both_client.app[SETTINGS].spool_dir / sid).exists()
    await problem(await both_client.get(f"/v1/sessions/{sid}", headers=learner.auth), 404, "not_found")
    await problem(await both_client.get(f"/v1/sessions/{sid}/export", headers=learner.auth), 404, "not_found")
    await problem(await both_client.delete(f"/v1/sessions/{sid}", headers=learner.auth), 404, "not_found")
    async with both_client.app[DATABASE].sessions() as s:
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.session_id == sid))).scalars().all()
        assert await s.get(SessionTombstone, sid) is not None
    deleted = [a for a in audit if a.event == "session.deleted"]
    assert len(deleted) == 1 and deleted[0].code == "owner"
    assert all(PLANTED not in str(vars(a)) for a in audit)
    # The learner's other session is untouched.
    assert await objects_of(both_client, other)
    assert (await rows_of(both_client, other))["chunks"] > 0


async def test_someone_elses_session_cannot_be_deleted(both_client: Client, tmp_path: Path) -> None:
    """Another user's session answers the same 404 as a missing one, and nothing of it is removed."""
    owner = await signup(both_client)
    intruder = await signup(both_client)
    sid, _ = await finished_session(both_client, owner, tmp_path / "spool")
    await problem(await both_client.delete(f"/v1/sessions/{sid}", headers=intruder.auth), 404, "not_found")
    assert await objects_of(both_client, sid)
    assert (await rows_of(both_client, sid))["sessions"] == 1


async def test_an_upload_in_flight_during_the_delete_leaves_nothing(
    both_client: Client, tmp_path: Path
) -> None:
    """A segment uploaded after the fence (the recorder still closing) is removed, not listed."""
    learner = await signup(both_client)
    sid = await new_session(both_client, learner)
    db, store = both_client.app[DATABASE], both_client.app[OBJECTS]
    spool_root = tmp_path / "spool"
    factory = SpoolRecorderFactory(db, store, spool_root, segment_ms=1000)
    factory.max_buffer_ms = 60_000
    rec = factory.open(sid)
    feed(rec, Speaker.LEARNER, 0, 2500)  # the recorder stays open: its last segment is still local
    report = await delete_session(db, store, spool_root, sid, sweep_rounds=1)
    assert report.complete
    # Now the recorder closes: its segments reach the uploader after the session was fenced.
    await rec.aclose()
    await factory.aclose()
    leftover = sorted(spool_root.rglob("*.ogg"))
    for path in leftover:  # what is still in the spool (if anything) is refused as well
        await upload_segment(db, store, Spool(spool_root), path)
    assert await objects_of(both_client, sid) == []
    assert set((await rows_of(both_client, sid)).values()) == {0}
    assert not (spool_root / sid).exists()


async def test_a_transcript_write_after_the_fence_writes_nothing(both_client: Client, tmp_path: Path) -> None:
    """The recorder's transcript write of a deleted session stores nothing and says so (empty id)."""
    learner = await signup(both_client)
    sid = await new_session(both_client, learner)
    db, store = both_client.app[DATABASE], both_client.app[OBJECTS]
    factory = SpoolRecorderFactory(db, store, tmp_path / "spool")
    rec = factory.open(sid)
    try:
        assert await rec.transcript(TranscriptEvent(Speaker.LEARNER, "before", 0, 900, "i1", None, 1))
        async with db.sessions.begin() as s:
            s.add(SessionTombstone(session_id=sid))  # fenced; the rows are not removed yet
        stored = await rec.transcript(TranscriptEvent(Speaker.COACH, PLANTED, 1000, 2000, "i2", "i1", 2))
        assert stored == ""
        assert (await rows_of(both_client, sid))["segments"] == 1
    finally:
        await rec.aclose()
        await factory.aclose()


async def exported_events(client: Client, session_id: str) -> list[AuditEvent]:
    async with client.app[DATABASE].sessions() as s:
        query = select(AuditEvent).where(
            AuditEvent.session_id == session_id, AuditEvent.event == "session.exported"
        )
        return list((await s.execute(query)).scalars())


async def test_an_export_of_a_session_being_deleted_is_not_found(both_client: Client, tmp_path: Path) -> None:
    """Fenced, its rows not removed yet: the export answers 404 as for a deleted session."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")
    await fence(both_client.app[DATABASE], sid)
    await problem(await both_client.get(f"/v1/sessions/{sid}/export", headers=learner.auth), 404, "not_found")
    assert await exported_events(both_client, sid) == []


async def test_an_export_under_way_when_the_session_is_fenced_is_cut(
    both_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export sees the fence at its next file: the zip is never finished nor recorded as exported."""
    learner = await signup(both_client)
    sid, _ = await finished_session(
        both_client, learner, tmp_path / "spool", learner_ms=4000, coach_ms=3000, segment_ms=500
    )
    for track in ("learner", "coach"):  # plans each track's assembly: the gate counts streaming reads
        resp = await both_client.get(f"/v1/sessions/{sid}/audio/{track}", headers=learner.auth)
        assert resp.status == 200 and await resp.read()
    gate = Gate(both_client, allowed=2, monkeypatch=monkeypatch)
    resp = await both_client.get(f"/v1/sessions/{sid}/export", headers=learner.auth)
    assert resp.status == 200
    await gate.blocked.wait()  # mid-stream, holding a read of the store
    await fence(both_client.app[DATABASE], sid)
    gate.opened.set()
    with pytest.raises(ClientPayloadError):
        await resp.read()
    assert await exported_events(both_client, sid) == []
    # An export that was finished before the fence stays recorded, ordered before the tombstone.
    other, _ = await finished_session(both_client, learner, tmp_path / "spool2")
    resp = await both_client.get(f"/v1/sessions/{other}/export", headers=learner.auth)
    assert resp.status == 200 and await resp.read()
    resp = await both_client.delete(f"/v1/sessions/{other}", headers=learner.auth)
    assert resp.status == 204, await resp.text()
    (exported,) = await exported_events(both_client, other)
    async with both_client.app[DATABASE].sessions() as s:
        tombstone = await s.get(SessionTombstone, other)
    assert tombstone is not None and exported.at < tombstone.deleted_at


async def test_delete_me_removes_every_session_and_the_account(both_client: Client, tmp_path: Path) -> None:
    """DELETE /v1/me: every session's rows and objects and the user row are gone; others are untouched."""
    learner = await signup(both_client)
    neighbour = await signup(both_client)
    mine = [(await finished_session(both_client, learner, tmp_path / f"s{i}"))[0] for i in range(2)]
    theirs, _ = await finished_session(both_client, neighbour, tmp_path / "n")
    resp = await both_client.delete("/v1/me", headers=learner.auth)
    assert resp.status == 204, await resp.text()
    for sid in mine:
        assert await objects_of(both_client, sid) == []
        assert set((await rows_of(both_client, sid)).values()) == {0}
    async with both_client.app[DATABASE].sessions() as s:
        users = (await s.execute(select(func.count()).select_from(User))).scalar_one()
    assert users == 1
    assert (await both_client.get("/v1/me", headers=learner.auth)).status == 401
    assert await objects_of(both_client, theirs)
    assert (await both_client.get(f"/v1/sessions/{theirs}", headers=neighbour.auth)).status == 200
