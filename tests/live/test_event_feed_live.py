"""The event feed WebSocket against a real session: aiortc browser <-> relay <-> simulator."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any

from aiohttp import ClientWebSocketResponse, WSMsgType

from relay.api.events import CLOSE_RESUME_GAP, CLOSE_SLOW_CONSUMER
from relay.keys import FEEDS
from tests.api import problem, signup
from tests.fakes.rtc_client import speech_like
from tests.live.conftest import TIMEOUT_S, Call, Relay, offer, start_call

SILENCE_S = 1.2  # longer than the beginner topic's 900 ms silence window


def path(session_id: str, after: int | None = None) -> str:
    return f"/v1/sessions/{session_id}/events" + ("" if after is None else f"?after={after}")


async def speak(call: Call, seconds: float) -> None:
    call.rtc.send_pcm(speech_like(seconds) + bytes(int(SILENCE_S * 48000) * 2))


async def collect(
    ws: ClientWebSocketResponse, into: list[dict[str, Any]], stop_after: int | None = None
) -> int:
    """Append every message to ``into`` until the server closes (its close code) or ``stop_after`` came."""
    async with asyncio.timeout(3 * TIMEOUT_S):
        async for msg in ws:
            assert msg.type is WSMsgType.TEXT, msg
            into.append(json.loads(msg.data))
            if stop_after is not None and len(into) >= stop_after:
                await ws.close()
                break
    return ws.close_code or 0


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages]


def finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The transcript.final events without their seq, as the data channel carries them."""
    return [{k: v for k, v in m.items() if k != "seq"} for m in messages if m["type"] == "transcript.final"]


async def wait_for(condition: Any, timeout: float = TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_subscribers_see_the_live_session_in_order_and_resume_without_loss(relay: Relay) -> None:
    """Subscribers by header (from `created`), by subprotocol with an API key and ?after=, and one that
    reconnects with ?after= all get the data channel's transcript.final events with contiguous seqs,
    then a 1000 close when the session ends."""
    learner = await signup(relay.client)
    created = await relay.client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    body = await created.json()
    session_id, secret = body["session"]["id"], body["client_secret"]["value"]
    key = (
        await (await relay.client.post("/v1/api-keys", json={"name": "feed"}, headers=learner.auth)).json()
    )["key"]

    first = await relay.client.ws_connect(path(session_id), headers=learner.auth)  # before the call
    assert first.protocol is None
    got_first: list[dict[str, Any]] = []
    first_task = asyncio.create_task(collect(first, got_first))
    dropping = await relay.client.ws_connect(path(session_id), headers=learner.auth)
    got_dropping: list[dict[str, Any]] = []

    rtc = relay.new_rtc()
    answer = await offer(relay, session_id, secret, rtc)
    assert answer.status == 201, await answer.text()
    await rtc.accept(await answer.text())
    async with asyncio.timeout(TIMEOUT_S):
        await rtc.connected()
        await rtc.wait_channel("events")
    call = Call(session_id, rtc, answer.headers["Location"], learner)
    await call.wait_event(lambda m: m == {"type": "session.state", "status": "live"})
    await speak(call, 1.5)
    await call.wait_count("coach.done", 1, timeout=30)

    # The reconnecting subscriber leaves after the first coach.done it sees...
    async with asyncio.timeout(TIMEOUT_S):
        async for msg in dropping:
            got_dropping.append(json.loads(msg.data))
            if got_dropping[-1]["type"] == "coach.done":
                break
    await dropping.close()
    # ... and a subscriber with an API key in the subprotocol resumes after the `live` state.
    live_seq = next(m["seq"] for m in got_first if m.get("status") == "live")
    second = await relay.client.ws_connect(
        path(session_id, after=live_seq), protocols=(f"parley.bearer.{key}", "parley.events")
    )
    assert second.protocol == "parley.events"
    got_second: list[dict[str, Any]] = []
    second_task = asyncio.create_task(collect(second, got_second))

    await speak(call, 1.5)
    await call.wait_count("coach.done", 2, timeout=30)
    await call.wait_event(lambda m: len(call.events("transcript.final")) >= 4)
    resumed = await relay.client.ws_connect(
        path(session_id, after=got_dropping[-1]["seq"]), headers=learner.auth
    )
    got_resumed: list[dict[str, Any]] = []
    resumed_task = asyncio.create_task(collect(resumed, got_resumed))

    ended = await relay.client.post(f"/v1/sessions/{session_id}/end", headers=learner.auth)
    assert ended.status == 200
    assert await first_task == 1000 and await second_task == 1000 and await resumed_task == 1000

    last = got_first[-1]["seq"]
    assert seqs(got_first) == list(range(1, last + 1))
    assert got_first[-1] == {"type": "session.state", "status": "ended", "seq": last}
    states = [m["status"] for m in got_first if m["type"] == "session.state"]
    assert states == ["connecting", "live", "ending", "ended"]
    assert seqs(got_second) == list(range(live_seq + 1, last + 1))
    assert seqs(got_dropping) + seqs(got_resumed) == list(range(1, last + 1))  # no loss, no repeat
    assert got_dropping + got_resumed == got_first
    channel_finals = call.events("transcript.final")
    speakers = [m["segment"]["speaker"] for m in channel_finals]
    assert speakers.count("learner") == 2 and speakers.count("coach") == 2
    assert finals(got_first) == channel_finals
    assert finals(got_second) == channel_finals
    # The ended session's feed lingers: a late resume still gets the tail, then 1000.
    late = await relay.client.ws_connect(path(session_id, after=last - 1), headers=learner.auth)
    got_late: list[dict[str, Any]] = []
    assert await collect(late, got_late) == 1000 and got_late == got_first[-1:]


async def test_a_non_reading_subscriber_is_cut_off_without_hurting_the_session(relay: Relay) -> None:
    """A subscriber that stops reading is closed with 4008 after a gap-free prefix, while a reading one
    gets everything and the session's transcript completes; resuming from dropped events is 4009.

    Filler events published into the session's real feed stand in for a long, busy session: a short call
    publishes far fewer events than the socket buffers between a stalled client and the relay hold.
    """
    call = await start_call(relay)
    await call.wait_event(lambda m: m == {"type": "session.state", "status": "live"})
    feeds = relay.client.app[FEEDS]
    feed = feeds.get(call.session_id)
    assert feed is not None
    stalled = await relay.client.ws_connect(path(call.session_id), headers=call.learner.auth)  # never read
    reading = await relay.client.ws_connect(path(call.session_id), headers=call.learner.auth)
    got_reading: list[dict[str, Any]] = []
    reading_task = asyncio.create_task(collect(reading, got_reading))
    await speak(call, 1.5)

    pad = "x" * 4096
    while feeds.stats.cut_offs == 0 or feed.oldest_seq <= 2:
        assert feed.last_seq < 20_000, "the stalled subscriber was never cut off"
        for _ in range(32):
            feed.publish({"type": "test.filler", "pad": pad})
        await wait_for(lambda: got_reading and got_reading[-1]["seq"] >= feed.last_seq - 32)
    assert feeds.stats.cut_offs == 1  # only the stalled one
    # It reads again (within the relay's 10 s close timeout): what it had, then the close code.
    got_stalled: list[dict[str, Any]] = []
    assert await collect(stalled, got_stalled) == CLOSE_SLOW_CONSUMER
    assert got_stalled and seqs(got_stalled) == list(range(1, len(got_stalled) + 1))
    assert len(got_stalled) < feed.last_seq
    gap = await relay.client.ws_connect(path(call.session_id, after=1), headers=call.learner.auth)
    assert await collect(gap, []) == CLOSE_RESUME_GAP

    await call.wait_count("coach.done", 1, timeout=30)
    await call.wait_event(lambda m: len(call.events("transcript.final")) >= 2)

    ended = await relay.client.post(f"/v1/sessions/{call.session_id}/end", headers=call.learner.auth)
    assert ended.status == 200
    assert await reading_task == 1000
    assert seqs(got_reading) == list(range(1, feed.last_seq + 1))
    assert finals(got_reading) == call.events("transcript.final")
    await wait_for(lambda: feeds.stats.subscribers == 0)


def upgrade_headers(**extra: str) -> dict[str, str]:
    """A WebSocket opening handshake, to read a refusal's problem+json body."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **extra,
    }


async def test_refusals_come_before_the_upgrade(relay: Relay) -> None:
    """Missing or bad credentials 401, someone else's session 404, a bad or future after 422, a bare
    bearer subprotocol 400, a plain GET 400, an ended session without a feed 409."""
    owner, other = await signup(relay.client), await signup(relay.client)
    created = await relay.client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=owner.auth)
    session_id = (await created.json())["session"]["id"]
    get = relay.client.get
    await problem(await get(path(session_id), headers=upgrade_headers()), 401, "unauthorized")
    bad_key = upgrade_headers(Authorization="Bearer pk_not_a_key")
    await problem(await get(path(session_id), headers=bad_key), 401, "unauthorized")
    await problem(await get(path(session_id), headers=upgrade_headers(**other.auth)), 404, "not_found")
    await problem(await get(path("ses_missing"), headers=upgrade_headers(**owner.auth)), 404, "not_found")
    body = await problem(
        await get(path(session_id) + "?after=-1", headers=upgrade_headers(**owner.auth)),
        422,
        "invalid_request",
    )
    assert body["field"] == "after"
    await problem(
        await get(path(session_id, after=3), headers=upgrade_headers(**owner.auth)), 422, "invalid_request"
    )
    bare = upgrade_headers(**{"Sec-WebSocket-Protocol": f"parley.bearer.{owner.token}"})
    body = await problem(await get(path(session_id), headers=bare), 400, "invalid_subprotocol")
    assert owner.token not in json.dumps(body)
    await problem(await get(path(session_id), headers=owner.auth), 400, "websocket_required")
    assert len(relay.client.app[FEEDS]) == 0  # refused subscribers left nothing behind

    # A subscriber of a session that is ended before it ever goes live is closed normally...
    waiting = await relay.client.ws_connect(path(session_id), headers=owner.auth)
    assert (await relay.client.post(f"/v1/sessions/{session_id}/end", headers=owner.auth)).status == 200
    assert await collect(waiting, []) == 1000
    # ... and once its (never used) feed is gone, the session answers 409.
    await wait_for(lambda: relay.client.app[FEEDS].get(session_id) is None)
    await problem(await get(path(session_id), headers=upgrade_headers(**owner.auth)), 409, "session_ended")


async def test_binary_from_the_client_closes_with_1003(relay: Relay) -> None:
    """The client has nothing to send: text is ignored, binary closes the socket with 1003."""
    learner = await signup(relay.client)
    created = await relay.client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    session_id = (await created.json())["session"]["id"]
    ws = await relay.client.ws_connect(
        path(session_id), protocols=(f"parley.bearer.{learner.token}", "parley.events")
    )
    await ws.send_str("hello")
    await ws.send_bytes(b"\x00\x01")
    assert await collect(ws, []) == 1003
    await wait_for(lambda: relay.client.app[FEEDS].stats.subscribers == 0)


async def test_shutdown_closes_subscribers_with_1001_at_once(relay: Relay) -> None:
    """Stopping the server closes open feeds with 1001 first, so they do not hold shutdown up."""
    learner = await signup(relay.client)
    created = await relay.client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    session_id = (await created.json())["session"]["id"]
    ws = await relay.client.ws_connect(path(session_id), headers=learner.auth)
    closed = asyncio.create_task(collect(ws, []))
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(5):
        await relay.client.server.close()
    assert await closed == 1001
    assert asyncio.get_running_loop().time() - started < 5
