"""Speech-like audio for the coach's answers: voiced syllables with pauses, pcm16 at 24 kHz (no I/O).

Nothing here recognises or synthesises real speech. A process-wide *syllable bank* is computed once
(:func:`warm_up`): 40 voiced syllables, 120-240 ms each, made by sweeping a harmonic wavetable
(vowel-like formant shapes) along a pitch glide between 100 and 220 Hz with a rise-and-fall
amplitude envelope, some with a short unvoiced (noise) onset. An :class:`Utterance` strings bank
syllables together, one to four a word following the word's vowel groups, separated by 60-170 ms
pauses sized so that a word and its pause last about 0.4 s: the result runs at about 150 words a
minute, has a syllable-rate envelope and is voiced enough for the energy VAD to hear. Rendering is slicing
of precomputed bytes, so producing audio costs far less than real time; which syllables and pauses
are chosen depends only on the text and the seed.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

SAMPLE_RATE = 24000
BANK_SIZE = 40
_BANK_SEED = 1729
_TABLE_SIZE = 1024
_HARMONICS = 36
_REFERENCE_F0 = 150.0
_VOWEL_FORMANTS = (
    (730.0, 1090.0, 2440.0),  # a
    (530.0, 1840.0, 2480.0),  # e
    (270.0, 2290.0, 3010.0),  # i
    (570.0, 840.0, 2410.0),  # o
    (300.0, 870.0, 2240.0),  # u
)
_VOWEL_GROUPS = re.compile(r"[aeiouy]+", re.IGNORECASE)
_SENTENCE_END = (".", "?", "!")
_WORD_MS = 400.0
"""A word and its pause take about this long: 150 words a minute."""
_MIN_PAUSE_MS = 60.0
_MAX_PAUSE_MS = 170.0
"""Pause plus the quiet tails of the syllables around it stay under the default 200 ms VAD silence
window, so coach audio looped back into the VAD reads as one turn."""


@dataclass(frozen=True, slots=True)
class Syllable:
    """One precomputed syllable: little-endian pcm16 bytes and its mean pitch."""

    pcm: bytes
    mean_f0: float

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2


def warm_up() -> None:
    """Build the syllable bank now (about 0.1 s of CPU, once a process) rather than on first use."""
    syllable_bank()


@cache
def syllable_bank() -> tuple[Syllable, ...]:
    """The process-wide bank, sorted from the highest to the lowest mean pitch."""
    rng = random.Random(_BANK_SEED)
    tables = [_wavetable(formants) for formants in _VOWEL_FORMANTS]
    bank = [_syllable(rng, tables[i % len(tables)]) for i in range(BANK_SIZE)]
    return tuple(sorted(bank, key=lambda s: -s.mean_f0))


def _wavetable(formants: Sequence[float]) -> list[float]:
    """One period of a harmonic tone whose spectrum falls at 6 dB/octave with three formant peaks."""
    amplitudes = []
    for k in range(1, _HARMONICS + 1):
        f = k * _REFERENCE_F0
        resonance = sum(1.0 / (1.0 + ((f - fc) / (90.0 + 0.06 * fc)) ** 2) for fc in formants)
        amplitudes.append((0.15 + resonance) / k)
    table = [0.0] * _TABLE_SIZE
    for k, amplitude in enumerate(amplitudes, start=1):
        w = 2.0 * math.pi * k / _TABLE_SIZE
        for n in range(_TABLE_SIZE):
            table[n] += amplitude * math.sin(w * n)
    peak = max(abs(v) for v in table)
    return [v / peak for v in table]


def _syllable(rng: random.Random, table: list[float]) -> Syllable:
    voiced_n = int(SAMPLE_RATE * rng.uniform(0.12, 0.22))
    f0_start = rng.uniform(100.0, 220.0)
    f0_end = min(230.0, max(95.0, f0_start * rng.uniform(0.8, 1.15)))
    peak = rng.uniform(0.35, 0.6) * 32767.0
    attack = int(voiced_n * 0.25)
    release = int(voiced_n * 0.35)
    out = array("h")
    if rng.random() < 0.5:
        noise_n = int(SAMPLE_RATE * rng.uniform(0.015, 0.03))
        noise_amp = rng.uniform(0.06, 0.12) * 32767.0
        out.extend(int(rng.uniform(-noise_amp, noise_amp)) for _ in range(noise_n))
    phase = 0.0
    mask = _TABLE_SIZE - 1
    step = _TABLE_SIZE / SAMPLE_RATE
    vibrato = 2.0 * math.pi * 5.5 / SAMPLE_RATE
    f0_total = 0.0
    for n in range(voiced_n):
        f0 = f0_start + (f0_end - f0_start) * n / voiced_n
        f0 *= 1.0 + 0.015 * math.sin(vibrato * n)
        f0_total += f0
        phase += f0 * step
        if n < attack:
            envelope = 0.5 - 0.5 * math.cos(math.pi * n / attack)
        elif n >= voiced_n - release:
            envelope = 0.5 + 0.5 * math.cos(math.pi * (n - (voiced_n - release)) / release)
        else:
            envelope = 1.0
        out.append(int(peak * envelope * table[int(phase) & mask]))
    if sys.byteorder == "big":
        out.byteswap()
    return Syllable(out.tobytes(), f0_total / voiced_n)


def syllable_count(word: str) -> int:
    """Vowel groups in ``word``, between 1 and 4."""
    return max(1, min(4, len(_VOWEL_GROUPS.findall(word))))


class Utterance:
    """The audio for a sequence of words, rendered lazily chunk by chunk.

    ``word_starts[i]`` is the sample at which word ``i`` begins, so a transcript can be paced with
    the audio.
    """

    def __init__(self, words: Sequence[str], seed: int, speed: float = 1.0) -> None:
        bank = syllable_bank()
        rng = random.Random(seed)
        self._starts: list[int] = []
        self._pieces: list[bytes | int] = []
        self.word_starts: list[int] = []
        position = 0
        sentence_start = 0
        for index, word in enumerate(words):
            self.word_starts.append(position)
            sentence_words = max(1, _sentence_length(words, sentence_start))
            progress = (index - sentence_start) / sentence_words
            center = int(progress * 0.7 * (len(bank) - 1))
            word_start = position
            for _ in range(syllable_count(word)):
                pick = min(len(bank) - 1, max(0, center + rng.randint(-5, 5)))
                position = self._add(position, bank[pick].pcm)
            last = index == len(words) - 1
            if word.endswith(_SENTENCE_END):
                sentence_start = index + 1
                pause_ms = rng.uniform(_MAX_PAUSE_MS - 20.0, _MAX_PAUSE_MS)
            else:
                voiced_ms = (position - word_start) * 1000.0 / SAMPLE_RATE
                pause_ms = _WORD_MS - voiced_ms + rng.uniform(-30.0, 30.0)
                pause_ms = min(_MAX_PAUSE_MS, max(_MIN_PAUSE_MS, pause_ms))
            if not last:
                position = self._add(position, int(SAMPLE_RATE * pause_ms / 1000.0 / speed))
        self.total_samples = position

    def _add(self, position: int, piece: bytes | int) -> int:
        self._starts.append(position)
        self._pieces.append(piece)
        return position + (len(piece) // 2 if isinstance(piece, bytes) else piece)

    @property
    def duration_ms(self) -> float:
        return self.total_samples * 1000.0 / SAMPLE_RATE

    @property
    def word_ends_ms(self) -> list[float]:
        """When each word, with the pause after it, ends."""
        return [end * 1000.0 / SAMPLE_RATE for end in [*self.word_starts[1:], self.total_samples]]

    def render(self, start: int, count: int) -> bytes:
        """Samples ``start`` to ``start + count`` (clipped to the end) as little-endian pcm16 bytes."""
        end = min(self.total_samples, start + count)
        out = bytearray()
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        position = start
        while position < end and i < len(self._pieces):
            piece, piece_start = self._pieces[i], self._starts[i]
            length = len(piece) // 2 if isinstance(piece, bytes) else piece
            lo = position - piece_start
            hi = min(length, end - piece_start)
            if hi > lo:
                out += piece[2 * lo : 2 * hi] if isinstance(piece, bytes) else bytes(2 * (hi - lo))
                position = piece_start + hi
            i += 1
        return bytes(out)


def _sentence_length(words: Sequence[str], start: int) -> int:
    for offset, word in enumerate(words[start:]):
        if word.endswith(_SENTENCE_END):
            return offset + 1
    return len(words) - start
