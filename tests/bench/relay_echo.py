"""The baseline of ``bench_relay.py``: a bare aiortc echo server, aiortc's stock audio path both ways.

``python -m tests.bench.relay_echo CORE DUMP_FILE`` pins itself to CPU ``CORE``, serves
``POST /offer?peer=K`` (SDP offer in, SDP answer out) on a free loopback port, prints the port, and
runs until SIGTERM. Each peer's inbound audio track is sent straight back on the same transceiver:
aiortc's jitter buffer (fixed 80 ms), decoder thread, a copy of each frame (see :class:`EchoTrack`),
then aiortc's Opus encoder (96 kbit/s stereo, via
``run_in_executor``) and ``RTCRtpSender``. Host candidates are pinned to 127.0.0.1, like the relay's.

Probes (same as the relay's where they can be): every RTP packet sent (``install_send_probe``);
per peer, the arrival of every inbound RTP packet and the time ``recv()`` returned each decoded
frame, matched by RTP timestamp (aiortc maps the first packet's timestamp to pts 0 and the Opus
decoder keeps it), which gives the inbound latency (RTP arrival -> frame available to the
application); and each speech onset (an inbound packet of at least ``ONSET_BYTES`` after
``QUIET_PACKETS`` smaller ones) with the time its decoded frame reached the application.
``SIGUSR1`` dumps it all as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from relay.browser.ice import restrict_host_addresses
from tests.bench.relay_probe import install_dump_handler, install_send_probe, pin

ONSET_BYTES = 45  # the client's speech packets; its silence packets are 3 or 32 bytes
QUIET_PACKETS = 30  # 600 ms: longer than the 200 ms pauses inside a burst


@dataclass
class PeerLog:
    arrived: dict[int, float] = field(default_factory=dict)  # pts -> arrival
    frames: list[tuple[float, int]] = field(default_factory=list)  # (recv() returned, pts)
    onset_pts: list[int] = field(default_factory=list)
    origin: int | None = None
    quiet: int = 0

    def on_packet(self, timestamp: int, size: int) -> None:
        if self.origin is None:
            self.origin = timestamp
        pts = (timestamp - self.origin) % (1 << 32)
        self.arrived[pts] = time.monotonic()
        if size >= ONSET_BYTES:
            if self.quiet >= QUIET_PACKETS:
                self.onset_pts.append(pts)
            self.quiet = 0
        else:
            self.quiet += 1

    def summary(self) -> dict[str, Any]:
        returned = {pts: t for t, pts in self.frames}
        inbound = [(t, t - self.arrived[pts]) for t, pts in self.frames if pts in self.arrived]
        onsets = [(self.arrived[p], returned[p]) for p in self.onset_pts if p in returned]
        return {"inbound": inbound, "onsets": onsets}


class EchoTrack(MediaStreamTrack):
    """The peer's own decoded audio, returned frame by frame as it arrives.

    Each frame is copied into an ``AudioFrame`` of its own size. Handing aiortc's decoded frame
    straight back would also work, but FFmpeg's Opus decoder allocates every frame for 120 ms
    (23 040 bytes for 20 ms of 48 kHz stereo) and aiortc's sender runs its pure-Python
    ``compute_audio_level_dbov`` over the whole buffer: about 2 ms of event-loop time per frame,
    which saturates one core at about 8 echo sessions. The copy (a few microseconds) keeps the
    baseline at aiortc's ordinary cost.
    """

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, log: PeerLog) -> None:
        super().__init__()
        self._source = source
        self._log = log

    async def recv(self) -> Any:
        decoded: Any = await self._source.recv()
        self._log.frames.append((time.monotonic(), decoded.pts))
        frame = av.AudioFrame(format="s16", layout=decoded.layout.name, samples=decoded.samples)
        frame.sample_rate = decoded.sample_rate
        frame.planes[0].update(
            bytes(memoryview(decoded.planes[0])[: decoded.samples * 2 * len(decoded.layout.channels)])
        )
        frame.pts = decoded.pts
        frame.time_base = decoded.time_base
        return frame


class EchoServer:
    def __init__(self) -> None:
        self.peers: dict[str, PeerLog] = {}
        self.pcs: set[RTCPeerConnection] = set()
        self.sends = install_send_probe()

    async def offer(self, request: web.Request) -> web.Response:
        log = self.peers.setdefault(request.query["peer"], PeerLog())
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.add(pc)

        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                pc.addTrack(EchoTrack(track, log))

        pc.on("track", on_track)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=await request.text(), type="offer"))
        receiver: Any = pc.getTransceivers()[0].receiver
        original = receiver._handle_rtp_packet

        async def handle(packet: Any, arrival_time_ms: int) -> None:
            log.on_packet(packet.timestamp, len(packet.payload))
            await original(packet, arrival_time_ms=arrival_time_ms)

        receiver._handle_rtp_packet = handle
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(text=pc.localDescription.sdp, content_type="application/sdp")

    def collect(self) -> dict[str, Any]:
        return {
            "sends": list(self.sends.values()),
            "peers": {name: log.summary() for name, log in self.peers.items()},
        }


async def _serve(server: EchoServer) -> None:
    app = web.Application()
    app.router.add_post("/offer", server.offer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(port, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.gather(*(pc.close() for pc in server.pcs), return_exceptions=True)
        await runner.cleanup()


def main() -> None:
    core, dump_file = int(sys.argv[1]), Path(sys.argv[2])
    pin(core)
    restrict_host_addresses(["127.0.0.1"])
    server = EchoServer()
    install_dump_handler(dump_file, server.collect)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(server))


if __name__ == "__main__":
    main()
