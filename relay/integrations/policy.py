"""What an integrating client may send through Parley's Realtime socket.

Every client frame is first validated as OpenAI would (the SDK's own client-event types, shared
with the simulator: :func:`relay.simulator.validation.decode_client_event`), then checked against
what Parley keeps for itself. A client may change the conversation (instructions, voice, turn
detection, formats, function tools it executes itself) but not:

- the model (``session.model``): Parley's operator chose it and pays for it;
- tools or prompts that reach outside the conversation on Parley's account (``mcp`` tools and
  items, stored ``prompt`` references, ``tracing``);
- the session type (``transcription``) or input transcription off: Parley records transcripts of
  every session, which is the point of connecting through it.

A refusal is an ``error`` server event shaped like OpenAI's, with the client's ``event_id`` echoed,
and the frame is not forwarded; the socket stays open, as it does for OpenAI's own refusals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from relay.simulator.ids import new_id
from relay.simulator.validation import ClientEventError, decode_client_event

__all__ = ["ClientEventError", "admit_client_event", "error_event"]

MODEL_NOT_ALLOWED: Final = "model_not_allowed"
TOOL_NOT_ALLOWED: Final = "tool_not_allowed"
PROMPT_NOT_ALLOWED: Final = "prompt_not_allowed"
TRACING_NOT_ALLOWED: Final = "tracing_not_allowed"
SESSION_TYPE_NOT_ALLOWED: Final = "session_type_not_allowed"
TRANSCRIPTION_REQUIRED: Final = "transcription_required"


def admit_client_event(frame: str | bytes, *, model: str) -> dict[str, Any] | ClientEventError:
    """The event to forward upstream, or why it is refused."""
    event = decode_client_event(frame)
    if isinstance(event, ClientEventError):
        return event
    refusal = _refusal(event, model)
    if refusal is None:
        return event
    code, message, param = refusal
    event_id = event.get("event_id")
    return ClientEventError(code, message, param, event_id if isinstance(event_id, str) else None)


def error_event(error: ClientEventError) -> dict[str, Any]:
    """The ``error`` server event for a refusal (REALTIME.md §3.5 shape)."""
    return {
        "type": "error",
        "event_id": new_id("event"),
        "error": {
            "type": error.type,
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "event_id": error.event_id,
        },
    }


def _refusal(event: Mapping[str, Any], model: str) -> tuple[str, str, str] | None:
    kind = event["type"]
    if kind == "session.update":
        return _session_refusal(event.get("session") or {}, model)
    if kind == "response.create":
        response = event.get("response") or {}
        return _outside_reach(response, "response")
    if kind == "conversation.item.create":
        item = event.get("item") or {}
        if str(item.get("type", "")).startswith("mcp"):
            return (TOOL_NOT_ALLOWED, "MCP items are not available through Parley.", "item.type")
    return None


def _session_refusal(session: Mapping[str, Any], model: str) -> tuple[str, str, str] | None:
    if session.get("type") != "realtime":
        return (
            SESSION_TYPE_NOT_ALLOWED,
            "Parley relays conversations: the session type must be 'realtime'.",
            "session.type",
        )
    requested = session.get("model")
    if requested is not None and requested != model:
        return (MODEL_NOT_ALLOWED, f"The model is fixed by Parley ({model}).", "session.model")
    if "tracing" in session and session["tracing"] is not None:
        return (TRACING_NOT_ALLOWED, "Tracing is not available through Parley.", "session.tracing")
    audio_input = (session.get("audio") or {}).get("input") or {}
    if "transcription" in audio_input and audio_input["transcription"] is None:
        return (
            TRANSCRIPTION_REQUIRED,
            "Parley records a transcript of every session: input transcription cannot be turned off.",
            "session.audio.input.transcription",
        )
    return _outside_reach(session, "session")


def _outside_reach(config: Mapping[str, Any], where: str) -> tuple[str, str, str] | None:
    """Tools and prompts that would act on Parley's account rather than in the client's own code."""
    for i, tool in enumerate(config.get("tools") or []):
        if isinstance(tool, Mapping) and tool.get("type") != "function":
            return (
                TOOL_NOT_ALLOWED,
                "Only function tools (run by your own code) are available through Parley.",
                f"{where}.tools[{i}].type",
            )
    if config.get("prompt") is not None:
        return (PROMPT_NOT_ALLOWED, "Stored prompts are not available through Parley.", f"{where}.prompt")
    choice = config.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") == "mcp":
        return (TOOL_NOT_ALLOWED, "MCP tools are not available through Parley.", f"{where}.tool_choice")
    return None
