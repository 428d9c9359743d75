"""PARLEY_RTC_PORT_RANGE end to end: a real ``parley serve`` with a 3-port range and aiortc browsers.

The relay runs as its own process: the range wrapper is installed on the relay's event loop, and an
in-process relay would share its loop (and so its port range) with the test's aiortc clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from relay.simulator import SimulatorOptions, SimulatorServer
from storage import migrate
from storage.db import Database
from tests.api import Learner, signup
from tests.fakes.relay_process import RelayProcess, relay_env
from tests.fakes.rtc_client import RtcClient, loopback_ice, rms, speech_like  # noqa: F401 (fixture)
from tests.fixtures_s3 import free_loopback_port, free_udp_range
from tests.live.conftest import TIMEOUT_S, Call

pytestmark = pytest.mark.integration

RANGE_SIZE = 3
SILENCE = bytes(int(1.2 * 48000) * 2)  # longer than the topic's end-of-turn silence
EXHAUSTED = "parley_rtc_port_exhausted_total"
HALF_SECOND_BYTES = 48000  # 0.5 s of 48 kHz s16 mono (stereo decodes count twice: still enough)


def host_ports(sdp: str) -> list[int]:
    """The distinct ports of the SDP's host candidates (``a=candidate:f c udp prio addr PORT typ host``);
    with BUNDLE every m-section repeats the same candidates."""
    fields = [line.split() for line in sdp.splitlines() if line.startswith("a=candidate:")]
    return sorted({int(f[5]) for f in fields if f[7] == "host"})


@dataclass
class RangedRelay:
    process: RelayProcess
    http: aiohttp.ClientSession
    ports: tuple[int, int]
    rtcs: list[RtcClient]

    def new_rtc(self) -> RtcClient:
        rtc = RtcClient(ping_interval_s=1.0)
        self.rtcs.append(rtc)
        return rtc

    async def exhausted_count(self) -> float:
        resp = await self.http.get("/metrics")
        assert resp.status == 200
        for line in (await resp.text()).splitlines():
            if line.startswith(EXHAUSTED + " "):
                return float(line.split()[1])
        raise AssertionError(f"{EXHAUSTED} is not exposed")

    async def new_session(self, learner: Learner) -> tuple[str, str]:
        resp = await self.http.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
        assert resp.status == 201, await resp.text()
        body = await resp.json()
        return body["session"]["id"], body["client_secret"]["value"]

    async def new_secret(self, learner: Learner, session_id: str) -> str:
        resp = await self.http.post(f"/v1/sessions/{session_id}/client-secret", headers=learner.auth)
        assert resp.status == 201, await resp.text()
        value: str = (await resp.json())["value"]
        return value

    async def offer(self, session_id: str, secret: str, rtc: RtcClient) -> aiohttp.ClientResponse:
        return await self.http.post(
            f"/v1/sessions/{session_id}/webrtc",
            data=await rtc.offer(),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/sdp"},
        )

    async def connect(self, learner: Learner, session_id: str, secret: str) -> tuple[Call, list[int]]:
        """Offer, check the answer, wait until media and the events channel are up."""
        rtc = self.new_rtc()
        answer = await self.offer(session_id, secret, rtc)
        assert answer.status == 201, await answer.text()
        sdp = await answer.text()
        await rtc.accept(sdp)
        async with asyncio.timeout(TIMEOUT_S):
            await rtc.connected()
            await rtc.wait_channel("events")
        return Call(session_id, rtc, answer.headers["Location"], learner), host_ports(sdp)


@pytest.fixture
async def ranged_relay(tmp_path: Path, loopback_ice: None) -> AsyncIterator[RangedRelay]:
    """``parley serve`` on SQLite with a simulator upstream and PARLEY_RTC_PORT_RANGE of 3 ports."""
    sim = SimulatorServer(SimulatorOptions(strict=True, first_audio_ms=150, realtime_pacing=False))
    await sim.start()
    ports = free_udp_range(RANGE_SIZE)
    data = tmp_path / "data"
    db = Database(f"sqlite+aiosqlite:///{data / 'parley.db'}")
    data.mkdir()
    await migrate.upgrade(db)
    await db.aclose()
    env = relay_env(
        PARLEY_DATA_DIR=str(data),
        PARLEY_PORT=str(free_loopback_port()),
        PARLEY_SECRET_KEY="k" * 48,
        PARLEY_UPSTREAM_URL=sim.ws_base_url,
        PARLEY_RTC_HOST_ADDRESSES="127.0.0.1",
        PARLEY_RTC_REMOTE_ALLOW="127.0.0.0/8",
        PARLEY_RTC_PORT_RANGE=f"{ports[0]}-{ports[1]}",
        PARLEY_MAX_SESSIONS="10",
        PARLEY_WORKERS_IN_PROCESS="0",
        PARLEY_DRAIN_TIMEOUT="1",
        PARLEY_MAX_LOOP_LAG_MS="2000",
    )
    process = RelayProcess(env, tmp_path / "relay.log")
    rtcs: list[RtcClient] = []
    try:
        await process.start()
        async with aiohttp.ClientSession(process.base_url) as http:
            yield RangedRelay(process, http, ports, rtcs)
    finally:
        for rtc in rtcs:
            await rtc.aclose()
        await process.stop()
        await sim.aclose()


async def test_small_port_range_answers_in_range_refuses_when_full_and_recovers(
    ranged_relay: RangedRelay,
) -> None:
    """3-port range: 3 calls get in-range host ports and carry audio; a 4th offer gets 503 capacity
    (counted) while the 3 go on; once one call ends, the refused session connects on its freed port."""
    relay = ranged_relay
    low, high = relay.ports
    assert await relay.exhausted_count() == 0
    learner = await signup(relay.http)  # type: ignore[arg-type]

    calls: list[Call] = []
    used: list[int] = []
    for _ in range(RANGE_SIZE):
        session_id, secret = await relay.new_session(learner)
        call, ports = await relay.connect(learner, session_id, secret)
        assert len(ports) == 1 and low <= ports[0] <= high, (ports, relay.ports)
        calls.append(call)
        used += ports
    assert sorted(used) == list(range(low, high + 1))

    # All ports taken: the next offer is refused at once with the capacity problem, and counted.
    refused_id, secret = await relay.new_session(learner)
    resp = await relay.offer(refused_id, secret, relay.new_rtc())
    assert resp.status == 503, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["code"] == "capacity" and "media port" in body["detail"]
    assert int(resp.headers["Retry-After"]) > 0
    assert await relay.exhausted_count() == 1

    # The three calls carry on: each learner speaks and hears the coach answer (its first 0.5 s).
    async def speak_and_hear(call: Call) -> None:
        call.rtc.send_pcm(speech_like(1.5) + SILENCE)
        await call.wait_count("coach.speaking", 1, timeout=30)
        heard_from = len(call.rtc.received_pcm)
        async with asyncio.timeout(TIMEOUT_S):
            while rms(bytes(call.rtc.received_pcm[heard_from:])) < 100 or (
                len(call.rtc.received_pcm) - heard_from < HALF_SECOND_BYTES
            ):
                await asyncio.sleep(0.05)

    await asyncio.gather(*(speak_and_hear(call) for call in calls))
    assert all(call.rtc.pc.connectionState == "connected" for call in calls)

    # One call ends: its port is free again, and the refused session connects with a fresh secret.
    resp = await relay.http.post(f"/v1/sessions/{calls[0].session_id}/end", headers=learner.auth)
    assert resp.status == 200, await resp.text()
    freed = used[0]
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            _, ports = await _try_connect(relay, learner, refused_id)
            if ports is not None:
                break
            await asyncio.sleep(0.2)  # the ended session's peer closes in the background
    assert ports == [freed]

    lines = relay.process.log_path.read_text(errors="replace").splitlines()
    assert any("rtc.port_range_small" in line for line in lines)  # 3 ports < 10 sessions x 1 address
    exhausted = [line for line in lines if "rtc.ports_exhausted" in line]
    assert exhausted and not any("127.0.0.1" in line for line in exhausted)  # counts, never addresses


async def _try_connect(
    relay: RangedRelay, learner: Learner, session_id: str
) -> tuple[Call | None, list[int] | None]:
    rtc = relay.new_rtc()
    answer = await relay.offer(session_id, await relay.new_secret(learner, session_id), rtc)
    if answer.status == 503:
        return None, None
    assert answer.status == 201, await answer.text()
    sdp = await answer.text()
    await rtc.accept(sdp)
    async with asyncio.timeout(TIMEOUT_S):
        await rtc.connected()
        await rtc.wait_channel("events")
    return Call(session_id, rtc, answer.headers["Location"], learner), host_ports(sdp)
