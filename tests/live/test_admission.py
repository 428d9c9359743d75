"""Admission on a lagging loop, and draining live sessions at shutdown."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import select

from relay.keys import LOOP_LAG, METRICS
from storage.db import Database
from storage.models import AudioRecording, Session
from tests.api import problem, signup
from tests.fakes.rtc_client import speech_like
from tests.live.conftest import Relay, offer, start_call


async def hold_loop_busy(seconds: float, block_s: float = 0.25) -> None:
    """Overload the relay's own event loop: block it ``block_s`` at a time, yielding in between."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(block_s)  # noqa: ASYNC251 (a deliberate stall of the relay's own event loop)
        await asyncio.sleep(0)


async def until_lag_samples(relay: Relay, count: int) -> None:
    """Wait until the lag monitor took ``count`` samples (sustained lag needs at least 10)."""

    def taken() -> float:
        text = relay.client.app[METRICS].render().decode()
        found = re.search(r"^parley_event_loop_lag_seconds_count (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    async with asyncio.timeout(count * 0.5):
        while taken() < count:
            await asyncio.sleep(0.1)


async def test_blocked_event_loop_refuses_new_calls(relay_factory: Callable[..., Awaitable[Relay]]) -> None:
    """While the loop stays late on its ticks (3 s of it), a new offer gets 503 capacity."""
    relay = await relay_factory(PARLEY_MAX_LOOP_LAG_MS="150")
    learner = await signup(relay.client)
    body = await (
        await relay.client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    ).json()
    rtc = relay.new_rtc()
    sdp_ready = await rtc.offer()
    assert sdp_ready
    await until_lag_samples(relay, 10)
    await hold_loop_busy(3.0)
    assert relay.client.app[LOOP_LAG].sustained_lag_ms > 150
    resp = await offer(relay, body["session"]["id"], body["client_secret"]["value"], rtc)
    await problem(resp, 503, "capacity")
    assert (
        'parley_session_admission_refused_total{cause="loop_lag"} 1.0'
        in relay.client.app[METRICS].render().decode()
    )


async def test_a_single_stall_does_not_refuse_new_calls(
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    """One 0.4 s stall (longer than a full GC) past the lag threshold does not refuse the next offer."""
    relay = await relay_factory(PARLEY_MAX_LOOP_LAG_MS="150")
    learner = await signup(relay.client)
    body = await (
        await relay.client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    ).json()
    rtc = relay.new_rtc()
    assert await rtc.offer()
    await until_lag_samples(relay, 20)  # two seconds of ticks: the stall is one sample of many
    time.sleep(0.4)  # noqa: ASYNC251 (a deliberate stall of the relay's own event loop)
    await asyncio.sleep(0.15)  # the lag monitor's next tick sees the stall
    assert relay.client.app[LOOP_LAG].lag_ms > 150
    resp = await offer(relay, body["session"]["id"], body["client_secret"]["value"], rtc)
    assert resp.status == 201, await resp.text()
    await rtc.accept(await resp.text())
    registry = relay.client.app[METRICS].registry
    for cause in ("loop_lag", "capacity"):
        assert registry.get_sample_value("parley_session_admission_refused_total", {"cause": cause}) == 0


async def test_shutdown_drains_live_sessions_and_finalizes_them(
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    """Stopping the app ends live sessions with reason `shutdown` and finalizes their recordings."""
    relay = await relay_factory()
    call = await start_call(relay)
    await call.wait_event(lambda m: m.get("status") == "live")
    call.rtc.send_pcm(speech_like(0.6))
    await asyncio.sleep(1.0)
    await relay.client.close()  # runs the app's cleanup: drain (1 s), then end what is left
    db = Database(relay.settings.database_url)
    try:
        async with db.sessions() as s:
            row = await s.get(Session, call.session_id)
            assert row is not None
            assert (row.status, row.end_reason) == ("ended", "shutdown")
            rec = (
                await s.execute(
                    select(AudioRecording).where(
                        AudioRecording.session_id == call.session_id, AudioRecording.track == "learner"
                    )
                )
            ).scalar_one()
            assert rec.status == "complete" and rec.duration_ms >= 600
    finally:
        await db.aclose()
