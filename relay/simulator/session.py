"""The session object: its defaults, how ``session.update`` changes it, and what its settings mean."""

from __future__ import annotations

from typing import Any

from relay.simulator import script
from relay.simulator.formats import AudioFormat
from relay.simulator.vad import VadConfig

SERVER_VAD_DEFAULTS: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 200,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
"""What the real server reports (``silence_duration_ms`` 200, although its field docs say 500)."""
SEMANTIC_VAD_DEFAULTS: dict[str, Any] = {
    "type": "semantic_vad",
    "eagerness": "auto",
    "create_response": True,
    "interrupt_response": True,
}
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": 500, "auto": 500, "high": 250}
"""Silence window standing in for ``semantic_vad`` eagerness (an eighth of the 8/4/2 s maximum waits)."""


def default_session(session_id: str, model: str, expires_at: int) -> dict[str, Any]:
    """The full default session the real server reports in ``session.created``."""
    pcm = AudioFormat().as_json()
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": script.DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": expires_at,
        "audio": {
            "input": {
                "format": pcm,
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": dict(SERVER_VAD_DEFAULTS),
            },
            "output": {"format": dict(pcm), "voice": "alloy", "speed": 1.0},
        },
        "include": None,
    }


def apply_update(config: dict[str, Any], update: dict[str, Any]) -> None:
    """Change ``config`` in place by a validated ``session.update`` payload: only present fields change.

    ``audio`` merges per field; a ``turn_detection`` object of the current type merges into the
    current one, of another type it starts from that type's defaults; ``null`` switches it off.
    """
    for key, value in update.items():
        if key == "audio":
            _merge_audio(config["audio"], value)
        elif key != "type":
            config[key] = value


def _merge_audio(audio: dict[str, Any], update: dict[str, Any]) -> None:
    for direction in ("input", "output"):
        for key, value in (update.get(direction) or {}).items():
            if key == "format":
                value = AudioFormat.from_json(value).as_json()
            elif key == "turn_detection" and value is not None:
                current = audio["input"]["turn_detection"]
                if current is not None and current["type"] == value["type"]:
                    base = current
                elif value["type"] == "server_vad":
                    base = SERVER_VAD_DEFAULTS
                else:
                    base = SEMANTIC_VAD_DEFAULTS
                value = {**base, **value}
            audio[direction][key] = value


def vad_config(detection: dict[str, Any]) -> VadConfig:
    """The energy-VAD settings for a ``turn_detection`` object."""
    if detection["type"] == "server_vad":
        return VadConfig(
            threshold=detection.get("threshold", 0.5),
            prefix_padding_ms=detection.get("prefix_padding_ms", 300),
            silence_duration_ms=detection.get("silence_duration_ms", 200),
        )
    return VadConfig(silence_duration_ms=SEMANTIC_SILENCE_MS[detection.get("eagerness") or "auto"])


def expiry_message(max_session_s: float) -> str:
    """The ``session_expired`` text, in the real wording ("... of 60 minutes."), seconds below a minute."""
    if max_session_s >= 60 and max_session_s % 60 == 0:
        value, unit = max_session_s / 60, "minute"
    else:
        value, unit = max_session_s, "second"
    return f"Your session hit the maximum duration of {value:g} {unit}{'' if value == 1 else 's'}."
