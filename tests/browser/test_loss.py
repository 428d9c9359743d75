"""Inbound latency under packet loss: the relay's buffer stays under 40 ms p95, aiortc's stock one does not.

A real aiortc client sends a real-time tone to a BrowserPeer over loopback and loses RTP packets
on purpose (two single losses, a burst of four, one more single loss). Latency is measured on the
relay: from the monotonic arrival of an RTP packet in the jitter buffer's ``add()`` to the moment
``mic_chunks`` yields the chunk that starts with its audio (``MicChunk.arrived_at``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import statistics
import time
from typing import Any

from aiortc.jitterbuffer import JitterBuffer

from relay.browser.ice import rtc_configuration
from relay.browser.jitter import JITTER_BUFFER_ATTR, install_mono_decoder
from relay.browser.mic import MicStats, mic_chunks
from relay.browser.peer import BrowserPeer
from relay.browser.sdp import validate_offer
from relay.browser.speaker import SpeakerTrack
from tests.fakes.rtc_client import RtcClient, tone

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
LOSSES = (1, 1, 4, 1)  # packets dropped at each loss event: single, single, burst, single


class InstrumentedStockBuffer(JitterBuffer):
    """aiortc's own audio buffer, unchanged (capacity 16, prefetch 4), plus arrival stamps."""

    def __init__(self) -> None:
        super().__init__(capacity=16, prefetch=4)
        self._arrivals: dict[int, float] = {}

    def add(self, packet: Any) -> tuple[bool, Any]:
        self._arrivals[packet.timestamp] = time.monotonic()
        while len(self._arrivals) > 64:  # timestamps of skipped frames are never claimed
            del self._arrivals[next(iter(self._arrivals))]
        pli, frame = super().add(packet)
        stamped: Any = frame
        if stamped is not None:  # read by relay.browser.jitter.MonoOpusDecoder
            stamped.arrived_at = self._arrivals.pop(frame.timestamp, None)
        return pli, stamped


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[94]


async def measure(*, stock: bool) -> tuple[list[float], list[float], BrowserPeer, MicStats]:
    """Latencies (ms) before and after the first loss, the peer, and the mic statistics."""
    speaker = SpeakerTrack()
    samples: list[tuple[float, float]] = []
    stats = MicStats()
    async with (
        BrowserPeer(
            peer_id="loss",
            configuration=rtc_configuration([]),
            speaker=speaker,
            on_event=print,
            connect_timeout_s=30,
        ) as peer,
        RtcClient() as client,
    ):
        offer = validate_offer((await client.offer()).encode(), remote_allow=LOOPBACK)
        answer = await peer.negotiate(offer)
        if stock:
            install_mono_decoder()  # only for its arrival stamps; the buffer is aiortc's
            assert peer._pc is not None
            setattr(peer._pc.getTransceivers()[0].receiver, JITTER_BUFFER_ATTR, InstrumentedStockBuffer())
        await client.accept(answer)
        client.send_pcm(tone(6.0, freq=330))
        assert peer.mic is not None
        origin = time.monotonic()

        async def consume() -> None:
            assert peer.mic is not None
            async with contextlib.aclosing(mic_chunks(peer.mic, clock_origin=origin, stats=stats)) as chunks:
                async for chunk in chunks:
                    now = time.monotonic()
                    samples.append((now, (now - chunk.arrived_at) * 1000))

        consumer = asyncio.create_task(consume(), name="test:consume")
        try:
            await asyncio.sleep(0.6)  # connected, decoder thread warm: the measurement starts here
            warm = time.monotonic()
            await asyncio.sleep(1.2)
            first_loss = time.monotonic()
            for n in LOSSES:
                client.drop(n)
                await asyncio.sleep(0.4)
            await asyncio.sleep(1.0)
        finally:
            consumer.cancel()
            await asyncio.wait([consumer])
        assert client.dropped_rtp == sum(LOSSES)
    before = [lat for t, lat in samples if warm <= t < first_loss]
    after = [lat for t, lat in samples if t >= first_loss]
    name = "stock" if stock else "low-latency"
    print(
        f"\n{name}: before p50 {statistics.median(before):.1f} p95 {p95(before):.1f} ms,"
        f" after p50 {statistics.median(after):.1f} p95 {p95(after):.1f} ms"
    )
    return before, after, peer, stats


async def test_low_latency_buffer_keeps_inbound_p95_under_40ms_through_loss(loopback_ice: None) -> None:
    """With the relay's buffer, arrival -> MicChunk is <= 40 ms p95 before and after losses."""
    before, after, peer, stats = await measure(stock=False)
    assert len(before) > 40 and len(after) > 80
    assert p95(before) <= 40
    assert p95(after) <= 40
    assert peer.jitter_buffer is not None and peer.jitter_buffer.skipped == sum(LOSSES)
    assert stats.gaps == len(LOSSES)  # each loss shows as a gap on the session timeline


async def test_stock_aiortc_buffer_fails_the_same_bound_after_loss(loopback_ice: None) -> None:
    """The same scenario through aiortc's stock buffer: ~80 ms before, and > 100 ms p95 after a loss."""
    before, after, _, _ = await measure(stock=True)
    assert p95(before) > 40  # the fixed 4-packet prefetch alone breaks the bound
    assert p95(after) > 100
