"""Simulator settings: per-server defaults, overridable per connection with ``sim_*`` query parameters."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KNOB_PREFIX = "sim_"
_SERVER_ONLY = frozenset({"api_key"})
_REJECT_STATUSES = frozenset({400, 401, 403, 404, 429, 500, 503})


class KnobError(ValueError):
    """A ``sim_*`` query parameter is unknown or has a bad value; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SimulatorOptions:
    """How a :class:`~relay.simulator.SimulatorServer` behaves; validated on construction.

    Every field but ``api_key`` can be overridden for one connection with the query parameter
    ``sim_<field>`` (for example ``?model=gpt-realtime&sim_first_audio_ms=300``); optional fields
    take ``none`` to unset them.
    """

    first_audio_ms: int = 250
    """Delay from ``response.created`` to the first ``response.output_audio.delta``."""
    chunk_ms: int = 100
    """Audio per ``response.output_audio.delta`` (10-1000 ms, a multiple of 10)."""
    realtime_pacing: bool = True
    """Send each chunk when its audio would start playing (real time); otherwise as fast as possible."""
    max_session_s: float = 3600.0
    """Session length, then ``error`` ``session_expired`` and close 1001 (the real limit is 60 min)."""
    api_key: str | None = None
    """When set, a handshake whose Bearer token differs is rejected with HTTP 401."""
    seed: int = 0
    """Seed of the coach's script choices and voice, so audio is reproducible."""
    strict: bool = False
    """Validate every emitted event against the SDK's server types; a mismatch closes the socket with 1011."""
    transcription_delay_ms: int = 150
    """Delay from a user item's commit to its simulated transcription events."""
    close_after_s: float | None = None
    """Close the WebSocket with ``close_code`` this long after the handshake."""
    close_code: int = 1011
    """Close code used by ``close_after_s``."""
    drop_after_s: float | None = None
    """Abort the TCP connection (no close frame, the client sees 1006) this long after the handshake."""
    reject_status: int | None = None
    """Refuse the handshake with this HTTP status and an OpenAI-style JSON error body."""
    error_after_s: float | None = None
    """Send an injected ``error`` event (type ``server_error``) this long after the handshake."""
    error_code: str = "server_error"
    """The ``code`` of the injected error event."""
    read_pause_after_s: float | None = None
    """Stop reading client frames this long after the handshake (a slow reader) ..."""
    read_pause_s: float = 0.0
    """... for this long."""

    def __post_init__(self) -> None:
        _require(0 <= self.first_audio_ms <= 60_000, "first_audio_ms", "must be between 0 and 60000")
        _require(
            10 <= self.chunk_ms <= 1000 and self.chunk_ms % 10 == 0,
            "chunk_ms",
            "must be a multiple of 10 between 10 and 1000",
        )
        _require(self.max_session_s > 0, "max_session_s", "must be positive")
        _require(self.api_key is None or self.api_key != "", "api_key", "must not be empty")
        _require(0 <= self.transcription_delay_ms <= 60_000, "transcription_delay_ms", "must be 0-60000")
        _require(
            self.close_code == 1000
            or 1001 <= self.close_code <= 1014
            and self.close_code not in {1004, 1005, 1006}
            or 3000 <= self.close_code <= 4999,
            "close_code",
            "must be a close code a server may send (1000-1003, 1007-1014, 3000-4999)",
        )
        _require(
            self.reject_status is None or self.reject_status in _REJECT_STATUSES,
            "reject_status",
            f"must be one of {sorted(_REJECT_STATUSES)}",
        )
        _require(self.read_pause_s >= 0, "read_pause_s", "must not be negative")
        _require(bool(self.error_code), "error_code", "must not be empty")
        for name in ("close_after_s", "drop_after_s", "error_after_s", "read_pause_after_s"):
            value = getattr(self, name)
            _require(value is None or value >= 0, name, "must not be negative")

    def with_knobs(self, query: Mapping[str, str]) -> SimulatorOptions:
        """These options with the ``sim_*`` entries of ``query`` applied; raises :class:`KnobError`."""
        changes: dict[str, Any] = {}
        for key, raw in query.items():
            if not key.startswith(KNOB_PREFIX):
                continue
            name = key[len(KNOB_PREFIX) :]
            kind = _KNOB_TYPES.get(name)
            if kind is None:
                raise KnobError(key, f"Unknown simulator parameter: '{key}'.")
            changes[name] = _parse(key, raw, kind)
        if not changes:
            return self
        try:
            return dataclasses.replace(self, **changes)
        except KnobError as exc:
            raise KnobError(KNOB_PREFIX + exc.param, f"Invalid '{KNOB_PREFIX}{exc.param}': {exc}.") from None


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise KnobError(name, message)


def _knob_types() -> dict[str, tuple[type, bool]]:
    hints = typing.get_type_hints(SimulatorOptions)
    out: dict[str, tuple[type, bool]] = {}
    for f in dataclasses.fields(SimulatorOptions):
        if f.name in _SERVER_ONLY:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        out[f.name] = (base, optional)
    return out


_KNOB_TYPES = _knob_types()
KNOBS = tuple(KNOB_PREFIX + name for name in _KNOB_TYPES)
"""Every per-connection query parameter the simulator understands."""


def _parse(key: str, raw: str, kind: tuple[type, bool]) -> Any:
    base, optional = kind
    text = raw.strip()
    if optional and text.lower() in {"", "none", "null"}:
        return None
    try:
        if base is bool:
            lowered = text.lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no"}:
                raise ValueError(text)
            return lowered in {"1", "true", "yes"}
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return text
    except ValueError:
        raise KnobError(key, f"Invalid '{key}': expected {base.__name__}, got '{raw[:32]}'.") from None
