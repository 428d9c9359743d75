"""The low-latency jitter buffer in virtual time, the batch-aware mono decoder, and the aiortc hook."""

from __future__ import annotations

import asyncio
import fractions
import ipaddress
import itertools
import threading
from typing import Any

import aiortc.rtcrtpreceiver
import av
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from relay.browser.ice import rtc_configuration
from relay.browser.jitter import (
    DECODER_QUEUE_ATTR,
    JITTER_BUFFER_ATTR,
    BatchFrame,
    InlineDecoding,
    LowLatencyJitterBuffer,
    MonoOpusDecoder,
    install_low_latency_jitter_buffer,
    install_mono_decoder,
    restore_decoder,
)
from relay.browser.peer import BrowserPeer
from relay.browser.sdp import validate_offer
from relay.browser.speaker import SpeakerTrack
from tests.fakes.rtc_client import RtcClient, loopback_ice, tone  # noqa: F401 (fixture)

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
receiver_module: Any = aiortc.rtcrtpreceiver  # get_decoder is not re-exported in its stubs
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=96)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def packet(seq: int, *, data: bytes | None = None) -> RtpPacket:
    p = RtpPacket(payload_type=96, sequence_number=seq & 0xFFFF, timestamp=(seq * 960) & 0xFFFFFFFF)
    p._data = data if data is not None else seq.to_bytes(4, "big")  # type: ignore[attr-defined]
    return p


def seqs(frame: BatchFrame | None) -> list[int]:
    """Sequence numbers (as encoded in the fake payloads) of a released batch."""
    if frame is None:
        return []
    return [int.from_bytes(frame.data, "big")] + [int.from_bytes(d, "big") for d, _, _ in frame.extra]


def feed(buffer: LowLatencyJitterBuffer, clock: Clock, seq: int, *, after_ms: float = 20) -> list[int]:
    clock.now += after_ms / 1000
    pli, frame = buffer.add(packet(seq))
    assert pli is False
    return seqs(frame)


def test_in_order_packets_are_released_immediately() -> None:
    """Each in-order packet comes out of the add() that received it: no prefetch delay."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    assert [feed(jb, clock, s) for s in range(10, 15)] == [[10], [11], [12], [13], [14]]
    assert (jb.skipped, jb.late, jb.batched) == (0, 0, 0)
    assert jb.last_arrival == clock.now


def test_single_loss_is_skipped_after_one_packet_time_and_backlog_drains() -> None:
    """After a loss the next packet waits one packet time, then both held packets leave together."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    assert feed(jb, clock, 1) == [1]
    assert feed(jb, clock, 3) == []  # 2 lost
    assert feed(jb, clock, 4) == [3, 4]
    assert feed(jb, clock, 5) == [5]  # back to zero delay
    assert (jb.skipped, jb.batched) == (1, 1)


def test_batch_carries_timestamps_offsets_and_arrival_times() -> None:
    """A batch keeps each frame's RTP timestamp offset and its own packet arrival time."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    feed(jb, clock, 1)
    feed(jb, clock, 3)
    first_arrival = clock.now
    clock.now += 0.02
    _, frame = jb.add(packet(4))
    assert isinstance(frame, BatchFrame)
    assert frame.timestamp == 3 * 960 and frame.arrived_at == first_arrival
    assert [(offset, arrived) for _, offset, arrived in frame.extra] == [(960, clock.now)]


def test_reordered_packet_fills_the_hole_without_loss() -> None:
    """Two swapped packets are both delivered, in order, when the late one arrives."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    feed(jb, clock, 1)
    assert feed(jb, clock, 3) == []
    assert feed(jb, clock, 2, after_ms=3) == [2, 3]
    assert jb.skipped == 0


def test_packet_arriving_after_its_hole_was_skipped_is_dropped() -> None:
    """A packet older than what was already released is counted late and never delivered."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    feed(jb, clock, 1)
    feed(jb, clock, 3)
    assert feed(jb, clock, 4) == [3, 4]
    assert feed(jb, clock, 2, after_ms=1) == []
    assert jb.late == 1
    assert feed(jb, clock, 5, after_ms=19) == [5]


def test_burst_loss_is_skipped_in_one_step() -> None:
    """Five lost packets cost one packet time of waiting, then everything held is released."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    feed(jb, clock, 1)
    assert feed(jb, clock, 7, after_ms=120) == []
    assert feed(jb, clock, 8) == [7, 8]
    assert jb.skipped == 5


def test_two_holes_are_both_skipped() -> None:
    """Held packets behind two separate holes all leave once the wait expires."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    feed(jb, clock, 1)
    assert feed(jb, clock, 3) == []
    assert feed(jb, clock, 5, after_ms=5) == []
    assert feed(jb, clock, 6, after_ms=15) == [3, 5, 6]
    assert jb.skipped == 2


def test_jump_beyond_capacity_releases_at_once() -> None:
    """A gap larger than the capacity (long outage) resynchronises without waiting."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock, capacity=16)
    feed(jb, clock, 1)
    assert feed(jb, clock, 100, after_ms=2000) == [100]
    assert jb.skipped == 98
    assert feed(jb, clock, 101) == [101]


def test_held_packets_are_bounded_by_capacity() -> None:
    """Even with an endless wait, at most `capacity` packets are held before the hole is skipped."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock, capacity=4, max_wait_s=3600)
    feed(jb, clock, 1)
    assert [feed(jb, clock, s) for s in (3, 4, 5)] == [[], [], []]
    assert feed(jb, clock, 6) == [3, 4, 5, 6]


def test_sequence_number_wraparound() -> None:
    """Sequence numbers wrapping from 65535 to 0 are in order, and a loss across the wrap is skipped."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    assert [feed(jb, clock, s) for s in (65534, 65535, 0)] == [[65534], [65535], [0]]
    assert feed(jb, clock, 2) == []
    assert feed(jb, clock, 3) == [2, 3]


def test_duplicates_are_dropped() -> None:
    """A duplicated packet (held or already released) is delivered once."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    feed(jb, clock, 1)
    feed(jb, clock, 3)
    assert feed(jb, clock, 3, after_ms=1) == []
    assert feed(jb, clock, 1, after_ms=1) == []
    assert jb.late == 2


def test_sender_restart_far_behind_resynchronises() -> None:
    """A sequence number far behind (a restarted sender) starts a new stream instead of being late."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    feed(jb, clock, 5000)
    assert feed(jb, clock, 10) == [10]
    assert feed(jb, clock, 11) == [11]
    assert jb.resets == 1


def test_empty_payloads_are_not_sent_to_the_decoder() -> None:
    """An RTP packet without payload advances the sequence but yields no frame."""
    clock = Clock()
    jb = LowLatencyJitterBuffer(clock=clock)
    clock.now += 0.02
    assert jb.add(packet(1, data=b"")) == (False, None)
    assert feed(jb, clock, 2) == [2]


def opus_packets(n: int) -> list[bytes]:
    encoder: Any = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format, encoder.bit_rate = 48000, "stereo", "s16", 64000
    encoder.time_base = fractions.Fraction(1, 48000)
    frame = av.AudioFrame(format="s16", layout="stereo", samples=960)
    frame.sample_rate = 48000
    out = []
    for i in range(n):
        frame.planes[0].update(bytes([i % 7 * 10]) * 3840)
        frame.pts = i * 960
        out += [bytes(p) for p in encoder.encode(frame)]
    return out


def test_mono_decoder_decodes_every_frame_of_a_batch() -> None:
    """A 3-frame batch of stereo Opus decodes to three 48 kHz mono frames with pts and arrival stamps."""
    data = opus_packets(3)
    batch = BatchFrame(data[0], 1000, 5.0)
    batch.extra = [(data[1], 960, 5.02), (data[2], 1920, 5.04)]
    frames = MonoOpusDecoder().decode(batch)
    assert [(f.samples, f.layout.name, f.sample_rate) for f in frames] == [(960, "mono", 48000)] * 3
    assert [f.pts for f in frames] == [1000, 1960, 2920]
    assert [f.opaque.arrived_at for f in frames] == [5.0, 5.02, 5.04]
    assert [f.opaque.packet for f in frames] == data  # the packets as received, for the recorder


def test_mono_decoder_accepts_stock_frames_and_skips_garbage() -> None:
    """aiortc's own JitterFrame decodes (no arrival stamp); an undecodable frame is skipped and counted."""
    decoder = MonoOpusDecoder()
    (frame,) = decoder.decode(JitterFrame(opus_packets(1)[0], 0))
    assert frame.opaque.arrived_at is None and frame.layout.name == "mono"
    errors = MonoOpusDecoder.errors
    assert decoder.decode(JitterFrame(b"\xff" * 3, 960)) == []
    assert MonoOpusDecoder.errors == errors + 1


async def test_install_replaces_the_receiver_buffer_and_patches_the_decoder(loopback_ice: None) -> None:
    """The hook swaps aiortc 1.16's name-mangled audio jitter buffer, its decoder thread's queue and
    its Opus decoder factory, on receivers an offer created; anything else is refused."""
    offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        unapplied = offerer.addTransceiver("audio").receiver  # no remote track yet
        offerer.addTransceiver("video")
        await offerer.setLocalDescription(await offerer.createOffer())
        await pc.setRemoteDescription(offerer.localDescription)
        audio, video = (t.receiver for t in pc.getTransceivers())
        assert isinstance(getattr(audio, JITTER_BUFFER_ATTR), JitterBuffer)
        buffer = install_low_latency_jitter_buffer(audio, max_wait_s=0.01)
        assert getattr(audio, JITTER_BUFFER_ATTR) is buffer and buffer.max_wait_s == 0.01
        assert isinstance(getattr(audio, DECODER_QUEUE_ATTR), InlineDecoding)
        assert isinstance(receiver_module.get_decoder(OPUS), MonoOpusDecoder)
        for wrong in (video, unapplied, object()):
            with pytest.raises(RuntimeError):
                install_low_latency_jitter_buffer(wrong)
    finally:
        await pc.close()
        await offerer.close()
        restore_decoder()


def test_decoder_patch_is_idempotent_and_restorable() -> None:
    """Installing twice is harmless; restore gives aiortc's own OpusDecoder back."""
    install_mono_decoder()
    install_mono_decoder()
    assert isinstance(receiver_module.get_decoder(OPUS), MonoOpusDecoder)
    restore_decoder()
    restore_decoder()
    assert type(receiver_module.get_decoder(OPUS)).__name__ == "OpusDecoder"


async def test_the_relays_receiver_decodes_inside_the_rtp_handler_and_its_track_ends_with_the_peer(
    loopback_ice: None,
) -> None:
    """With the hook, every Opus frame is decoded on the event loop as its packet is handled (no
    decoder-thread hop): the frames are on the track's queue in order before the handler returns,
    and closing the peer still ends the track and the receiver's decoder thread."""
    peer = BrowserPeer(
        peer_id="inline", configuration=rtc_configuration([]), speaker=SpeakerTrack(), on_event=print
    )
    async with peer, RtcClient() as client:
        offer = validate_offer((await client.offer()).encode(), remote_allow=LOOPBACK)
        await client.accept(await peer.negotiate(offer))
        assert peer._pc is not None
        receiver = peer._pc.getTransceivers()[0].receiver
        inline = getattr(receiver, DECODER_QUEUE_ATTR)
        assert isinstance(inline, InlineDecoding)
        handle = receiver._handle_rtp_packet
        queued_at_return: list[int] = []

        async def watched(packet: Any, arrival_time_ms: int) -> None:
            before = inline.frames
            await handle(packet, arrival_time_ms)
            if inline.frames > before:  # decoded inside this call, already queued for the track
                queued_at_return.append(receiver.track._queue.qsize())

        receiver._handle_rtp_packet = watched
        client.send_pcm(tone(1.0))
        assert peer.mic is not None
        pts = []
        async with asyncio.timeout(10):
            while len(pts) < 25:
                frame = await peer.mic.recv()
                pts.append(frame.pts)
        assert inline.frames >= 25 and inline.errors == 0
        assert queued_at_return and min(queued_at_return) >= 1
        assert all(b - a == 960 for a, b in itertools.pairwise(pts))  # 20 ms apart, in order
        decoder_threads = [t for t in threading.enumerate() if t.name == "audio-decoder"]
        assert decoder_threads, "aiortc's decoder thread still exists, waiting for the receiver to stop"
    for thread in decoder_threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
    with pytest.raises(MediaStreamError):
        async with asyncio.timeout(5):
            while True:
                await peer.mic.recv()
