"""The Realtime socket's pure parts: the client-event policy, G.711 expansion and the tap's timelines."""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from relay.integrations.formats import AudioFormat, audio_format, to_pcm16
from relay.integrations.policy import ClientEventError, admit_client_event, error_event
from relay.integrations.tap import RecordingTap
from relay.model import protocol
from relay.session.transcripts import TranscriptBook
from storage.ports import Speaker, TranscriptEvent

MODEL = "gpt-realtime"


def admit(event: dict[str, Any]) -> dict[str, Any] | ClientEventError:
    return admit_client_event(json.dumps(event), model=MODEL)


@pytest.mark.parametrize(
    "event",
    [
        {"type": "session.update", "session": {"type": "realtime", "instructions": "Speak slowly."}},
        {"type": "session.update", "session": {"type": "realtime", "model": MODEL}},
        {"type": "session.update", "session": {"type": "realtime", "tools": [
            {"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}},
        {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "format": {"type": "audio/pcmu"}, "transcription": {"model": "gpt-4o-transcribe"}}}}},
        {"type": "response.create", "response": {"instructions": "Say hi."}},
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0\0" * 480).decode()},
        {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 10},
    ],
)  # fmt: skip
def test_events_that_change_only_the_conversation_are_forwarded_unchanged(event: dict[str, Any]) -> None:
    """What a client may change passes the policy as the same event."""
    assert admit(event) == event


def test_a_malformed_frame_is_refused_as_openai_would() -> None:
    """Not JSON, no type and binary frames get OpenAI's own error codes (shared with the simulator)."""
    assert isinstance(refused := admit_client_event("{", model=MODEL), ClientEventError)
    assert refused.code == "invalid_json"
    missing = admit({"event_id": "e1"})
    assert (
        isinstance(missing, ClientEventError) and missing.code == "invalid_event" and missing.event_id == "e1"
    )
    binary = admit_client_event(b"{}", model=MODEL)
    assert isinstance(binary, ClientEventError) and binary.code == "invalid_event"


def test_an_mcp_item_and_tool_choice_are_refused() -> None:
    """MCP reaches outside the conversation on Parley's account, in items and in tool_choice."""
    item = admit({"type": "conversation.item.create", "item": {"type": "mcp_approval_response",
                  "id": "item_m", "approval_request_id": "a", "approve": True}})  # fmt: skip
    assert isinstance(item, ClientEventError) and item.code == "tool_not_allowed"
    choice = admit({"type": "session.update", "session": {"type": "realtime",
                    "tool_choice": {"type": "mcp", "server_label": "x"}}})  # fmt: skip
    assert isinstance(choice, ClientEventError) and choice.param == "session.tool_choice"


def test_the_error_event_has_openais_shape_and_echoes_the_client_event_id() -> None:
    """A refusal becomes an ``error`` server event the SDK's own type accepts."""
    from relay.simulator.validation import server_event_problems

    refused = admit(
        {"type": "session.update", "event_id": "evt_9", "session": {"type": "realtime", "model": "x"}}
    )
    assert isinstance(refused, ClientEventError)
    event = error_event(refused)
    assert event["error"]["event_id"] == "evt_9" and event["error"]["code"] == "model_not_allowed"
    assert server_event_problems(event) == []


def test_g711_expands_exactly_like_the_reference_codec() -> None:
    """Every μ-law and A-law code decodes to the sample Python's own audioop gives (the reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    codes = bytes(range(256))
    assert to_pcm16(codes, AudioFormat("audio/pcmu", 8000)) == audioop.ulaw2lin(codes, 2)
    assert to_pcm16(codes, AudioFormat("audio/pcma", 8000)) == audioop.alaw2lin(codes, 2)


def test_formats_are_read_with_their_rates() -> None:
    """pcm keeps its rate; G.711 is 8 kHz; anything else keeps the previous format."""
    previous = AudioFormat("audio/pcm", 24000)
    assert audio_format({"type": "audio/pcm", "rate": 24000}) == previous
    assert audio_format({"type": "audio/pcmu"}) == AudioFormat("audio/pcmu", 8000)
    assert audio_format({"type": "audio/opus"}, previous) is previous
    assert audio_format(None, previous) is previous


class Taken:
    """A recorder that keeps what the tap hands it (the tap is under test, not the recorder)."""

    def __init__(self) -> None:
        self.audio: list[tuple[str, int, int, int]] = []
        self.segments: list[TranscriptEvent] = []

    def learner_audio(self, pcm: bytes, *, sample_rate: int, at_ms: int) -> None:
        self.audio.append(("learner", at_ms, len(pcm) // 2, sample_rate))

    def coach_audio(self, pcm: bytes, *, sample_rate: int, at_ms: int) -> None:
        self.audio.append(("coach", at_ms, len(pcm) // 2, sample_rate))

    def upstream_event(self, event: object, *, at_ms: int) -> None:
        pass

    async def transcript(self, event: TranscriptEvent) -> str:
        self.segments.append(event)
        return f"seg_{len(self.segments)}"

    async def history(self) -> Sequence[tuple[Speaker, str]]:
        return []


class Clock:
    def __init__(self) -> None:
        self.ms = 0

    def __call__(self) -> int:
        return self.ms


def make_tap() -> tuple[RecordingTap, Taken, Clock, list[dict[str, Any]], list[Awaitable[None]]]:
    taken, clock, sent, spawned = Taken(), Clock(), [], []
    book = TranscriptBook(
        taken,
        send=sent.append,
        spawn=lambda work, role: spawned.append(work),
        now_ms=clock,  # type: ignore[arg-type]
    )
    return (
        RecordingTap(recorder=taken, book=book, now_ms=clock, send=sent.append),
        taken,
        clock,
        sent,
        spawned,
    )  # type: ignore[arg-type]


def append(ms: int, rate: int = 24000) -> dict[str, Any]:
    return {
        "type": "input_audio_buffer.append",
        "audio": base64.b64encode(bytes(2 * rate * ms // 1000)).decode(),
    }


def test_learner_audio_sent_faster_than_real_time_is_placed_back_to_back() -> None:
    """A file streamed in one burst lands contiguously, not on top of itself."""
    tap, taken, clock, _, _ = make_tap()
    clock.ms = 100
    for _ in range(3):
        tap.client_event(append(40))
    assert [a[1] for a in taken.audio] == [100, 140, 180]


def test_a_pause_in_learner_audio_starts_again_at_its_arrival() -> None:
    """Audio after a pause is placed when it arrived: the pause stays a gap, never filled."""
    tap, taken, clock, _, _ = make_tap()
    tap.client_event(append(20))
    clock.ms = 500
    tap.client_event(append(20))
    assert [a[1] for a in taken.audio] == [0, 500]


def test_odd_chunk_sizes_do_not_drift_the_timeline() -> None:
    """Chunks of 85.33 ms keep exact sample time: 30 of them end at 2560 ms, not 30 x 85."""
    tap, taken, _, _, _ = make_tap()
    chunk = {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(4096)).decode()}
    for _ in range(30):
        tap.client_event(chunk)
    last = taken.audio[-1]
    assert last[1] + last[2] * 1000 // 24000 in (2559, 2560)


async def test_a_client_truncation_cuts_the_coach_transcript_to_what_was_heard() -> None:
    """The client says it played 500 ms of a 1000 ms answer: half the words are stored, marked truncated."""
    tap, taken, clock, sent, spawned = make_tap()
    item = {"id": "item_A", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    events = [
        {"type": "response.output_item.added", "event_id": "e1", "response_id": "r1", "output_index": 0,
         "item": item},
        {"type": "response.output_audio.delta", "event_id": "e2", "response_id": "r1", "item_id": "item_A",
         "output_index": 0, "content_index": 0, "delta": base64.b64encode(bytes(48000)).decode()},
        {"type": "response.output_audio_transcript.delta", "event_id": "e3", "response_id": "r1",
         "item_id": "item_A", "output_index": 0, "content_index": 0, "delta": "one two three four"},
    ]  # fmt: skip
    for event in events:
        tap.server_event(protocol.decode(json.dumps(event)))
    assert taken.audio == [("coach", 0, 24000, 24000)]
    assert sent[0] == {"type": "coach.speaking", "item_id": "item_A"}
    tap.client_event({"type": "conversation.item.truncate", "item_id": "item_A", "content_index": 0,
                      "audio_end_ms": 500})  # fmt: skip
    for work in spawned:
        await work
    assert [(s.text, s.truncated, s.end_ms) for s in taken.segments] == [("one two", True, 500)]
    assert sent[-1]["type"] == "transcript.final" and sent[-1]["item_id"] == "item_A"
