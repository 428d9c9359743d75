"""Live sessions under faults: upstream drops and expiry, browser drops, grace expiry, fatal upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import select

from relay.browser.peer import BrowserPeer
from relay.errors import CapacityError
from relay.keys import DATABASE, METRICS, REGISTRY
from storage.models import AudioGap, AudioRecording, TranscriptSegment
from tests.api import ENDED_OR_LATER, signup
from tests.fakes.rtc_client import speech_like
from tests.live.conftest import Call, Relay, offer, reconnect, start_call

SILENCE = bytes(int(1.2 * 48000) * 2)


def say(call: Call, seconds: float = 1.5) -> None:
    call.rtc.send_pcm(speech_like(seconds) + SILENCE)


async def status_of(relay: Relay, call: Call) -> str:
    body = await (await relay.client.get(f"/v1/sessions/{call.session_id}", headers=call.learner.auth)).json()
    return str(body["status"])


async def wait_status(relay: Relay, call: Call, wanted: str, timeout: float = 20) -> None:
    """Until the session is ``wanted`` (``ended``: or already moved on by the finalize job)."""
    accepted = ENDED_OR_LATER if wanted == "ended" else (wanted,)
    async with asyncio.timeout(timeout):
        while await status_of(relay, call) not in accepted:
            await asyncio.sleep(0.1)


async def end(relay: Relay, call: Call) -> None:
    resp = await relay.client.post(f"/v1/sessions/{call.session_id}/end", headers=call.learner.auth)
    assert resp.status == 200


async def segments(relay: Relay, session_id: str) -> list[TranscriptSegment]:
    async with relay.client.app[DATABASE].sessions() as s:
        rows = await s.execute(
            select(TranscriptSegment)
            .where(TranscriptSegment.session_id == session_id)
            .order_by(TranscriptSegment.seq)
        )
        return list(rows.scalars())


async def test_upstream_drop_mid_turn_is_survived(relay: Relay) -> None:
    """The upstream TCP connection dies mid-conversation: the learner hears `retrying`, then the coach."""
    relay.set_upstream(drop_after_s=4.0)
    call = await start_call(relay)
    relay.set_upstream(drop_after_s=None)  # only the first upstream connection drops
    say(call)
    await call.wait_count("coach.done", 1, timeout=30)
    await call.wait_event(
        lambda m: m == {"type": "error", "code": "upstream_retrying", "message": m.get("message")}
    )
    say(call)
    await call.wait_count("coach.done", 2, timeout=30)
    await end(relay, call)
    rows = await segments(relay, call.session_id)
    assert [r.speaker for r in rows].count("coach") >= 2
    metrics = relay.client.app[METRICS].render().decode()
    assert 'parley_upstream_reconnects_total{outcome="ok"} 1.0' in metrics
    assert 'parley_session_outcomes_total{reason="ended_by_user"} 1.0' in metrics


async def test_upstream_session_expiry_is_survived(relay: Relay) -> None:
    """The upstream's max duration passes (session_expired, 1001): a fresh upstream session takes over."""
    relay.set_upstream(max_session_s=4.0)
    call = await start_call(relay)
    relay.set_upstream(max_session_s=3600.0)
    say(call)
    await call.wait_count("coach.done", 1, timeout=30)
    await call.wait_event(lambda m: m.get("code") == "upstream_retrying")
    live = relay.client.app[REGISTRY].get(call.session_id)
    assert live is not None
    async with asyncio.timeout(10):
        while not live.link.connected:
            await asyncio.sleep(0.05)
    assert live.link.stats.replayed_items >= 2  # the conversation so far went back upstream
    say(call)
    await call.wait_count("coach.done", 2, timeout=30)
    assert await status_of(relay, call) == "live"
    await end(relay, call)


async def test_browser_drop_and_reconnect_within_grace(relay: Relay) -> None:
    """A vanished browser is noticed within 5 s; a new offer resumes the same session, the gap is recorded."""
    call = await start_call(relay)
    say(call)
    await call.wait_count("coach.done", 1, timeout=30)
    call.rtc.freeze()
    loop = asyncio.get_running_loop()
    frozen_at = loop.time()
    await wait_status(relay, call, "reconnecting", timeout=8)
    assert loop.time() - frozen_at < 5.5
    second = await reconnect(relay, call)
    await second.wait_event(lambda m: m == {"type": "session.state", "status": "live"})
    say(second)
    await second.wait_count("coach.done", 1, timeout=30)
    await end(relay, second)
    async with relay.client.app[DATABASE].sessions() as s:
        learner = (
            await s.execute(
                select(AudioRecording).where(
                    AudioRecording.session_id == call.session_id, AudioRecording.track == "learner"
                )
            )
        ).scalar_one()
        gaps = (await s.execute(select(AudioGap).where(AudioGap.recording_id == learner.id))).scalars().all()
    assert learner.duration_ms >= 3000  # both legs' speech in one recording
    assert len(gaps) == 1 and gaps[0].reason == "reconnect" and gaps[0].end_ms > gaps[0].start_ms
    rows = await segments(relay, call.session_id)
    assert [r.speaker for r in rows].count("learner") >= 2


async def test_grace_expiry_ends_the_session(
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    """Without a reconnect inside the grace window the session ends and its recording is finalized."""
    relay = await relay_factory(PARLEY_RECONNECT_GRACE="1")
    call = await start_call(relay)
    call.rtc.send_pcm(speech_like(0.5))
    await call.wait_event(lambda m: m.get("status") == "live")
    call.rtc.freeze()
    await wait_status(relay, call, "ended", timeout=12)
    metrics = relay.client.app[METRICS].render().decode()
    assert 'parley_session_outcomes_total{reason="grace_expired"} 1.0' in metrics
    assert relay.client.app[REGISTRY].get(call.session_id) is None


async def test_a_session_whose_first_leg_never_negotiates_ends_after_the_grace_window(
    relay_factory: Callable[..., Awaitable[Relay]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admitted offer whose negotiation fails (e.g. no media port left) and no working offer
    after it: the session ends `failed` within the reconnect grace instead of holding its slot."""
    relay = await relay_factory(PARLEY_RECONNECT_GRACE="1")

    async def no_port(self: BrowserPeer, offer_sdp: str) -> str:
        raise CapacityError("No media port could be opened on this node; try again shortly.")

    monkeypatch.setattr(BrowserPeer, "negotiate", no_port)
    learner = await signup(relay.client)
    resp = await relay.client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    body = await resp.json()
    session_id = body["session"]["id"]
    refused = await offer(relay, session_id, body["client_secret"]["value"], relay.new_rtc())
    assert refused.status == 503 and (await refused.json())["code"] == "capacity"
    assert relay.client.app[REGISTRY].get(session_id) is not None  # admitted, waiting for a leg
    async with asyncio.timeout(10):
        while relay.client.app[REGISTRY].get(session_id) is not None:
            await asyncio.sleep(0.1)
    got = await (await relay.client.get(f"/v1/sessions/{session_id}", headers=learner.auth)).json()
    assert got["status"] == "failed"
    metrics = relay.client.app[METRICS].render().decode()
    assert 'parley_session_outcomes_total{reason="no_peer"} 1.0' in metrics


async def test_hang_up_then_reconnect(relay: Relay) -> None:
    """DELETE on the peer's Location closes that leg; the session waits, and a new offer resumes it."""
    call = await start_call(relay)
    await call.wait_event(lambda m: m.get("status") == "live")
    resp = await relay.client.delete(call.location, headers=call.learner.auth)
    assert resp.status == 204
    await wait_status(relay, call, "reconnecting", timeout=5)
    missing = await relay.client.delete(call.location, headers=call.learner.auth)
    assert missing.status == 404
    second = await reconnect(relay, call)
    await second.wait_event(lambda m: m.get("status") == "live")
    await end(relay, second)


async def test_fatal_upstream_ends_the_session_with_a_clear_code(relay: Relay) -> None:
    """An upstream that refuses Parley's key ends the session as failed and tells the learner why."""
    relay.set_upstream(reject_status=401)
    call = await start_call(relay)
    await call.wait_event(lambda m: m.get("type") == "error" and m.get("code") == "upstream_auth_failed")
    await wait_status(relay, call, "failed", timeout=10)
    metrics = relay.client.app[METRICS].render().decode()
    assert 'parley_session_outcomes_total{reason="upstream_failed"} 1.0' in metrics
