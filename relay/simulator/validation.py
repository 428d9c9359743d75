"""Validate events against the openai SDK's own pydantic types (REALTIME.md §7).

Client events are parsed, validated with ``RealtimeClientEvent`` plus an unknown-key walk, and
range-checked; a failure becomes a :class:`ClientEventError` carrying the error ``code``, ``message``
and ``param`` the simulator answers with. Server events are checked with ``RealtimeServerEvent``
(used by the strict mode and by the tests) so that the simulator cannot drift from the SDK.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, cast

import pydantic
from openai.types.realtime import (
    RealtimeClientEvent,
    RealtimeServerEvent,
    RealtimeSessionCreateResponse,
)
from pydantic import Field, TypeAdapter, ValidationError

SERVER_TA: TypeAdapter[Any] = TypeAdapter(Annotated[RealtimeServerEvent, Field(discriminator="type")])
CLIENT_TA: TypeAdapter[Any] = TypeAdapter(Annotated[RealtimeClientEvent, Field(discriminator="type")])
SESSION_TA: TypeAdapter[RealtimeSessionCreateResponse] = TypeAdapter(RealtimeSessionCreateResponse)

SERVER_EXTRA_ALLOWLIST = frozenset(
    {"$.session.id", "$.session.object", "$.session.expires_at", "$.obfuscation"}
)
"""Keys the real server sends that the SDK's server event types do not declare (REALTIME.md §7)."""

MAX_EVENT_ID_LENGTH = 512
MAX_APPEND_BYTES = 15 * 1024 * 1024
_SESSION_EVENTS = frozenset({"session.created", "session.updated"})
_APPEND_KEYS = frozenset({"type", "event_id", "audio"})
_MAX_SHOWN = 64


@dataclass(frozen=True, slots=True)
class ClientEventError:
    """Why a client event was refused; becomes the ``error`` object of an ``error`` server event."""

    code: str
    message: str
    param: str | None
    event_id: str | None
    type: str = "invalid_request_error"


class SimulatorDriftError(AssertionError):
    """An event the simulator was about to send does not match the SDK's server event types."""


def unknown_keys(model: object, path: str = "$") -> list[str]:
    """Return the JSON paths of keys that a validated model accepted only as extras."""
    out: list[str] = []
    if isinstance(model, pydantic.BaseModel):
        out += [f"{path}.{key}" for key in model.model_extra or {}]
        for name in type(model).model_fields:
            out += unknown_keys(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for i, value in enumerate(model):
            out += unknown_keys(value, f"{path}[{i}]")
    elif isinstance(model, dict):
        for key, value in model.items():
            out += unknown_keys(value, f"{path}.{key}")
    return out


def server_event_problems(event: Mapping[str, Any]) -> list[str]:
    """Return what is wrong with a server event (empty when it matches the SDK types exactly)."""
    try:
        model = SERVER_TA.validate_python(event)
    except ValidationError as exc:
        return [f"{event.get('type')!r}: {err['loc']}: {err['msg']}" for err in exc.errors()]
    problems = [f"{event.get('type')!r}: unknown key {p}" for p in unknown_keys(model)]
    problems = [p for p in problems if p.rsplit(" ", 1)[-1] not in SERVER_EXTRA_ALLOWLIST]
    if event.get("type") in _SESSION_EVENTS:
        try:
            session = SESSION_TA.validate_python(event["session"])
        except ValidationError as exc:
            return problems + [f"session: {err['loc']}: {err['msg']}" for err in exc.errors()]
        problems += [f"session: unknown key {p}" for p in unknown_keys(session, "$.session")]
    return problems


def check_server_event(event: Mapping[str, Any]) -> None:
    """Raise :class:`SimulatorDriftError` if ``event`` does not match the SDK's server event types."""
    problems = server_event_problems(event)
    if problems:
        raise SimulatorDriftError("; ".join(problems))


def decode_client_event(frame: str | bytes) -> dict[str, Any] | ClientEventError:
    """Parse and validate one client text frame; return the event dict or the error to report."""
    if isinstance(frame, bytes):
        return ClientEventError(
            "invalid_event", "Binary frames are not supported; send JSON text.", None, None
        )
    try:
        data = json.loads(frame)
    except ValueError:
        return ClientEventError(
            "invalid_json", "The server could not parse the event as JSON. Send a JSON object.", None, None
        )
    if not isinstance(data, dict):
        return ClientEventError("invalid_event", "Expected the event to be a JSON object.", None, None)
    raw_event_id = data.get("event_id")
    event_id = raw_event_id[:MAX_EVENT_ID_LENGTH] if isinstance(raw_event_id, str) else None
    error = _check_append(data) if _is_plain_append(data) else _validate(data)
    if error is not None:
        return ClientEventError(error[0], error[1], error[2], event_id)
    return data


def _is_plain_append(data: dict[str, Any]) -> bool:
    """The hot path (50 appends a second a session): a shape the SDK type accepts, checked directly."""
    event_id = data.get("event_id")
    return (
        data.get("type") == "input_audio_buffer.append"
        and isinstance(data.get("audio"), str)
        and (event_id is None or isinstance(event_id, str) and len(event_id) <= MAX_EVENT_ID_LENGTH)
        and data.keys() <= _APPEND_KEYS
    )


def _validate(data: dict[str, Any]) -> tuple[str, str, str | None] | None:
    if "type" not in data:
        return ("invalid_event", "The 'type' field is missing.", None)
    try:
        model = CLIENT_TA.validate_python(_without_item_references(data))
    except ValidationError as exc:
        return _describe(exc.errors(), data)
    extras = unknown_keys(model)
    if extras:
        param = extras[0].removeprefix("$.")
        return ("unknown_parameter", f"Unknown parameter: '{param}'.", param)
    return _check_ranges(data)


def _without_item_references(data: dict[str, Any]) -> dict[str, Any]:
    """``response.create`` may list ``item_reference`` inputs that the SDK's model rejects (§7 gap 3)."""
    response = data.get("response")
    if data.get("type") != "response.create" or not isinstance(response, dict):
        return data
    items = response.get("input")
    if not isinstance(items, list):
        return data
    kept = [i for i in items if not (isinstance(i, dict) and i.get("type") == "item_reference")]
    return {**data, "response": {**response, "input": kept}}


def _describe(errors: Sequence[Any], data: dict[str, Any]) -> tuple[str, str, str | None]:
    """Turn pydantic's errors for one event into the single error the real server would report.

    Smart unions report one error per branch; errors from branches whose ``type`` literal did not
    match the input are dropped, then the most specific (deepest) path wins.
    """
    wrong_branches = [
        tuple(err["loc"][:-1])
        for err in errors
        if err["type"] == "literal_error" and err["loc"][-1:] == ("type",)
    ]
    relevant = [
        err for err in errors if not any(tuple(err["loc"][: len(b)]) == b and b for b in wrong_branches)
    ] or list(errors)
    paths = [_clean_path(err["loc"], data, err["type"]) for err in relevant]
    best = max(range(len(relevant)), key=lambda i: (len(paths[i]), -i))
    err, path = relevant[best], paths[best]
    param = _format_path(path) or None
    kind: str = err["type"]
    if kind == "union_tag_invalid" and not path:
        param = "type"
        return (
            "invalid_value",
            f"Invalid value: {_show(err['input'].get('type'))}. {_supported(err)}",
            param,
        )
    if kind == "missing":
        return ("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    if kind in {"literal_error", "union_tag_invalid", "enum"}:
        expected = sorted(
            {
                str(e.get("ctx", {}).get("expected") or e.get("ctx", {}).get("expected_tags") or "")
                for e, p in zip(relevant, paths, strict=True)
                if p == path
            }
            - {""}
        )
        supported = f" Supported values are: {', '.join(expected)}." if expected else ""
        return ("invalid_value", f"Invalid value: {_show(err['input'])}.{supported}", param)
    if kind in {"model_type", "dict_type", "model_attributes_type"} and isinstance(err["input"], str):
        return ("invalid_value", f"Invalid value: {_show(err['input'])}. Expected an object.", param)
    return ("invalid_type", f"Invalid type for '{param}': {err['msg'][0].lower()}{err['msg'][1:]}.", param)


def _supported(err: Mapping[str, Any]) -> str:
    tags = err.get("ctx", {}).get("expected_tags")
    return f"Supported values are: {tags}." if tags else ""


def _clean_path(loc: Sequence[str | int], data: dict[str, Any], kind: str) -> list[str | int]:
    """Follow ``loc`` through the input, dropping the union-branch labels pydantic inserts."""
    parts = list(loc[1:] if loc and loc[0] == data.get("type") else loc)
    path: list[str | int] = []
    node: object = data
    for i, part in enumerate(parts):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            path.append(part)
            node = cast(Any, node)[part]
        elif kind == "missing" and i == len(parts) - 1:
            path.append(part)  # the absent field itself
    return path


def _format_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return "'" + (text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...") + "'"


def _range_error(
    param: str, value: float, low: float | None, high: float | None
) -> tuple[str, str, str] | None:
    kind = "integer" if isinstance(value, int) else "decimal"
    if low is not None and value < low:
        return (
            f"{kind}_below_min_value",
            f"Invalid '{param}': {kind} below minimum value. "
            f"Expected a value >= {low:g}, but got {value:g} instead.",
            param,
        )
    if high is not None and value > high:
        return (
            f"{kind}_above_max_value",
            f"Invalid '{param}': {kind} above maximum value. "
            f"Expected a value <= {high:g}, but got {value:g} instead.",
            param,
        )
    return None


def _check_ranges(data: dict[str, Any]) -> tuple[str, str, str | None] | None:
    """Limits the SDK types do not encode but the API documents."""
    checks: list[tuple[str, object, float | None, float | None]] = []
    event_id = data.get("event_id")
    if isinstance(event_id, str) and len(event_id) > MAX_EVENT_ID_LENGTH:
        return (
            "string_above_max_length",
            f"Invalid 'event_id': string too long. Expected a string with maximum length "
            f"{MAX_EVENT_ID_LENGTH}, but got a string with length {len(event_id)} instead.",
            "event_id",
        )
    kind = data["type"]
    if kind == "session.update":
        session = data["session"]
        audio = session.get("audio") or {}
        detection = (audio.get("input") or {}).get("turn_detection") or {}
        prefix = "session.audio.input.turn_detection"
        checks += [
            (f"{prefix}.threshold", detection.get("threshold"), 0.0, 1.0),
            (f"{prefix}.prefix_padding_ms", detection.get("prefix_padding_ms"), 0, None),
            (f"{prefix}.silence_duration_ms", detection.get("silence_duration_ms"), 0, None),
            (f"{prefix}.idle_timeout_ms", detection.get("idle_timeout_ms"), 0, None),
            ("session.audio.output.speed", (audio.get("output") or {}).get("speed"), 0.25, 1.5),
            ("session.max_output_tokens", session.get("max_output_tokens"), 1, 4096),
        ]
    elif kind == "response.create":
        response = data.get("response") or {}
        checks.append(("response.max_output_tokens", response.get("max_output_tokens"), 1, 4096))
        metadata = response.get("metadata") or {}
        if len(metadata) > 16:
            return (
                "invalid_value",
                "Invalid 'response.metadata': at most 16 pairs are allowed.",
                "response.metadata",
            )
        for key, value in metadata.items():
            if len(key) > 64 or len(value) > 512:
                param = f"response.metadata.{key[:64]}"
                return (
                    "invalid_value",
                    "Metadata keys are limited to 64 and values to 512 characters.",
                    param,
                )
    elif kind == "conversation.item.truncate":
        checks += [
            ("content_index", data["content_index"], 0, None),
            ("audio_end_ms", data["audio_end_ms"], 0, None),
        ]
    elif kind == "input_audio_buffer.append":
        return _check_append(data)
    for param, value, low, high in checks:
        if isinstance(value, int | float) and not isinstance(value, bool):
            error = _range_error(param, value, low, high)
            if error is not None:
                return error
    return None


def _check_append(data: dict[str, Any]) -> tuple[str, str, str] | None:
    """The size limit; the base64 itself is decoded (once, strictly) by the session."""
    if len(data["audio"]) > MAX_APPEND_BYTES * 4 // 3 + 4:
        return ("invalid_value", "Invalid 'audio': at most 15 MiB of audio per event.", "audio")
    return None
