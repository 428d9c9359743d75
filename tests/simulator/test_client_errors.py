"""Bad client events get an ``error`` with code, param and the echoed event_id; the socket stays open."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from .audio import silence, speech
from .flow import MANUAL, ready, send_audio, until


def update(session: dict[str, Any], event_id: str = "evt-1") -> str:
    return json.dumps(
        {"type": "session.update", "event_id": event_id, "session": {"type": "realtime", **session}}
    )


CASES: list[tuple[str, str, str, str | None, str | None]] = [
    # (test id, raw frame, code, param, echoed event_id)
    ("not-json", "{not json", "invalid_json", None, None),
    ("no-type", '{"event_id": "evt-1"}', "invalid_event", None, "evt-1"),
    (
        "unknown-type",
        '{"type": "transcription_session.update", "event_id": "evt-1"}',
        "invalid_value",
        "type",
        "evt-1",
    ),
    ("beta-voice", update({"voice": "alloy"}), "unknown_parameter", "session.voice", "evt-1"),
    (
        "beta-format",
        update({"input_audio_format": "pcm16"}),
        "unknown_parameter",
        "session.input_audio_format",
        "evt-1",
    ),
    ("beta-temperature", update({"temperature": 0.8}), "unknown_parameter", "session.temperature", "evt-1"),
    (
        "missing-session-type",
        json.dumps({"type": "session.update", "event_id": "evt-1", "session": {"instructions": "Hi"}}),
        "missing_required_parameter",
        "session.type",
        "evt-1",
    ),
    (
        "format-string",
        update({"audio": {"input": {"format": "pcm16"}}}),
        "invalid_value",
        "session.audio.input.format",
        "evt-1",
    ),
    (
        "rate-16k",
        update({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}),
        "invalid_value",
        "session.audio.input.format.rate",
        "evt-1",
    ),
    (
        "threshold-range",
        update({"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}}),
        "decimal_above_max_value",
        "session.audio.input.turn_detection.threshold",
        "evt-1",
    ),
    (
        "instructions-type",
        update({"instructions": 42}),
        "invalid_type",
        "session.instructions",
        "evt-1",
    ),
    (
        "transcription-session",
        json.dumps({"type": "session.update", "event_id": "evt-1", "session": {"type": "transcription"}}),
        "invalid_value",
        "session.type",
        "evt-1",
    ),
    (
        "append-no-audio",
        '{"type": "input_audio_buffer.append", "event_id": "a1"}',
        "missing_required_parameter",
        "audio",
        "a1",
    ),
    (
        "append-bad-base64",
        '{"type": "input_audio_buffer.append", "audio": "@@@"}',
        "invalid_value",
        "audio",
        None,
    ),
    (
        "truncate-type",
        '{"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": "x"}',
        "invalid_type",
        "audio_end_ms",
        None,
    ),
    (
        "item-role",
        json.dumps(
            {
                "type": "conversation.item.create",
                "event_id": "c1",
                "item": {"type": "message", "role": "bot", "content": []},
            }
        ),
        "invalid_value",
        "item.role",
        "c1",
    ),
    (
        "response-beta-key",
        json.dumps({"type": "response.create", "event_id": "r1", "response": {"modalities": ["audio"]}}),
        "unknown_parameter",
        "response.modalities",
        "r1",
    ),
    ("webrtc-only", '{"type": "output_audio_buffer.clear", "event_id": "o1"}', "invalid_event", "type", "o1"),
    (
        "long-event-id",
        json.dumps({"type": "input_audio_buffer.clear", "event_id": "e" * 600}),
        "string_above_max_length",
        "event_id",
        "e" * 512,
    ),
    (
        "unknown-item",
        '{"type": "conversation.item.delete", "item_id": "item_nope", "event_id": "d1"}',
        "item_not_found",
        "item_id",
        "d1",
    ),
    (
        "unknown-previous-item",
        json.dumps(
            {
                "type": "conversation.item.create",
                "event_id": "c2",
                "previous_item_id": "item_nope",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]},
            }
        ),
        "item_not_found",
        "previous_item_id",
        "c2",
    ),
]


async def still_open(conn: AsyncRealtimeConnection) -> None:
    """The connection still works: a valid session.update is answered."""
    await conn.session.update(session={"type": "realtime", "instructions": "still here"})
    updated = (await until(conn, "session.updated"))[-1]
    assert updated.session.instructions == "still here"


@pytest.mark.parametrize(
    ("frame", "code", "param", "event_id"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_event_gets_an_error_and_the_socket_stays_open(
    client: AsyncOpenAI, frame: str, code: str, param: str | None, event_id: str | None
) -> None:
    """Each malformed or refused client event yields one error with the right code, param and event_id."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn)
        await conn.send_raw(frame)
        events = await until(conn, "error")
        await still_open(conn)
    assert [e.type for e in events] == ["error"]
    error = events[0].error
    assert (error.type, error.code, error.param, error.event_id) == (
        "invalid_request_error",
        code,
        param,
        event_id,
    )
    assert error.message


async def test_commit_of_a_too_short_buffer_is_refused(client: AsyncOpenAI) -> None:
    """input_audio_buffer_commit_empty below 100 ms, with the buffered duration in the message."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await send_audio(conn, silence(60))
        await conn.input_audio_buffer.commit(event_id="commit-1")
        error = (await until(conn, "error"))[-1].error
        await still_open(conn)
    assert error.code == "input_audio_buffer_commit_empty" and error.event_id == "commit-1"
    assert error.message.endswith("but buffer only has 60.00ms of audio.")


async def test_voice_cannot_change_after_the_coach_spoke(client: AsyncOpenAI) -> None:
    """The voice is locked once assistant audio exists; before that it can change."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(
            conn, {**MANUAL, "audio": {"input": {"turn_detection": None}, "output": {"voice": "marin"}}}
        )
        await send_audio(conn, speech(2))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        await until(conn, "response.done")
        await conn.session.update(session={"type": "realtime", "audio": {"output": {"voice": "cedar"}}})
        error = (await until(conn, "error"))[-1].error
        await still_open(conn)
    assert error.code == "cannot_update_voice" and error.param == "session.audio.output.voice"


async def test_pretty_printed_events_are_accepted(client: AsyncOpenAI) -> None:
    """Multi-line JSON (what the SDK sends for pydantic models) is a valid frame."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn)
        await conn.send_raw(json.dumps({"type": "session.update", "session": {"type": "realtime"}}, indent=2))
        events = await until(conn, "session.updated", "error")
    assert [e.type for e in events] == ["session.updated"]
