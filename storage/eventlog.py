"""The upstream event log's lines: one JSON object per server event, audio payloads removed.

Kept for audit (what the model sent, when the relay received it), not for playback: the audio is in
the tracks. Each line is the event as the SDK models it (``model_dump(mode="json",
exclude_none=True)``, wire names), or a dict as it is, with the relay's receive time on the session
timeline first (``at_ms``). Base64 audio never reaches a line:

* audio deltas (any type ending in ``audio.delta``: ``response.output_audio.delta``, the beta
  ``response.audio.delta``, ``session.output_audio.delta``) lose ``delta`` and get
  ``omitted_bytes``: the decoded length;
* any other string field named ``audio`` at any depth (content parts, conversation item content in
  ``conversation.item.*``, ``response.output_item.done``, ``response.done``) is replaced the same
  way, by ``omitted_bytes`` in the object that held it.

Serializing runs in the recorder's worker pool, never on the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "dropped_line",
    "event_kind",
    "event_line",
    "event_record",
    "omitted_bytes",
    "unserializable_line",
]

#: Placeholder ``type`` for an event without a usable one.
UNKNOWN_KIND: Final = "unknown"
_KIND_MAX: Final = 64


def omitted_bytes(b64: str) -> int:
    """The decoded length of a base64 string, without decoding (or copying) it."""
    pad = 2 if b64.endswith("==") else 1 if b64.endswith("=") else 0
    return len(b64) * 3 // 4 - pad


def event_kind(event: object) -> str:
    """The event's ``type`` (for logs and placeholders): a short string, never content."""
    kind = event.get("type") if isinstance(event, Mapping) else getattr(event, "type", None)
    return kind[:_KIND_MAX] if isinstance(kind, str) and kind else UNKNOWN_KIND


def _is_audio_delta(kind: str) -> bool:
    return kind.endswith("audio.delta")


def event_record(event: object, at_ms: int) -> dict[str, Any]:
    """The line's object: ``at_ms`` first, then the event without audio payloads."""
    kind = event_kind(event)
    delta: object = None
    if isinstance(event, Mapping):
        data = dict(event)
        if _is_audio_delta(kind):
            delta = data.pop("delta", None)
    else:
        dump = getattr(event, "model_dump", None)
        if dump is None:
            raise TypeError("not a pydantic model or a mapping")
        # The bulk of the stream is audio deltas: their payload is not even dumped.
        audio_delta = _is_audio_delta(kind)
        data = dump(
            mode="json", exclude_none=True, by_alias=True, warnings=False,
            exclude={"delta"} if audio_delta else None,
        )  # fmt: skip
        if audio_delta:
            delta = getattr(event, "delta", None)
    if isinstance(delta, str):
        data["omitted_bytes"] = omitted_bytes(delta)
    stripped = _strip_audio(data)
    assert isinstance(stripped, dict)
    return {"at_ms": at_ms, **stripped}


def _strip_audio(value: object) -> object:
    """A copy of ``value`` with every string ``audio`` field replaced by ``omitted_bytes``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "audio" and isinstance(item, str):
                out["omitted_bytes"] = omitted_bytes(item)
            else:
                out[key] = _strip_audio(item)
        return out
    if isinstance(value, list | tuple):
        return [_strip_audio(item) for item in value]
    return value


def event_line(event: object, at_ms: int) -> bytes:
    """One JSON line (UTF-8, newline-terminated). Raises on an event that cannot be serialized."""
    record = event_record(event, at_ms)
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def unserializable_line(kind: str, at_ms: int) -> bytes:
    """What stands in a log for an event that could not be serialized: its type, never content."""
    return (json.dumps({"at_ms": at_ms, "type": kind, "unserializable": True}) + "\n").encode()


def dropped_line(reason: str, count: int, at_ms: int) -> bytes:
    """Declares events that were not kept (inbox overflow, spool full, a failed write)."""
    record = {"at_ms": at_ms, "type": "relay.events_dropped", "reason": reason, "count": count}
    return (json.dumps(record) + "\n").encode()
