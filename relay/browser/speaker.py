"""Relay -> browser: the coach's voice as paced 20 ms Opus packets from our own encoder.

aiortc's ``RTCRtpSender`` does no pacing: it sends whatever ``track.recv()`` returns the moment it
returns, stamping RTP time from ``pts`` (AIORTC.md B, "Audio frame pacing"). For an ``AudioFrame``
it also runs its 96 kbit/s stereo encoder through ``run_in_executor`` and a pure-Python audio
level loop; for an ``av.Packet`` it only packetises (``OpusEncoder.pack``). So
:class:`SpeakerTrack` paces itself against an absolute monotonic schedule and returns packets from
its own mono 24 kHz libopus encoder, on the event loop (no executor hop, no audio-level loop).

Model audio arrives faster than real time in bursts; :meth:`SpeakerTrack.feed` only buffers it and
the 20 ms cadence releases it. Accounting is in bytes of 24 kHz pcm16 (48 bytes per ms) so
:meth:`SpeakerTrack.played_ms` is exact for the upstream truncate after a barge-in.
"""

from __future__ import annotations

import array
import asyncio
import collections
import fractions
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

__all__ = ["FRAME_BYTES", "FRAME_MS", "SPEAKER_RATE", "JITTER_BUCKETS_MS", "SpeakerStats", "SpeakerTrack"]

logger = logging.getLogger(__name__)

# av.Packet is generic over its stream in PyAV's stubs (not at run time); ours belong to no stream.
if TYPE_CHECKING:
    _Packet: TypeAlias = av.Packet[Any]

SPEAKER_RATE = 24000
FRAME_MS = 20
FRAME_S = FRAME_MS / 1000
FRAME_SAMPLES = SPEAKER_RATE * FRAME_MS // 1000
FRAME_BYTES = FRAME_SAMPLES * 2
BYTES_PER_MS = SPEAKER_RATE * 2 // 1000
# RTP time for Opus is always 48 kHz, whatever rate the encoder runs at (RFC 7587).
_RTP_TIME_BASE = fractions.Fraction(1, 48000)
_PTS_PER_FRAME = 48000 * FRAME_MS // 1000
_ZERO_FRAME = bytes(FRAME_BYTES)
# Past this much behind schedule, skip slots instead of sending a burst the browser would have to absorb.
_MAX_BEHIND_S = 3 * FRAME_S
# Idle frames still run through the encoder after audio, so it decays the way libopus wants,
# before the cached silence packet takes over.
_SILENCE_TAIL_FRAMES = 3
_PLAYED_HISTORY = 512
_CANCELLED_HISTORY = 64


# Module seams so tests can run the schedule on a virtual clock.
_monotonic = time.monotonic
_sleep = asyncio.sleep
# Upper bounds (ms) of the |interval - 20 ms| histogram buckets; the last bucket is everything above.
JITTER_BUCKETS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


@dataclass(slots=True)
class SpeakerStats:
    """Counters and histograms of one :class:`SpeakerTrack`; read them, don't write them."""

    frames_sent: int = 0
    audio_frames: int = 0
    silence_frames: int = 0
    frames_late_5ms: int = 0  # returned more than 5 ms after their slot
    max_late_ms: float = 0.0
    # |interval between consecutive returns - 20 ms|, bucketed by JITTER_BUCKETS_MS (+ overflow).
    interval_jitter_hist: list[int] = field(default_factory=lambda: [0] * (len(JITTER_BUCKETS_MS) + 1))
    max_interval_jitter_ms: float = 0.0
    schedule_skips: int = 0  # times the schedule fell behind by more than 3 frames and jumped
    skipped_slots: int = 0  # 20 ms slots that were never sent because of those jumps
    drained_frames: int = 0  # queued audio dropped by the max-latency policy
    underruns: int = 0  # times an item ran dry mid-way and silence was inserted
    underrun_frames: int = 0
    overflow_bytes: int = 0  # fed audio refused because max_queued_ms was reached
    dropped_after_clear_bytes: int = 0  # fed audio of an item cleared by a barge-in
    hook_errors: int = 0


@dataclass(slots=True, eq=False)
class _Item:
    item_id: str
    buf: bytearray
    offset: int = 0
    finished: bool = False
    started: bool = False
    origin_slot: int = 0  # slot of the first frame, moved on by underruns (the model was late, not us)
    position: int = 0  # frames consumed since origin: sent or drained
    idle_slots: int = 0

    @property
    def available(self) -> int:
        return len(self.buf) - self.offset


def _make_encoder(bitrate: int, complexity: int) -> Any:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = SPEAKER_RATE
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.bit_rate = bitrate
    encoder.options = {"application": "voip", "compression_level": str(complexity)}
    encoder.time_base = fractions.Fraction(1, SPEAKER_RATE)
    encoder.open()
    return encoder


@functools.lru_cache(maxsize=8)
def _silence_packet(bitrate: int) -> bytes:
    """The Opus packet libopus settles on for digital silence: 3 bytes (a CELT silence frame).

    A fresh encoder fed only zeros keeps emitting ~32-byte packets; after some signal it switches
    to the 3-byte form, so a throwaway encoder is walked there once and the result cached. Below
    complexity 6 libopus never gets there within 40 frames (31-32 bytes, 12 kbit/s of silence),
    so the throwaway encoder always runs at 10: any Opus packet decodes in any stream.
    """
    encoder = _make_encoder(bitrate, 10)
    frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
    frame.sample_rate = SPEAKER_RATE
    signal = array.array("h", (int(3000 * math.sin(i / 12)) for i in range(FRAME_SAMPLES))).tobytes()
    packet = b""
    for n in range(40):
        frame.planes[0].update(signal if n < 5 else _ZERO_FRAME)
        frame.pts = n * FRAME_SAMPLES
        for encoded in encoder.encode(frame):
            packet = bytes(encoded)
    return packet


class SpeakerTrack(MediaStreamTrack):
    """The relay's outbound audio track: paced, self-encoded, interruptible coach audio.

    * ``feed(pcm24k, item_id=...)`` buffers 24 kHz mono pcm16 of one upstream item (sync).
    * ``recv()`` (called by aiortc's sender) returns one Opus ``av.Packet`` per 20 ms slot, slot n
      due at ``t0 + n * 20 ms`` on ``time.monotonic()`` (no drift), ``pts = n * 960`` in
      ``1/48000``; silence when nothing is queued.
    * ``clear()`` drops everything queued at once (barge-in) and reports what was played.

    Items play in the order first fed. An item is *done* once its audio has all been sent and
    either :meth:`finish` was called for it, another item is queued behind it, or no more of it
    arrived for ``idle_done_ms``; audio of the same id fed after that plays as a new item.

    Max-latency drain: an item's audio follows its own real-time schedule from its first frame.
    Slots the track could not send (event-loop stalls, or no peer polling it between two
    connections) put the item behind that schedule; silence inserted because the model's audio had
    not arrived yet does not. When an item is more than ``max_latency_ms`` behind, the queued audio
    it should already have played is dropped (``stats.drained_frames``) so it catches up.

    Hooks, all called on the event loop from inside ``recv()``, must be cheap and must not raise
    (an exception is logged and counted, never propagated into aiortc's sender):
    ``on_frame(packet, session_ms, samples48)`` for every non-silent 20 ms frame sent (``packet`` is
    its Opus packet exactly as sent, so the recorder stores the coach's voice without encoding it
    again; ``session_ms`` is the slot's time since ``clock_origin``; ``samples48`` is how much of it
    is the model's audio, in 48 kHz samples: less than 960 for an item's last frame, which is padded
    with silence);
    ``on_item_started(item_id)`` when an item's first frame is sent; ``on_item_done(item_id)`` when
    an item is done as defined above (not for items cut by :meth:`clear`).

    Encoding runs on the event loop, which is cheaper than aiortc's executor hop when a process is
    pinned to one core: measured on this 2-vCPU VM, libopus costs ~0.13 ms per 20 ms frame of a
    tone and ~0.3 ms for speech-like audio at ``complexity=10`` (about half at 0); idle slots cost
    ~3 µs. Lower ``complexity`` buys sessions per core for some quality.

    One consumer at a time, so peers attach through :meth:`outlet`, not the track itself: the
    newest outlet is served and older ones end, which makes a reconnect safe even while the old
    peer's sender is still running. The track outlives peers; between two of them the schedule
    simply skips the slots nobody asked for.
    """

    kind = "audio"

    def __init__(
        self,
        *,
        bitrate: int = 32000,
        max_latency_ms: int = 2000,
        on_frame: Callable[[bytes, int, int], None] | None = None,
        on_item_started: Callable[[str], None] | None = None,
        on_item_done: Callable[[str], None] | None = None,
        clock_origin: float | None = None,
        idle_done_ms: int = 500,
        max_queued_ms: int = 300_000,
        complexity: int = 10,
    ) -> None:
        super().__init__()
        self.on_frame = on_frame
        self.on_item_started = on_item_started
        self.on_item_done = on_item_done
        self.stats = SpeakerStats()
        self.clock_origin = _monotonic() if clock_origin is None else clock_origin
        self._max_latency_slots = max(1, max_latency_ms // FRAME_MS)
        self._idle_done_slots = max(1, idle_done_ms // FRAME_MS)
        self._max_queued_bytes = max_queued_ms * BYTES_PER_MS
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_bytes = 0
        self._played: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._t0: float | None = None
        self._slot = -1
        self._last_return: float | None = None
        self._silent_run = _SILENCE_TAIL_FRAMES
        self._outlet: _Outlet | None = None
        self._taken_bytes = 0  # real audio in the frame _take() returned last (the rest is padding)

        if not 0 <= complexity <= 10:
            raise ValueError("complexity must be 0..10")
        self._encoder = _make_encoder(bitrate, complexity)
        self._enc_pts = 0
        # One frame object, refilled in place: the encoder has consumed it when encode() returns.
        self._frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        self._frame.sample_rate = SPEAKER_RATE
        # Pre-encoded once per bitrate; each idle slot wraps these bytes in a fresh packet.
        self._silence = _silence_packet(bitrate)

    # -- feeding side ------------------------------------------------------------------------

    def feed(self, pcm24k: bytes, *, item_id: str) -> None:
        """Queue 24 kHz mono s16le audio of upstream item ``item_id``; never blocks or awaits.

        Audio of an item cleared by :meth:`clear` is ignored (late deltas of a cancelled
        response must not play). Audio beyond ``max_queued_ms`` in total is refused and counted.
        """
        if not pcm24k:
            return
        if item_id in self._cancelled:
            self.stats.dropped_after_clear_bytes += len(pcm24k)
            return
        room = self._max_queued_bytes - self._queued_bytes
        if len(pcm24k) > room:
            self.stats.overflow_bytes += len(pcm24k) - max(0, room)
            if room <= 0:
                return
            pcm24k = pcm24k[:room]
        item = self._find(item_id)
        if item is None:
            item = _Item(item_id, bytearray())
            self._queue.append(item)
        item.buf += pcm24k
        self._queued_bytes += len(pcm24k)

    def finish(self, item_id: str) -> None:
        """Mark that no more audio of ``item_id`` will be fed, so it is done as soon as it has played."""
        item = self._find(item_id)
        if item is not None:
            item.finished = True

    def clear(self) -> dict[str, int]:
        """Barge-in: drop all queued audio now; return ``{item_id: ms played}`` for the items dropped.

        Every item that still had audio queued or was playing is reported, with the audio of it
        actually sent (0 for one that never started). Those ids are remembered so late audio fed
        for them is ignored. The next ``recv()`` returns silence. Idempotent: a second call
        returns ``{}``.
        """
        touched: dict[str, int] = {}
        for item in self._queue:
            touched[item.item_id] = self.played_ms(item.item_id)
            self._cancelled[item.item_id] = None
        while len(self._cancelled) > _CANCELLED_HISTORY:
            self._cancelled.popitem(last=False)
        self._queue.clear()
        self._queued_bytes = 0
        return touched

    def played_ms(self, item_id: str) -> int:
        """Milliseconds of ``item_id``'s audio actually sent so far (drained audio excluded).

        Floors to whole ms, but never 0 once any audio was sent; never more than was fed.
        Remembered for the last 512 items.
        """
        played = self._played.get(item_id, 0)
        return max(1, played // BYTES_PER_MS) if played else 0

    @property
    def speaking(self) -> bool:
        """True while coach audio is queued or an item is playing and not yet done."""
        return bool(self._queue)

    @property
    def queued_ms(self) -> int:
        """Audio queued and not yet sent, in ms."""
        return self._queued_bytes // BYTES_PER_MS

    # -- aiortc side -------------------------------------------------------------------------

    def outlet(self) -> MediaStreamTrack:
        """A track for one peer's ``RTCRtpSender``, reading this speaker.

        Creating an outlet makes it the only one served: an older outlet's next ``recv()`` raises
        ``MediaStreamError``, which ends that sender quietly (a frame already being prepared for
        it is still delivered). aiortc's ``stop()`` on a finished sender stops the outlet only.
        """
        outlet = _Outlet(self)
        self._outlet = outlet
        return outlet

    async def recv(self) -> _Packet:
        """Wait for the next 20 ms slot and return its Opus packet (``pts``/``time_base`` set).

        Cancelling it (aiortc does when the peer closes) is safe: the slot is simply not sent.
        """
        self._slot += 1
        now = _monotonic()
        if self._t0 is None:
            self._t0 = now
            self._slot = 0
        due = self._t0 + self._slot * FRAME_S
        if now - due > _MAX_BEHIND_S:
            slot = int((now - self._t0) / FRAME_S + 1e-6)  # the latest slot already due
            self.stats.schedule_skips += 1
            self.stats.skipped_slots += slot - self._slot
            self._slot = slot
            due = self._t0 + slot * FRAME_S
        elif due > now:
            # Always the slot's own time, even for an answer that arrives while the track idles:
            # the browser plays a continuous stream by RTP timestamp, so a frame sent before its
            # slot is not heard any sooner, and the return to the grid afterwards would reach the
            # browser's jitter buffer as a late arrival.
            await _sleep(due - now)

        pcm = self._next_pcm()
        if pcm is None:
            packet = self._silent_packet()
        else:
            self._silent_run = 0
            self.stats.audio_frames += 1
            encoded = self._encode(pcm)
            packet = encoded if encoded is not None else av.Packet(self._silence)
            if self.on_frame is not None:
                samples48 = self._taken_bytes  # 24 kHz s16: bytes == samples at 48 kHz
                self._call(self.on_frame, bytes(packet), round((due - self.clock_origin) * 1000), samples48)
        packet.pts = self._slot * _PTS_PER_FRAME
        packet.time_base = _RTP_TIME_BASE
        self._account(due)
        return packet

    # -- internals ---------------------------------------------------------------------------

    def _find(self, item_id: str) -> _Item | None:
        for item in reversed(self._queue):
            if item.item_id == item_id:
                return item
        return None

    def _next_pcm(self) -> bytes | None:
        """The 20 ms of audio for the current slot, or None for silence."""
        while self._queue:
            item = self._queue[0]
            available = item.available
            complete = item.finished or len(self._queue) > 1 or item.idle_slots >= self._idle_done_slots
            if available >= FRAME_BYTES or (available > 0 and complete):
                if item.started:
                    if item.idle_slots:
                        self.stats.underruns += 1
                        self.stats.underrun_frames += item.idle_slots
                        item.origin_slot += item.idle_slots
                        item.idle_slots = 0
                    self._drain_if_late(item)
                    if item.available == 0:
                        continue
                return self._take(item)
            if available == 0 and complete:
                self._queue.popleft()
                if item.started and self.on_item_done is not None:
                    self._call(self.on_item_done, item.item_id)
                continue
            item.idle_slots += 1
            return None
        return None

    def _drain_if_late(self, item: _Item) -> None:
        behind = self._slot - (item.origin_slot + item.position)
        if behind <= self._max_latency_slots:
            return
        frames = min(behind, item.available // FRAME_BYTES)
        if frames:
            dropped = frames * FRAME_BYTES
            item.offset += dropped
            item.position += frames
            self._queued_bytes -= dropped
            self.stats.drained_frames += frames

    def _take(self, item: _Item) -> bytes:
        n = min(item.available, FRAME_BYTES)
        start = item.offset
        with memoryview(item.buf) as view:  # one copy; released before the buffer may be resized
            pcm = bytes(view[start : start + n])
        self._taken_bytes = n
        if n < FRAME_BYTES:
            pcm += _ZERO_FRAME[n:]
        item.offset += n
        if item.offset >= 1 << 16:
            del item.buf[: item.offset]
            item.offset = 0
        self._queued_bytes -= n
        if not item.started:
            item.started = True
            item.origin_slot = self._slot
            if self.on_item_started is not None:
                self._call(self.on_item_started, item.item_id)
        item.idle_slots = 0
        item.position += 1
        self._played[item.item_id] = self._played.pop(item.item_id, 0) + n
        while len(self._played) > _PLAYED_HISTORY:
            self._played.popitem(last=False)
        return pcm

    def _silent_packet(self) -> _Packet:
        self.stats.silence_frames += 1
        if self._silent_run < _SILENCE_TAIL_FRAMES:
            self._silent_run += 1
            packet = self._encode(_ZERO_FRAME)
            if packet is not None:
                return packet
        return av.Packet(self._silence)

    def _encode(self, pcm: bytes) -> _Packet | None:
        self._frame.planes[0].update(pcm)
        self._frame.pts = self._enc_pts
        self._enc_pts += FRAME_SAMPLES
        packets = self._encoder.encode(self._frame)
        # libopus returns exactly one packet per 20 ms frame, with no delay in the output.
        return packets[0] if packets else None

    def _account(self, due: float) -> None:
        now = _monotonic()
        stats = self.stats
        stats.frames_sent += 1
        late_ms = (now - due) * 1000
        if late_ms > 5:
            stats.frames_late_5ms += 1
        if late_ms > stats.max_late_ms:
            stats.max_late_ms = late_ms
        if self._last_return is not None:
            jitter = abs((now - self._last_return) * 1000 - FRAME_MS)
            bucket = 0
            while bucket < len(JITTER_BUCKETS_MS) and jitter > JITTER_BUCKETS_MS[bucket]:
                bucket += 1
            stats.interval_jitter_hist[bucket] += 1
            if jitter > stats.max_interval_jitter_ms:
                stats.max_interval_jitter_ms = jitter
        self._last_return = now

    def _call(self, hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:
            self.stats.hook_errors += 1
            # A broken hook fails 50 times a second; the first failure and a count are enough.
            if self.stats.hook_errors % 500 == 1:
                logger.exception("speaker.hook_failed", extra={"count": self.stats.hook_errors})


class _Outlet(MediaStreamTrack):
    """One peer's view of a :class:`SpeakerTrack`; see :meth:`SpeakerTrack.outlet`."""

    kind = "audio"

    def __init__(self, speaker: SpeakerTrack) -> None:
        super().__init__()
        self._speaker = speaker

    async def recv(self) -> _Packet:
        if self._speaker._outlet is not self:
            raise MediaStreamError
        return await self._speaker.recv()
