"""The assembly step of finalize, on both engines and both object stores: one verified file per track,
served byte for byte as the segments give it; store failures, broken segments and a delete midway."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select, update

from relay.keys import DATABASE, OBJECTS
from relay.observability.metrics import Metrics
from relay.worker.assembly import UNAVAILABLE, UNVERIFIED, assembly_step
from relay.worker.finalize import finalize_kind
from relay.worker.jobs import JobKinds, Worker
from storage import jobs
from storage.assembly import assembled_track, final_object_key
from storage.db import Database
from storage.deletion import DeletionReport, delete_session, fence, session_prefix
from storage.models import AudioChunk, AudioRecording, Job, SessionStatus
from storage.objects import ObjectInfo, ObjectStore, ObjectStoreUnavailable
from storage.oggopus import crc32_ogg, parse_pages
from tests.api import Learner, signup
from tests.integration.recorded import finished_session, manifest, set_status
from tests.integration.test_jobs import job_row, status_of
from tests.storage.test_assembly import decode

Client = TestClient[web.Request, web.Application]
TRACKS = ("learner", "coach")
#: finished_session's timeline: learner 0-3000 ms, coach 3200-5200 ms, 1 s segments.
TIMELINE_MS = {"learner": 3000, "coach": 5200}


@pytest.fixture
def app_env() -> dict[str, str]:
    """No worker inside the app: each test runs its own, with the assembly step."""
    return {"PARLEY_WORKERS_IN_PROCESS": "0"}


class FaultyStore:
    """The app's real store, with faults injected around it by key (never a stand-in for it)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.puts: list[str] = []
        #: Keys whose put fails as if the store were down.
        self.fail_put: Callable[[str], bool] = lambda key: False
        #: Awaited once a put's bytes are all read, before it lands; and before a read starts.
        self.before_put: Callable[[str], Awaitable[None]] | None = None
        self.before_get: Callable[[str], Awaitable[None]] | None = None
        #: Keys whose reads break (as if the store went away) after this many bytes.
        self.break_get_after: dict[str, int] = {}

    async def setup(self) -> None:
        await self.inner.setup()

    async def put(
        self, key: str, data: bytes | AsyncIterable[bytes], *, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        self.puts.append(key)
        if self.fail_put(key):
            raise ObjectStoreUnavailable("injected: the store is down")
        if self.before_put is not None:
            # Every byte is sent, the object not yet committed: the moment the hook runs in.
            if not isinstance(data, bytes | bytearray | memoryview):
                data = b"".join([chunk async for chunk in data])
            await self.before_put(key)
        return await self.inner.put(key, data, content_type=content_type)

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        return self._get(key, start, end)

    async def _get(self, key: str, start: int, end: int | None) -> AsyncIterator[bytes]:
        if self.before_get is not None:
            await self.before_get(key)
        budget = self.break_get_after.get(key)
        async for chunk in self.inner.get(key, start=start, end=end):
            if budget is not None and len(chunk) > budget:
                if budget:
                    yield chunk[:budget]
                raise ObjectStoreUnavailable("injected: the store went away mid-read")
            if budget is not None:
                budget -= len(chunk)
            yield chunk

    async def read(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.get(key)])

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self.inner.stat(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def check(self) -> None:
        await self.inner.check()

    async def aclose(self) -> None:
        pass  # the app owns the inner store


def kinds() -> JobKinds:
    registry = JobKinds()
    registry.register(finalize_kind([assembly_step()]))
    return registry


async def recorded(client: Client, tmp_path: Path) -> tuple[Learner, str]:
    """An ended session with both tracks recorded in 1 s segments, and its finalize job queued."""
    learner = await signup(client)
    sid, _ = await finished_session(client, learner, tmp_path / "spool")
    async with client.app[DATABASE].sessions.begin() as s:
        await jobs.enqueue(s, jobs.FINALIZE, sid)
    return learner, sid


async def run_finalize(db: Database, store: ObjectStore, sid: str) -> Job:
    """Run the session's finalize job (retries included, backoff shortened) until it is done or dead."""
    worker = Worker(db, store, kinds(), metrics=Metrics(), backoff_base_s=0.01, backoff_cap_s=0.05)
    async with asyncio.timeout(60):
        while (job := await job_row(db, sid)).status not in ("done", "dead"):
            if await worker.run_once() is None:
                await asyncio.sleep(0.01)
    return job


async def served(client: Client, learner: Learner, sid: str) -> dict[str, tuple[bytes, bytes]]:
    """Each track through GET /audio: the whole body and the range 1000-2999."""
    found = {}
    for track in TRACKS:
        url = f"/v1/sessions/{sid}/audio/{track}"
        whole = await client.get(url, headers=learner.auth)
        assert whole.status == 200, await whole.text()
        part = await client.get(url, headers={**learner.auth, "Range": "bytes=1000-2999"})
        assert part.status == 206
        found[track] = (await whole.read(), await part.read())
    return found


async def final_keys(db: Database, sid: str) -> dict[str, str | None]:
    async with db.sessions() as s:
        rows = await s.execute(
            select(AudioRecording.track, AudioRecording.final_object_key).where(
                AudioRecording.session_id == sid
            )
        )
        return {track: key for track, key in rows.all()}


async def assembled_objects(store: ObjectStore, sid: str) -> list[str]:
    """Keys of assembled files (not segments) under the session's prefix."""
    audio = f"{session_prefix(sid)}audio/"
    return [info.key async for info in store.list(audio) if "/" not in info.key[len(audio) :]]


async def segment_digests(client: Client, sid: str) -> dict[str, str]:
    """The SHA-256 of every listed segment as stored now, checked against the manifest."""
    found = {}
    for chunks in (await manifest(client, sid)).values():
        for chunk in chunks:
            digest = hashlib.sha256(await client.app[OBJECTS].read(chunk.object_key)).hexdigest()
            assert digest == chunk.sha256
            found[chunk.object_key] = digest
    return found


async def test_each_track_gets_one_verified_file_served_byte_for_byte(
    both_client: Client, tmp_path: Path
) -> None:
    """Per track: a file that decodes to the timeline's length is stored and recorded; GET answers the
    same bytes (whole and a range) before and after; segments are untouched; a rerun writes nothing."""
    db, store = both_client.app[DATABASE], FaultyStore(both_client.app[OBJECTS])
    learner, sid = await recorded(both_client, tmp_path)
    before, segments = await served(both_client, learner, sid), await segment_digests(both_client, sid)

    job = await run_finalize(db, store, sid)
    assert (job.status, job.attempts, job.last_error_code) == ("done", 1, None)
    assert await status_of(db, sid) == SessionStatus.PROCESSED
    chunks = await manifest(both_client, sid)
    keys = await final_keys(db, sid)
    expected = {t: final_object_key(sid, t, len(chunks[t])) for t in TRACKS}
    assert keys == expected
    assert sorted(store.puts) == sorted(expected.values())
    assert sorted(await assembled_objects(store, sid)) == sorted(expected.values())
    for track, key in keys.items():
        assert key is not None
        data = await store.read(key)
        assert data == before[track][0]
        path = tmp_path / f"{track}.ogg"
        path.write_bytes(data)
        samples, _ = decode(path)
        assert abs(samples / 48 - TIMELINE_MS[track]) <= 40, (track, samples / 48)
        audio = await assembled_track(db, store, sid, track)
        assert audio is not None and audio.final_key == key  # GET reads the file now
    assert await served(both_client, learner, sid) == before
    assert await segment_digests(both_client, sid) == segments

    async with db.sessions.begin() as s:  # the same job once more (an operator's retry, say)
        await s.execute(update(Job).where(Job.id == job.id).values(status="queued"))
    store.puts.clear()
    assert (await run_finalize(db, store, sid)).status == "done"
    assert store.puts == [] and await final_keys(db, sid) == keys


async def test_a_store_failing_every_put_retries_then_fails_the_session_keeping_its_audio(
    both_client: Client, tmp_path: Path
) -> None:
    """Puts of the assembled file fail every time: retried to max_attempts, then dead with
    assembly_store_unavailable and the session processing_failed; segments and GET unchanged."""
    db, store = both_client.app[DATABASE], FaultyStore(both_client.app[OBJECTS])
    store.fail_put = lambda key: True
    learner, sid = await recorded(both_client, tmp_path)
    before, segments = await served(both_client, learner, sid), await segment_digests(both_client, sid)

    job = await run_finalize(db, store, sid)
    assert (job.status, job.attempts, job.runs, job.last_error_code) == ("dead", 5, 5, UNAVAILABLE)
    assert await status_of(db, sid) == SessionStatus.PROCESSING_FAILED
    assert len(store.puts) == 5
    assert await final_keys(db, sid) == {"learner": None, "coach": None}
    assert await assembled_objects(store, sid) == []
    assert await segment_digests(both_client, sid) == segments
    assert await served(both_client, learner, sid) == before


def _break_a_packet(data: bytes) -> bytes:
    """The segment with its 10th audio packet made invalid Opus (code 3, zero frames), CRC kept valid.

    Not the first: the start of a segment that follows another is trimmed from the stream.
    """
    page = parse_pages(data)[2]
    assert len(page.packets) > 10
    out = bytearray(data)
    body = page.offset + 27 + out[page.offset + 26] + sum(len(p) for p in page.packets[:10])
    out[body] |= 0x03
    out[body + 1] = 0
    struct.pack_into("<I", out, page.offset + 22, 0)
    struct.pack_into(
        "<I", out, page.offset + 22, crc32_ogg(bytes(out[page.offset : page.offset + page.length]))
    )
    return bytes(out)


@pytest.mark.parametrize("fault", ["altered_after_upload", "stored_broken", "timeline_longer"])
async def test_a_broken_segment_fails_verification_and_leaves_no_file(
    both_client: Client, tmp_path: Path, fault: str
) -> None:
    """A coach segment altered after its upload (its digest differs), stored broken (digest matches,
    the audio does not decode), or listed as longer than it is (the file decodes short of the
    timeline): dead at once with assembly_unverified, no coach file and no final_object_key left,
    the session processing_failed, and GET still serves the segments' stream."""
    db, store = both_client.app[DATABASE], FaultyStore(both_client.app[OBJECTS])
    learner, sid = await recorded(both_client, tmp_path)
    chunk = (await manifest(both_client, sid))["coach"][-1]
    original = await store.read(chunk.object_key)
    stored = original if fault == "timeline_longer" else _break_a_packet(original)
    await store.inner.put(chunk.object_key, stored, content_type="audio/ogg")
    async with db.sessions.begin() as s:
        if fault == "stored_broken":
            await s.execute(
                update(AudioChunk)
                .where(AudioChunk.id == chunk.id)
                .values(sha256=hashlib.sha256(stored).hexdigest())
            )
        elif fault == "timeline_longer":
            await s.execute(
                update(AudioChunk)
                .where(AudioChunk.id == chunk.id)
                .values(duration_ms=chunk.duration_ms + 300)
            )
    before = await served(both_client, learner, sid)

    job = await run_finalize(db, store, sid)
    assert (job.status, job.attempts, job.last_error_code) == ("dead", 1, UNVERIFIED)
    assert await status_of(db, sid) == SessionStatus.PROCESSING_FAILED
    coach_key = final_object_key(sid, "coach", len((await manifest(both_client, sid))["coach"]))
    # Altered, the file was never put; otherwise it was put, failed its check and was removed.
    assert (coach_key in store.puts) is (fault != "altered_after_upload")
    keys = await final_keys(db, sid)
    assert keys["coach"] is None and not await store.exists(coach_key)
    assert await assembled_objects(store, sid) == [k for k in keys.values() if k is not None]
    assert await served(both_client, learner, sid) == before
    assert await store.read(chunk.object_key) == stored  # the segment itself is left as it is


async def test_a_session_deleted_before_the_file_lands_keeps_no_object(
    both_client: Client, tmp_path: Path
) -> None:
    """DELETE's whole sweep runs just before the file's put lands: the step finds the fence after
    its put and removes the file, so nothing is left under the session's prefix."""
    db, store = both_client.app[DATABASE], FaultyStore(both_client.app[OBJECTS])
    _, sid = await recorded(both_client, tmp_path)
    reports: list[DeletionReport] = []

    async def delete_first(key: str) -> None:
        if not reports:
            reports.append(await delete_session(db, store.inner, tmp_path / "spool", sid, sweep_rounds=1))

    store.before_put = delete_first
    worker = Worker(db, store, kinds(), metrics=Metrics(), backoff_base_s=0.01)
    assert await worker.run_once() is not None
    assert len(reports) == 1 and reports[0].complete  # the delete itself found nothing left ...
    assert len(store.puts) == 1  # ... then the file landed, and the step stopped there
    assert [info.key async for info in store.list(session_prefix(sid))] == []
    assert await status_of(db, sid) is None


async def test_a_session_fenced_while_its_file_is_verified_gets_no_file(
    both_client: Client, tmp_path: Path
) -> None:
    """The tombstone lands while the file is read back: the step removes its file instead of
    recording it (the segments are the delete's to remove), and the delete then leaves nothing."""
    db, store = both_client.app[DATABASE], FaultyStore(both_client.app[OBJECTS])
    _, sid = await recorded(both_client, tmp_path)
    segments = await segment_digests(both_client, sid)

    async def fence_on_read_back(key: str) -> None:
        if key in store.puts:
            await fence(db, sid)

    store.before_get = fence_on_read_back
    worker = Worker(db, store, kinds(), metrics=Metrics(), backoff_base_s=0.01)
    assert await worker.run_once() is not None
    job = await job_row(db, sid)
    assert (job.status, job.last_error_code) == ("done", jobs.SESSION_DELETED)
    assert len(store.puts) == 1 and not await store.exists(store.puts[0])
    assert await final_keys(db, sid) == {"learner": None, "coach": None}
    assert sorted([info.key async for info in store.list(session_prefix(sid))]) == sorted(segments)
    report = await delete_session(db, store.inner, tmp_path / "spool", sid, sweep_rounds=1)
    assert report.complete and [info.key async for info in store.list(session_prefix(sid))] == []


async def test_a_file_left_by_a_run_that_died_before_recording_it_is_made_again(
    both_client: Client, tmp_path: Path
) -> None:
    """A torn file at the final key without final_object_key (a crash between put and record): the
    next run puts and verifies it again and records it."""
    db, store = both_client.app[DATABASE], FaultyStore(both_client.app[OBJECTS])
    learner, sid = await recorded(both_client, tmp_path)
    before = await served(both_client, learner, sid)
    n = len((await manifest(both_client, sid))["learner"])
    await store.inner.put(final_object_key(sid, "learner", n), before["learner"][0][:5000])

    assert (await run_finalize(db, store, sid)).status == "done"
    assert (await final_keys(db, sid))["learner"] == final_object_key(sid, "learner", n)
    assert await store.read(final_object_key(sid, "learner", n)) == before["learner"][0]
    assert await served(both_client, learner, sid) == before


async def test_interrupted_tracks_are_assembled_and_recording_ones_left_alone(
    both_client: Client, tmp_path: Path
) -> None:
    """A recording `interrupted` (its relay died) gets its file; one still `recording` does not."""
    db, store = both_client.app[DATABASE], FaultyStore(both_client.app[OBJECTS])
    _, sid = await recorded(both_client, tmp_path)
    await set_status(both_client, sid, SessionStatus.ENDED, recording_status="interrupted")
    async with db.sessions.begin() as s:
        await s.execute(
            update(AudioRecording)
            .where(AudioRecording.session_id == sid, AudioRecording.track == "coach")
            .values(status="recording")
        )
    assert (await run_finalize(db, store, sid)).status == "done"
    keys = await final_keys(db, sid)
    assert keys["learner"] is not None and keys["coach"] is None
    assert await assembled_objects(store, sid) == [keys["learner"]]


async def test_an_unreadable_file_falls_back_to_the_segments_with_the_same_bytes(
    both_client: Client, tmp_path: Path
) -> None:
    """Once assembled: a file whose read breaks midway, or that is gone, is served on from the
    segments, byte for byte; a segment listed after the file was made makes it stale."""
    db, store = both_client.app[DATABASE], FaultyStore(both_client.app[OBJECTS])
    learner, sid = await recorded(both_client, tmp_path)
    before = await served(both_client, learner, sid)
    assert (await run_finalize(db, store, sid)).status == "done"
    keys = await final_keys(db, sid)

    learner_key = keys["learner"]
    assert learner_key is not None
    whole = before["learner"][0]
    for broken_at in (0, 1, 1500, len(whole) - 1):
        store.break_get_after = {learner_key: broken_at}
        audio = await assembled_track(db, store, sid, "learner")
        assert audio is not None and audio.final_key == learner_key
        assert b"".join([c async for c in audio.read(0)]) == whole, broken_at
        assert b"".join([c async for c in audio.read(1000, 2999)]) == whole[1000:3000], broken_at
    store.break_get_after = {}

    await store.inner.delete(learner_key)  # lost: GET serves the segments, same bytes
    assert await served(both_client, learner, sid) == before

    chunks = (await manifest(both_client, sid))["coach"]
    late = f"{session_prefix(sid)}audio/coach/{len(chunks):06d}.ogg"
    data = await store.read(chunks[-1].object_key)
    await store.inner.put(late, data, content_type="audio/ogg")
    async with db.sessions.begin() as s:  # listed after assembly, as a delayed upload would be
        s.add(
            AudioChunk(
                recording_id=chunks[-1].recording_id, seq=len(chunks), start_ms=6000,
                duration_ms=chunks[-1].duration_ms, object_key=late, size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )  # fmt: skip
    audio = await assembled_track(db, store, sid, "coach")
    assert audio is not None and audio.final_key is None and audio.length > len(before["coach"][0])
    resp = await both_client.get(f"/v1/sessions/{sid}/audio/coach", headers=learner.auth)
    assert resp.status == 200 and len(await resp.read()) == audio.length
