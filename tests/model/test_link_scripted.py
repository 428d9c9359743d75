"""ModelLink against a scripted upstream, for what the simulator never sends (unknown, malformed, repeats)."""

from __future__ import annotations

import json
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
