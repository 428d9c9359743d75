"""The event feed from any node: a subscriber on node B of a session live on node A is served A's feed.

Two real ``parley serve`` processes (fixtures of ``test_nodes.py``); sessions go live on A through the
Realtime socket (one through WebRTC), subscribers connect to B, which relays A's feed
(relay/cluster/ws_forward.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from datetime import timedelta
from typing import Any, Final

import aiohttp
import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from relay.cluster.routing import NODE_HEADER
from relay.cluster.ws_forward import CLOSE_OWNER_GONE
from storage import nodes
from storage.db import Database
from tests.api import problem
from tests.fakes.relay_process import RelayProcess
from tests.fakes.rtc_client import RtcClient, loopback_ice  # noqa: F401 (fixture)
from tests.integration.test_nodes import (  # noqa: F401 (db, two_nodes: fixtures)
    STALE_S,
    TOPIC,
    api_key,
    create_session,
    db,
    node_id_of,
    realtime,
    send_offer,
    signup,
    two_nodes,
)
from tests.simulator.audio import silence, speech
from tests.simulator.flow import send_audio, until

pytestmark = pytest.mark.integration

TIMEOUT_S: Final = 30.0
Messages = list[dict[str, Any]]
VAD: Final = {
    "type": "realtime",
    "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}},
}


def upgrade_headers(**extra: str) -> dict[str, str]:
    """A WebSocket opening handshake, to read a refusal's problem+json body."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **extra,
    }


def feed_url(relay: RelayProcess, session_id: str, after: int | None = None) -> str:
    return f"{relay.base_url}/v1/sessions/{session_id}/events" + ("" if after is None else f"?after={after}")


async def collect(ws: aiohttp.ClientWebSocketResponse, into: Messages, stop_after: int | None = None) -> int:
    """Append every message to ``into`` until the server closes (its close code), or until
    ``stop_after`` messages came (then close from this side)."""
    async with asyncio.timeout(TIMEOUT_S):
        async for msg in ws:
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            into.append(json.loads(msg.data))
            if stop_after is not None and len(into) >= stop_after:
                await ws.close()
                break
    return ws.close_code or 0


async def speak(conn: AsyncRealtimeConnection) -> None:
    """One learner turn and the coach's answer: transcript events on the session's feed."""
    await conn.session.update(session=VAD)  # type: ignore[arg-type]
    await until(conn, "session.updated")
    await send_audio(conn, speech(3) + silence(900))
    await until(conn, "response.done")


async def until_seen(got: Messages, event_type: str, **fields: Any) -> None:
    """Wait until an event of this type (with these fields) is in ``got``."""
    async with asyncio.timeout(TIMEOUT_S):
        while not any(m["type"] == event_type and fields.items() <= m.items() for m in got):
            await asyncio.sleep(0.05)


async def feed_subscribers(http: aiohttp.ClientSession, relay: RelayProcess) -> float:
    """The node's ``parley_event_feed_subscribers`` gauge: feed sockets open in that process."""
    async with http.get(f"{relay.base_url}/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^parley_event_feed_subscribers(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert found is not None, text
    return float(found.group(1))


async def test_a_subscriber_on_another_node_gets_the_owners_events_and_seqs_then_1000(
    two_nodes: list[RelayProcess],
) -> None:
    """A subscriber on B (subprotocol auth) and one on A (header auth) of a session live on A get the
    same events with the same seq, then both a 1000 close when the session ends."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        a_id = await node_id_of(http, a)
        learner = await signup(http, a)
        key = await api_key(http, a, learner)
        async with realtime(a, key) as (conn, session_id):
            on_a = await http.ws_connect(feed_url(a, session_id), headers=learner.auth)
            on_b = await http.ws_connect(
                feed_url(b, session_id), protocols=(f"parley.bearer.{key}", "parley.events")
            )
            assert on_b.protocol == "parley.events"
            got_a: Messages = []
            got_b: Messages = []
            reading = asyncio.gather(collect(on_a, got_a), collect(on_b, got_b))
            await speak(conn)
            await until_seen(got_b, "transcript.final")
            async with http.post(f"{b.base_url}/v1/sessions/{session_id}/end", headers=learner.auth) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers[NODE_HEADER] == a_id
            assert tuple(await reading) == (1000, 1000)
    assert got_b == got_a
    assert [m["seq"] for m in got_b] == list(range(1, len(got_b) + 1))
    assert {"session.state", "transcript.final"} <= {m["type"] for m in got_b}


async def test_a_subscriber_that_leaves_b_is_gone_from_a_and_resumes_through_b_with_after(
    two_nodes: list[RelayProcess],
) -> None:
    """A subscriber on B that closes is gone from A's feed too; reconnecting to B with ?after=<last seq>
    gets the rest without gap or repeat, so both parts together are what A's own subscriber got."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        learner = await signup(http, a)
        key = await api_key(http, a, learner)
        async with realtime(a, key) as (conn, session_id):
            on_a = await http.ws_connect(feed_url(a, session_id), headers=learner.auth)
            got_a: Messages = []
            reading_a = asyncio.create_task(collect(on_a, got_a))
            await until_seen(got_a, "session.state")
            first = await http.ws_connect(feed_url(b, session_id), headers=learner.auth)
            assert await feed_subscribers(http, a) == 2
            before: Messages = []
            await collect(first, before, stop_after=1)
            async with asyncio.timeout(TIMEOUT_S):  # B closed its socket to A as its client left
                while await feed_subscribers(http, a) != 1:
                    await asyncio.sleep(0.05)

            await speak(conn)
            await until_seen(got_a, "transcript.final")
            resumed = await http.ws_connect(
                feed_url(b, session_id, after=before[-1]["seq"]), headers=learner.auth
            )
            after: Messages = []
            reading_b = asyncio.create_task(collect(resumed, after))
            async with http.post(f"{a.base_url}/v1/sessions/{session_id}/end", headers=learner.auth) as resp:
                assert resp.status == 200, await resp.text()
            assert await reading_b == 1000
            assert await reading_a == 1000
    assert before + after == got_a
    assert any(m["type"] == "transcript.final" for m in after)


async def test_refusals_on_b_are_local_problems_and_the_owners_refusal_comes_back_as_its_answer(
    two_nodes: list[RelayProcess],
) -> None:
    """B refuses an unknown session, someone else's session live on A and bad credentials itself
    (problem+json from B); an ``after`` beyond A's last event is refused by A, its answer passed on."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        a_id, b_id = await node_id_of(http, a), await node_id_of(http, b)
        learner, other = await signup(http, a), await signup(http, b)
        key = await api_key(http, a, learner)
        async with realtime(a, key) as (_conn, session_id):
            refusals = [
                (feed_url(b, "ses_missing"), learner.auth, 404, "not_found"),
                (feed_url(b, session_id), other.auth, 404, "not_found"),
                (feed_url(b, session_id), {"Authorization": "Bearer pk_not_a_key"}, 401, "unauthorized"),
            ]
            for url, auth, status, code in refusals:
                async with http.get(url, headers=upgrade_headers(**auth)) as resp:
                    await problem(resp, status, code)
                    assert resp.headers[NODE_HEADER] == b_id
            async with http.get(
                feed_url(b, session_id, after=10**6), headers=upgrade_headers(**learner.auth)
            ) as resp:
                body = await problem(resp, 422, "invalid_request")
                assert body["field"] == "after"
                assert resp.headers[NODE_HEADER] == a_id  # answered by the owner


async def test_the_owner_killed_mid_stream_closes_the_b_side_with_1012_and_b_answers_503_meanwhile(
    two_nodes: list[RelayProcess], db: Database
) -> None:
    """SIGKILL A while a subscriber on B reads its feed: B closes the client with 1012 (service restart,
    reconnect with after); a reconnect while A still counts as alive is refused 503 node_unreachable."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        a_id = await node_id_of(http, a)
        learner = await signup(http, a)
        key = await api_key(http, a, learner)
        async with realtime(a, key) as (conn, session_id):
            on_b = await http.ws_connect(feed_url(b, session_id), headers=learner.auth)
            got: Messages = []
            reading = asyncio.create_task(collect(on_b, got))
            await until_seen(got, "session.state")
            await a.kill()
            assert await reading == CLOSE_OWNER_GONE
            assert on_b.close_code == CLOSE_OWNER_GONE
            # Keep A alive in the registry, as it is for a few heartbeats after a crash.
            (a_row,) = [
                n
                for n, _ in await nodes.list_nodes(db, stale_after=timedelta(seconds=STALE_S))
                if n.id == a_id
            ]
            await nodes.heartbeat(db, a_id, a_row.url)
            resume = feed_url(b, session_id, after=got[-1]["seq"])
            async with http.get(resume, headers=upgrade_headers(**learner.auth)) as resp:
                await problem(resp, 503, "node_unreachable")


async def test_a_subscriber_on_b_before_the_call_is_handed_over_when_the_call_goes_live_on_a(
    two_nodes: list[RelayProcess], loopback_ice: None
) -> None:
    """A subscriber on B of a session still `created` keeps its socket when the WebRTC call goes live on
    A: it gets A's events from seq 1, the same as a subscriber on A, then 1000 when the session ends."""
    a, b = two_nodes
    rtc = RtcClient()
    try:
        async with aiohttp.ClientSession() as http:
            learner = await signup(http, a)
            created = await create_session(http, a, learner)
            session_id = created["session"]["id"]
            on_a = await http.ws_connect(feed_url(a, session_id), headers=learner.auth)
            on_b = await http.ws_connect(
                feed_url(b, session_id, after=0),
                protocols=(f"parley.bearer.{learner.token}", "parley.events"),
            )
            got_a: Messages = []
            got_b: Messages = []
            reading = asyncio.gather(collect(on_a, got_a), collect(on_b, got_b))
            await send_offer(http, a, session_id, created["client_secret"]["value"], rtc)
            await until_seen(got_b, "session.state", status="live")
            async with http.post(f"{b.base_url}/v1/sessions/{session_id}/end", headers=learner.auth) as resp:
                assert resp.status == 200, await resp.text()
            assert tuple(await reading) == (1000, 1000)
    finally:
        await rtc.aclose()
    assert got_b == got_a
    assert [m.get("status") for m in got_b[:2]] == ["connecting", "live"]


async def test_sigterm_to_b_closes_its_relayed_feeds_with_1001_at_once(two_nodes: list[RelayProcess]) -> None:
    """B shutting down closes a feed it relays with 1001 as shutdown begins (not after the handlers'
    grace), and the session on A goes on."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        learner = await signup(http, a)
        key = await api_key(http, a, learner)
        async with realtime(a, key) as (_conn, session_id):
            on_b = await http.ws_connect(feed_url(b, session_id), headers=learner.auth)
            got: Messages = []
            reading = asyncio.create_task(collect(on_b, got))
            await until_seen(got, "session.state")
            loop = asyncio.get_running_loop()
            started = loop.time()
            stopping = asyncio.create_task(b.stop())
            assert await reading == 1001
            assert loop.time() - started < 5
            assert await stopping == 0
            assert await feed_subscribers(http, a) == 0
