"""Browser mic -> model: learner audio goes upstream and to the recorder as it arrives.

The recorder gets the browser's Opus packets as they were received (decoding happens once, for
the model); PCM only when a decoder did not pass its packets on. It is fed by the mic's reader
itself, so a loop too busy for the model's share (chunks dropped past the backlog bound) still
records every chunk.

Nothing here awaits the network: ``ModelLink.push_audio`` only enqueues. The upstream's audio
clock (the ``audio_start_ms``/``audio_end_ms`` of VAD events) counts only the audio the current
upstream connection received, so :class:`UpstreamClock` maps it back to the session timeline.
"""

from __future__ import annotations

import bisect
import contextlib

from aiortc import MediaStreamTrack

from relay.browser.mic import MicChunk, MicStats, mic_chunks
from relay.model.link import ModelLink
from storage.ports import SessionRecorder

__all__ = ["UpstreamClock", "run_uplink"]

MIC_RATE = 24000


class UpstreamClock:
    """Maps ms of audio a given upstream connection received to ms on the session timeline."""

    def __init__(self) -> None:
        self._upstream: list[int] = []
        self._session: list[int] = []
        self._total = 0

    def reset(self) -> None:
        """A new upstream connection starts counting its audio from zero."""
        self._upstream.clear()
        self._session.clear()
        self._total = 0

    def pushed(self, session_ms: int, duration_ms: int) -> None:
        expected = None
        if self._upstream:
            expected = self._session[-1] + (self._total - self._upstream[-1])
        if expected is None or abs(session_ms - expected) > 1:  # a discontinuity starts a new run
            self._upstream.append(self._total)
            self._session.append(session_ms)
        self._total += duration_ms

    def to_session(self, upstream_ms: int) -> int:
        if not self._upstream:
            return upstream_ms
        i = max(0, bisect.bisect_right(self._upstream, upstream_ms) - 1)
        return self._session[i] + (upstream_ms - self._upstream[i])


async def run_uplink(
    track: MediaStreamTrack,
    *,
    clock_origin: float,
    link: ModelLink,
    recorder: SessionRecorder,
    clock: UpstreamClock,
    stats: MicStats | None = None,
) -> None:
    """Record every learner chunk as the mic reader assembles it, and forward those the model
    keeps up with upstream, until the track ends."""

    def record(chunk: MicChunk) -> None:
        if chunk.packets:  # the browser's own packets: stored as received, nothing to encode
            for at_ms, packet in chunk.packets:
                recorder.learner_opus(packet, at_ms=at_ms)
        elif chunk.pcm:
            recorder.learner_audio(chunk.pcm, sample_rate=MIC_RATE, at_ms=chunk.start_ms)

    chunks = mic_chunks(track, clock_origin=clock_origin, stats=stats, on_chunk=record)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            _forward(chunk, link, clock)


def _forward(chunk: MicChunk, link: ModelLink, clock: UpstreamClock) -> None:
    if not chunk.pcm:
        return
    if link.connected:
        link.push_audio(chunk.pcm, arrived_at=chunk.arrived_at)
        clock.pushed(chunk.start_ms, chunk.duration_ms)
