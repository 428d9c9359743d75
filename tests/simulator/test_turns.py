"""Turns driven with the official SDK: server VAD, semantic VAD, manual commit, transcription, answers."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from openai import AsyncOpenAI

from relay.simulator import SimulatorServer

from .audio import BYTES_PER_MS, silence, speech, tone
from .conftest import MakeClient, MakeSim
from .flow import MANUAL, audio_of, ready, send_audio, types_of, until, without_deltas

TURN = [
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "conversation.item.added",
    "conversation.item.done",
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
    "rate_limits.updated",
]
TOPIC = (
    "You are a friendly English coach. Topic: travel. Ask the learner: Where did you go on your last holiday?"
)


def vad(**fields: Any) -> dict[str, Any]:
    return {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad", **fields}}}}


async def test_server_vad_turn_follows_the_ga_event_order(client: AsyncOpenAI) -> None:
    """A spoken turn under the default server VAD yields the §3.4 event sequence with consistent ids."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn)
        await send_audio(conn, silence(400) + speech(5) + silence(600))
        events = await until(conn, "rate_limits.updated")
    assert without_deltas(events) == TURN
    started, stopped, committed, user_added, _, created, out_added, item_added = events[:8]
    user_id = started.item_id
    assert stopped.item_id == committed.item_id == user_added.item.id == user_id
    assert item_added.previous_item_id == user_id
    assert out_added.item.id == item_added.item.id
    assert created.response.status == "in_progress" and created.response.output == []
    done = next(e for e in events if e.type == "response.done")
    assert done.response.status == "completed"
    assert re.fullmatch(r"resp_[0-9A-Za-z]{21}", done.response.id or "")


@pytest.mark.parametrize(
    ("prefix_ms", "silence_ms", "start_ms", "end_ms"),
    [(300, 200, 700, 2000), (100, 500, 900, 2300)],
)
async def test_vad_times_honour_prefix_padding_and_silence_duration(
    client: AsyncOpenAI, prefix_ms: int, silence_ms: int, start_ms: int, end_ms: int
) -> None:
    """speech_started/stopped carry audio_start_ms = onset - prefix and audio_end_ms = offset + silence."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(
            conn, vad(prefix_padding_ms=prefix_ms, silence_duration_ms=silence_ms, create_response=False)
        )
        await send_audio(conn, silence(1000) + tone(800, -20) + silence(800))
        events = await until(conn, "conversation.item.done")
    started, stopped = events[0], events[1]
    assert started.type == "input_audio_buffer.speech_started"
    assert started.audio_start_ms == start_ms
    assert stopped.audio_end_ms == end_ms


@pytest.mark.parametrize(("threshold", "heard"), [(0.5, False), (0.3, True)])
async def test_vad_threshold_decides_what_counts_as_speech(
    client: AsyncOpenAI, threshold: float, heard: bool
) -> None:
    """A -45 dBFS voice is below threshold 0.5 (-40 dBFS) but above threshold 0.3 (-50 dBFS)."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, vad(threshold=threshold, create_response=False))
        await send_audio(conn, silence(200) + tone(600, -45) + silence(400))
        await conn.input_audio_buffer.commit()
        events = await until(conn, "input_audio_buffer.committed")
    assert ("input_audio_buffer.speech_started" in types_of(events)) is heard


@pytest.mark.parametrize(("silence_ms", "turns"), [(500, 1), (200, 2)])
async def test_a_pause_splits_turns_only_when_longer_than_the_silence_window(
    client: AsyncOpenAI, silence_ms: int, turns: int
) -> None:
    """A 300 ms pause inside speech ends the turn with silence_duration_ms 200 but not with 500."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, vad(silence_duration_ms=silence_ms, create_response=False))
        await send_audio(conn, tone(500, -20) + silence(300) + tone(500, -20) + silence(700))
        await conn.input_audio_buffer.clear()
        events = await until(conn, "input_audio_buffer.cleared")
    assert types_of(events).count("input_audio_buffer.speech_stopped") == turns


@pytest.mark.parametrize(("eagerness", "window_ms"), [("high", 250), ("auto", 500), ("low", 1000)])
async def test_semantic_vad_maps_eagerness_to_a_silence_window(
    client: AsyncOpenAI, eagerness: str, window_ms: int
) -> None:
    """semantic_vad is accepted, echoed with defaults, and ends a turn after its eagerness's window."""
    semantic = {"type": "semantic_vad", "eagerness": eagerness, "create_response": False}
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn)
        await conn.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": semantic}}}
        )
        updated = (await until(conn, "session.updated"))[-1]
        await send_audio(conn, silence(500) + tone(600, -20) + silence(1200))
        events = await until(conn, "input_audio_buffer.speech_stopped")
    detection = updated.session.audio.input.turn_detection
    assert detection.type == "semantic_vad" and detection.interrupt_response is True
    assert events[-1].audio_end_ms == 1100 + window_ms


async def test_manual_commit_turn_waits_for_response_create(client: AsyncOpenAI) -> None:
    """With turn_detection null, commit makes the user item and only response.create starts the answer."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await send_audio(conn, speech(4) + silence(500))
        await conn.input_audio_buffer.commit(event_id="commit-1")
        committed = await until(conn, "conversation.item.done")
        await conn.response.create()
        answer = await until(conn, "rate_limits.updated")
    assert types_of(committed) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert committed[0].previous_item_id is None
    assert without_deltas(answer) == TURN[5:]
    assert answer[2].previous_item_id == committed[0].item_id


async def test_input_audio_is_kept_on_the_user_item(client: AsyncOpenAI) -> None:
    """conversation.item.retrieve returns exactly the audio between audio_start_ms and audio_end_ms."""
    pcm = silence(1000) + tone(800, -20) + silence(800)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, vad(create_response=False))
        await send_audio(conn, pcm)
        events = await until(conn, "conversation.item.done")
        await conn.conversation.item.retrieve(item_id=events[0].item_id)
        retrieved = (await until(conn, "conversation.item.retrieved"))[-1]
    content = retrieved.item.content[0]
    assert content.type == "input_audio"
    assert base64.b64decode(content.audio) == pcm[700 * BYTES_PER_MS : 2000 * BYTES_PER_MS]


@pytest.mark.parametrize("model", ["gpt-4o-mini-transcribe", "whisper-1"])
async def test_transcription_events_follow_each_user_item(client: AsyncOpenAI, model: str) -> None:
    """With transcription on, each user item gets deltas and a completed placeholder transcript."""
    session = {"type": "realtime", "audio": {"input": {"transcription": {"model": model}}}}
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, session)
        await send_audio(conn, speech(6) + silence(600))
        events = await until(conn, "conversation.item.input_audio_transcription.completed")
    item_id = events[0].item_id
    deltas = [e for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    completed = events[-1]
    assert all(d.item_id == item_id for d in deltas) and completed.item_id == item_id
    transcript = completed.transcript
    assert "".join(d.delta or "" for d in deltas) == transcript
    match = re.fullmatch(r"\[simulated speech, (\d+\.\d) s\]((?: blah)+)", transcript)
    assert match is not None
    assert len(match.group(2).split()) == max(1, round(float(match.group(1)) * 1000 / 400))
    usage = completed.usage
    if model == "whisper-1":
        assert usage.type == "duration" and usage.seconds > 2
    else:
        assert usage.type == "tokens" and usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_coach_answer_uses_the_instructions_and_speaks_at_a_normal_rate(client: AsyncOpenAI) -> None:
    """The answer asks the topic's question; its 24 kHz pcm16 audio runs at about 150 words a minute."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, {"type": "realtime", "instructions": TOPIC})
        await send_audio(conn, speech(4) + silence(600))
        events = await until(conn, "response.done")
    transcript_deltas = [e.delta for e in events if e.type == "response.output_audio_transcript.delta"]
    done = next(e for e in events if e.type == "response.output_audio_transcript.done")
    assert "".join(transcript_deltas) == done.transcript
    assert "Where did you go on your last holiday?" in done.transcript
    audio = audio_of(events)
    seconds = len(audio) / 2 / 24000
    words_per_minute = len(done.transcript.split()) / seconds * 60
    assert len(audio) % 2 == 0 and 120 <= words_per_minute <= 180
    response = events[-1].response
    assert response.audio.output.format.type == "audio/pcm" and response.audio.output.format.rate == 24000


async def test_usage_adds_up_and_rate_limits_follow_the_response(client: AsyncOpenAI) -> None:
    """response.done usage: total = input + output and every detail block sums to its total."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        for _ in range(2):
            await send_audio(conn, speech(3))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            events = await until(conn, "rate_limits.updated")
    usage = events[-2].response.usage
    inp, out = usage.input_token_details, usage.output_token_details
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens == inp.text_tokens + inp.audio_tokens + inp.image_tokens
    cached = inp.cached_tokens_details
    assert 0 < inp.cached_tokens == cached.text_tokens + cached.audio_tokens + cached.image_tokens
    assert usage.output_tokens == out.text_tokens + out.audio_tokens
    limits = events[-1].rate_limits
    assert [limit.name for limit in limits] == ["tokens"] and 0 <= limits[0].remaining < limits[0].limit


async def test_text_modality_streams_output_text(client: AsyncOpenAI) -> None:
    """output_modalities ['text'] answers with output_text deltas and a text part, and no audio."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, {**MANUAL, "output_modalities": ["text"]})
        await conn.response.create()
        events = await until(conn, "response.done")
    kinds = types_of(events)
    assert "response.output_audio.delta" not in kinds and "response.output_text.delta" in kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert next(e for e in events if e.type == "response.output_text.done").text == text
    assert events[-1].response.output[0].content[0].type == "output_text"


async def test_out_of_band_response_leaves_the_conversation_alone(client: AsyncOpenAI) -> None:
    """conversation 'none' gives conversation_id null, echoes metadata and adds no conversation item."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await conn.response.create(response={"conversation": "none", "metadata": {"purpose": "rating"}})
        events = await until(conn, "response.done")
    assert "conversation.item.added" not in types_of(events)
    created, done = events[0], events[-1]
    assert created.response.conversation_id is None
    assert done.response.metadata == {"purpose": "rating"}


async def test_max_output_tokens_cuts_the_answer_short(client: AsyncOpenAI) -> None:
    """A small max_output_tokens ends the response 'incomplete' for reason max_output_tokens."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await conn.response.create(response={"max_output_tokens": 40})
        done = (await until(conn, "response.done"))[-1]
    assert done.response.status == "incomplete"
    assert done.response.status_details.reason == "max_output_tokens"
    assert done.response.usage.output_tokens <= 40


async def test_conversation_items_can_be_created_retrieved_and_deleted(client: AsyncOpenAI) -> None:
    """item.create answers added + done, retrieve returns the item, delete removes it."""
    text_item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn)
        await conn.conversation.item.create(item=text_item)
        first = await until(conn, "conversation.item.done")
        item_id = first[-1].item.id
        await conn.conversation.item.create(item=text_item, previous_item_id="root")
        second = await until(conn, "conversation.item.done")
        await conn.conversation.item.retrieve(item_id=item_id)
        retrieved = (await until(conn, "conversation.item.retrieved"))[-1]
        await conn.conversation.item.delete(item_id=item_id)
        deleted = (await until(conn, "conversation.item.deleted"))[-1]
    assert types_of(first) == ["conversation.item.added", "conversation.item.done"]
    assert first[0].previous_item_id is None and second[0].previous_item_id is None
    assert retrieved.item.content[0].text == "Hello"
    assert deleted.item_id == item_id


async def test_same_seed_gives_the_same_voice(make_sim: MakeSim, make_client: MakeClient) -> None:
    """The coach's audio is deterministic for a seed and changes with sim_seed."""
    sim: SimulatorServer = await make_sim(seed=5)
    client = make_client(sim)
    answers = []
    for query in ({}, {}, {"sim_seed": "6"}):
        async with client.realtime.connect(model="gpt-realtime", extra_query=query) as conn:
            await ready(conn, MANUAL)
            await conn.response.create()
            answers.append(audio_of(await until(conn, "response.done")))
    assert answers[0] == answers[1] != answers[2]


async def test_coach_audio_looped_back_is_one_vad_turn(client: AsyncOpenAI) -> None:
    """The coach's voice is speech to the energy VAD, and one whole answer reads as a single turn."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, MANUAL)
        await conn.response.create()
        coach = audio_of(await until(conn, "response.done"))
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, vad(create_response=False))
        await send_audio(conn, silence(300) + coach + silence(600))
        await conn.input_audio_buffer.clear()
        events = await until(conn, "input_audio_buffer.cleared")
    kinds = types_of(events)
    assert kinds[0] == "input_audio_buffer.speech_started"
    assert (
        kinds.count("input_audio_buffer.speech_started")
        == kinds.count("input_audio_buffer.speech_stopped")
        == 1
    )
    stopped = events[1]
    assert abs(stopped.audio_end_ms - (300 + len(coach) / 48 + 200)) <= 20


async def test_idle_timeout_prompts_the_model_after_silence(client: AsyncOpenAI) -> None:
    """server_vad idle_timeout_ms: silence after an answer triggers timeout_triggered and a new response."""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await ready(conn, vad(idle_timeout_ms=500))
        await conn.response.create()
        await until(conn, "rate_limits.updated")
        await send_audio(conn, silence(30_000))
        events = await until(conn, "response.created")
    assert types_of(events)[:4] == [
        "input_audio_buffer.timeout_triggered",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    triggered = events[0]
    assert triggered.audio_end_ms > triggered.audio_start_ms
