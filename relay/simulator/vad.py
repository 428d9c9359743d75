"""Energy voice activity detection, the simulator's stand-in for ``server_vad`` (no I/O).

The audio is cut into 10 ms frames. A frame is *voiced* when its RMS level reaches the level that
``threshold`` maps to (``threshold`` 0.0 → -65 dBFS, 0.5 → -40 dBFS, 1.0 → -15 dBFS). Speech starts
after :data:`MIN_SPEECH_MS` of consecutive voiced frames and stops after ``silence_duration_ms`` of
unvoiced frames. Times are milliseconds of input audio since the session's first append, the clock
the real server uses for ``audio_start_ms`` / ``audio_end_ms``.
"""

from __future__ import annotations

import math
import operator
from array import array
from dataclasses import dataclass

FRAME_MS = 10
MIN_SPEECH_MS = 30
"""Voiced audio needed before speech counts as started; a click or a pop stays silent."""

_DECIMATION = 3
"""Energy is estimated from every third sample: unbiased for the mean square, and three times cheaper."""


def threshold_dbfs(threshold: float) -> float:
    """The RMS level, in dBFS, that ``turn_detection.threshold`` stands for."""
    return -65.0 + 50.0 * threshold


def rms_dbfs(samples: array[int]) -> float:
    """The RMS level of pcm16 ``samples`` in dBFS (-120 for digital silence)."""
    if not samples:
        return -120.0
    mean_square = sum(map(operator.mul, samples, samples)) / len(samples)
    return 10.0 * math.log10(mean_square / 32768.0**2) if mean_square > 0 else -120.0


@dataclass(frozen=True, slots=True)
class VadConfig:
    """Turn-detection settings that the energy detector honours."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 200


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """Speech began; ``onset_ms`` is the start of its first voiced frame (prefix padding not applied)."""

    onset_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """Speech ended; ``end_ms`` is when the silence window elapsed (it includes that window)."""

    end_ms: int


VadEvent = SpeechStarted | SpeechStopped


class EnergyVad:
    """Frame-by-frame energy detector over decoded pcm16 samples at ``sample_rate``."""

    def __init__(self, config: VadConfig, sample_rate: int = 24000) -> None:
        self.config = config
        self._frame = sample_rate * FRAME_MS // 1000
        self._pending = array("h")
        self._limit = (32768.0 * 10.0 ** (threshold_dbfs(config.threshold) / 20.0)) ** 2
        self.position_ms = 0
        self.in_speech = False
        self._run_start_ms = 0
        self._run_ms = 0
        self._silence_ms = 0

    def reconfigure(self, config: VadConfig, sample_rate: int = 24000) -> None:
        """Apply new settings; the timeline and any speech in progress carry over."""
        self.config = config
        self._limit = (32768.0 * 10.0 ** (threshold_dbfs(config.threshold) / 20.0)) ** 2
        frame = sample_rate * FRAME_MS // 1000
        if frame != self._frame:
            self._frame = frame
            self._pending = array("h")

    def reset(self) -> None:
        """Forget speech in progress (after a commit or a clear); the timeline keeps running."""
        self.in_speech = False
        self._run_ms = 0
        self._silence_ms = 0

    def feed(self, samples: array[int]) -> list[VadEvent]:
        """Analyse newly appended samples and return the transitions they cause, in order."""
        pending = self._pending
        pending.extend(samples)
        frame = self._frame
        usable = len(pending) - len(pending) % frame
        events: list[VadEvent] = []
        step = _DECIMATION
        per_frame = len(range(0, frame, step))
        limit = self._limit * per_frame
        for start in range(0, usable, frame):
            window = pending[start : start + frame : step]
            voiced = sum(map(operator.mul, window, window)) >= limit
            self._advance(voiced, events)
        del pending[:usable]
        return events

    def _advance(self, voiced: bool, events: list[VadEvent]) -> None:
        position = self.position_ms
        self.position_ms = position + FRAME_MS
        if not self.in_speech:
            if not voiced:
                self._run_ms = 0
                return
            if self._run_ms == 0:
                self._run_start_ms = position
            self._run_ms += FRAME_MS
            if self._run_ms >= MIN_SPEECH_MS:
                self.in_speech = True
                self._silence_ms = 0
                events.append(SpeechStarted(self._run_start_ms))
            return
        if voiced:
            self._silence_ms = 0
            return
        self._silence_ms += FRAME_MS
        if self._silence_ms >= self.config.silence_duration_ms:
            self.in_speech = False
            self._run_ms = 0
            events.append(SpeechStopped(self.position_ms))
