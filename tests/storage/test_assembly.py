"""Assembled playback tracks: one valid Ogg Opus stream on the session timeline, served by byte range."""

from __future__ import annotations

import array
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import av
from sqlalchemy import update

from storage import assembly
from storage.assembly import AssembledTrack, assembled_track
from storage.db import Database
from storage.models import AudioRecording
from storage.objects import ObjectStore
from storage.oggopus import crc32_ogg, opus_packet_samples48, parse_pages
from storage.ports import Speaker
from storage.recorder import SpoolRecorderFactory
from tests.storage.test_recorder import feed, new_session

SEGMENT_MS = 2000


@dataclass
class Recorded:
    db: Database
    store: ObjectStore
    session_id: str


async def record(db: Database, store: ObjectStore, tmp_path: Path) -> Recorded:
    """Learner: 0-5 s, a 2 s hole, 7-11 s; coach: 1-4 s (a leading hole); 2 s segments."""
    sid = await new_session(db)
    factory = SpoolRecorderFactory(db, store, tmp_path / "spool", segment_ms=SEGMENT_MS)
    factory.max_buffer_ms = 60_000
    rec = factory.open(sid)
    try:
        feed(rec, Speaker.LEARNER, 0, 5000)
        rec.gap(Speaker.LEARNER, 5000, 7000, "peer_gone")
        feed(rec, Speaker.LEARNER, 7000, 11000)
        feed(rec, Speaker.COACH, 1000, 4000)
        await rec.aclose()
    finally:
        await factory.aclose()
    return Recorded(db, store, sid)


async def materialise(track: AssembledTrack, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in track.read(start, end)])


async def load(rec: Recorded, track: str) -> AssembledTrack:
    assembled = await assembled_track(rec.db, rec.store, rec.session_id, track)
    assert assembled is not None
    return assembled


def decode(path: Path) -> tuple[int, list[float]]:
    """(samples at 48 kHz, peak amplitude per 100 ms window) of an Ogg Opus file."""
    peaks: list[float] = []
    window: list[float] = []
    total = 0
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].codec_context.sample_rate
        assert rate == 48000
        for frame in container.decode(audio=0):
            fmt = frame.format.name
            code = "f" if fmt.startswith("flt") else "h"
            scale = 1.0 if code == "f" else 1 / 32768
            values = array.array(code, bytes(frame.planes[0]))[: frame.samples]
            total += frame.samples
            for v in values:
                window.append(abs(v) * scale)
                if len(window) == 4800:
                    peaks.append(max(window))
                    window = []
    return total, peaks


def check_single_stream(data: bytes) -> None:
    pages = parse_pages(data)
    assert sum(p.length for p in pages) == len(data)  # every page complete and CRC-valid
    assert len({p.serial for p in pages}) == 1
    assert [p.seqno for p in pages] == list(range(len(pages)))
    assert [p.flags for p in pages[:2]] == [0x02, 0] and pages[-1].flags == 0x04
    assert all(p.flags == 0 for p in pages[2:-1])
    assert pages[0].packets[0].startswith(b"OpusHead") and pages[1].packets[0].startswith(b"OpusTags")
    assert sum(p.packets[0].startswith(b"OpusHead") for p in pages for _ in p.packets[:1]) == 1
    assert sum(p.packets[0].startswith(b"OpusTags") for p in pages for _ in p.packets[:1]) == 1
    cumulative = 0
    granules = []
    for page in pages[2:]:
        cumulative += sum(opus_packet_samples48(p) for p in page.packets)
        granules.append(page.granule)
        if page is not pages[-1]:
            assert page.granule == cumulative  # mid-stream granules count every packet
    assert granules == sorted(granules) and cumulative - 960 < granules[-1] <= cumulative


async def test_assembled_track_is_one_ogg_stream_on_the_session_timeline(
    database: Database, object_store: ObjectStore, tmp_path: Path
) -> None:
    """Segments plus a hole become one valid stream whose decoded length and silence follow the timeline."""
    rec = await record(database, object_store, tmp_path)
    for track, timeline_ms, silent, sounding in (
        ("learner", 11000, range(52, 68), [*range(2, 48), *range(72, 108)]),
        ("coach", 4000, range(0, 8), range(12, 38)),
    ):
        assembled = await load(rec, track)
        data = await materialise(assembled)
        assert len(data) == assembled.length
        check_single_stream(data)
        path = tmp_path / f"{track}.ogg"
        path.write_bytes(data)
        samples, peaks = decode(path)
        assert abs(samples / 48 - timeline_ms) <= 40, (track, samples / 48)
        assert all(peaks[i] < 0.01 for i in silent), track  # the filled hole is silence
        assert all(peaks[i] > 0.05 for i in sounding), track  # the tone is where it was spoken


async def test_any_byte_range_equals_the_same_slice_of_the_whole_stream(
    database: Database, object_store: ObjectStore, tmp_path: Path
) -> None:
    """Ranges (page edges, first/last byte, random, past the end) match slices of the full stream."""
    rec = await record(database, object_store, tmp_path)
    assembled = await load(rec, "learner")
    whole = await materialise(assembled)
    n = len(whole)
    edges = [p.offset for p in parse_pages(whole)]
    rng = random.Random(7)
    ranges = [(0, 0), (0, n - 1), (n - 1, n - 1), (n - 1, None), (0, None), (5, n + 100)]
    for edge in rng.sample(edges, min(12, len(edges))):
        ranges += [(edge, edge), (max(0, edge - 1), min(n - 1, edge + 1)), (edge, min(n - 1, edge + 400))]
    for _ in range(25):
        a = rng.randrange(n)
        ranges.append((a, rng.randrange(a, n)))
    for start, end in ranges:
        stop = n if end is None else min(end, n - 1) + 1
        assert await materialise(assembled, start, end) == whole[start:stop], (start, end)
    assert await materialise(assembled, n, None) == b""


async def test_plan_is_cached_per_chunk_count_and_a_final_object_is_served_as_is(
    database: Database, object_store: ObjectStore, tmp_path: Path
) -> None:
    """The same chunk count reuses the plan; a set final_object_key is streamed unchanged."""
    rec = await record(database, object_store, tmp_path)
    first = await load(rec, "learner")
    again = await load(rec, "learner")
    assert first._plan is again._plan and (rec.session_id, "learner", 5) in assembly._plans
    final = os.urandom(100_000)
    key = f"sessions/{rec.session_id}/audio/learner.ogg"
    await object_store.put(key, final, content_type="audio/ogg")
    async with database.sessions.begin() as s:
        await s.execute(
            update(AudioRecording)
            .where(AudioRecording.session_id == rec.session_id, AudioRecording.track == "learner")
            .values(final_object_key=key)
        )
    served = await load(rec, "learner")
    assert served.length == len(final)
    assert await materialise(served) == final
    assert await materialise(served, 70_000, 70_009) == final[70_000:70_010]


async def test_a_track_without_audio_is_none(database: Database, object_store: ObjectStore) -> None:
    """No recording row (or no chunks) means no assembled track."""
    sid = await new_session(database)
    assert await assembled_track(database, object_store, sid, "learner") is None


def _crc_reference(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def test_fast_ogg_crc_matches_the_bitwise_definition() -> None:
    """The zlib-based Ogg CRC equals the bit-by-bit RFC 3533 definition on assorted inputs."""
    for data in (b"", b"OggS", bytes(range(256)), b"x" * 1000, struct.pack("<q", -1) * 7):
        assert crc32_ogg(data) == _crc_reference(data)
