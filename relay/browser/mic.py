"""Browser -> relay: the learner's decoded audio as 24 kHz mono pcm16 chunks on the session clock.

aiortc's ``RemoteStreamTrack`` queues decoded frames on an unbounded ``asyncio.Queue``; anything
that reads it late grows memory and latency without limit (AIORTC.md B, aiortc#554). So
:func:`mic_chunks` reads the track in its own task, whatever the consumer does, and keeps at most
``max_backlog_ms`` of converted audio for a slow consumer (dropping the oldest, counted).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from relay.browser.jitter import Received

__all__ = ["MIC_RATE", "MicChunk", "MicStats", "mic_chunks"]

MIC_RATE = 24000
_BYTES_PER_MS = MIC_RATE * 2 // 1000
# Past this disagreement between the sender's RTP clock and our arrival clock, re-anchor the
# timeline (an outage, a sender restart, or accumulated clock drift).
_REANCHOR_MS = 250
# A decoded frame that is this much shorter than a chunk still closes it: the resampler's filter
# delay makes the first output frame a few samples short, and waiting for the next frame would
# add a whole frame of latency for less than a millisecond of audio.
_SLACK_MS = 2


@dataclass(slots=True)
class MicChunk:
    """Learner audio: ``pcm`` is 24 kHz mono s16le.

    ``start_ms`` is on the session timeline (ms since ``clock_origin``), following the sender's
    RTP clock so consecutive chunks abut and a lost packet leaves a gap. ``duration_ms`` is the
    audio's length. ``arrived_at`` is the monotonic time the RTP packet of the chunk's first frame
    reached the relay (``time.monotonic()`` when no arrival stamp was available). ``packets`` are
    the Opus packets the chunk was decoded from, each with its own start on the session timeline,
    when the decoder passed them on (:class:`~relay.browser.jitter.Received`); empty otherwise.
    """

    pcm: bytes
    start_ms: int
    duration_ms: int
    arrived_at: float
    packets: tuple[tuple[int, bytes], ...] = ()


@dataclass(slots=True)
class MicStats:
    """Counters for one :func:`mic_chunks` stream."""

    frames: int = 0
    chunks: int = 0
    dropped_chunks: int = 0  # backlog over max_backlog_ms because the consumer fell behind
    gaps: int = 0  # discontinuities in the sender's timeline (lost packets, outages)
    reanchors: int = 0


async def mic_chunks(
    track: MediaStreamTrack,
    *,
    clock_origin: float,
    chunk_ms: int = 20,
    max_backlog_ms: int = 1000,
    stats: MicStats | None = None,
    on_chunk: Callable[[MicChunk], None] | None = None,
) -> AsyncGenerator[MicChunk, None]:
    """Yield the learner's audio from an aiortc audio track as :class:`MicChunk` objects.

    ``clock_origin`` is the ``time.monotonic()`` value of the session's start. A chunk is made of
    whole decoded frames and is yielded as soon as it holds ``chunk_ms`` (20 ms: every frame at
    once), or earlier at a gap in the sender's timeline. One ``av.AudioResampler`` (s16, mono,
    24 kHz) serves the whole stream.

    The track is read by a task named ``mic:<track id>`` for as long as the generator is alive,
    independently of how fast the consumer iterates. The generator ends when the track ends
    (``MediaStreamError``, e.g. the peer closed). Closing the generator (``aclose()``, or leaving an
    ``async with contextlib.aclosing(...)`` block) cancels and awaits that task; cancelling the
    consumer while it waits is safe. Use ``aclosing``: a generator abandoned without it keeps its
    reader task until it is garbage-collected.

    ``on_chunk`` sees every chunk as the reader assembles it, before the backlog bound can drop it
    and whether or not the consumer ever gets it: the recording's tap. On an overloaded loop the
    reader drains a burst of frames at once and the consumer falls behind; the model may then miss
    audio, the recording must not. It must not block.
    """
    stats = stats if stats is not None else MicStats()
    ready: collections.deque[MicChunk] = collections.deque()
    wake = asyncio.Event()
    max_backlog = max(1, max_backlog_ms // max(1, chunk_ms))
    reader = asyncio.create_task(
        _read(track, clock_origin, chunk_ms, ready, wake, max_backlog, stats, on_chunk),
        name=f"mic:{track.id}",
    )
    try:
        while True:
            while ready:
                yield ready.popleft()
            if reader.done():
                reader.result()  # re-raise an unexpected failure of the reader
                return
            wake.clear()
            await wake.wait()
    finally:
        reader.cancel()
        # wait() neither raises the reader's outcome nor swallows our own cancellation.
        await asyncio.wait([reader])
        if not reader.cancelled():
            reader.exception()  # mark it retrieved: surfaced above, or moot once the consumer left


async def _read(
    track: MediaStreamTrack,
    clock_origin: float,
    chunk_ms: int,
    ready: collections.deque[MicChunk],
    wake: asyncio.Event,
    max_backlog: int,
    stats: MicStats,
    on_chunk: Callable[[MicChunk], None] | None,
) -> None:
    try:
        assembler = _Assembler(clock_origin, chunk_ms, stats)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            for chunk in assembler.push(frame):
                if on_chunk is not None:
                    on_chunk(chunk)
                if len(ready) >= max_backlog:
                    ready.popleft()
                    stats.dropped_chunks += 1
                ready.append(chunk)
                wake.set()
        last = assembler.flush()
        if last is not None:
            if on_chunk is not None:
                on_chunk(last)
            ready.append(last)
    finally:
        wake.set()


class _Assembler:
    """Frames in, chunks out: resampling, the session timeline and chunking for one stream."""

    def __init__(self, clock_origin: float, chunk_ms: int, stats: MicStats) -> None:
        self._origin = clock_origin
        self._stats = stats
        self._chunk_samples = chunk_ms * MIC_RATE // 1000
        self._close_at = max(1, self._chunk_samples - _SLACK_MS * MIC_RATE // 1000)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=MIC_RATE)
        # The sender's timeline: a position in ms at a pts, and the pts expected next.
        self._anchor_ms = 0
        self._anchor_pts = 0
        self._next_pts: int | None = None
        self._end_ms = 0  # end of the last chunk emitted, so start_ms never goes backwards
        self._parts: list[bytes] = []
        self._samples = 0
        self._start_ms = 0
        self._arrived_at = 0.0
        self._packets: list[tuple[int, bytes]] = []

    def push(self, frame: Any) -> list[MicChunk]:
        self._stats.frames += 1
        opaque = frame.opaque
        packet: bytes | None = None
        arrived: float | None = None
        if isinstance(opaque, Received):
            arrived, packet = opaque
        elif isinstance(opaque, float):
            arrived = opaque
        if arrived is None:
            arrived = time.monotonic()
        out: list[MicChunk] = []
        position_ms = self._position_ms(frame, arrived, out)
        if packet is not None:
            self._packets.append((position_ms, packet))
        for resampled in self._resampler.resample(frame):
            nbytes = resampled.samples * 2
            if not nbytes:
                continue
            if not self._parts:
                self._start_ms = max(position_ms, self._end_ms)
                self._arrived_at = arrived
            # The plane's buffer is padded past the samples; copy only the audio, once.
            self._parts.append(bytes(memoryview(resampled.planes[0])[:nbytes]))
            self._samples += resampled.samples
        if self._samples >= self._close_at:
            self._emit(out)
        return out

    def flush(self) -> MicChunk | None:
        out: list[MicChunk] = []
        if self._parts or self._packets:
            self._emit(out)
        return out[0] if out else None

    def _position_ms(self, frame: Any, arrived: float, out: list[MicChunk]) -> int:
        """The frame's start on the session timeline; closes the open chunk at a discontinuity."""
        pts: int | None = frame.pts
        arrival_ms = round((arrived - self._origin) * 1000)
        if pts is None:
            return arrival_ms
        rate: int = frame.sample_rate
        if self._next_pts is None:
            self._anchor_ms, self._anchor_pts = arrival_ms, pts
        elif pts != self._next_pts:
            self._stats.gaps += 1
            if self._parts:
                self._emit(out)
        position = self._anchor_ms + (pts - self._anchor_pts) * 1000 // rate
        if abs(arrival_ms - position) > _REANCHOR_MS:
            self._stats.reanchors += 1
            self._anchor_ms, self._anchor_pts = arrival_ms, pts
            position = arrival_ms
        self._next_pts = pts + frame.samples
        return position

    def _emit(self, out: list[MicChunk]) -> None:
        pcm = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        duration_ms = len(pcm) // _BYTES_PER_MS
        out.append(MicChunk(pcm, self._start_ms, duration_ms, self._arrived_at, tuple(self._packets)))
        self._stats.chunks += 1
        self._end_ms = self._start_ms + duration_ms
        self._parts = []
        self._packets = []
        self._samples = 0
