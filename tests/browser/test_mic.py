"""mic_chunks: 24 kHz mono chunks on the session timeline, continuous reading, clean endings."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
from collections.abc import Iterable
from typing import Any

import av
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from relay.browser.mic import MicChunk, MicStats, mic_chunks
from tests.fakes.rtc_client import rms, tone

ORIGIN = 1000.0
TB = fractions.Fraction(1, 48000)


def frame(pcm: bytes, pts: int, arrived_at: float | None, layout: str = "mono") -> av.AudioFrame:
    channels = 2 if layout == "stereo" else 1
    f = av.AudioFrame(format="s16", layout=layout, samples=len(pcm) // 2 // channels)
    f.sample_rate = 48000
    f.planes[0].update(pcm)
    f.pts = pts
    f.time_base = TB
    f.opaque = arrived_at
    return f


def frames_of(pcm: bytes, *, skip: Iterable[int] = (), start: float = ORIGIN + 0.5) -> list[av.AudioFrame]:
    """20 ms mono frames of `pcm`, arriving every 20 ms, leaving out the frame indices in `skip`."""
    out = []
    for i in range(len(pcm) // 1920):
        if i not in set(skip):
            out.append(frame(pcm[i * 1920 : (i + 1) * 1920], i * 960, start + i * 0.02))
    return out


class FakeTrack(MediaStreamTrack):
    """Returns the given frames as fast as asked, then ends like a closed peer's track."""

    kind = "audio"

    def __init__(self, frames: list[av.AudioFrame], *, hang: bool = False) -> None:
        super().__init__()
        self.frames = list(frames)
        self.reads = 0
        self.hang = hang
        self.cancelled = False

    async def recv(self) -> av.AudioFrame:
        if not self.frames:
            if self.hang:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled = True
                    raise
            raise MediaStreamError
        self.reads += 1
        await asyncio.sleep(0)
        return self.frames.pop(0)


async def collect(track: MediaStreamTrack, **kwargs: Any) -> list[MicChunk]:
    async with contextlib.aclosing(mic_chunks(track, clock_origin=ORIGIN, **kwargs)) as chunks:
        return [c async for c in chunks]


async def test_chunks_are_24k_mono_and_contiguous_on_the_session_clock() -> None:
    """20 ms chunks abut on the timeline, which starts at the first packet's arrival after the origin."""
    pcm = tone(1.0, freq=440)
    chunks = await collect(FakeTrack(frames_of(pcm)))
    assert chunks[0].start_ms == 500 and chunks[0].arrived_at == ORIGIN + 0.5
    for a, b in zip(chunks, chunks[1:], strict=False):
        # Durations floor to whole ms: the first chunk is 19.3 ms (the resampler's filter delay).
        assert b.start_ms - (a.start_ms + a.duration_ms) in (0, 1)
    assert all(c.duration_ms == 20 and len(c.pcm) == 960 for c in chunks[1:-1])
    total = sum(len(c.pcm) for c in chunks) // 2
    assert 23900 <= total <= 24000  # one second at 24 kHz, minus the resampler's filter delay
    assert abs(rms(b"".join(c.pcm for c in chunks)) - rms(pcm)) < 0.05 * rms(pcm)


async def test_arrival_stamp_is_that_of_the_chunks_first_frame() -> None:
    """Every chunk carries the RTP arrival time of the frame it starts with."""
    chunks = await collect(FakeTrack(frames_of(tone(0.2))))
    assert [round(c.arrived_at - ORIGIN, 3) for c in chunks] == [round(0.5 + 0.02 * i, 3) for i in range(10)]


async def test_lost_frame_leaves_a_gap_in_the_timeline() -> None:
    """A missing frame (a skipped RTP packet) shows as a 20 ms jump in start_ms, not as shifted audio."""
    stats = MicStats()
    chunks = await collect(FakeTrack(frames_of(tone(0.2), skip=[5])), stats=stats)
    starts = [c.start_ms for c in chunks]
    assert starts[5] - (starts[4] + chunks[4].duration_ms) == 20
    assert stats.gaps == 1 and stats.frames == 9


async def test_longer_chunks_are_whole_frames_and_close_early_at_a_gap() -> None:
    """chunk_ms=100 gives ~100 ms chunks; a gap closes the open chunk instead of bridging it."""
    chunks = await collect(FakeTrack(frames_of(tone(0.6), skip=[12])), chunk_ms=100)
    durations = [c.duration_ms for c in chunks]
    assert durations[0] >= 98 and durations[1] == 100
    assert 40 in durations  # frames 10 and 11, closed by the gap at 12
    assert chunks[-1].start_ms + chunks[-1].duration_ms == 500 + 600


async def test_reanchors_when_the_sender_clock_jumps() -> None:
    """A pts jump that disagrees with arrival times by more than 250 ms re-anchors on arrival."""
    frames = frames_of(tone(0.2))
    for i, f in enumerate(frames[5:], start=5):
        f.pts = i * 960 + 48000 * 10  # the sender's clock leaps 10 s, arrivals do not
    stats = MicStats()
    chunks = await collect(FakeTrack(frames), stats=stats)
    assert stats.reanchors == 1
    assert chunks[5].start_ms == 500 + 100


async def test_stereo_frames_are_downmixed() -> None:
    """Frames from aiortc's stock stereo decoder also come out as 24 kHz mono."""
    mono = tone(0.1)
    interleaved = bytes(b for i in range(0, len(mono), 2) for b in mono[i : i + 2] * 2)
    frames = [
        frame(interleaved[i * 3840 : (i + 1) * 3840], i * 960, ORIGIN + i * 0.02, "stereo") for i in range(5)
    ]
    chunks = await collect(FakeTrack(frames))
    pcm = b"".join(c.pcm for c in chunks)
    assert len(pcm) in range(4 * 960, 5 * 960 + 1)
    assert abs(rms(pcm) - rms(mono)) < 0.05 * rms(mono)


async def test_one_resampler_per_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly one AudioResampler is created for a whole stream, never one per frame."""
    made: list[object] = []
    real = av.AudioResampler

    def counting(*args: Any, **kwargs: Any) -> av.AudioResampler:
        made.append(object())
        return real(*args, **kwargs)

    monkeypatch.setattr(av, "AudioResampler", counting)
    await collect(FakeTrack(frames_of(tone(0.5))))
    assert len(made) == 1


async def test_track_is_read_while_the_consumer_is_busy() -> None:
    """The track is drained even when nobody iterates, so aiortc's unbounded queue cannot grow."""
    track = FakeTrack(frames_of(tone(1.0)), hang=True)
    async with contextlib.aclosing(mic_chunks(track, clock_origin=ORIGIN)) as chunks:
        await anext(chunks)
        await asyncio.sleep(0.05)  # not iterating
        assert track.reads == 50


async def test_slow_consumer_backlog_is_bounded_and_counted() -> None:
    """Beyond max_backlog_ms the oldest chunks are dropped and counted."""
    stats = MicStats()
    track = FakeTrack(frames_of(tone(1.0)), hang=True)
    async with contextlib.aclosing(
        mic_chunks(track, clock_origin=ORIGIN, max_backlog_ms=200, stats=stats)
    ) as chunks:
        await anext(chunks)
        await asyncio.sleep(0.05)  # all 50 frames read meanwhile; only 10 chunks may wait
        rest = [await anext(chunks) for _ in range(10)]
    assert stats.frames == 50 and stats.dropped_chunks == 49 - 10
    assert [c.start_ms for c in rest] == [500 + 20 * k for k in range(40, 50)]  # the newest audio survived


async def test_the_recording_tap_sees_every_chunk_even_those_the_slow_consumer_lost() -> None:
    """on_chunk gets all chunks as the reader assembles them, also the ones dropped past the
    backlog bound and the last one flushed when the track ends: the recording never misses audio."""
    stats = MicStats()
    tapped: list[MicChunk] = []
    track = FakeTrack(frames_of(tone(1.0)))
    async with contextlib.aclosing(
        mic_chunks(track, clock_origin=ORIGIN, max_backlog_ms=200, stats=stats, on_chunk=tapped.append)
    ) as chunks:
        await anext(chunks)
        await asyncio.sleep(0.05)  # the consumer stalls while all 50 frames are read
        consumed = 1 + len([c async for c in chunks])
    assert stats.dropped_chunks > 0 and consumed < 50
    assert len(tapped) == 50
    assert [c.start_ms for c in tapped] == [500 + 20 * k for k in range(50)]


async def test_generator_ends_when_the_track_ends() -> None:
    """MediaStreamError from the track ends the iteration cleanly, last partial chunk included."""
    chunks = await collect(FakeTrack(frames_of(tone(0.1))), chunk_ms=60)
    assert [c.duration_ms for c in chunks] == [59, 40]


async def test_closing_the_generator_cancels_the_reader() -> None:
    """aclose() stops the reader task (the leaked-task check guards the rest)."""
    track = FakeTrack([], hang=True)
    gen = mic_chunks(track, clock_origin=ORIGIN)
    waiter = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    await gen.aclose()
    assert track.cancelled


async def test_reader_failure_is_raised_to_the_consumer() -> None:
    """An unexpected error while reading surfaces in the consumer instead of ending silently."""

    class Broken(FakeTrack):
        async def recv(self) -> av.AudioFrame:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await collect(Broken([]))
