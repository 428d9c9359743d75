"""ModelLink against a scripted upstream, for what the simulator never sends (unknown, malformed, repeats)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from relay.model.link import UpstreamFatal
from relay.simulator.session import default_session

from .conftest import Harness, MakeHarness, MakeSim, eventually


class ScriptedUpstream:
    """A WebSocket server that answers the first ``session.update`` with a scripted burst of frames."""

    def __init__(self, burst: list[str]) -> None:
        self.burst = burst
        self.received: list[dict[str, Any]] = []
        self._server: Server | None = None

    @staticmethod
    def session_created(session_id: str) -> str:
        session = default_session(session_id, "gpt-realtime", 0)
        return json.dumps({"type": "session.created", "event_id": f"event_{session_id}", "session": session})

    async def _handle(self, ws: ServerConnection) -> None:
        await ws.send(self.session_created("sess_A"))
        async for frame in ws:
            event = json.loads(frame)
            self.received.append(event)
            if event["type"] == "session.update" and len(self.received) == 1:
                for raw in self.burst:
                    await ws.send(raw)

    async def start(self) -> str:
        self._server = await serve(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    """A scripted upstream bursting: unknown event, malformed frame, 2nd session.created, rate limits."""
    rate_limits = {"type": "rate_limits.updated", "event_id": "event_rl", "rate_limits": []}
    upstream = ScriptedUpstream(
        [
            json.dumps({"type": "brand.new.event", "event_id": "event_x", "payload": "private"}),
            "this is not json",
            ScriptedUpstream.session_created("sess_B"),
            json.dumps(rate_limits),
        ]
    )
    yield upstream
    await upstream.aclose()


async def test_unknown_and_malformed_events_are_skipped_and_counted(
    scripted: ScriptedUpstream, make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """Unknown types and non-JSON frames never reach on_event; they are counted; the link carries on."""
    url = await scripted.start()
    h: Harness = make_harness(await make_sim(), base_url=url)
    h.start()
    await h.until_event("rate_limits.updated")
    assert h.types() == ["session.created", "session.created", "rate_limits.updated"]
    stats = h.link.stats
    assert (stats.unknown_events, stats.malformed_events, stats.events_received) == (1, 1, 4)
    assert h.statuses == [("connecting", None), ("ready", None)]


async def test_every_session_created_gets_a_session_update_and_early_control_waits(
    scripted: ScriptedUpstream, make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """Control sent before ready follows session.update; a repeated session.created is configured again."""
    url = await scripted.start()
    h = make_harness(await make_sim(), base_url=url)
    h.link.send({"type": "response.create"})  # e.g. let the coach greet first
    h.start()
    await eventually(lambda: len(scripted.received) == 3, "three client events")
    types = [e["type"] for e in scripted.received]
    assert types[0] == "session.update" and sorted(types[1:]) == ["response.create", "session.update"]
    updates = [e for e in scripted.received if e["type"] == "session.update"]
    assert updates[0] == updates[1] and h.config_calls == 2
    assert h.link.session_id == "sess_B"


async def test_failed_response_for_quota_is_fatal(make_sim: MakeSim, make_harness: MakeHarness) -> None:
    """A response.done failed with insufficient_quota (no error event) ends the link with upstream_quota."""
    details = {"type": "failed", "error": {"type": "insufficient_quota", "code": "insufficient_quota"}}
    response = {"object": "realtime.response", "id": "resp_1", "status": "failed", "status_details": details}
    done = {"type": "response.done", "event_id": "event_d", "response": {**response, "output": []}}
    upstream = ScriptedUpstream([json.dumps(done)])
    try:
        h = make_harness(await make_sim(), base_url=await upstream.start())
        error = await h.run_to_failure()
    finally:
        await upstream.aclose()
    assert isinstance(error, UpstreamFatal) and error.code == "upstream_quota"
    assert h.types() == ["session.created", "response.done"]  # forwarded before the link gave up
    assert h.statuses == [("connecting", None), ("ready", None), ("failed", "upstream_quota")]


# ---------------------------------------------------------------------------------------- uplink batching

CHUNK_20MS = 20 * 48  # pcm16 mono 24 kHz


def numbered_chunks(count: int) -> list[bytes]:
    """20 ms chunks that differ from each other, so order and content can be checked."""
    return [bytes([i % 251, 0]) * (CHUNK_20MS // 2) for i in range(count)]


def appends(upstream: ScriptedUpstream) -> list[bytes]:
    """The audio of each input_audio_buffer.append the upstream received, in order."""
    events = upstream.received
    return [base64.b64decode(e["audio"]) for e in events if e["type"] == "input_audio_buffer.append"]


@pytest.fixture
async def quiet() -> AsyncIterator[ScriptedUpstream]:
    """A scripted upstream that only records what it receives."""
    upstream = ScriptedUpstream([])
    yield upstream
    await upstream.aclose()


async def test_twenty_ms_pushes_go_out_as_half_as_many_forty_ms_appends(
    quiet: ScriptedUpstream, make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """N pushes of 20 ms become N/2 appends of 40 ms whose audio, concatenated, is exactly what was pushed."""
    h = make_harness(await make_sim(), base_url=await quiet.start())
    h.start()
    await h.until_ready()
    pushed = numbered_chunks(10)
    for chunk in pushed:
        h.link.push_audio(chunk)
    await eventually(lambda: len(appends(quiet)) == 5, "five appends")
    received = appends(quiet)
    assert [len(a) for a in received] == [2 * CHUNK_20MS] * 5
    assert b"".join(received) == b"".join(pushed)
    stats = h.link.stats
    assert (stats.audio_appends_sent, stats.audio_chunks_sent, stats.dropped_audio_chunks) == (5, 10, 0)


async def test_a_lone_chunk_is_flushed_by_the_timer_after_append_ms(
    quiet: ScriptedUpstream, make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """A partial batch waits for company no longer than append_ms: its timer sends it alone."""
    h = make_harness(await make_sim(), base_url=await quiet.start(), append_ms=40)
    h.start()
    await h.until_ready()
    chunk = numbered_chunks(1)[0]
    started = time.monotonic()
    h.link.push_audio(chunk)
    await asyncio.sleep(0.02)
    assert h.link.stats.audio_appends_sent == 0  # still waiting for a second chunk
    await eventually(lambda: len(appends(quiet)) == 1, "the lone chunk", limit_s=2.0)
    elapsed = time.monotonic() - started
    assert appends(quiet) == [chunk]
    assert 0.04 <= elapsed < 0.04 + 0.5, elapsed  # not before the timer; soon after it


async def test_inbound_latency_counts_the_wait_for_the_batch(
    quiet: ScriptedUpstream, make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """Each chunk's latency runs from its arrival to its batch being queued: the first one waited."""
    h = make_harness(await make_sim(), base_url=await quiet.start(), append_ms=40)
    h.start()
    await h.until_ready()
    first, second, lone = numbered_chunks(3)
    h.link.push_audio(first, arrived_at=time.monotonic() - 0.005)
    await asyncio.sleep(0.02)
    h.link.push_audio(second, arrived_at=time.monotonic())
    assert len(h.audio_latencies) == 2
    assert h.audio_latencies[0] >= 0.02 + 0.005 > h.audio_latencies[1] >= 0
    h.link.push_audio(lone)  # no arrival stamp: sent, not measured
    await eventually(lambda: len(appends(quiet)) == 2, "both batches")
    assert len(h.audio_latencies) == 2


async def test_a_partial_batch_waiting_longer_than_append_ms_goes_with_the_next_push(
    quiet: ScriptedUpstream, make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """If the loop was too busy to run the timer, the next push sends the overdue batch at once."""
    h = make_harness(await make_sim(), base_url=await quiet.start(), append_ms=60)
    h.start()
    await h.until_ready()
    first, second = numbered_chunks(2)
    h.link.push_audio(first)
    time.sleep(0.07)  # noqa: ASYNC251 (the loop is stalled past the timer's due time on purpose)
    h.link.push_audio(second)  # 40 ms of audio, less than 60, but the batch is overdue
    assert h.link.stats.audio_appends_sent == 0
    await eventually(lambda: len(appends(quiet)) == 1, "the overdue batch")
    assert appends(quiet) == [first + second]


async def test_control_events_flush_pending_audio_first(
    quiet: ScriptedUpstream, make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """A commit sent right after a push goes out after that audio, not before it (nor 40 ms later)."""
    h = make_harness(await make_sim(), base_url=await quiet.start())
    h.start()
    await h.until_ready()
    chunk = numbered_chunks(1)[0]
    h.link.push_audio(chunk)
    h.link.send({"type": "input_audio_buffer.commit"})
    await eventually(lambda: len(quiet.received) == 3, "append and commit")
    types = [e["type"] for e in quiet.received[1:]]
    assert types == ["input_audio_buffer.append", "input_audio_buffer.commit"]
    assert appends(quiet) == [chunk]


async def test_closing_drops_and_counts_a_pending_batch(
    quiet: ScriptedUpstream, make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """Like queued audio, a batch still pending at aclose is not sent; it is counted, its timer cancelled."""
    h = make_harness(await make_sim(), base_url=await quiet.start(), append_ms=40)
    h.start()
    await h.until_ready()
    h.link.push_audio(numbered_chunks(1)[0])
    await h.link.aclose()
    await asyncio.sleep(0.06)  # past the timer's due time
    assert appends(quiet) == []
    assert (h.link.stats.audio_dropped_disconnected, h.link.stats.audio_appends_sent) == (1, 0)
