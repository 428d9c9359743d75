"""The SDK-type validation helpers used by the strict mode and by client-event checks."""

from __future__ import annotations

import json

from relay.simulator.validation import ClientEventError, decode_client_event, server_event_problems

SESSION = {
    "type": "realtime",
    "object": "realtime.session",
    "id": "sess_123456789012345678901",
    "expires_at": 0,
}


def test_server_event_allow_list_is_exactly_the_documented_extras() -> None:
    """obfuscation and session id/object/expires_at pass; any other unknown key is reported."""
    delta = {
        "type": "response.output_audio_transcript.delta",
        "event_id": "event_1",
        "response_id": "r",
        "item_id": "i",
        "output_index": 0,
        "content_index": 0,
        "delta": "Hi",
    }
    assert server_event_problems({**delta, "obfuscation": "abc"}) == []
    assert server_event_problems({**delta, "padding": "abc"}) != []
    created = {"type": "session.created", "event_id": "event_1", "session": SESSION}
    assert server_event_problems(created) == []
    assert server_event_problems({**created, "session": {**SESSION, "voice": "alloy"}}) != []


def test_beta_event_names_are_drift() -> None:
    """The beta name response.audio.delta is not a GA server event."""
    beta = {"type": "response.audio.delta", "event_id": "e", "response_id": "r", "item_id": "i"}
    assert server_event_problems({**beta, "output_index": 0, "content_index": 0, "delta": ""})


def test_item_references_are_accepted_in_response_input() -> None:
    """response.create may list item_reference inputs, which the SDK's model alone rejects."""
    event = {"type": "response.create", "response": {"input": [{"type": "item_reference", "id": "item_1"}]}}
    assert decode_client_event(json.dumps(event)) == event


def test_errors_prefer_the_branch_the_input_chose() -> None:
    """A bad field in a realtime session is reported there, not as a wrong 'transcription' type."""
    event = {
        "type": "session.update",
        "session": {"type": "realtime", "audio": {"output": {"speed": "fast"}}},
    }
    error = decode_client_event(json.dumps(event))
    assert isinstance(error, ClientEventError)
    assert (error.code, error.param) == ("invalid_type", "session.audio.output.speed")
