"""The Sans-I/O protocol core: encoders checked with the SDK's client types, decoder with the simulator."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

import pydantic
import pytest
from openai.types.realtime import (
    ConversationItemAdded,
    RealtimeClientEvent,
    RealtimeConversationItemUserMessage,
    ResponseContentPartDoneEvent,
)
from pydantic import Field, TypeAdapter

from relay.model import protocol
from relay.model.protocol import HistoryItem, MalformedEvent, UnknownEvent, decode
from relay.simulator.state import RealtimeSession, StreamResponse, TranscribeLater
from tests.realtime_checks import unknown_keys
from tests.simulator.audio import frames, silence, speech

CLIENT_TA: TypeAdapter[Any] = TypeAdapter(Annotated[RealtimeClientEvent, Field(discriminator="type")])
VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 200}


def assert_valid_client_event(event: dict[str, Any]) -> None:
    """Strict check of one encoded event: the SDK's client union (REALTIME.md §7) and no unknown keys."""
    wire = json.loads(json.dumps(event))
    model = CLIENT_TA.validate_python(wire)
    assert model.type == event["type"]
    assert unknown_keys(model) == []


@pytest.mark.parametrize(
    "event",
    [
        protocol.audio_append(b"\x01\x00" * 480),
        protocol.session_update(instructions="Talk about travel.", turn_detection=VAD),
        protocol.session_update(
            instructions="", turn_detection=None, voice="marin", transcription_model=None
        ),
        protocol.truncate("item_abc", 1234),
        *protocol.replay_items([HistoryItem("learner", "Hello"), HistoryItem("coach", "Hi, how are you?")]),
    ],
    ids=lambda e: e["type"],
)
def test_encoded_events_validate_against_the_sdk_client_types(event: dict[str, Any]) -> None:
    """Every encoder produces a GA client event the SDK's own types accept, with no unknown keys."""
    assert_valid_client_event(event)


def test_audio_append_is_base64_pcm() -> None:
    """input_audio_buffer.append carries the pcm bytes base64-encoded; odd or empty input is refused."""
    pcm = bytes(range(256)) * 2
    event = protocol.audio_append(pcm)
    assert event["type"] == "input_audio_buffer.append" and base64.b64decode(event["audio"]) == pcm
    for bad in (b"", b"\x00"):
        with pytest.raises(ValueError):
            protocol.audio_append(bad)


def test_session_update_has_the_ga_shape() -> None:
    """session.update: type realtime, pcm 24 kHz in and out, transcription model, turn detection, voice."""
    event = protocol.session_update(instructions="Be brief.", turn_detection=VAD, voice="verse")
    assert event == {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "output_modalities": ["audio"],
            "instructions": "Be brief.",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": "gpt-4o-mini-transcribe"},
                    "turn_detection": VAD,
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "verse"},
            },
        },
    }
    manual = protocol.session_update(instructions="x", turn_detection=None)
    assert '"turn_detection": null' in json.dumps(manual)


def test_truncate_targets_content_zero() -> None:
    """conversation.item.truncate cuts content part 0 at the played position; bad arguments are refused."""
    assert protocol.truncate("item_1", 250) == {
        "type": "conversation.item.truncate",
        "item_id": "item_1",
        "content_index": 0,
        "audio_end_ms": 250,
    }
    with pytest.raises(ValueError):
        protocol.truncate("item_1", -1)
    with pytest.raises(ValueError):
        protocol.truncate("", 0)


def test_replay_items_chain_text_messages_from_root() -> None:
    """History becomes user input_text / assistant output_text items chained by previous_item_id."""
    history = [
        HistoryItem("coach", "Hello! Where did you travel?"),
        HistoryItem("learner", "  To Lisbon.  "),
        HistoryItem("learner", "   "),
        HistoryItem("coach", "Lovely."),
    ]
    events = protocol.replay_items(history)
    assert [e["previous_item_id"] for e in events] == ["root", "replay_00000", "replay_00001"]
    assert [e["item"]["id"] for e in events] == ["replay_00000", "replay_00001", "replay_00002"]
    assert [(e["item"]["role"], e["item"]["content"]) for e in events] == [
        ("assistant", [{"type": "output_text", "text": "Hello! Where did you travel?"}]),
        ("user", [{"type": "input_text", "text": "To Lisbon."}]),
        ("assistant", [{"type": "output_text", "text": "Lovely."}]),
    ]
    assert protocol.replay_items([]) == []


def test_replayed_items_are_accepted_by_the_simulator_in_order() -> None:
    """The simulator (GA rules: no client-made assistant audio) accepts the replay and keeps its order."""
    session = RealtimeSession(model="gpt-realtime", strict=True)
    session.start()
    session.drain()
    history = [HistoryItem("learner", "One"), HistoryItem("coach", "Two"), HistoryItem("learner", "Three")]
    added = []
    for event in protocol.replay_items(history):
        session.receive(json.dumps(event))
        events, _ = session.drain()
        assert [e["type"] for e in events] == ["conversation.item.added", "conversation.item.done"]
        added.append(events[0])
    assert [(e["previous_item_id"], e["item"]["id"]) for e in added] == [
        (None, "replay_00000"),
        ("replay_00000", "replay_00001"),
        ("replay_00001", "replay_00002"),
    ]


# ------------------------------------------------------------------------------------------ decode


def _simulated_traffic() -> list[dict[str, Any]]:
    """Server events of a Sans-I/O simulator session that exercises every kind of event it emits."""
    session = RealtimeSession(model="gpt-realtime", strict=True)
    out: list[dict[str, Any]] = []

    def pump() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while True:
            events, actions = session.drain()
            got += events
            if not actions:
                out.extend(got)
                return got
            for action in actions:
                if isinstance(action, StreamResponse):
                    while not session.advance_response(action.response_id):
                        pass
                elif isinstance(action, TranscribeLater):
                    session.transcribe(action.item_id)

    def send(**event: Any) -> list[dict[str, Any]]:
        session.receive(json.dumps(event))
        return pump()

    session.start()
    pump()
    update = protocol.session_update(
        instructions="Talk about travel.", turn_detection={**VAD, "idle_timeout_ms": 5000}
    )
    send(**update)
    turn = [
        e for f in frames(speech(3) + silence(800)) for e in send(type="input_audio_buffer.append", audio=f)
    ]
    for f in frames(silence(20_000), 100):  # past the answer's playback plus idle_timeout_ms
        send(type="input_audio_buffer.append", audio=f)
    answer = next(e for e in turn if e["type"] == "response.output_item.done")["item"]["id"]
    send(**protocol.truncate(answer, 100))
    send(type="conversation.item.retrieve", item_id=answer)
    send(type="conversation.item.delete", item_id=answer)
    send(type="input_audio_buffer.clear")
    send(type="response.create", response={"output_modalities": ["text"], "conversation": "none"})
    send(type="response.cancel")  # nothing active: error response_cancel_not_active
    session.expire(60)
    pump()
    return out


SIMULATED = _simulated_traffic()
EMITTED = {
    "session.created",
    "session.updated",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "input_audio_buffer.cleared",
    "input_audio_buffer.timeout_triggered",
    "conversation.item.added",
    "conversation.item.done",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.truncated",
    "conversation.item.retrieved",
    "conversation.item.deleted",
    "response.created",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_audio.delta",
    "response.output_audio_transcript.delta",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.done",
    "rate_limits.updated",
    "error",
}


def test_simulated_traffic_covers_every_event_type_the_simulator_emits() -> None:
    """The traffic below exercises all 28 server event types the simulator can send."""
    assert {e["type"] for e in SIMULATED} == EMITTED


@pytest.mark.parametrize("kind", sorted(EMITTED))
def test_decode_every_simulator_event_type_strictly(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """Each simulator event decodes from text and bytes to the SDK model of its type, without fallback."""
    caplog.set_level("DEBUG", logger="relay.model.protocol")
    samples = [e for e in SIMULATED if e["type"] == kind]
    for sample in samples:
        raw = json.dumps(sample)
        for frame in (raw, raw.encode()):
            event = decode(frame)
            assert type(event) is protocol.KNOWN_TYPES[kind]
            assert isinstance(event, pydantic.BaseModel)
            assert event.type == kind and getattr(event, "event_id", None) == sample["event_id"]
    assert "lenient_decode" not in caplog.messages


def test_decode_accepts_an_sdk_parsed_event() -> None:
    """decode also takes an event the SDK already parsed (a pydantic model) and gives the same event."""
    sample = next(e for e in SIMULATED if e["type"] == "response.done")
    parsed = decode(json.dumps(sample))
    assert isinstance(parsed, pydantic.BaseModel)
    again = decode(parsed)
    assert type(again) is type(parsed) and again == parsed


def test_unknown_type_becomes_unknown_event() -> None:
    """A type the SDK does not know is not an error: it decodes to UnknownEvent with its type and id."""
    event = decode('{"type": "totally.new_thing", "event_id": "event_1", "payload": {"x": 1}}')
    assert isinstance(event, UnknownEvent)
    assert (event.type, event.event_id, dict(event.data)["payload"]) == (
        "totally.new_thing",
        "event_1",
        {"x": 1},
    )
    assert "payload" not in repr(event)


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"event_id": "e"}', '{"type": 5}', b"\xff\xfe"])
def test_malformed_frames_raise_malformed_event(raw: str | bytes) -> None:
    """A frame that is not a JSON object with a string type raises MalformedEvent (a ValueError)."""
    with pytest.raises(MalformedEvent):
        decode(raw)


def test_decode_tolerates_extra_fields_and_missing_object() -> None:
    """Extra fields (obfuscation, future keys) are kept; items without ``object`` decode fine."""
    added = next(e for e in SIMULATED if e["type"] == "conversation.item.added")
    item = {k: v for k, v in added["item"].items() if k != "object"}
    event = decode(json.dumps({**added, "item": item, "obfuscation": "abc", "future_key": 1}))
    assert type(event) is protocol.KNOWN_TYPES["conversation.item.added"]
    assert event.model_extra == {"obfuscation": "abc", "future_key": 1}
    assert isinstance(event, ConversationItemAdded)
    assert isinstance(event.item, RealtimeConversationItemUserMessage) and event.item.object is None


@pytest.mark.parametrize(
    ("wire", "read"), [("audio", "audio"), ("output_audio", "audio"), ("output_text", "text")]
)
def test_content_part_type_audio_or_output_audio(wire: str, read: str) -> None:
    """response.content_part.* parts typed output_audio / output_text (seen from some GA clients) decode."""
    sample = next(e for e in SIMULATED if e["type"] == "response.content_part.done")
    event = decode(json.dumps({**sample, "part": {**sample["part"], "type": wire}}))
    assert type(event) is protocol.KNOWN_TYPES["response.content_part.done"]
    assert isinstance(event, ResponseContentPartDoneEvent) and event.part.type == read


def test_invalid_known_event_is_built_leniently(caplog: pytest.LogCaptureFixture) -> None:
    """A known type that fails validation still decodes (as the SDK does), logging locations, not values."""
    caplog.set_level("DEBUG", logger="relay.model.protocol")
    event = decode('{"type": "response.output_audio.delta", "event_id": "e1", "delta": 12345}')
    assert type(event) is protocol.KNOWN_TYPES["response.output_audio.delta"]
    assert event.type == "response.output_audio.delta"
    (record,) = [r for r in caplog.records if r.getMessage() == "lenient_decode"]
    assert "12345" not in str(record.__dict__)
