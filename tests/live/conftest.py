"""A relay on loopback with a real simulator upstream, and aiortc "browsers" to call it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from relay.app import build_app
from relay.config import Settings
from relay.simulator import SimulatorOptions, SimulatorServer
from storage import migrate
from storage.db import Database
from tests.api import Learner, signup
from tests.conftest import FAST_PASSWORDS
from tests.fakes.rtc_client import RtcClient, loopback_ice  # noqa: F401 (fixture)

TIMEOUT_S = 20.0


@dataclass
class Relay:
    client: TestClient  # type: ignore[type-arg]
    sim: SimulatorServer
    settings: Settings
    rtcs: list[RtcClient] = field(default_factory=list)

    def new_rtc(self) -> RtcClient:
        """An aiortc browser closed by the fixture, whatever the test's outcome."""
        rtc = RtcClient(ping_interval_s=1.0)
        self.rtcs.append(rtc)
        return rtc

    def set_upstream(self, **knobs: Any) -> None:
        """Change the simulator's behaviour for the next upstream connection."""
        self.sim.options = replace(self.sim.options, **knobs)


@dataclass
class Call:
    session_id: str
    rtc: RtcClient
    location: str
    learner: Learner

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            m for label, m in self.rtc.messages if label == "events" and (kind is None or m["type"] == kind)
        ]

    async def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT_S
    ) -> None:
        async with asyncio.timeout(timeout):
            await self.rtc.wait_message(lambda label, m: label == "events" and predicate(m))

    async def wait_count(self, kind: str, count: int, timeout: float = TIMEOUT_S) -> None:
        await self.wait_event(lambda m: m["type"] == kind and len(self.events(kind)) >= count, timeout)


SimOptions = Callable[..., SimulatorOptions]


@pytest.fixture
async def relay_factory(
    aiohttp_client: AiohttpClient, tmp_path: Path, loopback_ice: None
) -> AsyncIterator[Callable[..., Awaitable[Relay]]]:
    """Build a relay whose upstream is a strict simulator on loopback; both closed afterwards."""
    sims: list[SimulatorServer] = []
    relays: list[Relay] = []

    async def make(sim_options: SimulatorOptions | None = None, **env: str) -> Relay:
        sim = SimulatorServer(
            sim_options or SimulatorOptions(strict=True, first_audio_ms=150, realtime_pacing=False)
        )
        await sim.start()
        sims.append(sim)
        values = {
            "PARLEY_DATA_DIR": str(tmp_path / "data"),
            "PARLEY_UPSTREAM_URL": sim.ws_base_url,
            "PARLEY_RTC_HOST_ADDRESSES": "127.0.0.1",
            "PARLEY_RTC_REMOTE_ALLOW": "127.0.0.0/8",
            "PARLEY_RECONNECT_GRACE": "5",
            "PARLEY_DRAIN_TIMEOUT": "1",
            # Test processes stall their loop now and then (app start-up, GC, the other core busy);
            # the loop-lag admission has its own test with the production threshold.
            "PARLEY_MAX_LOOP_LAG_MS": "2000",
            **env,
        }
        settings = Settings.from_env(values, dotenv=None)
        db = Database(settings.database_url)
        await migrate.upgrade(db)
        await db.aclose()
        client = await aiohttp_client(build_app(settings, passwords=FAST_PASSWORDS))
        made = Relay(client, sim, settings)
        relays.append(made)
        return made

    yield make
    for made in relays:
        for rtc in made.rtcs:
            await rtc.aclose()
    for sim in sims:
        assert not sim.failures, f"the simulator saw protocol drift: {sim.failures!r}"
        await sim.aclose()


@pytest.fixture
async def relay(relay_factory: Callable[..., Awaitable[Relay]]) -> Relay:
    return await relay_factory()


async def offer(relay: Relay, session_id: str, secret: str, rtc: RtcClient) -> Any:
    sdp = await rtc.offer()
    return await relay.client.post(
        f"/v1/sessions/{session_id}/webrtc",
        data=sdp,
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/sdp"},
    )


async def start_call(relay: Relay, learner: Learner | None = None, topic_id: str = "cafe-order") -> Call:
    """Sign up (or reuse) a learner, create a session, connect an aiortc browser to it."""
    learner = learner or await signup(relay.client)
    resp = await relay.client.post("/v1/sessions", json={"topic_id": topic_id}, headers=learner.auth)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    session_id = body["session"]["id"]
    rtc = relay.new_rtc()
    answer = await offer(relay, session_id, body["client_secret"]["value"], rtc)
    assert answer.status == 201, await answer.text()
    assert answer.content_type == "application/sdp"
    await rtc.accept(await answer.text())
    async with asyncio.timeout(TIMEOUT_S):
        await rtc.connected()
        await rtc.wait_channel("events")
    return Call(session_id, rtc, answer.headers["Location"], learner)


async def reconnect(relay: Relay, call: Call) -> Call:
    """A new peer for the same session, with a fresh client secret (the old peer is left as is)."""
    resp = await relay.client.post(f"/v1/sessions/{call.session_id}/client-secret", headers=call.learner.auth)
    assert resp.status == 201, await resp.text()
    secret = (await resp.json())["value"]
    rtc = relay.new_rtc()
    answer = await offer(relay, call.session_id, secret, rtc)
    assert answer.status == 201, await answer.text()
    await rtc.accept(await answer.text())
    async with asyncio.timeout(TIMEOUT_S):
        await rtc.connected()
        await rtc.wait_channel("events")
    return Call(call.session_id, rtc, answer.headers["Location"], call.learner)


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
