"""The Realtime audio formats: pcm16 at 24 kHz and G.711 (μ-law, A-law) at 8 kHz (no I/O)."""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from functools import cache
from typing import Any

PCM_RATE = 24000
G711_RATE = 8000


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """One of ``audio/pcm`` (24 kHz, 2 bytes a sample), ``audio/pcmu`` or ``audio/pcma`` (8 kHz, 1 byte)."""

    type: str = "audio/pcm"

    @property
    def rate(self) -> int:
        return PCM_RATE if self.type == "audio/pcm" else G711_RATE

    @property
    def bytes_per_ms(self) -> int:
        return 48 if self.type == "audio/pcm" else 8

    def as_json(self) -> dict[str, Any]:
        """The session-object form (``rate`` only for pcm, as the API echoes it)."""
        return {"type": "audio/pcm", "rate": PCM_RATE} if self.type == "audio/pcm" else {"type": self.type}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> AudioFormat:
        return cls(str((data or {}).get("type") or "audio/pcm"))


def decode(fmt: AudioFormat, data: bytes) -> array[int]:
    """Input audio bytes as pcm16 samples at ``fmt.rate``."""
    if fmt.type == "audio/pcm":
        samples = array("h")
        samples.frombytes(data[: len(data) - len(data) % 2])
        if sys.byteorder == "big":
            samples.byteswap()
        return samples
    table = _ulaw_decode_table() if fmt.type == "audio/pcmu" else _alaw_decode_table()
    return array("h", [table[b] for b in data])


def encode_from_pcm24k(fmt: AudioFormat, pcm: bytes) -> bytes:
    """Little-endian pcm16 24 kHz audio in ``fmt`` (G.711: averaged down to 8 kHz, then companded)."""
    if fmt.type == "audio/pcm":
        return pcm
    samples = array("h")
    samples.frombytes(pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    table = _ulaw_encode_table() if fmt.type == "audio/pcmu" else _alaw_encode_table()
    n = len(samples) - len(samples) % 3
    return bytes(
        table[((samples[i] + samples[i + 1] + samples[i + 2]) // 3) & 0xFFFF] for i in range(0, n, 3)
    )


def _ulaw_to_linear(u: int) -> int:
    u = ~u & 0xFF
    exponent = (u >> 4) & 0x07
    sample = ((((u & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return -sample if u & 0x80 else sample


def _alaw_to_linear(a: int) -> int:
    a ^= 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    sample = (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    return sample if a & 0x80 else -sample


def _linear_to_ulaw(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sign else sample, 32635) + 0x84
    exponent = magnitude.bit_length() - 8
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _linear_to_alaw(sample: int) -> int:
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(sample if sign else -sample - 1, 32767)
    if magnitude >= 256:
        exponent = magnitude.bit_length() - 8
        mantissa = (magnitude >> (exponent + 3)) & 0x0F
    else:
        exponent, mantissa = 0, magnitude >> 4
    return (sign | (exponent << 4) | mantissa) ^ 0x55


@cache
def _ulaw_decode_table() -> tuple[int, ...]:
    return tuple(_ulaw_to_linear(u) for u in range(256))


@cache
def _alaw_decode_table() -> tuple[int, ...]:
    return tuple(_alaw_to_linear(a) for a in range(256))


def _signed(index: int) -> int:
    return index - 0x10000 if index & 0x8000 else index


@cache
def _ulaw_encode_table() -> bytes:
    return bytes(_linear_to_ulaw(_signed(i)) for i in range(0x10000))


@cache
def _alaw_encode_table() -> bytes:
    return bytes(_linear_to_alaw(_signed(i)) for i in range(0x10000))
