"""The handshake and the first event: URL, auth, knobs, ``session.created``."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from openai import AsyncOpenAI
from websockets.exceptions import InvalidStatus

from relay.simulator import KNOBS, SimulatorServer
from relay.simulator.script import DEFAULT_INSTRUCTIONS

from .conftest import MakeClient, MakeSim
from .flow import until

ID = r"[0-9A-Za-z]{21}"


def body(exc: InvalidStatus) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(exc.response.body)
    assert exc.response.headers["Content-Type"] == "application/json"
    return payload["error"]


async def test_session_created_comes_first_with_the_full_default_session(client: AsyncOpenAI) -> None:
    """The first event is session.created with real-shaped ids and the GA defaults the real server reports."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        created = await conn.recv()
    assert created.type == "session.created"
    assert re.fullmatch(f"event_{ID}", created.event_id)
    session = created.session.model_dump()
    assert re.fullmatch(f"sess_{ID}", session["id"]) and session["object"] == "realtime.session"
    assert abs(session["expires_at"] - (time.time() + 3600)) < 5
    assert session["model"] == "gpt-realtime" and session["output_modalities"] == ["audio"]
    assert session["instructions"] == DEFAULT_INSTRUCTIONS and session["max_output_tokens"] == "inf"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    }
    assert session["audio"]["output"]["voice"] == "alloy" and session["audio"]["output"]["speed"] == 1.0


async def test_each_connection_is_a_new_session(client: AsyncOpenAI, sim: SimulatorServer) -> None:
    """Two connections get two session ids; active_connections counts open sockets."""
    async with client.realtime.connect(model="gpt-realtime") as first:
        one = (await until(first, "session.created"))[-1]
        async with client.realtime.connect(model="gpt-realtime") as second:
            two = (await until(second, "session.created"))[-1]
            assert sim.active_connections == 2
    assert one.session.id != two.session.id


async def test_wrong_api_key_is_rejected_with_401(make_sim: MakeSim, make_client: MakeClient) -> None:
    """With api_key set, a different Bearer token fails the upgrade with 401 and an OpenAI error body."""
    sim = await make_sim(api_key="sk-right")
    with pytest.raises(InvalidStatus) as caught:
        async with make_client(sim, "sk-wrong").realtime.connect(model="gpt-realtime"):
            pass
    assert caught.value.response.status_code == 401
    assert body(caught.value)["code"] == "invalid_api_key"
    assert "sk-wrong" not in caught.value.response.body.decode()
    async with make_client(sim, "sk-right").realtime.connect(model="gpt-realtime") as conn:
        assert (await conn.recv()).type == "session.created"


@pytest.mark.parametrize(
    ("status", "code"), [(401, "invalid_api_key"), (429, "rate_limit_exceeded"), (503, "service_unavailable")]
)
async def test_reject_knob_fails_the_handshake(client: AsyncOpenAI, status: int, code: str) -> None:
    """sim_reject_status makes the upgrade fail with that status and a JSON error body."""
    with pytest.raises(InvalidStatus) as caught:
        async with client.realtime.connect(
            model="gpt-realtime", extra_query={"sim_reject_status": str(status)}
        ):
            pass
    assert caught.value.response.status_code == status
    assert body(caught.value)["code"] == code


async def test_other_paths_are_404(sim: SimulatorServer) -> None:
    """Only /v1/realtime is served."""
    client = AsyncOpenAI(api_key="sk-test", websocket_base_url=sim.ws_base_url.replace("/v1", "/v2"))
    try:
        with pytest.raises(InvalidStatus) as caught:
            async with client.realtime.connect(model="gpt-realtime"):
                pass
    finally:
        await client.close()
    assert caught.value.response.status_code == 404
    assert body(caught.value)["message"] == "Invalid URL (GET /v2/realtime)"


async def test_model_or_call_id_is_required(client: AsyncOpenAI) -> None:
    """No model and no call_id is a 400; an unknown call_id is a 404 call_id_not_found."""
    with pytest.raises(InvalidStatus) as missing:
        async with client.realtime.connect():
            pass
    with pytest.raises(InvalidStatus) as unknown:
        async with client.realtime.connect(call_id="rtc_123"):
            pass
    assert missing.value.response.status_code == 400
    assert body(missing.value) == {
        "message": "Missing required parameter: 'model'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "missing_required_parameter",
    }
    assert unknown.value.response.status_code == 404 and body(unknown.value)["code"] == "call_id_not_found"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"sim_nope": "1"}, "sim_nope"),
        ({"sim_first_audio_ms": "soon"}, "sim_first_audio_ms"),
        ({"sim_chunk_ms": "15"}, "sim_chunk_ms"),
        ({"sim_close_code": "1006"}, "sim_close_code"),
    ],
)
async def test_bad_knobs_are_a_400(client: AsyncOpenAI, query: dict[str, str], param: str) -> None:
    """An unknown sim_ parameter or a bad value fails the upgrade with 400 naming the parameter."""
    with pytest.raises(InvalidStatus) as caught:
        async with client.realtime.connect(model="gpt-realtime", extra_query=query):
            pass
    assert caught.value.response.status_code == 400 and body(caught.value)["param"] == param


def test_every_option_but_the_api_key_is_a_knob() -> None:
    """The sim_ knobs mirror SimulatorOptions (api_key stays server-side)."""
    assert "sim_api_key" not in KNOBS
    assert {"sim_first_audio_ms", "sim_max_session_s", "sim_drop_after_s", "sim_reject_status"} <= set(KNOBS)
