"""The Realtime API's audio formats, as the recorder needs them: pcm16 samples and their rate.

A Realtime socket carries ``audio/pcm`` (pcm16 mono, 24 kHz) or G.711 (``audio/pcmu``,
``audio/pcma``, 8 kHz, what telephony bridges send). The recorder takes pcm16 at any rate, so
G.711 is expanded to pcm16 at 8 kHz through two 256-entry tables with ``bytes.translate`` (C speed,
no per-sample Python; ``audioop`` is gone from Python 3.13).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["PCM24", "AudioFormat", "audio_format", "to_pcm16"]


@dataclass(frozen=True, slots=True)
class AudioFormat:
    type: str
    rate: int


PCM24: Final = AudioFormat("audio/pcm", 24_000)
_G711_RATE: Final = 8_000


def audio_format(spec: object, default: AudioFormat = PCM24) -> AudioFormat:
    """The format of a ``{"type": ..., "rate": ...}`` object (``default`` when absent or unknown)."""
    if not isinstance(spec, Mapping):
        return default
    kind = spec.get("type")
    if kind == "audio/pcm":
        rate = spec.get("rate", PCM24.rate)
        return AudioFormat("audio/pcm", rate if isinstance(rate, int) and rate > 0 else PCM24.rate)
    if kind in ("audio/pcmu", "audio/pcma"):
        return AudioFormat(str(kind), _G711_RATE)
    return default


def _ulaw(code: int) -> int:
    u = ~code & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return 0x84 - magnitude if u & 0x80 else magnitude - 0x84


def _alaw(code: int) -> int:
    a = code ^ 0x55
    exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
    magnitude = (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    return magnitude if a & 0x80 else -magnitude


def _tables(decode: Any) -> tuple[bytes, bytes]:
    samples = [decode(code) & 0xFFFF for code in range(256)]
    return bytes(s & 0xFF for s in samples), bytes(s >> 8 for s in samples)


_TABLES: Final = {"audio/pcmu": _tables(_ulaw), "audio/pcma": _tables(_alaw)}


def to_pcm16(data: bytes, fmt: AudioFormat) -> bytes:
    """``data`` in ``fmt`` as pcm16 little-endian at ``fmt.rate``."""
    tables = _TABLES.get(fmt.type)
    if tables is None:
        return data[: len(data) - len(data) % 2]
    low, high = tables
    out = bytearray(2 * len(data))
    out[0::2] = data.translate(low)
    out[1::2] = data.translate(high)
    return bytes(out)
