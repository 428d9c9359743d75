"""Parley's OpenAI-compatible Realtime socket, driven by the official `openai` SDK as the integrating client.

The SDK's ``websocket_base_url`` points at Parley, which relays to a strict simulator with its own
key, records both sides and the transcript, and refuses what a client may not change.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import av
import pytest
from openai import AsyncOpenAI
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.api.realtime import SESSION_HEADER
from relay.keys import METRICS, REGISTRY
from storage.db import Database
from storage.models import Session
from tests.api import Learner, signup
from tests.live.conftest import Relay
from tests.simulator.audio import silence, speech
from tests.simulator.flow import send_audio, until

TOPIC = "cafe-order"
VAD = {
    "type": "realtime",
    "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}},
}


async def api_key(relay: Relay, learner: Learner) -> str:
    resp = await relay.client.post("/v1/api-keys", json={"name": "agent"}, headers=learner.auth)
    assert resp.status == 201, await resp.text()
    key: str = (await resp.json())["key"]
    return key


def sdk(relay: Relay, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=key, websocket_base_url=f"ws://127.0.0.1:{relay.client.server.port}/v1", max_retries=0
    )


@asynccontextmanager
async def realtime(
    relay: Relay, key: str, topic_id: str = TOPIC
) -> AsyncIterator[tuple[AsyncRealtimeConnection, str]]:
    """An SDK connection to Parley's socket and the session id from the handshake."""
    client = sdk(relay, key)
    try:
        async with client.realtime.connect(model="gpt-realtime", extra_query={"topic_id": topic_id}) as conn:
            # The SDK keeps the handshake answer on its websockets connection (not public API).
            session_id = conn._connection.response.headers[SESSION_HEADER]  # type: ignore[union-attr]
            yield conn, session_id
    finally:
        await client.close()


async def session_status(relay: Relay, learner: Learner, session_id: str, *wanted: str) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            resp = await relay.client.get(f"/v1/sessions/{session_id}", headers=learner.auth)
            body: dict[str, Any] = await resp.json()
            if body.get("status") in wanted:
                return body
            await asyncio.sleep(0.1)


async def read_feed(feed: Any) -> list[dict[str, Any]]:
    """Every event of a session's feed until the feed closes."""
    events = []
    async for msg in feed:
        events.append(json.loads(msg.data))
    await feed.close()
    return events


def decoded_ms(ogg: bytes) -> float:
    with av.open(io.BytesIO(ogg)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    return samples / 48


async def test_a_server_vad_conversation_through_parley_is_recorded_and_readable(relay: Relay) -> None:
    """The SDK talks to Parley as to OpenAI; afterwards both tracks and the transcript are in the REST API."""
    learner = await signup(relay.client)
    key = await api_key(relay, learner)
    async with realtime(relay, key) as (conn, session_id):
        feed = await relay.client.ws_connect(
            f"/v1/sessions/{session_id}/events", headers={"Authorization": f"Bearer {key}"}
        )
        watched = asyncio.create_task(read_feed(feed))
        created = (await until(conn, "session.created"))[-1]
        # Parley applied the topic before the client spoke: its instructions and transcription are on.
        assert created.session.instructions  # type: ignore[union-attr]
        assert created.session.audio.input.transcription is not None  # type: ignore[union-attr]
        listed = await (await relay.client.get(f"/v1/sessions/{session_id}", headers=learner.auth)).json()
        assert listed["status"] == "live" and listed["visibility"] == "private"
        await conn.session.update(session=VAD)  # type: ignore[arg-type]
        await until(conn, "session.updated")
        await send_audio(conn, speech(5) + silence(900))
        events = await until(conn, "response.done")
        assert "conversation.item.input_audio_transcription.completed" in [e.type for e in events] or (
            await until(conn, "conversation.item.input_audio_transcription.completed")
        )
        coach_audio = [e for e in events if e.type == "response.output_audio.delta"]
        assert coach_audio, "the coach answered with audio through Parley"
    ended = await session_status(relay, learner, session_id, "ended", "processing", "processed")
    assert ended["duration_ms"] is None or ended["duration_ms"] >= 0
    transcript = await (
        await relay.client.get(f"/v1/sessions/{session_id}/transcript", headers=learner.auth)
    ).json()
    speakers = [s["speaker"] for s in transcript["segments"]]
    assert speakers[:2] == ["learner", "coach"], speakers
    assert all(s["text"] for s in transcript["segments"])
    # The event feed saw the same final transcript live, in order, then closed with the session.
    seen = await asyncio.wait_for(watched, 20)
    finals = [e["segment"] for e in seen if e["type"] == "transcript.final"]
    assert [(f["id"], f["text"]) for f in finals] == [(s["id"], s["text"]) for s in transcript["segments"]]
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    states = [e["status"] for e in seen if e["type"] == "session.state"]
    assert states == ["connecting", "live", "ending", "ended"]
    registry = relay.client.app[METRICS].registry
    assert registry.get_sample_value("parley_event_feed_subscriptions_total") == 1
    assert registry.get_sample_value("parley_event_feed_subscribers") == 0
    assert registry.get_sample_value("parley_session_starts_total", {"result": "live"}) == 1
    for track, at_least_ms in (("learner", 2000), ("coach", 500)):
        resp = await relay.client.get(f"/v1/sessions/{session_id}/audio/{track}", headers=learner.auth)
        assert resp.status == 200 and resp.content_type == "audio/ogg"
        assert decoded_ms(await resp.read()) >= at_least_ms, track


def update(**session: Any) -> dict[str, Any]:
    return {"type": "session.update", "session": {"type": "realtime", **session}}


MCP_TOOL = {"type": "mcp", "server_label": "x", "server_url": "https://example.org/mcp"}
REFUSED = [
    (update(model="gpt-4o-realtime-preview"), "model_not_allowed", "session.model"),
    (update(tools=[MCP_TOOL]), "tool_not_allowed", "session.tools[0].type"),
    (
        update(audio={"input": {"transcription": None}}),
        "transcription_required",
        "session.audio.input.transcription",
    ),
    (
        {"type": "session.update", "session": {"type": "transcription"}},
        "session_type_not_allowed",
        "session.type",
    ),
    (
        {"type": "response.create", "response": {"prompt": {"id": "pmpt_1"}}},
        "prompt_not_allowed",
        "response.prompt",
    ),
    ({"type": "no.such.event"}, "invalid_value", None),
]


@pytest.mark.parametrize(("event", "code", "param"), REFUSED)
async def test_a_disallowed_client_event_gets_an_error_event_and_the_socket_stays_open(
    relay: Relay, event: dict[str, Any], code: str, param: str | None
) -> None:
    """Refused events are answered like OpenAI's refusals (event_id echoed) and never reach the upstream."""
    learner = await signup(relay.client)
    async with realtime(relay, await api_key(relay, learner)) as (conn, _):
        await until(conn, "session.created")
        await conn.send({**event, "event_id": "evt_client_1"})  # type: ignore[arg-type]
        error = (await until(conn, "error"))[-1]
        assert error.error.code == code and error.error.event_id == "evt_client_1"  # type: ignore[union-attr]
        if param is not None:
            assert error.error.param == param  # type: ignore[union-attr]
        refused = relay.client.app[METRICS].registry.get_sample_value(
            "parley_realtime_refused_events_total", {"code": code}
        )
        assert refused == 1
        await conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
        updated = (await until(conn, "session.updated"))[-1]
        assert updated.session.instructions == "Be brief."  # type: ignore[union-attr]
    assert not relay.sim.failures


async def test_handshake_refusals_are_http_answers(relay: Relay) -> None:
    """A bad key is 401, a missing or unknown topic 422 naming the field, before any session exists."""
    learner = await signup(relay.client)
    key = await api_key(relay, learner)
    for bad_key, topic, status in (
        ("pk_" + "x" * 40, TOPIC, 401),
        (key, "no-such-topic", 422),
        (key, "", 422),
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with realtime(relay, bad_key, topic):
                pass
        assert refused.value.response.status_code == status
    sessions = await (await relay.client.get("/v1/sessions", headers=learner.auth)).json()
    assert sessions["sessions"] == []


async def test_ending_the_session_over_rest_closes_the_socket(relay: Relay) -> None:
    """POST /v1/sessions/{id}/end closes the client's socket normally and the session ends."""
    learner = await signup(relay.client)
    async with realtime(relay, await api_key(relay, learner)) as (conn, session_id):
        await until(conn, "session.created")
        resp = await relay.client.post(f"/v1/sessions/{session_id}/end", headers=learner.auth)
        assert resp.status == 200
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    await conn.recv_bytes()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    await session_status(relay, learner, session_id, "ended", "processing", "processed")
    assert relay.client.app[REGISTRY].get(session_id) is None


async def test_admission_applies_to_the_socket(relay_factory: Any) -> None:
    """With one live place taken, a second socket is refused with 503 before its session is created."""
    relay = await relay_factory(PARLEY_MAX_SESSIONS="1")
    learner = await signup(relay.client)
    key = await api_key(relay, learner)
    async with realtime(relay, key) as (conn, _):
        await until(conn, "session.created")
        with pytest.raises(InvalidStatus) as refused:
            async with realtime(relay, key):
                pass
        assert refused.value.response.status_code == 503
    sessions = await (await relay.client.get("/v1/sessions", headers=learner.auth)).json()
    assert len(sessions["sessions"]) == 1


async def test_an_unavailable_upstream_is_an_error_event_then_close_1011(relay: Relay) -> None:
    """The upstream refusing Parley: the client hears why, the socket closes 1011, the session failed."""
    relay.set_upstream(reject_status=500)
    learner = await signup(relay.client)
    async with realtime(relay, await api_key(relay, learner)) as (conn, session_id):
        error = (await until(conn, "error"))[-1]
        assert error.error.type == "server_error"  # type: ignore[union-attr]
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    await conn.recv_bytes()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    await session_status(relay, learner, session_id, "failed")
    starts = relay.client.app[METRICS].registry
    assert starts.get_sample_value("parley_session_starts_total", {"result": "failed"}) == 1
    assert starts.get_sample_value("parley_session_starts_total", {"result": "live"}) == 0


async def test_shutting_down_closes_realtime_sockets_with_1001(relay: Relay) -> None:
    """A node going away ends its socket sessions at once (1001, so clients reconnect elsewhere) and
    their recordings are finalized as ended."""
    learner = await signup(relay.client)
    async with realtime(relay, await api_key(relay, learner)) as (conn, session_id):
        await until(conn, "session.created")
        closing = asyncio.create_task(relay.client.close())
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    await conn.recv_bytes()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        await asyncio.wait_for(closing, 10)
    db = Database(relay.settings.database_url)
    try:
        async with db.sessions() as s:
            row = await s.get(Session, session_id)
        assert (
            row is not None
            and row.status in ("ended", "processing", "processed")
            and row.end_reason == "shutdown"
        )
    finally:
        await db.aclose()
