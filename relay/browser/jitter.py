"""A low-latency audio jitter buffer and a mono Opus decoder, patched into aiortc 1.16's receiver.

How aiortc 1.16 drives the receive path (``aiortc/rtcrtpreceiver.py``), which fixes the shape of
everything here:

* ``RTCRtpReceiver._handle_rtp_packet`` (on the event loop, once per RTP packet) calls
  ``self.__jitter_buffer.add(packet)``, which must return ``(pli_flag, JitterFrame | None)``.
  The attribute is name-mangled: ``receiver._RTCRtpReceiver__jitter_buffer``; for audio it is
  ``JitterBuffer(capacity=16, prefetch=4)``, i.e. 80 ms always and 280 ms after one loss
  (AIORTC.md A.5).
* A returned frame gets its ``timestamp`` rewritten by the receiver's ``TimestampMapper`` and is
  put on a ``queue.Queue`` read by the ``audio-decoder`` thread, which calls
  ``aiortc.rtcrtpreceiver.get_decoder(codec)`` once and then ``decoder.decode(frame)`` per frame.
  Every ``av.AudioFrame`` the decoder returns is handed to the loop and queued on the track.
* ``add()`` runs only when a packet arrives; there is no timer. So the buffer can release at most
  one ``JitterFrame`` per packet, which is why aiortc never drains a backlog.
* The decoder queue is the receiver's ``__decoder_queue`` (``_RTCRtpReceiver__decoder_queue``);
  the thread reads it with ``get()`` and ends on ``None``, which ``__stop_decoder`` puts and then
  joins the thread. Each decoded frame reaches the loop through ``run_coroutine_threadsafe``: a
  task per 20 ms frame, a self-pipe wake-up, and a thread that competes with the loop for the GIL
  on the one core a relay process runs on (py-spy at 8 sessions: a tenth of the loop thread's
  busy time inside ``Queue.put``/``Condition.notify``, and the decoder threads besides).

:class:`InlineDecoding` takes the queue's place and decodes on the event loop inside ``put()``
(an Opus frame decodes in tens of microseconds), handing frames straight to the track's queue;
the decoder thread only waits in ``get()`` until the receiver stops. The replacement
:class:`LowLatencyJitterBuffer` releases a packet the moment it is next in
sequence (nothing is prefetched: one RTP packet is one Opus frame), holds packets behind a hole
for at most ``max_wait_s`` and then skips the hole, and returns *everything* that became ready in
one :class:`BatchFrame`. The patched decoder (:class:`MonoOpusDecoder`) decodes every Opus packet
of a batch, so a backlog is drained at once and latency falls back to baseline. It also decodes to
mono (half the decoder output and resampler work) and stamps each ``AudioFrame.opaque`` with a
:class:`Received`: the monotonic arrival time of its RTP packet, which is how
:mod:`relay.browser.mic` measures inbound latency, and the Opus packet itself, which the recorder
stores as received instead of encoding the decoded audio again.
"""

from __future__ import annotations

import asyncio
import fractions
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import aiortc.rtcrtpreceiver
import av
from aiortc.jitterbuffer import JitterFrame

__all__ = [
    "BatchFrame",
    "InlineDecoding",
    "LowLatencyJitterBuffer",
    "MonoOpusDecoder",
    "Received",
    "install_low_latency_jitter_buffer",
    "install_mono_decoder",
    "restore_decoder",
]

# The receiver attribute aiortc 1.16 keeps its jitter buffer in (name mangling of __jitter_buffer).
JITTER_BUFFER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_KIND_ATTR = "_RTCRtpReceiver__kind"
# ... and the queue its decoder thread reads (aiortc 1.16: a queue.Queue until receive() starts the thread).
DECODER_QUEUE_ATTR = "_RTCRtpReceiver__decoder_queue"
# Packets further behind than this are a new stream (sender restart), not reordering (aiortc's value).
_MAX_MISORDER = 100
_OPUS_CLOCK = 48000
_TIME_BASE = fractions.Fraction(1, _OPUS_CLOCK)


class Received(NamedTuple):
    """What a decoded frame came from (``AudioFrame.opaque``)."""

    arrived_at: float | None  # monotonic arrival of the RTP packet, when the jitter buffer knew it
    packet: bytes  # the Opus packet exactly as the browser sent it


class BatchFrame(JitterFrame):
    """One or more consecutive Opus frames released together.

    ``data``/``timestamp`` are the first frame, exactly as aiortc's ``JitterFrame`` (the receiver
    rewrites ``timestamp``); ``extra`` holds the rest as ``(data, timestamp offset from the first,
    arrival time)`` so the offsets survive that rewrite. ``arrived_at`` is the monotonic arrival
    time of the first frame's packet.
    """

    __slots__ = ("arrived_at", "extra")

    def __init__(self, data: bytes, timestamp: int, arrived_at: float) -> None:
        super().__init__(data, timestamp)
        self.arrived_at = arrived_at
        self.extra: list[tuple[bytes, int, float]] = []


class LowLatencyJitterBuffer:
    """Drop-in replacement for aiortc's audio ``JitterBuffer``: release now, skip holes quickly.

    * In order: a packet is returned by the ``add()`` that received it (no prefetch).
    * Hole: later packets are held until the hole is filled (reordering) or until the oldest held
      packet has waited ``max_wait_s``; the next ``add()`` after that skips the missing sequence
      numbers and returns everything held. With 20 ms packets and the default 15 ms, the packet
      after a loss waits one packet time and the one after it is not delayed at all.
    * Late (behind what was already released): dropped and counted, never delivered out of order.
    * Bounded: at most ``capacity`` packets are held; a jump ahead of more than that (a long
      burst loss or a sender restart) releases what is held and resynchronises.

    Because release happens only inside ``add()``, a hole followed by silence from the sender
    holds the last packet until the next one arrives; browsers send continuously (no DTX is
    negotiated by aiortc), so in practice that is one packet time. ``add()`` is called on the
    event loop and never blocks.
    """

    def __init__(
        self,
        *,
        max_wait_s: float = 0.015,
        capacity: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self.max_wait_s = max_wait_s
        self._capacity = capacity
        self._clock = clock
        self._next: int | None = None
        self._held: dict[int, tuple[Any, float]] = {}
        self.last_arrival: float | None = None
        # Counters, read by tests and by whoever exports metrics.
        self.packets = 0
        self.late = 0
        self.skipped = 0
        self.resets = 0
        self.batched = 0

    @property
    def capacity(self) -> int:
        """The most packets held behind a hole (aiortc's ``JitterBuffer`` exposes the same)."""
        return self._capacity

    def add(self, packet: Any) -> tuple[bool, BatchFrame | None]:
        """Take one depayloaded RTP packet; return ``(False, frames now ready or None)``.

        ``packet`` is aiortc's ``RtpPacket`` after depayloading (``_data`` set by the receiver).
        The PLI flag is always ``False``: it only matters for video.
        """
        now = self._clock()
        self.last_arrival = now
        self.packets += 1
        seq: int = packet.sequence_number
        if self._next is None:
            self._next = seq
        ahead = (seq - self._next) & 0xFFFF
        force = False
        if ahead >= 0x8000:
            if 0x10000 - ahead <= _MAX_MISORDER:
                self.late += 1
                return False, None
            self._resync(seq)
        elif ahead >= self._capacity:
            force = True
        if seq in self._held:
            self.late += 1  # duplicate
            return False, None
        self._held[seq] = (packet, now)
        return False, self._release(now, force)

    def _resync(self, seq: int) -> None:
        self.resets += 1
        self._held.clear()
        self._next = seq

    def _release(self, now: float, force: bool) -> BatchFrame | None:
        assert self._next is not None
        held = self._held
        expected = self._next
        ready: list[tuple[Any, float]] = []
        while held:
            entry = held.pop(expected, None)
            if entry is not None:
                ready.append(entry)
                expected = (expected + 1) & 0xFFFF
                continue
            oldest = min(arrival for _, arrival in held.values())
            if not (force or len(held) >= self._capacity or now - oldest >= self.max_wait_s):
                break
            # Skip the hole: jump to the nearest held sequence number.
            base = expected
            nearest = min(held, key=lambda s: (s - base) & 0xFFFF)
            self.skipped += (nearest - expected) & 0xFFFF
            expected = nearest
        self._next = expected
        return self._batch(ready)

    def _batch(self, ready: list[tuple[Any, float]]) -> BatchFrame | None:
        batch: BatchFrame | None = None
        for packet, arrival in ready:
            data: bytes = packet._data
            if not data:
                continue  # an empty payload has nothing for the decoder
            if batch is None:
                batch = BatchFrame(data, packet.timestamp, arrival)
            else:
                batch.extra.append((data, (packet.timestamp - batch.timestamp) & 0xFFFFFFFF, arrival))
        if batch is not None and batch.extra:
            self.batched += 1
        return batch


class MonoOpusDecoder:
    """aiortc's ``OpusDecoder`` with mono output, batch support and arrival stamps.

    Runs on the event loop for the relay's receivers (:class:`InlineDecoding`) and on aiortc's
    ``audio-decoder`` thread for any other receiver in the process (test clients). Output: 48 kHz
    mono s16 ``AudioFrame`` objects (FFmpeg's libopus decoder ignores a 24 kHz request, AIORTC.md
    B), ``pts`` in 1/48000,
    ``opaque`` = :class:`Received` (the packet's arrival time when the jitter buffer recorded one,
    and the packet).
    A frame that fails to decode is skipped and counted in :attr:`errors` rather than losing the
    rest of its batch.
    """

    errors = 0  # process-wide; only ever incremented (on the loop or decoder threads, under the GIL)

    def __init__(self) -> None:
        self.codec = av.CodecContext.create("libopus", "r")
        self.codec.format = "s16"
        self.codec.layout = "mono"
        self.codec.sample_rate = _OPUS_CLOCK

    def decode(self, encoded_frame: Any) -> list[Any]:
        """Decode one ``JitterFrame`` (aiortc's or a :class:`BatchFrame`) into audio frames."""
        base: int = encoded_frame.timestamp
        frames = self._decode_one(encoded_frame.data, base, getattr(encoded_frame, "arrived_at", None))
        for data, offset, arrived_at in getattr(encoded_frame, "extra", ()):
            frames += self._decode_one(data, base + offset, arrived_at)
        return frames

    def _decode_one(self, data: bytes, pts: int, arrived_at: float | None) -> list[Any]:
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = _TIME_BASE
        try:
            frames: list[Any] = self.codec.decode(packet)
        except av.FFmpegError:
            MonoOpusDecoder.errors += 1
            return []
        for frame in frames:
            frame.opaque = Received(arrived_at, data)
        return frames


class InlineDecoding:
    """Stands in for an ``RTCRtpReceiver``'s decoder ``queue.Queue``: decodes on the event loop.

    ``put((codec, frame))`` (from ``_handle_rtp_packet``, on the loop) decodes at once with
    ``get_decoder(codec)`` (:class:`MonoOpusDecoder` for Opus) and puts every decoded frame on the
    track's queue, in order, without a thread hop. ``put(None)`` (the receiver stopping) releases
    the receiver's decoder thread, which has been waiting in :meth:`get` and now ends the track
    as it always does. A frame that fails to decode is counted in :attr:`errors` and skipped.
    """

    def __init__(self, track_queue: asyncio.Queue[Any]) -> None:
        self._out = track_queue
        self._decoder: Any = None
        self._codec_name: str | None = None
        self._stopped = threading.Event()
        self.frames = 0
        self.errors = 0

    def put(self, item: tuple[Any, Any] | None) -> None:
        if item is None:
            self._stopped.set()
            return
        codec, encoded_frame = item
        if codec.name != self._codec_name:
            self._decoder = _RECEIVER_MODULE.get_decoder(codec)
            self._codec_name = codec.name
        try:
            frames = self._decoder.decode(encoded_frame)
        except av.FFmpegError:
            self.errors += 1
            return
        for frame in frames:
            self._out.put_nowait(frame)
        self.frames += len(frames)

    def get(self) -> None:
        """aiortc's decoder thread: wait until the receiver stops, then let the thread end the track."""
        self._stopped.wait()


# Typed as Any: the module attribute is replaced at run time, which its declared type forbids.
_RECEIVER_MODULE: Any = aiortc.rtcrtpreceiver
_ORIGINAL_GET_DECODER: Callable[[Any], Any] = _RECEIVER_MODULE.get_decoder
_patch_lock = threading.Lock()


def _get_decoder(codec: Any) -> Any:
    if str(codec.mimeType).lower() == "audio/opus":
        return MonoOpusDecoder()
    return _ORIGINAL_GET_DECODER(codec)


def install_mono_decoder() -> None:
    """Make every aiortc receiver decode Opus with :class:`MonoOpusDecoder`.

    Process-wide and idempotent: it replaces ``aiortc.rtcrtpreceiver.get_decoder``, which each
    receiver's decoder thread calls when its first frame arrives, so it applies to every receiver
    (test clients in the same process included) that has not decoded yet. Other codecs are left
    to aiortc.
    """
    with _patch_lock:
        _RECEIVER_MODULE.get_decoder = _get_decoder


def restore_decoder() -> None:
    """Put aiortc's own ``get_decoder`` back (for tests); idempotent."""
    with _patch_lock:
        _RECEIVER_MODULE.get_decoder = _ORIGINAL_GET_DECODER


def install_low_latency_jitter_buffer(receiver: Any, **options: Any) -> LowLatencyJitterBuffer:
    """Replace an audio ``RTCRtpReceiver``'s jitter buffer with :class:`LowLatencyJitterBuffer`
    and its decoder thread's queue with :class:`InlineDecoding`.

    Call it after ``setRemoteDescription`` created the receiver and before media flows (packets
    already held by the old buffer are dropped). Also installs :func:`install_mono_decoder`,
    without which a :class:`BatchFrame` would lose all but its first frame. ``options`` go to the
    buffer. Raises ``RuntimeError`` if the receiver is not an aiortc 1.16-shaped audio receiver,
    rather than silently leaving the stock 80 ms buffer and the decoder thread in place.
    """
    track_queue = getattr(getattr(receiver, "track", None), "_queue", None)
    if (
        not hasattr(receiver, JITTER_BUFFER_ATTR)
        or getattr(receiver, _KIND_ATTR, None) != "audio"
        or not isinstance(getattr(receiver, DECODER_QUEUE_ATTR, None), queue.Queue)
        or not isinstance(track_queue, asyncio.Queue)
    ):
        raise RuntimeError("not an aiortc audio receiver with a patchable jitter buffer and decoder queue")
    install_mono_decoder()
    buffer = LowLatencyJitterBuffer(**options)
    setattr(receiver, JITTER_BUFFER_ATTR, buffer)
    setattr(receiver, DECODER_QUEUE_ATTR, InlineDecoding(track_queue))
    return buffer
