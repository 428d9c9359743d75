"""BrowserPeer against a real aiortc client on loopback: media, events channel, liveness, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from relay.browser.ice import rtc_configuration
from relay.browser.mic import mic_chunks
from relay.browser.peer import BrowserPeer
from relay.browser.sdp import InvalidOffer, validate_offer
from relay.browser.speaker import SpeakerTrack
from tests.fakes.rtc_client import RtcClient, rms, speech_like

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


@dataclass
class Call:
    peer: BrowserPeer
    client: RtcClient
    speaker: SpeakerTrack
    events: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def call(*, ping_interval_s: float | None = None, **peer_options: Any) -> AsyncIterator[Call]:
    """A connected BrowserPeer <-> RtcClient pair; both closed on exit."""
    speaker = SpeakerTrack()
    events: list[dict[str, Any]] = []
    peer = BrowserPeer(
        peer_id="p1",
        configuration=rtc_configuration([]),
        speaker=speaker,
        on_event=events.append,
        **peer_options,
    )
    async with peer, RtcClient(ping_interval_s=ping_interval_s) as client:
        offer = validate_offer((await client.offer()).encode(), remote_allow=LOOPBACK)
        await client.accept(await peer.negotiate(offer))
        async with asyncio.timeout(5):
            await client.connected()
            await client.wait_channel(client.channel.label)
        yield Call(peer, client, speaker, events)


def decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "audio-decoder"]


async def until(condition: Callable[[], bool]) -> None:
    """Poll a counter that has no event to wait on, for at most 3 s."""
    async with asyncio.timeout(3):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_negotiation_gives_a_sendrecv_answer_and_opens_events(loopback_ice: None) -> None:
    """The answer is complete (candidates, active DTLS), and the relay-opened 'events' channel opens."""
    async with call() as c:
        answer = c.client.pc.remoteDescription.sdp
        assert "a=sendrecv" in answer and "a=setup:active" in answer and "m=application" in answer
        assert "a=end-of-candidates" in answer and " 127.0.0.1 " in answer
        async with asyncio.timeout(3):
            channel = await c.client.wait_channel("events")
        assert channel.label == "events"
        assert c.peer.mic is not None and c.peer.mic.kind == "audio"
        assert c.peer.connection_state == "connected"


async def test_audio_flows_both_ways(loopback_ice: None) -> None:
    """Learner speech reaches mic_chunks as 24 kHz mono; coach audio fed to the speaker reaches the client."""
    async with call() as c:
        assert c.peer.mic is not None
        c.client.send_pcm(speech_like(0.6))
        c.speaker.feed(speech_like(0.6, rate=24000), item_id="item-1")
        origin = time.monotonic()
        received = []
        async with contextlib.aclosing(mic_chunks(c.peer.mic, clock_origin=origin)) as chunks:
            async for chunk in chunks:
                received.append(chunk)
                if len(received) == 40:
                    break
        heard = b"".join(ch.pcm for ch in received)
        assert rms(heard) > 1000
        await until(lambda: c.speaker.played_ms("item-1") >= 600 and c.client.received_frames > 40)
        assert c.client.received_layouts == {"mono"} and rms(bytes(c.client.received_pcm)) > 500


async def test_send_event_is_delivered_or_dropped_and_counted(loopback_ice: None) -> None:
    """Events reach the browser once the channel is open; before that, or when backed up, they are dropped."""
    speaker = SpeakerTrack()
    peer = BrowserPeer(peer_id="p0", configuration=rtc_configuration([]), speaker=speaker, on_event=print)
    peer.send_event({"type": "session.state", "status": "connecting"})
    assert peer.stats.events_dropped_not_open == 1
    await peer.aclose()

    async with call(max_buffered_bytes=0) as c:
        async with asyncio.timeout(3):
            await c.client.wait_channel("events")
        await until(lambda: c.peer._events is not None and c.peer._events.readyState == "open")
        c.peer.send_event({"type": "coach.speaking", "item_id": "i1"})
        for _ in range(20):  # nothing drains between these: the buffer is above the 0-byte limit
            c.peer.send_event({"type": "transcript.delta", "delta": "x" * 100})
        async with asyncio.timeout(3):
            await c.client.wait_message(lambda label, m: label == "events" and m.get("item_id") == "i1")
        assert c.peer.stats.events_sent >= 1 and c.peer.stats.events_dropped_backpressure >= 1


async def test_events_sent_before_the_channel_opens_are_delivered_in_order(loopback_ice: None) -> None:
    """Events sent between negotiate() and the channel opening wait (64 at most) and arrive in order."""
    speaker = SpeakerTrack()
    peer = BrowserPeer(peer_id="p5", configuration=rtc_configuration([]), speaker=speaker, on_event=print)
    async with peer, RtcClient() as client:
        answer = await peer.negotiate(validate_offer((await client.offer()).encode(), remote_allow=LOOPBACK))
        for n in range(70):
            peer.send_event({"type": "session.state", "n": n})
        assert peer.stats.events_dropped_not_open == 6
        await client.accept(answer)
        async with asyncio.timeout(3):
            await client.wait_message(lambda label, m: m.get("n") == 69)
        assert [m["n"] for label, m in client.messages if label == "events"] == list(range(6, 70))


async def test_heartbeat_pong_inbound_events_and_malformed_messages(loopback_ice: None) -> None:
    """ping gets pong on the same channel; other JSON objects go to on_event; junk is counted, never fatal."""
    async with call() as c:
        async with asyncio.timeout(3):
            events = await c.client.wait_channel("events")
        for junk in ("not json", "[1, 2]", '{"no": "type"}', '{"type": 5}', "{" + " " * 20000 + "}"):
            c.client.channel.send(junk)
        c.client.channel.send(b"\xff\xfe")
        c.client.send_json({"type": "ping"})
        events.send('{"type": "ping"}')
        c.client.send_json({"type": "session.end"})
        async with asyncio.timeout(3):
            await c.client.wait_message(lambda label, m: label == "client" and m == {"type": "pong"})
            await c.client.wait_message(lambda label, m: label == "events" and m == {"type": "pong"})
        await until(lambda: c.events == [{"type": "session.end"}])
        assert c.peer.stats.heartbeats == 2 and c.peer.stats.messages_malformed == 6


async def test_failing_event_handler_is_contained(loopback_ice: None) -> None:
    """An exception in on_event is counted; the peer keeps answering heartbeats."""
    async with call() as c:

        def broken(_: dict[str, Any]) -> None:
            raise RuntimeError("handler")

        c.peer._on_event = broken
        c.client.send_json({"type": "session.end"})
        c.client.send_json({"type": "ping"})
        async with asyncio.timeout(3):
            await c.client.wait_message(lambda label, m: m == {"type": "pong"})
        assert c.peer.stats.handler_errors == 1


async def test_frozen_client_is_declared_dead_within_five_seconds(loopback_ice: None) -> None:
    """No RTP and no heartbeat for dead_after_s (default 4 s) ends wait_dead() with 'inactive'."""
    async with call(ping_interval_s=0.5) as c:
        c.client.send_pcm(speech_like(1.0))
        await until(lambda: c.peer.stats.heartbeats >= 1)
        await asyncio.sleep(0.3)
        frozen_at = time.monotonic()
        c.client.freeze()
        async with asyncio.timeout(5):
            reason = await c.peer.wait_dead()
        elapsed = time.monotonic() - frozen_at
        assert reason == "inactive" and 3.5 < elapsed < 5.0
        assert c.peer.connection_state == "connected"  # aiortc itself has not noticed anything


async def test_heartbeats_alone_keep_the_peer_alive(loopback_ice: None) -> None:
    """Without inbound RTP, data-channel heartbeats still count as a live browser."""
    async with call(ping_interval_s=0.1, dead_after_s=0.5) as c:
        c.client.source.stop()  # the microphone track ends: no more RTP
        waiter = asyncio.ensure_future(c.peer.wait_dead())
        await asyncio.sleep(1.2)
        assert not waiter.done()
        waiter.cancel()
        c.client._ping_interval = None
        for task in c.client._tasks:
            task.cancel()
        async with asyncio.timeout(2):
            assert await c.peer.wait_dead() == "inactive"


async def test_client_close_is_seen_as_connection_closed(loopback_ice: None) -> None:
    """A browser that closes its peer connection is gone at once, not after aiortc's 30 s."""
    async with call() as c:
        started = time.monotonic()
        await c.client.pc.close()
        async with asyncio.timeout(3):
            reason = await c.peer.wait_dead()
        assert reason == "connection_closed" and time.monotonic() - started < 3


async def test_answer_never_applied_times_out(loopback_ice: None) -> None:
    """If the browser never connects, wait_dead() reports connect_timeout."""
    speaker = SpeakerTrack()
    async with (
        BrowserPeer(
            peer_id="p2",
            configuration=rtc_configuration([]),
            speaker=speaker,
            on_event=print,
            connect_timeout_s=0.3,
        ) as peer,
        RtcClient() as client,
    ):
        await peer.negotiate(validate_offer((await client.offer()).encode(), remote_allow=LOOPBACK))
        async with asyncio.timeout(2):
            assert await peer.wait_dead() == "connect_timeout"


async def test_aclose_is_idempotent_concurrent_and_releases_everything(loopback_ice: None) -> None:
    """Concurrent and repeated aclose() close once; the decoder thread ends, the mic track ends."""
    before = len(decoder_threads())
    async with call() as c:
        c.client.send_pcm(speech_like(0.3))
        await until(lambda: c.peer.jitter_buffer is not None and c.peer.jitter_buffer.packets > 5)
        assert len(decoder_threads()) > before
        waiter = asyncio.ensure_future(c.peer.wait_dead())
        await asyncio.gather(c.peer.aclose(), c.peer.aclose(), c.peer.aclose())
        await c.peer.aclose()
        assert await waiter == "closed"
        assert c.peer.connection_state == "closed"
        assert c.peer.mic is not None
        with pytest.raises(MediaStreamError):
            async with asyncio.timeout(2):
                while True:  # frames decoded before the close, then the end of the track
                    await c.peer.mic.recv()
        assert c.peer._watchdog is not None and c.peer._watchdog.done()
        c.peer.send_event({"type": "late"})
        assert c.peer.stats.events_dropped_not_open >= 1
    await until(lambda: len(decoder_threads()) <= before)


async def test_cancelled_aclose_caller_does_not_interrupt_the_close(loopback_ice: None) -> None:
    """Cancelling one aclose() waiter leaves the close running for everyone else."""
    async with call() as c:
        first = asyncio.ensure_future(c.peer.aclose())
        await asyncio.sleep(0)
        first.cancel()
        await c.peer.aclose()
        assert c.peer.connection_state == "closed"


async def test_negotiate_rejects_what_aiortc_cannot_apply_and_runs_once(loopback_ice: None) -> None:
    """An offer aiortc refuses becomes InvalidOffer (peer closed); a second negotiate is a RuntimeError."""
    speaker = SpeakerTrack()
    async with RtcClient() as client:
        offer = validate_offer((await client.offer()).encode(), remote_allow=LOOPBACK)
    broken = offer.replace("a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid", "a=extmap:1 a b c")
    peer = BrowserPeer(peer_id="p3", configuration=rtc_configuration([]), speaker=speaker, on_event=print)
    with pytest.raises(InvalidOffer):
        await peer.negotiate(broken)
    assert await peer.wait_dead() == "closed"
    with pytest.raises(RuntimeError):
        await peer.negotiate(offer)
    await peer.aclose()


async def test_offer_without_data_channel_still_negotiates(loopback_ice: None) -> None:
    """Audio-only offers work; events then have nowhere to go and are counted as dropped."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    speaker = SpeakerTrack()
    async with BrowserPeer(
        peer_id="p4", configuration=rtc_configuration([]), speaker=speaker, on_event=print
    ) as peer:
        try:
            await pc.setLocalDescription(await pc.createOffer())
            answer = await peer.negotiate(
                validate_offer(pc.localDescription.sdp.encode(), remote_allow=LOOPBACK)
            )
            assert "m=application" not in answer and peer.mic is not None
            peer.send_event({"type": "session.state", "status": "live"})
            assert peer.stats.events_dropped_not_open == 1
        finally:
            await pc.close()


async def test_reconnect_hands_the_speaker_to_the_new_peer(loopback_ice: None) -> None:
    """A second peer on the same SpeakerTrack takes over at once, even before the first is closed."""
    speaker = SpeakerTrack()
    clients: list[RtcClient] = []
    peers: list[BrowserPeer] = []
    try:
        for attempt in range(2):
            peer = BrowserPeer(
                peer_id=f"p{attempt}", configuration=rtc_configuration([]), speaker=speaker, on_event=print
            )
            peers.append(peer)
            clients.append(client := RtcClient())
            await client.accept(await peer.negotiate(await client.offer()))
            async with asyncio.timeout(3):
                await client.connected()
            await until(lambda c=client: c.received_frames > 10)  # type: ignore[misc]
        first, second = clients
        frames_of_first = first.received_frames
        speaker.feed(speech_like(0.3, rate=24000), item_id="after-reconnect")
        await until(lambda: speaker.played_ms("after-reconnect") >= 300)
        await asyncio.sleep(0.1)  # jitter buffers flush
        assert first.received_frames <= frames_of_first + 1  # the old sender stopped
        assert rms(bytes(second.received_pcm[-48000:])) > 500
    finally:
        for closer in [*peers, *clients]:
            await closer.aclose()
