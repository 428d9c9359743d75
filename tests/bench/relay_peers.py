"""Lean aiortc client peers for ``bench_relay.py`` and ``bench_load.py``: pre-encoded speech out, RTP
arrival stamps in.

A :class:`BenchPeer` offers one ``sendrecv`` audio section and a data channel, like the web client
(and :class:`tests.fakes.rtc_client.RtcClient`), but it is built to keep the client process cheap
and its measurements close to the wire:

* Outbound: :class:`PacketSource` returns pre-encoded Opus packets (libopus, 48 kHz mono,
  32 kbit/s, ``voip``; the speech of :func:`tests.fakes.rtc_client.speech_like`) on an absolute
  20 ms schedule, so aiortc only packetises them (no encoder, no executor hop).
* Inbound: the receiver's ``_handle_rtp_packet`` is replaced by a recorder of
  ``(monotonic arrival, sequence number, RTP timestamp, payload bytes)``: no jitter buffer and no
  decoding in the client, so an arrival stamp is taken as soon as aiortc has parsed the packet.
* Loss: :attr:`BenchPeer.loss` drops that fraction of outgoing RTP packets at random, never two in
  a row (single losses), below SRTP so sequence numbers still advance as on a network.
* Learners (``bench_load.py``): :meth:`BenchPeer.learn` converses like :meth:`BenchPeer.converse` and
  sometimes barges in; :func:`connect_to_relay` and :func:`hang_up` open and end a relay session the
  way the web client does (``POST /v1/sessions``, the SDP offer, ``POST /v1/sessions/{id}/end``).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import functools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import is_rtcp

from tests.fakes.rtc_client import speech_like

RATE = 48000
FRAME_SAMPLES = 960
FRAME_S = 0.02
TIME_BASE = fractions.Fraction(1, RATE)
SPEECH_PACKETS_MAX = 75  # 1.5 s
TAIL_PACKETS = 50  # 1 s of encoded silence after each burst, then the idle packet repeats


@dataclass(frozen=True)
class Voice:
    """The client's microphone, encoded once: a speech burst, the silence after it, an idle packet."""

    speech: tuple[bytes, ...]
    tail: tuple[bytes, ...]
    idle: bytes


def encode_voice() -> Voice:
    """Encode 1.5 s of speech-like audio and 1 s of silence with libopus (48 kHz mono 32 kbit/s)."""
    encoder: Any = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = RATE
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.bit_rate = 32000
    encoder.options = {"application": "voip"}
    encoder.time_base = TIME_BASE
    encoder.open()
    pcm = speech_like(SPEECH_PACKETS_MAX * FRAME_S) + bytes(TAIL_PACKETS * FRAME_SAMPLES * 2)
    packets: list[bytes] = []
    frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
    frame.sample_rate = RATE
    step = FRAME_SAMPLES * 2
    for n, start in enumerate(range(0, len(pcm), step)):
        frame.planes[0].update(pcm[start : start + step])
        frame.pts = n * FRAME_SAMPLES
        packets.extend(bytes(p) for p in encoder.encode(frame))
    speech = tuple(packets[:SPEECH_PACKETS_MAX])
    tail = tuple(packets[SPEECH_PACKETS_MAX:])
    return Voice(speech=speech, tail=tail, idle=tail[-1])


class PacketSource(MediaStreamTrack):
    """Pre-encoded Opus packets at an absolute 20 ms schedule; the idle packet when nothing is queued."""

    kind = "audio"

    def __init__(self, voice: Voice) -> None:
        super().__init__()
        self._voice = voice
        self._pending: collections.deque[bytes] = collections.deque()
        self._onset_pending = False
        self._t0: float | None = None
        self._n = 0
        self._stopped = False
        self.late_sends = 0  # recv() returned more than 5 ms after its slot (client loop overloaded)
        self.onsets: list[tuple[float, int]] = []  # (monotonic, pts) of each burst's first packet

    def speak(self, packets: int) -> None:
        """Queue a speech burst of ``packets`` x 20 ms, then the encoded silence tail (replaces any rest)."""
        self._pending.clear()
        self._pending.extend(self._voice.speech[:packets])
        self._pending.extend(self._voice.tail)
        self._onset_pending = True

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def mute(self) -> None:
        """Stop the microphone for good: the next ``recv()`` ends the track, so aiortc stops sending."""
        self._stopped = True

    async def recv(self) -> Any:
        if self.readyState != "live" or self._stopped:
            raise MediaStreamError
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._n * FRAME_S
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.005:
            self.late_sends += 1
        if self._pending:
            payload = self._pending.popleft()
            if self._onset_pending:
                self._onset_pending = False
                self.onsets.append((time.monotonic(), self._n * FRAME_SAMPLES))
        else:
            payload = self._voice.idle
        packet = av.Packet(payload)
        packet.pts = self._n * FRAME_SAMPLES
        packet.time_base = TIME_BASE
        self._n += 1
        return packet


@dataclass
class PeerRecord:
    """What one peer saw; times are ``time.monotonic()`` (system-wide, comparable across processes)."""

    arrivals: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, seq, ts, bytes
    events: list[tuple[float, str, str]] = field(default_factory=list)  # t, type, item_id/status
    sent_rtp: int = 0
    dropped_rtp: int = 0
    answer_timeouts: int = 0
    turns: int = 0
    barge_ins: int = 0  # learn(): bursts started while the coach was still speaking


class BenchPeer:
    """One aiortc "browser" for the benchmark; see the module docstring. Always ``await aclose()``."""

    def __init__(self, index: int, voice: Voice, *, seed: int) -> None:
        self.index = index
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.source = PacketSource(voice)
        transceiver = self.pc.addTransceiver(self.source, direction="sendrecv")
        self.record = PeerRecord()
        self.loss = 0.0
        self._rng = random.Random(seed)
        self._last_dropped = False
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()
        self.coach_items_started = 0
        self.coach_items_done = 0
        self.live = asyncio.Event()
        self.events_open = asyncio.Event()
        self.channel = self.pc.createDataChannel("client")
        self.pc.on("datachannel", self._attach)
        self.pc.on("connectionstatechange", self._on_state)
        # Instance attribute: aiortc's RTP router calls receiver._handle_rtp_packet(packet, ...).
        receiver: Any = transceiver.receiver
        receiver._handle_rtp_packet = self._on_rtp

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        """Apply the answer and put the loss shim under the RTP sender."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        transport: Any = self.pc.getTransceivers()[0].sender.transport
        send_rtp: Callable[[bytes], Any] = transport._send_rtp
        record = self.record

        async def lossy_send_rtp(data: bytes) -> None:
            rtp = not is_rtcp(data)
            if rtp:
                if self.loss and not self._last_dropped and self._rng.random() < self.loss:
                    self._last_dropped = True
                    record.dropped_rtp += 1
                    return
                self._last_dropped = False
            await send_rtp(data)
            if rtp:
                record.sent_rtp += 1  # counted once the transport took it

        transport._send_rtp = lossy_send_rtp

    async def connected(self) -> None:
        await self._connected.wait()

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()

    async def _on_rtp(self, packet: Any, arrival_time_ms: int) -> None:
        self.record.arrivals.append(
            (time.monotonic(), packet.sequence_number, packet.timestamp, len(packet.payload))
        )

    def _attach(self, channel: RTCDataChannel) -> None:
        if channel.label == "events":
            if channel.readyState == "open":
                self.events_open.set()
            channel.on("open", self.events_open.set)
        channel.on("message", self._on_message)

    def _on_message(self, raw: str | bytes) -> None:
        now = time.monotonic()
        message = json.loads(raw)
        kind = message.get("type", "")
        if kind == "coach.speaking":
            self.coach_items_started += 1
            self.record.events.append((now, kind, str(message.get("item_id"))))
        elif kind == "coach.done":
            self.coach_items_done += 1
            self.record.events.append((now, kind, str(message.get("item_id"))))
        elif kind == "session.state":
            self.record.events.append((now, kind, str(message.get("status"))))
            if message.get("status") == "live":
                self.live.set()
        elif kind == "error":
            self.record.events.append((now, kind, str(message.get("code"))))
        self._changed.set()

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return predicate()
        return True

    def _started_since(self, count: int) -> bool:
        return self.coach_items_started > count

    async def converse(self, stop_at: float, *, initial_delay: float) -> None:
        """Relay mode: speak a 1.0-1.5 s burst, wait for the coach's whole answer, pause, repeat."""
        await asyncio.sleep(initial_delay)
        while time.monotonic() < stop_at:
            started = self.coach_items_started
            self.source.speak(self._rng.randint(50, SPEECH_PACKETS_MAX))
            self.record.turns += 1
            answered = await self._wait_for(functools.partial(self._started_since, started), 10.0)
            answered = answered and await self._wait_for(
                lambda: self.coach_items_done >= self.coach_items_started, 20.0
            )
            if not answered:
                self.record.answer_timeouts += 1
            await asyncio.sleep(self._rng.uniform(0.3, 0.8))

    async def learn(self, stop_at: float, *, initial_delay: float, barge_in: float) -> None:
        """A learner: like :meth:`converse`, but in a ``barge_in`` share of the turns (seeded) it speaks
        again 0.5-2.0 s into the coach's answer, while the coach is still talking."""
        await asyncio.sleep(initial_delay)
        while time.monotonic() < stop_at:
            started = self.coach_items_started
            self.source.speak(self._rng.randint(50, SPEECH_PACKETS_MAX))
            self.record.turns += 1
            if not await self._wait_for(functools.partial(self._started_since, started), 10.0):
                self.record.answer_timeouts += 1
                await asyncio.sleep(self._rng.uniform(0.3, 0.8))
                continue
            if self._rng.random() < barge_in:
                await asyncio.sleep(self._rng.uniform(0.5, 2.0))
                if self.coach_items_done < self.coach_items_started:  # the coach is still talking
                    self.record.barge_ins += 1
                    continue
            if not await self._wait_for(lambda: self.coach_items_done >= self.coach_items_started, 20.0):
                self.record.answer_timeouts += 1
            await asyncio.sleep(self._rng.uniform(0.3, 0.8))

    async def chatter(self, stop_at: float, *, initial_delay: float) -> None:
        """Echo mode: speak a 1.0-1.5 s burst, let 1.5 s of silence follow, pause, repeat."""
        await asyncio.sleep(initial_delay)
        while time.monotonic() < stop_at:
            packets = self._rng.randint(50, SPEECH_PACKETS_MAX)
            self.source.speak(packets)
            self.record.turns += 1
            await asyncio.sleep(packets * FRAME_S + 1.5 + self._rng.uniform(0.3, 0.8))

    async def aclose(self) -> None:
        await self.pc.close()


async def connect_to_relay(
    http: aiohttp.ClientSession, peer: BenchPeer, *, token: str, topic: str, attempts: int = 20
) -> tuple[str, int]:
    """Create a session on the relay behind ``http``, connect ``peer`` to it and wait until it is live.

    Returns the session id and how many offers admission control refused (503, retried after its
    ``Retry-After``; a refused offer does not spend the client secret). Response bodies are never
    printed: they hold client secrets and SDP.
    """
    auth = {"Authorization": f"Bearer {token}"}
    async with http.post("/v1/sessions", json={"topic_id": topic}, headers=auth) as resp:
        assert resp.status == 201, f"POST /v1/sessions: HTTP {resp.status}"
        body = await resp.json()
    session_id: str = body["session"]["id"]
    headers = {"Authorization": f"Bearer {body['client_secret']['value']}", "Content-Type": "application/sdp"}
    sdp = await peer.offer()
    refusals = 0
    for _ in range(attempts):
        async with http.post(f"/v1/sessions/{session_id}/webrtc", data=sdp, headers=headers) as resp:
            if resp.status == 503:
                refusals += 1
                await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            assert resp.status == 201, f"POST /v1/sessions/{{id}}/webrtc: HTTP {resp.status}"
            answer = await resp.text()
            break
    else:
        raise AssertionError("the relay kept refusing the session")
    await peer.accept(answer)
    async with asyncio.timeout(30):
        await peer.connected()
        await peer.events_open.wait()
        await peer.live.wait()
    return session_id, refusals


async def hang_up(
    http: aiohttp.ClientSession, peer: BenchPeer, session_id: str, *, token: str, quiet_s: float = 0.5
) -> int:
    """End a learner's session: mute the microphone, let the last packets land for ``quiet_s``, then
    ``POST /v1/sessions/{id}/end`` (it returns once the recording is finalized) and close the peer.

    Returns the learner audio the peer sent, in ms (RTP packets handed to the transport x 20 ms).
    """
    peer.source.mute()
    await asyncio.sleep(quiet_s)
    sent_ms = peer.record.sent_rtp * round(FRAME_S * 1000)
    try:
        async with http.post(
            f"/v1/sessions/{session_id}/end", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 200, f"POST /v1/sessions/{{id}}/end: HTTP {resp.status}"
    finally:
        await peer.aclose()
    return sent_ms
