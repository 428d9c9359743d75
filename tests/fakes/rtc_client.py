"""A scriptable aiortc "browser" for tests: sends real-time audio, records what comes back.

:class:`RtcClient` wraps an ``RTCPeerConnection`` with ``iceServers=[]`` that offers one
``sendrecv`` audio section and a data channel (like the web client must, so the relay can open
``events``). Its microphone is a :class:`PcmSource` paced on an absolute 20 ms schedule and
encoded by aiortc's own Opus encoder, as a browser encodes independently of the relay.
Knobs: :meth:`RtcClient.drop` loses outgoing RTP packets, :meth:`RtcClient.freeze` stops all
outgoing media and heartbeats without closing (a vanished tab or network), pings on a timer.

Host candidates must be pinned to loopback first (``restrict_host_addresses(["127.0.0.1"])``);
the :func:`loopback_ice` fixture does that and undoes the process-wide decoder patch afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import math
import time
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import av
import pytest
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import is_rtcp

from relay.browser.ice import restore_host_addresses, restrict_host_addresses
from relay.browser.jitter import restore_decoder

RATE = 48000
FRAME_SAMPLES = 960
FRAME_BYTES = FRAME_SAMPLES * 2
_TIME_BASE = fractions.Fraction(1, RATE)


@pytest.fixture
def loopback_ice() -> Iterator[None]:
    """ICE host candidates on 127.0.0.1 only (both relay and client); aiortc patches undone after."""
    restrict_host_addresses(["127.0.0.1"])
    try:
        yield
    finally:
        restore_host_addresses()
        restore_decoder()


def tone(seconds: float, *, freq: float = 440.0, amplitude: float = 0.3, rate: int = RATE) -> bytes:
    """A sine tone as mono s16le."""
    scale = amplitude * 32767
    step = 2 * math.pi * freq / rate
    return array("h", (int(scale * math.sin(step * i)) for i in range(int(seconds * rate)))).tobytes()


def speech_like(seconds: float, *, rate: int = RATE) -> bytes:
    """Voiced bursts with pauses (300 ms on, 200 ms off): a 140 Hz buzz with a few harmonics."""
    out = array("h")
    on, period = int(0.3 * rate), int(0.5 * rate)
    for i in range(int(seconds * rate)):
        if i % period >= on:
            out.append(0)
            continue
        t = i / rate
        envelope = math.sin(math.pi * (i % period) / on)
        value = sum(math.sin(2 * math.pi * 140 * k * t) / k for k in (1, 2, 3, 5))
        out.append(int(9000 * envelope * value))
    return out.tobytes()


def rms(pcm: bytes) -> float:
    """Root mean square of s16le samples (0 for no audio)."""
    samples = array("h", pcm[: len(pcm) // 2 * 2])
    return math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0


class PcmSource(MediaStreamTrack):
    """A microphone: 20 ms 48 kHz mono frames at an absolute schedule; queued PCM, else silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()
        self._t0: float | None = None
        self._n = 0
        self.frames = 0

    def send_pcm(self, pcm48k: bytes) -> None:
        self._pending += pcm48k

    @property
    def pending_ms(self) -> int:
        return len(self._pending) // (RATE * 2 // 1000)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._n * 0.02
        if due > now:
            await asyncio.sleep(due - now)
        chunk = bytes(self._pending[:FRAME_BYTES])
        del self._pending[:FRAME_BYTES]
        if len(chunk) < FRAME_BYTES:
            chunk += bytes(FRAME_BYTES - len(chunk))
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.sample_rate = RATE
        frame.planes[0].update(chunk)
        frame.pts = self._n * FRAME_SAMPLES
        frame.time_base = _TIME_BASE
        self._n += 1
        self.frames += 1
        return frame


class RtcClient:
    """An aiortc peer playing the browser's part; see the module docstring.

    Always ``await aclose()`` (or use ``async with``): it cancels the ping and playback tasks.
    """

    def __init__(self, *, ping_interval_s: float | None = None, channel_label: str = "client") -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.source = PcmSource()
        self.pc.addTransceiver(self.source, direction="sendrecv")
        self.channel = self.pc.createDataChannel(channel_label)
        self.channels: dict[str, RTCDataChannel] = {channel_label: self.channel}
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.received_pcm = bytearray()  # relay -> client audio as decoded (48 kHz, mono or stereo)
        self.received_frames = 0
        self.received_layouts: set[str] = set()
        self.sent_rtp = 0
        self.dropped_rtp = 0
        self._drop = 0
        self._frozen = False
        self._ping_interval = ping_interval_s
        self._tasks: list[asyncio.Task[None]] = []
        self._channel_open: dict[str, asyncio.Event] = {}
        self._message_seen = asyncio.Event()
        self._connected = asyncio.Event()
        self._attach(self.channel)
        self.pc.on("datachannel", self._attach)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()

    async def __aenter__(self) -> RtcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- signalling --------------------------------------------------------------------------

    async def offer(self) -> str:
        """Create the offer (all candidates gathered) and return its SDP."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        """Apply the relay's answer and start the loss/freeze shim and the heartbeat."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        transport: Any = self.pc.getTransceivers()[0].sender.transport
        send_rtp: Callable[[bytes], Any] = transport._send_rtp

        async def lossy_send_rtp(data: bytes) -> None:
            if self._frozen:
                return
            if not is_rtcp(data):
                if self._drop > 0:
                    self._drop -= 1
                    self.dropped_rtp += 1
                    return
                self.sent_rtp += 1
            await send_rtp(data)

        # An instance attribute shadows the method for the RTP sender and for RTCP (not for SCTP).
        transport._send_rtp = lossy_send_rtp
        if self._ping_interval is not None:
            self._tasks.append(asyncio.create_task(self._ping_loop(), name="rtc-client:ping"))

    async def connected(self) -> None:
        """Wait for connectionState ``connected`` (wrap in ``asyncio.timeout``)."""
        await self._connected.wait()

    # -- knobs -------------------------------------------------------------------------------

    def send_pcm(self, pcm48k: bytes) -> None:
        """Queue 48 kHz mono s16le audio to be sent in real time."""
        self.source.send_pcm(pcm48k)

    def drop(self, n: int) -> None:
        """Lose the next ``n`` outgoing RTP packets (sequence numbers still advance, as on a network)."""
        self._drop += n

    def freeze(self) -> None:
        """Stop every outgoing RTP/RTCP packet and heartbeat, without closing anything."""
        self._frozen = True

    def thaw(self) -> None:
        self._frozen = False

    # -- data channels -----------------------------------------------------------------------

    async def wait_channel(self, label: str) -> RTCDataChannel:
        """Wait until a channel with ``label`` (ours or the relay's) is open (wrap in ``asyncio.timeout``)."""
        await self._channel_open.setdefault(label, asyncio.Event()).wait()
        return self.channels[label]

    def send_json(self, message: Any, *, label: str | None = None) -> None:
        channel = self.channels[label] if label is not None else self.channel
        channel.send(json.dumps(message))

    async def wait_message(self, predicate: Callable[[str, dict[str, Any]], bool]) -> None:
        """Wait until some received ``(label, message)`` satisfies ``predicate``."""
        while not any(predicate(label, m) for label, m in self.messages):
            self._message_seen.clear()
            await self._message_seen.wait()

    def _attach(self, channel: RTCDataChannel) -> None:
        self.channels[channel.label] = channel
        event = self._channel_open.setdefault(channel.label, asyncio.Event())
        if channel.readyState == "open":
            event.set()
        channel.on("open", event.set)
        channel.on("message", lambda raw: self._on_message(channel.label, raw))

    def _on_message(self, label: str, raw: str | bytes) -> None:
        self.messages.append((label, json.loads(raw)))
        self._message_seen.set()

    async def _ping_loop(self) -> None:
        assert self._ping_interval is not None
        while True:
            await asyncio.sleep(self._ping_interval)
            if not self._frozen and self.channel.readyState == "open":
                self.send_json({"type": "ping"})

    # -- relay -> client audio ---------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._tasks.append(asyncio.create_task(self._play(track), name="rtc-client:play"))

    async def _play(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame: Any = await track.recv()
                self.received_frames += 1
                self.received_layouts.add(frame.layout.name)
                nbytes = frame.samples * 2 * len(frame.layout.channels)
                self.received_pcm += memoryview(frame.planes[0])[:nbytes]

    async def aclose(self) -> None:
        """Close the peer connection and cancel the client's tasks; idempotent."""
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks.clear()
