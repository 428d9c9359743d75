"""Fixtures for the simulator tests: strict servers, SDK clients, and a check on every event.

Every frame an SDK connection receives is validated against the SDK's server event types, with no
unknown keys beyond the allow-list of REALTIME.md §7, independently of the simulator's own strict
mode (which the servers here also turn on). The leaked-task check comes from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import pytest
from openai import AsyncOpenAI
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime import RealtimeServerEvent, RealtimeSessionCreateResponse
from pydantic import Field, TypeAdapter

from relay.simulator import SimulatorServer
from tests.realtime_checks import strict_simulators, unknown_keys

SERVER_TA: TypeAdapter[Any] = TypeAdapter(Annotated[RealtimeServerEvent, Field(discriminator="type")])
ALLOWED_EXTRAS = {"$.session.id", "$.session.object", "$.session.expires_at", "$.obfuscation"}
TEST_OPTIONS: dict[str, Any] = {
    "strict": True,
    "first_audio_ms": 20,
    "realtime_pacing": False,
    "transcription_delay_ms": 10,
}

MakeSim = Callable[..., Awaitable[SimulatorServer]]
MakeClient = Callable[[SimulatorServer], AsyncOpenAI]


def assert_valid_server_event(raw: bytes | str) -> dict[str, Any]:
    """Validate one received frame strictly (REALTIME.md §7 recipe) and return it decoded."""
    event: dict[str, Any] = json.loads(raw)
    model = SERVER_TA.validate_python(event)
    extras = [e for e in unknown_keys(model) if e not in ALLOWED_EXTRAS]
    assert not extras, f"{event['type']}: unknown keys {extras}"
    if event["type"] in {"session.created", "session.updated"}:
        session = RealtimeSessionCreateResponse.model_validate(event["session"])
        assert not unknown_keys(session), f"session: unknown keys {unknown_keys(session)}"
    return event


@pytest.fixture(autouse=True)
def validate_every_received_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrap the SDK's ``recv_bytes`` so that a drifting server event fails the test where it arrives."""
    original = AsyncRealtimeConnection.recv_bytes

    async def recv_bytes(self: AsyncRealtimeConnection) -> bytes:
        raw = await original(self)
        assert_valid_server_event(raw)
        return raw

    monkeypatch.setattr(AsyncRealtimeConnection, "recv_bytes", recv_bytes)


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    """Start strict simulators (test-friendly defaults plus overrides); close and check them afterwards."""
    async with strict_simulators(TEST_OPTIONS) as make:
        yield make


@pytest.fixture
async def sim(make_sim: MakeSim) -> SimulatorServer:
    """A strict simulator with the test defaults."""
    return await make_sim()


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Official SDK clients pointed at a simulator; closed afterwards."""
    clients: list[AsyncOpenAI] = []

    def make(server: SimulatorServer, api_key: str = "sk-test") -> AsyncOpenAI:
        client = AsyncOpenAI(api_key=api_key, websocket_base_url=server.ws_base_url)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def client(sim: SimulatorServer, make_client: MakeClient) -> AsyncOpenAI:
    """An SDK client for ``sim``."""
    return make_client(sim)
