"""The spool recorder end to end: segments, manifest, gaps and transcripts on both engines and stores."""

from __future__ import annotations

import array
import hashlib
import math
import secrets
from pathlib import Path
from typing import Any

import av
from sqlalchemy import select

from storage import sessions
from storage.db import Database
from storage.models import AudioChunk, AudioGap, AudioRecording, User
from storage.objects import ObjectStore
from storage.ports import Speaker, TranscriptEvent
from storage.recorder import SpoolRecorder, SpoolRecorderFactory

RATE = 24000
FRAME_MS = 20


def tone(ms: int, rate: int = RATE, freq: float = 220.0) -> bytes:
    n = ms * rate // 1000
    return array.array("h", (int(5000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(n))).tobytes()


ONE_SECOND = tone(1000)


def feed(rec: SpoolRecorder, speaker: Speaker, start_ms: int, end_ms: int, rate: int = RATE) -> None:
    """Feed 20 ms frames of a tone for [start_ms, end_ms) on the session timeline."""
    second = ONE_SECOND if rate == RATE else tone(1000, rate)
    frame_bytes = rate * FRAME_MS // 1000 * 2
    call = rec.learner_audio if speaker is Speaker.LEARNER else rec.coach_audio
    for at in range(start_ms, end_ms, FRAME_MS):
        off = (at % 1000) * rate // 1000 * 2
        call(second[off : off + frame_bytes], sample_rate=rate, at_ms=at)


async def new_session(db: Database) -> str:
    async with db.sessions.begin() as s:
        user = User(email=f"{secrets.token_hex(6)}@example.org")
        s.add(user)
        await s.flush()
        made = await sessions.create_session(s, user_id=user.id, topic_id="cafe-order", user_hash="h")
        return made.id


async def manifest(db: Database, session_id: str, track: str) -> tuple[AudioRecording, list[AudioChunk]]:
    async with db.sessions() as s:
        rec = (
            await s.execute(
                select(AudioRecording).where(
                    AudioRecording.session_id == session_id, AudioRecording.track == track
                )
            )
        ).scalar_one()
        chunks = (
            (
                await s.execute(
                    select(AudioChunk).where(AudioChunk.recording_id == rec.id).order_by(AudioChunk.seq)
                )
            )
            .scalars()
            .all()
        )
    return rec, list(chunks)


def spool_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def decoded_ms(path: Path) -> float:
    with av.open(str(path)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
        return samples * 1000 / container.streams.audio[0].codec_context.sample_rate


async def test_twenty_seconds_on_both_tracks_become_a_contiguous_manifest(
    database: Database, object_store: ObjectStore, tmp_path: Path
) -> None:
    """20 s per track with a learner gap: ordered chunks, contiguous but at the gap, objects verified."""
    sid = await new_session(database)
    spool = tmp_path / "spool"
    factory = SpoolRecorderFactory(database, object_store, spool, max_spool_bytes=50_000_000)
    factory.max_buffer_ms = 60_000  # the test feeds faster than real time
    rec = factory.open(sid)
    feed(rec, Speaker.LEARNER, 0, 8000)
    rec.gap(Speaker.LEARNER, 8000, 10000, "peer_gone")
    feed(rec, Speaker.LEARNER, 10000, 20000)
    feed(rec, Speaker.COACH, 0, 20000)
    await rec.aclose()
    await rec.aclose()  # idempotent
    try:
        for track, fed_ms in (("learner", 18000), ("coach", 20000)):
            recording, chunks = await manifest(database, sid, track)
            assert recording.status == "complete" and recording.lost_ms == 0
            assert [c.seq for c in chunks] == list(range(len(chunks)))
            assert abs(sum(c.duration_ms for c in chunks) - fed_ms) <= 100
            assert abs(recording.duration_ms - fed_ms) <= 100
            holes = [
                (a.start_ms + a.duration_ms, b.start_ms)
                for a, b in zip(chunks, chunks[1:], strict=False)
                if abs(b.start_ms - (a.start_ms + a.duration_ms)) > 1
            ]
            assert holes == ([(8000, 10000)] if track == "learner" else [])
            assert chunks[0].start_ms == 0
            for chunk in chunks:
                data = await object_store.read(chunk.object_key)
                assert chunk.object_key == f"sessions/{sid}/audio/{track}/{chunk.seq:06d}.ogg"
                assert hashlib.sha256(data).hexdigest() == chunk.sha256 and len(data) == chunk.size_bytes
                local = tmp_path / f"{track}-{chunk.seq}.ogg"
                local.write_bytes(data)
                assert abs(decoded_ms(local) - chunk.duration_ms) <= FRAME_MS
        learner, _ = await manifest(database, sid, "learner")
        async with database.sessions() as s:
            gaps = (
                (await s.execute(select(AudioGap).where(AudioGap.recording_id == learner.id))).scalars().all()
            )
        assert [(g.start_ms, g.end_ms, g.reason) for g in gaps] == [(8000, 10000, "peer_gone")]
        assert spool_files(spool) == []
        assert factory.spool_bytes() == 0 and factory.accepting
    finally:
        await factory.aclose()


async def test_a_non_opus_rate_is_resampled_and_timed_right(database: Database, tmp_path: Path) -> None:
    """A 44.1 kHz learner track is resampled once per track; durations still match what was fed."""
    from storage.objects import LocalObjectStore

    store = LocalObjectStore(tmp_path / "objects")
    await store.setup()
    sid = await new_session(database)
    factory = SpoolRecorderFactory(database, store, tmp_path / "spool", segment_ms=2000)
    factory.max_buffer_ms = 60_000
    rec = factory.open(sid)
    feed(rec, Speaker.LEARNER, 0, 5000, rate=44100)
    await rec.aclose()
    try:
        recording, chunks = await manifest(database, sid, "learner")
        assert recording.sample_rate == 44100
        assert abs(sum(c.duration_ms for c in chunks) - 5000) <= 100
        assert [c.start_ms for c in chunks] == [0, 2000, 4000]
    finally:
        await factory.aclose()
        await store.aclose()


async def test_transcripts_insert_update_and_replay_in_order(database: Database, tmp_path: Path) -> None:
    """Transcript rows are written, a truncation updates the same row, and history keeps item order."""
    from storage.objects import LocalObjectStore

    store = LocalObjectStore(tmp_path / "objects")
    await store.setup()
    sid = await new_session(database)
    factory = SpoolRecorderFactory(database, store, tmp_path / "spool")
    rec = factory.open(sid)
    try:
        a = await rec.transcript(TranscriptEvent(Speaker.LEARNER, "hello", 0, 900, "i1", None, 1))
        b = await rec.transcript(TranscriptEvent(Speaker.COACH, "hi there, how", 1000, 2000, "i2", "i1", 2))
        b2 = await rec.transcript(
            TranscriptEvent(Speaker.COACH, "hi there", 1000, 1500, "i2", "i1", 2, truncated=True)
        )
        assert a != b and b == b2
        assert list(await rec.history()) == [(Speaker.LEARNER, "hello"), (Speaker.COACH, "hi there")]
    finally:
        await rec.aclose()
        await factory.aclose()
        await store.aclose()


def opus_packets(ms: int, rate: int = 48000) -> list[bytes]:
    """20 ms Opus packets of a tone, as a browser (48 kHz) or the speaker (24 kHz) would send them."""
    encoder: Any = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format, encoder.bit_rate = rate, "mono", "s16", 32000
    encoder.open()
    pcm = tone(ms, rate)
    step = rate // 50 * 2
    packets: list[bytes] = []
    for i in range(0, len(pcm) - step + 1, step):
        frame = av.AudioFrame(format="s16", layout="mono", samples=step // 2)
        frame.sample_rate = rate
        frame.pts = i // 2
        frame.planes[0].update(pcm[i : i + step])
        packets += [bytes(p) for p in encoder.encode(frame)]
    return packets


async def test_opus_packets_are_stored_as_they_came_without_encoding(
    database: Database, tmp_path: Path
) -> None:
    """Packets pass through byte for byte: durations (a padded end trimmed), offsets and rates exact."""
    from storage.objects import LocalObjectStore
    from storage.oggopus import parse_pages, read_segment_info

    store = LocalObjectStore(tmp_path / "objects")
    await store.setup()
    sid = await new_session(database)
    factory = SpoolRecorderFactory(database, store, tmp_path / "spool", segment_ms=2000)
    factory.max_buffer_ms = 60_000
    rec = factory.open(sid)
    learner = opus_packets(5000)
    coach = opus_packets(3000, rate=24000)
    for i, packet in enumerate(learner):
        rec.learner_opus(packet, at_ms=i * FRAME_MS)
    for i, packet in enumerate(coach):  # two answers with a pause between them
        last = i == len(coach) - 1  # the second answer ends 10 ms into its last frame (padding)
        rec.coach_opus(packet, at_ms=i * FRAME_MS + (4000 if i >= 75 else 0), samples48=480 if last else None)
    rec.learner_audio(ONE_SECOND[:960], sample_rate=RATE, at_ms=5000)  # a PCM frame on a packet track
    await rec.aclose()
    try:
        recording, chunks = await manifest(database, sid, "learner")
        assert recording.sample_rate == 48000 and recording.status == "complete"
        assert [c.start_ms for c in chunks] == [0, 2000, 4000]
        assert sum(c.duration_ms for c in chunks) == 5000
        stored: list[bytes] = []
        for chunk in chunks:
            data = await store.read(chunk.object_key)
            assert read_segment_info(data).pre_skip == 0
            for page in parse_pages(data)[2:]:
                stored += page.packets
        assert stored == learner  # not a single packet re-encoded
        assert recording.lost_ms == 20  # the stray PCM frame is declared, never mixed in
        coach_rec, coach_chunks = await manifest(database, sid, "coach")
        assert coach_rec.sample_rate == 24000
        assert [(c.start_ms, c.duration_ms) for c in coach_chunks] == [(0, 1500), (5500, 1490)]
    finally:
        await factory.aclose()
        await store.aclose()
