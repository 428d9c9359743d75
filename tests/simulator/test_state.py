"""The Sans-I/O session on its own: no sockets, no timers, a fake clock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.simulator import state as state_module
from relay.simulator.session import expiry_message
from relay.simulator.state import RealtimeSession, StreamResponse, TranscribeLater
from relay.simulator.validation import SimulatorDriftError

from .audio import frames, silence, speech
from .conftest import assert_valid_server_event


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def send(state: RealtimeSession, **event: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    state.receive(json.dumps(event))
    events, actions = state.drain()
    for e in events:
        assert_valid_server_event(json.dumps(e))
    return events, actions


def stream_all(session: RealtimeSession, response_id: str) -> list[dict[str, Any]]:
    while not session.advance_response(response_id):
        pass
    return session.drain()[0]


def manual_session(clock: Clock | None = None) -> RealtimeSession:
    session = RealtimeSession(model="gpt-realtime", strict=True, clock=clock or Clock())
    session.start()
    session.drain()
    send(
        session,
        type="session.update",
        session={"type": "realtime", "audio": {"input": {"turn_detection": None}}},
    )
    return session


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (3600, "Your session hit the maximum duration of 60 minutes."),
        (60, "Your session hit the maximum duration of 1 minute."),
        (90, "Your session hit the maximum duration of 90 seconds."),
        (5, "Your session hit the maximum duration of 5 seconds."),
        (0.5, "Your session hit the maximum duration of 0.5 seconds."),
    ],
)
def test_expiry_message_keeps_the_real_wording(seconds: float, text: str) -> None:
    """Whole minutes use the real 'N minutes' wording; anything else is said in seconds."""
    assert expiry_message(seconds) == text


def test_start_emits_session_created_only() -> None:
    """session.created is the only event before the client speaks."""
    session = RealtimeSession(model="gpt-realtime", strict=True, expires_at=42)
    session.start()
    events, actions = session.drain()
    assert [e["type"] for e in events] == ["session.created"] and actions == []
    assert events[0]["session"]["expires_at"] == 42 and events[0]["session"]["id"] == session.id


def test_vad_turn_asks_for_streaming_and_transcription() -> None:
    """A VAD-committed turn asks for StreamResponse, and for TranscribeLater when transcription is on."""
    session = RealtimeSession(model="gpt-realtime", strict=True)
    session.start()
    send(
        session,
        type="session.update",
        session={"type": "realtime", "audio": {"input": {"transcription": {}}}},
    )
    actions: list[Any] = []
    for chunk in frames(speech(3) + silence(500)):
        actions += send(session, type="input_audio_buffer.append", audio=chunk)[1]
    assert [type(a) for a in actions] == [TranscribeLater, StreamResponse]
    session.transcribe(actions[0].item_id)
    completed = session.drain()[0][-1]
    assert completed["type"] == "conversation.item.input_audio_transcription.completed"
    assert completed["transcript"].startswith("[simulated speech, ")


def test_cancelled_response_stops_streaming() -> None:
    """After response.cancel, advance_response reports the response over and emits nothing more."""
    session = manual_session()
    _, actions = send(session, type="response.create")
    response_id = actions[0].response_id
    assert session.advance_response(response_id) is False
    session.drain()
    events, _ = send(session, type="response.cancel")
    assert events[-2]["response"]["status"] == "cancelled"
    assert session.advance_response(response_id) is True
    assert session.drain() == ([], [])


def test_rate_limits_count_tokens_in_a_one_minute_window() -> None:
    """remaining drops by each response's total tokens and recovers after 60 s."""
    clock = Clock()
    session = manual_session(clock)
    remaining = []
    for _ in range(2):
        _, actions = send(session, type="response.create")
        events = stream_all(session, actions[0].response_id)
        remaining.append(
            (events[-1]["rate_limits"][0]["remaining"], events[-2]["response"]["usage"]["total_tokens"])
        )
    clock.now += 61
    _, actions = send(session, type="response.create")
    last = stream_all(session, actions[0].response_id)
    (first_left, first_used), (second_left, second_used) = remaining
    assert first_left == 40000 - first_used and second_left == first_left - second_used
    assert last[-1]["rate_limits"][0]["remaining"] == 40000 - last[-2]["response"]["usage"]["total_tokens"]


def test_old_items_lose_their_audio_beyond_the_retention_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the newest AUDIO_RETENTION_MS of item audio is kept; older items keep their ids, not bytes."""
    monkeypatch.setattr(state_module, "AUDIO_RETENTION_MS", 1000)
    session = manual_session()
    ids = []
    for _ in range(3):
        for chunk in frames(speech(1)[: 600 * 48]):
            send(session, type="input_audio_buffer.append", audio=chunk)
        events, _ = send(session, type="input_audio_buffer.commit")
        ids.append(events[0]["item_id"])
    retrieved = [send(session, type="conversation.item.retrieve", item_id=i)[0][0]["item"] for i in ids]
    assert ["audio" in item["content"][0] for item in retrieved] == [False, False, True]


def test_strict_mode_raises_on_drift() -> None:
    """In strict mode an event with a beta name or a stray key raises SimulatorDriftError."""
    session = RealtimeSession(model="gpt-realtime", strict=True)
    with pytest.raises(SimulatorDriftError):
        session._emit(
            "response.audio.delta", response_id="r", item_id="i", output_index=0, content_index=0, delta=""
        )
    with pytest.raises(SimulatorDriftError):
        session._emit("input_audio_buffer.cleared", extra=1)
