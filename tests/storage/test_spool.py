"""Spool behaviour: store outages, the byte budget, and recovery after a killed process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import Database
from storage.models import AudioChunk, AudioGap, Session
from storage.objects import ObjectInfo, ObjectStore, S3ObjectStore
from storage.oggopus import parse_pages
from storage.ports import Speaker
from storage.recorder import SpoolRecorderFactory, recover_spool
from tests.fixtures_s3 import free_loopback_port
from tests.storage.crash import bury, kill
from tests.storage.test_recorder import feed, manifest, new_session, spool_files


class SwitchableStore:
    """Delegates to a real S3 endpoint on a closed port (down) until ``current`` is switched."""

    def __init__(self, up: ObjectStore) -> None:
        self.kind = up.kind
        self.down = S3ObjectStore.from_url(
            f"s3://test:test@127.0.0.1:{free_loopback_port()}/parley?secure=false"
        )
        self.up = up
        self.current: ObjectStore = self.down

    async def put(
        self, key: str, data: bytes | AsyncIterable[bytes], *, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        return await self.current.put(key, data, content_type=content_type)

    async def delete(self, key: str) -> None:
        await self.current.delete(key)

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        return self.current.get(key, start=start, end=end)

    async def aclose(self) -> None:
        await self.down.aclose()


async def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def chunk_count(db: Database) -> int:
    async with db.sessions() as s:
        return len((await s.execute(select(AudioChunk.id))).all())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_segments_wait_while_the_store_is_down_then_upload_once(
    database: Database, object_store: ObjectStore, tmp_path: Path
) -> None:
    """With the store unreachable segments stay in the spool unlisted; once back, each is listed once."""
    sid = await new_session(database)
    store = SwitchableStore(object_store)
    spool = tmp_path / "spool"
    factory = SpoolRecorderFactory(
        database,
        store,
        spool,
        segment_ms=2000,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,  # type: ignore[arg-type]
    )
    factory.max_buffer_ms = 60_000
    rec = factory.open(sid)
    try:
        for track in Speaker:
            feed(rec, track, 0, 9000)
        await wait_for(lambda: len(list(spool.rglob("*.ogg"))) >= 8)
        await asyncio.sleep(0.5)  # a few failed upload attempts
        assert await chunk_count(database) == 0
        assert factory.spool_bytes() > 0
        store.current = object_store
        await rec.aclose()
        for track in ("learner", "coach"):
            recording, chunks = await manifest(database, sid, track)
            assert [c.seq for c in chunks] == [0, 1, 2, 3, 4]
            assert [c.start_ms for c in chunks] == [0, 2000, 4000, 6000, 8000]
            assert recording.lost_ms == 0 and abs(recording.duration_ms - 9000) <= 100
            for chunk in chunks:
                assert await object_store.exists(chunk.object_key)
        assert spool_files(spool) == []
    finally:
        await factory.aclose()
        await store.aclose()


async def test_past_the_spool_budget_loss_is_declared_and_sessions_refused(
    tmp_path: Path, database: Database, local_store: ObjectStore
) -> None:
    """Over max_spool_bytes audio is dropped, declared as lost_ms and a gap, and accepting is False."""
    sid = await new_session(database)
    store = SwitchableStore(local_store)
    spool = tmp_path / "spool"
    factory = SpoolRecorderFactory(
        database, store, spool, segment_ms=1000, max_spool_bytes=12_000, upload_wait_s=0.3,  # type: ignore[arg-type]
        backoff_initial_s=0.05, backoff_max_s=0.1,
    )  # fmt: skip
    factory.max_buffer_ms = 60_000
    rec = factory.open(sid)
    try:
        assert factory.accepting
        feed(rec, Speaker.COACH, 0, 10000)
        await wait_for(lambda: not factory.accepting)
        assert factory.spool_bytes() >= 12_000
        await rec.aclose()
        recording, chunks = await manifest(database, sid, "coach")
        assert chunks == []  # the store is still down
        assert recording.lost_ms >= 3000
        async with database.sessions() as s:
            gaps = (
                (await s.execute(select(AudioGap).where(AudioGap.recording_id == recording.id)))
                .scalars()
                .all()
            )
        assert any(g.reason == "spool_full" for g in gaps)
        assert not factory.accepting
        # kept segments still upload when the store returns, and the spool drains
        store.current = local_store
        await wait_for(lambda: spool_files(spool) == [])
        _, chunks = await manifest(database, sid, "coach")
        assert chunks and factory.accepting
    finally:
        await factory.aclose()
        await store.aclose()


async def test_recovery_after_a_killed_process_keeps_audio_up_to_the_crash(
    database: Database, object_store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A killed recorder's spool (closed segments, .part files, one cut mid-page) is recovered."""
    sid = await new_session(database)
    spool = tmp_path / "spool"
    dead = SwitchableStore(object_store)  # nothing uploads before the "crash"
    factory = SpoolRecorderFactory(
        database, dead, spool, segment_ms=2000, page_ms=200, drain_s=0.05,  # type: ignore[arg-type]
    )  # fmt: skip
    factory.max_buffer_ms = 60_000
    rec = factory.open(sid)
    feed(rec, Speaker.LEARNER, 0, 4000)
    rec.gap(Speaker.LEARNER, 4000, 5000, "peer_gone")
    feed(rec, Speaker.LEARNER, 5000, 6600)
    feed(rec, Speaker.COACH, 0, 6600)
    await wait_for(lambda: len(list(spool.rglob("*.ogg.part"))) == 2)
    await asyncio.sleep(0.8)  # let pages of the open segments reach the disk
    # the kill: no aclose, tasks stop where they are
    await kill(rec, factory)
    await dead.aclose()
    request.addfinalizer(lambda: bury(rec))
    parts = sorted(spool.rglob("*.ogg.part"))
    assert len(parts) == 2
    coach_part = next(p for p in parts if p.parent.name == "coach")
    data = coach_part.read_bytes()
    last = parse_pages(data)[-1]
    coach_part.write_bytes(data[: last.offset + last.length // 2])  # cut mid-page

    recovered = await recover_spool(database, object_store, spool)

    assert recovered == [sid]
    for track, fed_ms in (("learner", 5600), ("coach", 6600)):
        recording, chunks = await manifest(database, sid, track)
        assert recording.status == "interrupted"
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        total = sum(c.duration_ms for c in chunks)
        assert fed_ms - 1500 <= total <= fed_ms, (track, total)
        for chunk in chunks:
            assert await object_store.exists(chunk.object_key)
    learner, _ = await manifest(database, sid, "learner")
    async with database.sessions() as s:
        session = (await s.execute(select(Session).where(Session.id == sid))).scalar_one()
        gaps = (await s.execute(select(AudioGap).where(AudioGap.recording_id == learner.id))).scalars().all()
    assert session.status == "interrupted" and session.ended_at is not None
    assert [(g.start_ms, g.end_ms) for g in gaps] == [(4000, 5000)]
    assert spool_files(spool) == []
    assert await recover_spool(database, object_store, spool) == []  # nothing left: idempotent
