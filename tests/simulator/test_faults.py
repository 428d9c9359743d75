"""Limits and fault knobs, seen through the official SDK (with and without its reconnect logic)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
from openai import AsyncOpenAI
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime import RealtimeServerEvent
from openai.types.websocket_reconnection import ReconnectingEvent, ReconnectingOverrides
from websockets.exceptions import ConnectionClosedError

from relay.simulator import SimulatorOptions, SimulatorServer
from relay.simulator import session as session_module
from relay.simulator.validation import SimulatorDriftError

from .conftest import MakeClient
from .flow import MANUAL, WAIT_S, ready, types_of, until

FAST_RETRY: dict[str, Any] = {"initial_delay": 0.01, "max_delay": 0.05}


def knobs(**values: object) -> dict[str, Any]:
    return {"extra_query": {f"sim_{k}": str(v) for k, v in values.items()}}


async def until_second_session(conn: AsyncRealtimeConnection) -> list[RealtimeServerEvent]:
    """Events up to the ``session.created`` of the socket the SDK reconnected (``async for`` reconnects)."""
    events = []
    async with asyncio.timeout(WAIT_S):
        async for event in conn:
            events.append(event)
            if types_of(events).count("session.created") == 2:
                return events
    raise AssertionError(f"the SDK did not reconnect: {types_of(events)}")


class Reconnects:
    """An ``on_reconnecting`` callback that records attempts and drops the fault knobs for the next socket."""

    def __init__(self) -> None:
        self.seen: list[ReconnectingEvent] = []

    def __call__(self, event: ReconnectingEvent) -> ReconnectingOverrides:
        self.seen.append(event)
        return {"extra_query": {}}


async def test_session_expiry_sends_session_expired_then_closes_1001(client: AsyncOpenAI) -> None:
    """At max duration, mid-answer: error session_expired in the real wording, nothing after, close 1001."""
    async with client.realtime.connect(
        model="gpt-realtime", **knobs(max_session_s=0.5, realtime_pacing=1)
    ) as conn:
        await ready(conn, MANUAL)
        await conn.response.create()
        events = [event async for event in conn]
        close_code, close_reason = conn._connection.close_code, conn._connection.close_reason
    assert "response.output_audio.delta" in types_of(events) and "response.done" not in types_of(events)
    assert types_of(events)[-1] == "error"
    error = events[-1].error
    assert error.code == "session_expired"
    assert error.message == "Your session hit the maximum duration of 0.5 seconds."
    assert (close_code, close_reason) == (1001, error.message)


async def test_session_expiry_with_sdk_reconnect_starts_a_fresh_session(client: AsyncOpenAI) -> None:
    """With on_reconnecting set, the SDK treats the 1001 as recoverable and lands in a new session."""
    reconnects = Reconnects()
    async with client.realtime.connect(
        model="gpt-realtime", on_reconnecting=reconnects, **FAST_RETRY, **knobs(max_session_s=0.3)
    ) as conn:
        events = await until_second_session(conn)
    first, expired, second = events
    assert expired.type == "error" and expired.error.code == "session_expired"
    assert second.type == "session.created"
    assert second.session.id != first.session.id
    assert [(e.attempt, e.close_code) for e in reconnects.seen] == [(1, 1001)]


@pytest.mark.parametrize(
    ("code", "reconnect", "retried"), [(1011, False, False), (1011, True, True), (4000, True, False)]
)
async def test_scheduled_close_code_reaches_the_client(
    client: AsyncOpenAI, code: int, reconnect: bool, retried: bool
) -> None:
    """sim_close_after_s closes with sim_close_code: 1011 is retried by the SDK, 4000 never is."""
    reconnects = Reconnects()
    options: dict[str, Any] = {"on_reconnecting": reconnects, **FAST_RETRY} if reconnect else {}
    async with client.realtime.connect(
        model="gpt-realtime", **options, **knobs(close_after_s=0.2, close_code=code)
    ) as conn:
        if retried:
            assert types_of(await until_second_session(conn)) == ["session.created", "session.created"]
        else:
            await conn.recv()
            with pytest.raises(ConnectionClosedError) as caught:
                await conn.recv()
            assert caught.value.rcvd is not None and caught.value.rcvd.code == code
    assert [e.close_code for e in reconnects.seen] == ([code] if retried else [])


async def test_normal_close_ends_the_event_loop(client: AsyncOpenAI) -> None:
    """sim_close_code 1000 ends ``async for`` without an exception and without a reconnect."""
    reconnects = Reconnects()
    async with client.realtime.connect(
        model="gpt-realtime", on_reconnecting=reconnects, **knobs(close_after_s=0.1, close_code=1000)
    ) as conn:
        events = [event async for event in conn]
    assert types_of(events) == ["session.created"] and reconnects.seen == []


@pytest.mark.parametrize("reconnect", [False, True])
async def test_tcp_drop_is_a_1006(client: AsyncOpenAI, reconnect: bool) -> None:
    """sim_drop_after_s aborts the TCP connection: no close frame, the SDK sees 1006."""
    reconnects = Reconnects()
    options: dict[str, Any] = {"on_reconnecting": reconnects, **FAST_RETRY} if reconnect else {}
    async with client.realtime.connect(model="gpt-realtime", **options, **knobs(drop_after_s=0.2)) as conn:
        if reconnect:
            assert types_of(await until_second_session(conn)) == ["session.created", "session.created"]
        else:
            await conn.recv()
            with pytest.raises(ConnectionClosedError) as caught:
                await conn.recv()
            assert caught.value.rcvd is None
    assert [e.close_code for e in reconnects.seen] == ([1006] if reconnect else [])


async def test_injected_error_event_keeps_the_session(client: AsyncOpenAI) -> None:
    """sim_error_after_s sends a server_error with sim_error_code; the socket stays usable."""
    async with client.realtime.connect(
        model="gpt-realtime", **knobs(error_after_s=0.1, error_code="upstream_overloaded")
    ) as conn:
        events = await until(conn, "error")
        await conn.session.update(session={"type": "realtime"})
        after = await until(conn, "session.updated")
    error = events[-1].error
    assert (error.type, error.code, error.event_id) == ("server_error", "upstream_overloaded", None)
    assert types_of(after) == ["session.updated"]


async def test_slow_reader_delays_handling_of_client_events(client: AsyncOpenAI) -> None:
    """sim_read_pause_s: the server stops reading, so an answer to a client event waits for the pause."""
    async with client.realtime.connect(
        model="gpt-realtime", **knobs(read_pause_after_s=0, read_pause_s=0.4)
    ) as conn:
        await conn.recv()
        sent = time.monotonic()
        await conn.session.update(session={"type": "realtime"})
        await until(conn, "session.updated")
        waited = time.monotonic() - sent
    assert waited >= 0.3


@pytest.mark.parametrize("first_audio_ms", [0, 300])
async def test_first_audio_latency_knob(client: AsyncOpenAI, first_audio_ms: int) -> None:
    """sim_first_audio_ms sets the delay from response.created to the first output_audio.delta."""
    async with client.realtime.connect(model="gpt-realtime", **knobs(first_audio_ms=first_audio_ms)) as conn:
        await ready(conn, MANUAL)
        await conn.response.create()
        await until(conn, "response.created")
        created_at = time.monotonic()
        await until(conn, "response.output_audio.delta")
        latency_ms = (time.monotonic() - created_at) * 1000
        await conn.response.cancel()
        await until(conn, "response.done")
    assert first_audio_ms - 5 <= latency_ms <= first_audio_ms + 100


@pytest.mark.parametrize("chunk_ms", [20, 40, 200])
async def test_chunk_duration_knob(client: AsyncOpenAI, chunk_ms: int) -> None:
    """sim_chunk_ms sets the audio per delta (all but the last chunk are full)."""
    async with client.realtime.connect(model="gpt-realtime", **knobs(chunk_ms=chunk_ms)) as conn:
        await ready(conn, MANUAL)
        await conn.response.create()
        events = await until(conn, "response.done")
    sizes = [len(base64.b64decode(e.delta)) for e in events if e.type == "response.output_audio.delta"]
    assert set(sizes[:-1]) == {chunk_ms * 48} and 0 < sizes[-1] <= chunk_ms * 48


@pytest.mark.parametrize("pacing", [True, False])
async def test_realtime_pacing_knob(client: AsyncOpenAI, pacing: bool) -> None:
    """Paced delivery takes about the audio's duration; unpaced delivery is much faster than real time."""
    async with client.realtime.connect(
        model="gpt-realtime", **knobs(realtime_pacing=int(pacing), chunk_ms=50, first_audio_ms=0)
    ) as conn:
        await ready(conn, MANUAL)
        await conn.response.create(response={"max_output_tokens": 30})
        await until(conn, "response.output_audio.delta")
        start = time.monotonic()
        events = await until(conn, "response.done")
        elapsed = time.monotonic() - start
    chunks = types_of(events).count("response.output_audio.delta")
    expected = chunks * 0.05
    assert expected > 0.5
    if pacing:
        assert expected - 0.1 <= elapsed <= expected + 0.25
    else:
        assert elapsed < expected / 3


async def test_closing_the_server_closes_sessions_with_1001_and_leaves_no_task(
    make_client: MakeClient,
) -> None:
    """aclose sends 1001 to every client, waits for the connection tasks, and is idempotent."""
    server = SimulatorServer(SimulatorOptions(strict=True, realtime_pacing=True))
    await server.start()
    async with make_client(server).realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await conn.response.create()
        await until(conn, "response.output_audio.delta")
        assert server.active_connections == 1
        await asyncio.gather(server.aclose(), server.aclose())
        events = [event async for event in conn]
        close_code = conn._connection.close_code
    await server.aclose()
    assert close_code == 1001 and "session.created" not in types_of(events)
    assert server.active_connections == 0 and server.failures == []
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("simulator:")]


async def test_strict_mode_turns_drift_into_a_1011(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In strict mode an event that does not match the SDK types is never sent: the socket closes 1011."""
    original = session_module.default_session

    def drifted(session_id: str, model: str, expires_at: int) -> dict[str, Any]:
        return {**original(session_id, model, expires_at), "voice": "alloy"}

    monkeypatch.setattr(session_module, "default_session", drifted)
    server = SimulatorServer(SimulatorOptions(strict=True))
    async with server, make_client(server).realtime.connect(model="gpt-realtime") as conn:
        with pytest.raises(ConnectionClosedError) as caught:
            await conn.recv()
    assert caught.value.rcvd is not None and caught.value.rcvd.code == 1011
    assert len(server.failures) == 1 and isinstance(server.failures[0], SimulatorDriftError)
