"""The coach's synthetic voice: voiced, pitched like speech, paced like speech, deterministic, cheap."""

from __future__ import annotations

import math
import time
from array import array

from relay.simulator import script, voice
from relay.simulator.vad import FRAME_MS, rms_dbfs

SENTENCE = script.words_of("Nice work, thank you for that answer. Where did you go on your last holiday?")


def samples_of(pcm: bytes) -> array[int]:
    out = array("h")
    out.frombytes(pcm)
    return out


def pitch_hz(samples: array[int]) -> float:
    """Fundamental frequency by autocorrelation over the 90-250 Hz lag range."""
    lags = range(voice.SAMPLE_RATE // 250, voice.SAMPLE_RATE // 90 + 1)
    n = len(samples) - lags[-1]
    best = max(lags, key=lambda lag: sum(samples[i] * samples[i + lag] for i in range(0, n, 2)))
    return voice.SAMPLE_RATE / best


def test_syllables_are_voiced_between_100_and_220_hz() -> None:
    """Every bank syllable has a measured pitch inside the range of a speaking voice."""
    bank = voice.syllable_bank()
    assert len(bank) == voice.BANK_SIZE
    for syllable in bank[::4]:
        samples = samples_of(syllable.pcm)
        middle = samples[len(samples) // 2 - 960 : len(samples) // 2 + 960]
        assert 92 <= pitch_hz(middle) <= 235
        assert 95 <= syllable.mean_f0 <= 230


def test_pitch_varies_across_an_utterance() -> None:
    """The syllables of a sentence are not all on one note."""
    means = {round(s.mean_f0) for s in voice.syllable_bank()}
    assert max(means) - min(means) > 60


def test_speaking_rate_is_about_150_words_a_minute() -> None:
    """A sentence lasts about 0.4 s a word."""
    utterance = voice.Utterance(SENTENCE, seed=3)
    words_per_minute = len(SENTENCE) / (utterance.duration_ms / 60_000)
    assert 130 <= words_per_minute <= 170


def test_envelope_has_syllable_pulses_and_pauses_between_words() -> None:
    """The 10 ms level rises and falls at a syllable rate, with silent gaps between words."""
    utterance = voice.Utterance(SENTENCE, seed=3)
    samples = samples_of(utterance.render(0, utterance.total_samples))
    step = voice.SAMPLE_RATE * FRAME_MS // 1000
    levels = [rms_dbfs(samples[i : i + step]) for i in range(0, len(samples) - step, step)]
    loud = [level > -30 for level in levels]
    bursts = sum(1 for a, b in zip(loud, loud[1:], strict=False) if b and not a) + loud[0]
    seconds = utterance.duration_ms / 1000
    assert 2.5 <= bursts / seconds <= 7
    silent_runs = sum(1 for a, b in zip(levels, levels[1:], strict=False) if b < -90 <= a)
    assert silent_runs >= len(SENTENCE) - 1
    assert all(not math.isinf(level) for level in levels)


def test_word_starts_line_up_with_the_audio() -> None:
    """Each word begins where its first syllable starts (audio after a pause)."""
    utterance = voice.Utterance(SENTENCE, seed=3)
    assert utterance.word_starts[0] == 0
    for start in utterance.word_starts[1:]:
        before = samples_of(utterance.render(start - 240, 240))
        assert max(abs(s) for s in before) == 0


def test_rendering_is_deterministic_and_chunk_independent() -> None:
    """Same words and seed give the same bytes, in one piece or chunk by chunk; another seed differs."""
    a = voice.Utterance(SENTENCE, seed=9)
    b = voice.Utterance(SENTENCE, seed=9)
    whole = a.render(0, a.total_samples)
    chunked = b"".join(b.render(i, 2400) for i in range(0, b.total_samples, 2400))
    assert whole == chunked
    other = voice.Utterance(SENTENCE, seed=10)
    assert other.render(0, other.total_samples) != whole


def test_synthesis_is_much_faster_than_real_time() -> None:
    """A minute of speech renders in well under a second of CPU."""
    words = SENTENCE * 10
    started = time.process_time()
    utterance = voice.Utterance(words, seed=1)
    for i in range(0, utterance.total_samples, 2400):
        utterance.render(i, 2400)
    assert utterance.duration_ms > 50_000
    assert time.process_time() - started < 0.5


def test_syllable_count_follows_vowel_groups() -> None:
    """Words get one to four syllables from their vowel groups."""
    assert [voice.syllable_count(w) for w in ("hm", "cat", "water", "conversation")] == [1, 1, 2, 4]
