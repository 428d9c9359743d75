"""SpeakerTrack: 20 ms slots on an absolute clock, own mono Opus, exact barge-in accounting."""

from __future__ import annotations

import asyncio
import fractions
from collections.abc import Iterator
from typing import Any

import av
import pytest
from aiortc.mediastreams import MediaStreamError

import relay.browser.speaker as speaker_module
from relay.browser.speaker import FRAME_BYTES, SpeakerTrack
from storage.oggopus import opus_packet_samples48
from tests.fakes.rtc_client import rms, tone

TB = fractions.Fraction(1, 48000)


class VirtualClock:
    """Replaces the track's clock and sleep: sleeping advances time instantly."""

    def __init__(self) -> None:
        self.now = 500.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += max(0.0, delay)
        await asyncio.sleep(0)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualClock]:
    c = VirtualClock()
    monkeypatch.setattr(speaker_module, "_monotonic", c.monotonic)
    monkeypatch.setattr(speaker_module, "_sleep", c.sleep)
    yield c


def pcm_ms(ms: int, freq: float = 300.0) -> bytes:
    return tone(ms / 1000, freq=freq, rate=24000)


async def run(track: SpeakerTrack, n: int) -> list[Any]:
    return [await track.recv() for _ in range(n)]


def decode(packets: list[Any]) -> list[av.AudioFrame]:
    decoder: Any = av.CodecContext.create("libopus", "r")
    decoder.format, decoder.layout, decoder.sample_rate = "s16", "mono", 48000
    frames: list[av.AudioFrame] = []
    for p in packets:
        frames += decoder.decode(av.Packet(bytes(p)))
    return frames


async def test_absolute_slots_pts_silence_and_decodable_mono_opus(clock: VirtualClock) -> None:
    """Frame n is returned at t0 + n * 20 ms (no drift), pts is continuous, idle slots are silence.

    The schedule is checked on a virtual clock; real-time pacing quality under load is measured by
    the benchmark (tests/bench), not asserted here.
    """
    track = SpeakerTrack()
    assert track._encoder.layout.name == "mono" and track._encoder.sample_rate == 24000
    voice = pcm_ms(1000, 440)
    packets, returned = [], []
    for n in range(120):
        if n == 20:
            track.feed(voice, item_id="a")
        packets.append(await track.recv())
        returned.append(clock.now)
    assert [round((t - returned[0]) * 1000, 6) for t in returned] == [20.0 * i for i in range(120)]
    assert track.stats.frames_late_5ms == 0 and track.stats.schedule_skips == 0
    assert [p.pts for p in packets] == [960 * i for i in range(120)]
    assert all(p.time_base == TB for p in packets)
    assert track.stats.frames_sent == 120 and track.stats.audio_frames == 50
    assert sum(track.stats.interval_jitter_hist) == 119
    assert all(p.size <= 8 for p in packets[:20] + packets[75:])  # the cached silence packet
    assert all(p.size > 20 for p in packets[22:68])
    frames = decode(packets)
    assert all(f.layout.name == "mono" and f.samples == 960 for f in frames)
    voiced = b"".join(bytes(memoryview(f.planes[0])[:1920]) for f in frames[25:68])
    assert abs(rms(voiced) - rms(voice)) < 0.25 * rms(voice)
    assert rms(b"".join(bytes(memoryview(f.planes[0])[:1920]) for f in frames[80:])) < 50


async def test_idle_slots_send_the_pre_encoded_silence_without_encoding(clock: VirtualClock) -> None:
    """Idle slots carry the silence packet encoded once at start; the encoder is not run for them."""
    track = SpeakerTrack()
    encoded_frames = track._enc_pts
    packets = await run(track, 3)
    assert {bytes(p) for p in packets} == {track._silence} and track._enc_pts == encoded_frames
    assert [p.pts for p in packets] == [0, 960, 1920]


async def test_feed_plays_in_order_and_played_ms_is_exact(clock: VirtualClock) -> None:
    """played_ms counts bytes actually sent: never more than fed, padded tail not counted."""
    track = SpeakerTrack()
    fed = 3 * FRAME_BYTES + 100
    track.feed(pcm_ms(100)[:fed], item_id="a")
    track.finish("a")
    assert track.speaking and track.queued_ms == fed // 48
    await run(track, 2)
    assert track.played_ms("a") == 40
    await run(track, 3)
    assert track.played_ms("a") == fed // 48 == 62
    assert track.played_ms("unknown") == 0
    assert not track.speaking


async def test_tiny_item_reports_at_least_one_ms(clock: VirtualClock) -> None:
    """An item with audio played never reports 0 ms, however short it was."""
    track = SpeakerTrack()
    track.feed(b"\x01\x00" * 5, item_id="tiny")
    track.finish("tiny")
    await run(track, 1)
    assert track.played_ms("tiny") == 1


async def test_clear_drops_queued_audio_at_once(clock: VirtualClock) -> None:
    """Barge-in: queued audio is gone, the next frame is silence, played ms are reported per item."""
    track = SpeakerTrack()
    track.feed(pcm_ms(1000), item_id="a")
    track.feed(pcm_ms(500), item_id="b")
    await run(track, 10)
    assert track.clear() == {"a": 200, "b": 0}
    assert not track.speaking and track.queued_ms == 0
    (packet,) = await run(track, 1)
    assert track.stats.audio_frames == 10 and track.stats.silence_frames == 1 and packet.size < 200
    assert track.clear() == {}
    assert track.played_ms("a") == 200


async def test_late_audio_of_a_cleared_item_is_ignored(clock: VirtualClock) -> None:
    """Deltas of a cancelled response that arrive after clear() do not play; new items do."""
    track = SpeakerTrack()
    track.feed(pcm_ms(200), item_id="a")
    await run(track, 2)
    track.clear()
    track.feed(pcm_ms(200), item_id="a")
    track.feed(pcm_ms(40), item_id="b")
    assert track.stats.dropped_after_clear_bytes == len(pcm_ms(200))
    await run(track, 3)
    assert track.played_ms("a") == 40 and track.played_ms("b") == 40


async def test_item_hooks_and_on_frame(clock: VirtualClock) -> None:
    """Item hooks bracket each item; on_frame gets each voiced frame's sent packet and slot time."""
    log: list[tuple[str, Any]] = []
    frames: list[tuple[bytes, int, int]] = []
    track = SpeakerTrack(
        clock_origin=clock.now - 1.0,
        on_item_started=lambda i: log.append(("started", i)),
        on_item_done=lambda i: log.append(("done", i)),
        on_frame=lambda packet, ms, samples48: frames.append((packet, ms, samples48)),
    )
    track.feed(pcm_ms(40), item_id="a")
    track.feed(pcm_ms(15), item_id="b")
    track.finish("b")
    sent = [bytes(p) for p in await run(track, 5)]
    assert log == [("started", "a"), ("done", "a"), ("started", "b"), ("done", "b")]
    assert [ms for _, ms, _ in frames] == [1000, 1020, 1040]
    assert [p for p, _, _ in frames] == sent[:3]  # exactly the packets that went to the browser
    assert all(opus_packet_samples48(p) == 960 for p, _, _ in frames)
    assert [n for _, _, n in frames] == [960, 960, 720]  # b's 15 ms, padded to a frame


async def test_item_without_finish_is_done_after_idle_time(clock: VirtualClock) -> None:
    """Without finish() an item is done once it has been dry for idle_done_ms."""
    done: list[str] = []
    track = SpeakerTrack(idle_done_ms=100, on_item_done=done.append)
    track.feed(pcm_ms(40), item_id="a")
    await run(track, 2 + 4)
    assert done == [] and track.speaking
    await run(track, 2)
    assert done == ["a"] and not track.speaking


async def test_underrun_inserts_silence_without_draining(clock: VirtualClock) -> None:
    """A model that is late causes counted underruns; its audio is delayed, never dropped."""
    track = SpeakerTrack(max_latency_ms=40)
    track.feed(pcm_ms(60), item_id="a")
    await run(track, 3 + 4)  # 3 frames, then 4 dry slots
    track.feed(pcm_ms(100), item_id="a")
    await run(track, 5)
    assert track.stats.underruns == 1 and track.stats.underrun_frames == 4
    assert track.stats.drained_frames == 0 and track.played_ms("a") == 160


async def test_loop_stall_skips_slots_and_drains_beyond_max_latency(clock: VirtualClock) -> None:
    """A 400 ms stall: no burst, slots skipped and counted, queued audio older than 100 ms dropped."""
    track = SpeakerTrack(max_latency_ms=100)
    track.feed(pcm_ms(2000), item_id="a")
    before = await run(track, 5)
    clock.now += 0.4  # the event loop was blocked
    after = await run(track, 3)
    # Slots 5..23 were never sent; slot 24 (due now) is the next one.
    assert track.stats.schedule_skips == 1 and track.stats.skipped_slots == 19
    assert after[0].pts - before[-1].pts == 20 * 960  # RTP time keeps matching wall-clock time
    assert track.stats.drained_frames == 19
    assert track.played_ms("a") == 8 * 20
    assert track.queued_ms == 2000 - (8 + 19) * 20


async def test_small_lag_is_caught_up_without_skipping(clock: VirtualClock) -> None:
    """Less than three frames behind, the schedule is kept by returning the due frames at once."""
    track = SpeakerTrack()
    await run(track, 2)  # slots 0 and 1; now = t0 + 20 ms
    clock.now += 0.05
    t = clock.now
    await run(track, 2)  # slots 2 and 3, 30 and 10 ms late: returned at once
    assert clock.now == t and track.stats.schedule_skips == 0
    assert track.stats.frames_late_5ms == 2
    await run(track, 1)  # slot 4 is in the future again
    assert clock.now == pytest.approx(t + 0.01)


async def test_queue_is_bounded(clock: VirtualClock) -> None:
    """Audio beyond max_queued_ms is refused and counted instead of growing without limit."""
    track = SpeakerTrack(max_queued_ms=100)
    track.feed(pcm_ms(80), item_id="a")
    track.feed(pcm_ms(80), item_id="b")
    assert track.queued_ms == 100 and track.stats.overflow_bytes == len(pcm_ms(60))


async def test_failing_hook_never_breaks_the_sender(clock: VirtualClock) -> None:
    """An exception in a hook is counted and logged, and recv() still returns the frame."""

    def boom(*_: object) -> None:
        raise ValueError("hook")

    track = SpeakerTrack(on_frame=boom, on_item_started=boom)
    track.feed(pcm_ms(20), item_id="a")
    (packet,) = await run(track, 1)
    assert packet.size > 20 and track.stats.hook_errors == 2


async def test_newest_outlet_is_the_only_one_served(clock: VirtualClock) -> None:
    """Outlets give each peer its own track; creating one retires the previous one."""
    track = SpeakerTrack()
    first = track.outlet()
    track.feed(pcm_ms(100), item_id="a")
    assert (await first.recv()).size > 20
    second = track.outlet()
    with pytest.raises(MediaStreamError):
        await first.recv()
    assert (await second.recv()).size > 20 and track.played_ms("a") == 40
    first.stop()  # aiortc stopping the old sender's track leaves the speaker alone
    assert track.readyState == "live" and (await second.recv()).size > 20


async def test_recv_still_works_after_aiortc_stopped_the_track(clock: VirtualClock) -> None:
    """aiortc stops a sender's track on close; the same SpeakerTrack can serve the next peer."""
    track = SpeakerTrack()
    await run(track, 2)
    track.stop()
    clock.now += 5
    track.feed(pcm_ms(20), item_id="a")
    (packet,) = await run(track, 1)
    assert packet.size > 20 and track.played_ms("a") == 20


async def test_every_frame_goes_out_on_its_slot_an_answer_after_silence_included(clock: VirtualClock) -> None:
    """Send time minus RTP time is one constant for silence, an answer fed mid-wait and the silence
    after it: no frame leaves early (it would not be heard sooner) and none late."""
    track = SpeakerTrack()
    sent: list[tuple[float, Any]] = []

    async def one() -> None:
        packet = await track.recv()
        sent.append((clock.now, packet))

    for _ in range(5):  # silence, past the encoder's tail
        await one()
    waiting = asyncio.create_task(one())
    await asyncio.sleep(0)  # the track waits for its next slot
    track.feed(pcm_ms(60), item_id="a")
    track.finish("a")
    await waiting
    for _ in range(6):
        await one()
    assert [p.pts for _, p in sent] == [i * 960 for i in range(12)]
    assert len({round(t - p.pts / 48000, 9) for t, p in sent}) == 1
    assert [opus_packet_samples48(bytes(p)) for _, p in sent[5:8]] == [960] * 3
    assert track.played_ms("a") == 60 and track.stats.audio_frames == 3
