"""Sans-I/O core of the model edge: encode client events, decode server events (no network, no clock).

Encoders return plain dicts in the GA shapes of REALTIME.md §2 (JSON-ready: ``None`` stays ``null``).
:func:`decode` turns one server frame into a typed event from ``openai.types.realtime``, validated
with the SDK's own discriminated union (REALTIME.md §7). It is tolerant where the wire is known to
differ from the SDK types (§3.3, §7 gaps): extra fields are kept, a missing ``object`` is fine, a
content part of type ``output_audio``/``output_text`` is read as ``audio``/``text``, and a known
event that still fails validation is built leniently, as the SDK's own ``parse_event`` does. An
event type the SDK does not know becomes an :class:`UnknownEvent`, which callers log and skip.
Callers dispatch on ``event.type`` strings, never on ``isinstance`` alone (REALTIME.md §1.3).
"""

from __future__ import annotations

import base64
import json
import logging
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeAlias, cast

import pydantic
from openai._models import construct_type_unchecked
from openai.types.realtime import RealtimeServerEvent
from pydantic import Field, TypeAdapter

__all__ = [
    "Event",
    "HistoryItem",
    "MalformedEvent",
    "UnknownEvent",
    "audio_append",
    "decode",
    "replay_items",
    "session_object",
    "session_update",
    "session_update_event",
    "truncate",
]

log = logging.getLogger("relay.model.protocol")

SAMPLE_RATE: Final = 24_000
"""The only PCM rate the Realtime API takes (pcm16, mono, little-endian)."""
DEFAULT_VOICE: Final = "alloy"
DEFAULT_TRANSCRIPTION_MODEL: Final = "gpt-4o-mini-transcribe"
REPLAY_ID_PREFIX: Final = "replay"
"""Client-chosen ids of replayed items: ``replay_00000``, ``replay_00001``, ... (well under 32 chars)."""


# ---------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """One finished line of the conversation so far, as the session stored it."""

    speaker: Literal["learner", "coach"]
    text: str


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """A server event whose ``type`` the SDK does not know; callers log its type and skip it."""

    type: str
    event_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The decoded frame (may hold payloads: never log it)."""


class MalformedEvent(ValueError):
    """A server frame that is not a JSON object with a string ``type``."""


Event: TypeAlias = "RealtimeServerEvent | UnknownEvent"
"""What :func:`decode` returns. Dispatch on ``event.type``."""


# ---------------------------------------------------------------------------------------- encode


def audio_append(pcm24k: bytes) -> dict[str, Any]:
    """``input_audio_buffer.append`` carrying ``pcm24k`` (pcm16 mono 24 kHz) as base64."""
    if not pcm24k or len(pcm24k) % 2:
        raise ValueError("pcm24k must be non-empty 16-bit samples (an even number of bytes)")
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm24k).decode("ascii")}


def session_object(
    *,
    instructions: str,
    turn_detection: Mapping[str, Any] | None,
    voice: str = DEFAULT_VOICE,
    transcription_model: str | None = DEFAULT_TRANSCRIPTION_MODEL,
) -> dict[str, Any]:
    """The GA ``session`` object for ``session.update`` (REALTIME.md §2.1).

    Audio in and out is ``audio/pcm`` at 24 kHz. ``turn_detection=None`` turns VAD off (manual
    commit); ``transcription_model=None`` turns input transcription off.
    """
    transcription = None if transcription_model is None else {"model": transcription_model}
    return {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                "transcription": transcription,
                "turn_detection": None if turn_detection is None else dict(turn_detection),
            },
            "output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": voice},
        },
    }


def session_update_event(session: Mapping[str, Any]) -> dict[str, Any]:
    """``session.update`` carrying an already built ``session`` object."""
    return {"type": "session.update", "session": dict(session)}


def session_update(
    *,
    instructions: str,
    turn_detection: Mapping[str, Any] | None,
    voice: str = DEFAULT_VOICE,
    transcription_model: str | None = DEFAULT_TRANSCRIPTION_MODEL,
) -> dict[str, Any]:
    """``session.update`` with :func:`session_object` built from these arguments."""
    return session_update_event(
        session_object(
            instructions=instructions,
            turn_detection=turn_detection,
            voice=voice,
            transcription_model=transcription_model,
        )
    )


def truncate(item_id: str, audio_end_ms: int) -> dict[str, Any]:
    """``conversation.item.truncate``: cut the coach's audio item where playback stopped (barge-in)."""
    if not item_id:
        raise ValueError("item_id must not be empty")
    if audio_end_ms < 0:
        raise ValueError("audio_end_ms must not be negative")
    return {
        "type": "conversation.item.truncate",
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": audio_end_ms,
    }


def replay_items(
    history: Sequence[HistoryItem], *, id_prefix: str = REPLAY_ID_PREFIX
) -> list[dict[str, Any]]:
    """``conversation.item.create`` events that rebuild ``history`` as text in a fresh upstream session.

    Learner lines become user messages with ``input_text``; coach lines become assistant messages
    with ``output_text`` (clients may not create assistant *audio*, REALTIME.md §2.3). Each item
    gets a client id (``{id_prefix}_00000``, ...) and is chained after the previous one with
    ``previous_item_id``; the first goes to ``"root"`` so history precedes anything else.
    Blank lines are skipped.
    """
    events: list[dict[str, Any]] = []
    previous = "root"
    for line in history:
        text = line.text.strip()
        if not text:
            continue
        item_id = f"{id_prefix}_{len(events):05d}"
        if line.speaker == "learner":
            item: dict[str, Any] = {"role": "user", "content": [{"type": "input_text", "text": text}]}
        else:
            item = {"role": "assistant", "content": [{"type": "output_text", "text": text}]}
        events.append(
            {
                "type": "conversation.item.create",
                "previous_item_id": previous,
                "item": {"id": item_id, "type": "message", **item},
            }
        )
        previous = item_id
    return events


# ---------------------------------------------------------------------------------------- decode

_SERVER_TA: TypeAdapter[RealtimeServerEvent] = TypeAdapter(
    Annotated[RealtimeServerEvent, Field(discriminator="type")]
)


def _known_types() -> dict[str, type[pydantic.BaseModel]]:
    union = typing.get_args(RealtimeServerEvent)[0]
    known: dict[str, type[pydantic.BaseModel]] = {}
    for model in typing.get_args(union):
        (name,) = typing.get_args(model.model_fields["type"].annotation)
        known[name] = model
    return known


KNOWN_TYPES: Final = _known_types()
"""Every server event type in the SDK's union, mapped to its model."""

_PART_TYPES: Final = {"output_audio": "audio", "output_text": "text"}
_PART_EVENTS: Final = frozenset({"response.content_part.added", "response.content_part.done"})


def decode(raw: str | bytes | pydantic.BaseModel) -> Event:
    """Decode one server frame (or an SDK-parsed event) into a typed event.

    Raises :class:`MalformedEvent` if the frame is not a JSON object with a string ``type``.
    Unknown types give an :class:`UnknownEvent`; nothing else raises.
    """
    data = _as_dict(raw)
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        raise MalformedEvent("server event without a string 'type'")
    model = KNOWN_TYPES.get(kind)
    if model is None:
        event_id = data.get("event_id")
        return UnknownEvent(kind, event_id if isinstance(event_id, str) else None, data)
    if kind in _PART_EVENTS:
        data = _normalize_part(data)
    try:
        return _SERVER_TA.validate_python(data)
    except pydantic.ValidationError as exc:
        # Locations only: the error's text repeats input values (audio, transcripts).
        locs = [".".join(str(p) for p in e["loc"]) for e in exc.errors(include_input=False)][:5]
        log.debug(
            "lenient_decode", extra={"kind": kind, "count": exc.error_count(), "reason": ",".join(locs)}
        )
        return cast("RealtimeServerEvent", construct_type_unchecked(value=data, type_=model))


def _as_dict(raw: str | bytes | pydantic.BaseModel) -> dict[str, Any]:
    if isinstance(raw, pydantic.BaseModel):
        dumped: dict[str, Any] = raw.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return dumped
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MalformedEvent("server frame is not JSON") from exc
    if not isinstance(data, dict):
        raise MalformedEvent("server frame is not a JSON object")
    return data


def _normalize_part(data: dict[str, Any]) -> dict[str, Any]:
    part = data.get("part")
    if isinstance(part, dict) and part.get("type") in _PART_TYPES:
        return {**data, "part": {**part, "type": _PART_TYPES[part["type"]]}}
    return data
