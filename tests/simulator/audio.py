"""Speech-shaped test audio (pcm16, 24 kHz, mono) built from the simulator's own voice."""

from __future__ import annotations

import base64
import math
import sys
from array import array

from relay.simulator.voice import SAMPLE_RATE, Utterance

BYTES_PER_MS = 48


def silence(ms: int) -> bytes:
    """``ms`` of digital silence."""
    return bytes(ms * BYTES_PER_MS)


def speech(words: int, seed: int = 7, gain: float = 1.0) -> bytes:
    """Voiced syllables with pauses, about 0.4 s a word; ``gain`` scales the level."""
    utterance = Utterance(["lalala"] * words, seed=seed)
    pcm = utterance.render(0, utterance.total_samples)
    return pcm if gain == 1.0 else scale(pcm, gain)


def tone(ms: int, dbfs: float, hz: float = 150.0) -> bytes:
    """A sine of constant RMS level ``dbfs``: exact onsets and offsets for VAD timing tests."""
    amplitude = 32768.0 * math.sqrt(2.0) * 10.0 ** (dbfs / 20.0)
    n = ms * SAMPLE_RATE // 1000
    samples = array("h", (int(amplitude * math.sin(2 * math.pi * hz * i / SAMPLE_RATE)) for i in range(n)))
    return _to_bytes(samples)


def scale(pcm: bytes, gain: float) -> bytes:
    """``pcm`` with every sample multiplied by ``gain`` (clipped)."""
    samples = _from_bytes(pcm)
    return _to_bytes(array("h", (max(-32768, min(32767, int(s * gain))) for s in samples)))


def frames(pcm: bytes, ms: int = 20) -> list[str]:
    """``pcm`` cut into base64 chunks of ``ms`` each, as ``input_audio_buffer.append`` carries them."""
    step = ms * BYTES_PER_MS
    return [base64.b64encode(pcm[i : i + step]).decode("ascii") for i in range(0, len(pcm), step)]


def duration_ms(pcm: bytes) -> float:
    return len(pcm) / BYTES_PER_MS


def _from_bytes(pcm: bytes) -> array[int]:
    samples = array("h")
    samples.frombytes(pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _to_bytes(samples: array[int]) -> bytes:
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()
