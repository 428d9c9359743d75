"""Barge-in, cancellation and truncation, driven with the official SDK."""

from __future__ import annotations

import base64

from openai import AsyncOpenAI

from .audio import silence, speech, tone
from .conftest import MakeClient, MakeSim
from .flow import MANUAL, audio_of, ready, send_audio, types_of, until, without_deltas

CANCELLED = [
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
    "rate_limits.updated",
]


async def test_speech_during_an_answer_cancels_it_and_truncate_cuts_the_item(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    """Barge-in: speech_started, the answer ends 'cancelled'/turn_detected, truncate shortens its audio."""
    sim = await make_sim(realtime_pacing=True, chunk_ms=50)
    async with make_client(sim).realtime.connect(model="gpt-realtime") as conn:
        await ready(conn)
        await send_audio(conn, speech(3) + silence(400))
        await until(conn, "response.created")
        streamed = []
        while len([e for e in streamed if e.type == "response.output_audio.delta"]) < 4:
            streamed += await until(conn, "response.output_audio.delta")
        await send_audio(conn, tone(600, -20))
        barge = await until(conn, "rate_limits.updated")
        item_id = streamed[-1].item_id
        played_ms = len(audio_of(streamed + barge)) // 48 - 20
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=played_ms)
        truncated = await until(conn, "conversation.item.truncated")
        await conn.conversation.item.retrieve(item_id=item_id)
        retrieved = (await until(conn, "conversation.item.retrieved"))[-1]
        await send_audio(conn, silence(400))
        next_turn = await until(conn, "response.created")
    assert without_deltas(barge) == ["input_audio_buffer.speech_started", *CANCELLED]
    done = barge[-2].response
    assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
    assert done.output[0].status == "incomplete"
    assert truncated[-1].audio_end_ms == played_ms
    content = retrieved.item.content[0]
    assert len(base64.b64decode(content.audio)) == played_ms * 48 and content.transcript == ""
    assert types_of(next_turn) == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]


async def test_interrupt_response_false_lets_the_answer_finish(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    """With interrupt_response false, speech during an answer does not cancel it."""
    sim = await make_sim(first_audio_ms=400)
    session = {
        "type": "realtime",
        "audio": {"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}},
    }
    async with make_client(sim).realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, session)
        await send_audio(conn, speech(3) + silence(400))
        await until(conn, "response.created")
        await send_audio(conn, tone(500, -20) + silence(300))
        events = await until(conn, "response.done")
    assert "input_audio_buffer.speech_started" in types_of(events)
    assert events[-1].response.status == "completed"
    assert types_of(events).count("response.created") == 0


async def test_response_cancel_then_cancel_again(make_sim: MakeSim, make_client: MakeClient) -> None:
    """response.cancel ends the answer 'cancelled'/client_cancelled; a second cancel errors harmlessly."""
    sim = await make_sim(first_audio_ms=5000)
    async with make_client(sim).realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await conn.response.create()
        await until(conn, "response.content_part.added")
        await conn.response.cancel(event_id="cancel-1")
        cancelled = await until(conn, "rate_limits.updated")
        await conn.response.cancel(event_id="cancel-2")
        error = (await until(conn, "error"))[-1]
    assert without_deltas(cancelled) == CANCELLED
    done = cancelled[-2].response
    assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
    assert error.error.code == "response_cancel_not_active"
    assert error.error.message == "Cancellation failed: no active response found"
    assert error.error.event_id == "cancel-2"


async def test_second_response_create_is_refused_while_one_is_active(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    """conversation_already_has_active_response for a second default response; out-of-band ones may run."""
    sim = await make_sim(first_audio_ms=5000)
    async with make_client(sim).realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await conn.response.create(event_id="first")
        created = (await until(conn, "response.created"))[-1]
        await conn.response.create(event_id="second")
        await conn.response.create(event_id="side", response={"conversation": "none"})
        events = await until(conn, "response.content_part.added")
        events += await until(conn, "response.content_part.added")
    errors = [e for e in events if e.type == "error"]
    assert len(errors) == 1 and errors[0].error.event_id == "second"
    assert errors[0].error.code == "conversation_already_has_active_response"
    assert created.response.id in errors[0].error.message
    side = [e for e in events if e.type == "response.created"]
    assert len(side) == 1 and side[0].response.conversation_id is None


async def test_truncate_refuses_bad_targets(client: AsyncOpenAI) -> None:
    """Truncating past the audio, a user item or an unknown item returns errors naming the parameter."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await send_audio(conn, speech(2))
        await conn.input_audio_buffer.commit()
        user_id = (await until(conn, "input_audio_buffer.committed"))[-1].item_id
        await conn.response.create()
        done = (await until(conn, "response.done"))[-1]
        coach_id = done.response.output[0].id
        await conn.conversation.item.truncate(item_id=coach_id, content_index=0, audio_end_ms=600_000)
        too_long = (await until(conn, "error"))[-1]
        await conn.conversation.item.truncate(item_id=user_id, content_index=0, audio_end_ms=10)
        not_audio = (await until(conn, "error"))[-1]
        await conn.conversation.item.truncate(item_id="item_missing", content_index=0, audio_end_ms=10)
        missing = (await until(conn, "error"))[-1]
    assert too_long.error.param == "audio_end_ms"
    assert too_long.error.message.startswith("Audio content of ")
    assert not_audio.error.message == "Only model output audio messages can be truncated."
    assert missing.error.code == "item_not_found" and missing.error.param == "item_id"
