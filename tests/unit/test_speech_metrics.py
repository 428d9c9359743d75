"""Speech metrics (relay.worker.speech) on small transcripts whose values are worked out by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from relay.worker.speech import (
    EXPLANATIONS,
    SpeechMetrics,
    count_fillers,
    speech_metrics,
    vocabulary_variety,
    words,
)


@dataclass
class Row:
    speaker: str
    text: str
    start_ms: int
    end_ms: int


@dataclass
class Track:
    track: str
    duration_ms: int


CAFE = [
    Row("coach", "Hello! What would you like?", 0, 2000),
    Row("learner", "Um, I would like a coffee, please.", 2600, 6000),
    Row("coach", "Sure. Anything else?", 6300, 7500),
    Row("learner", "No.", 11000, 12000),  # answered after 3.5 s: a long pause
    Row("learner", "It was, like, great, you know, really great.", 16000, 18000),  # 4 s within the turn
]


def test_a_small_conversation_by_hand() -> None:
    """Every metric of a five-line conversation, each worked out by hand in the comments."""
    m = speech_metrics(CAFE, [Track("learner", 18_500), Track("coach", 7_600)])
    # The longest track (18.5 s) is later than the transcript's end (18 s).
    assert m.session_ms == 18_500
    # Learner: 3400 + 1000 + 2000 ms; coach: 2000 + 1200 ms; share 6400 / 9600.
    assert (m.learner_talk_ms, m.coach_talk_ms, m.learner_talk_ratio) == (6400, 3200, 0.667)
    # Two turns: "Um, ... please." and "No." + "It was ..." (no coach line between those two).
    assert m.learner_turns == 2
    # 7 + 1 + 8 words; 16 words in 6.4 s of talk = 150 per minute; 8 words per turn.
    assert (m.learner_words, m.words_per_minute, m.mean_utterance_words) == (16, 150.0, 8.0)
    # "Um" always, ", like," and "you know," (set off by commas); "would like" is no filler: 3 / 16.
    assert m.filler_rate == 0.188
    # 14 distinct words ("like" and "great" twice) of 16, under 50 words: the plain ratio.
    assert m.vocabulary_variety == 0.875
    # Answers came 600 ms and 3500 ms after the coach stopped: the median is 2050.
    assert m.response_latency_ms == 2050
    # The 3.5 s before "No." and the 4 s between "No." and "It was ...".
    assert m.long_pauses == 2


def test_an_empty_transcript_is_all_zeros() -> None:
    """No rows and no tracks: zeros everywhere, no division error, valid JSON."""
    m = speech_metrics([])
    assert m == SpeechMetrics()
    values = m.as_dict()
    assert set(values.values()) == {0}
    json.dumps(values, allow_nan=False)


def test_a_coach_only_transcript_gives_zeros_for_the_learner() -> None:
    """The coach talked; the learner's one row has no words (noise), so it counts as silence."""
    m = speech_metrics([Row("coach", "Hello?", 0, 1500), Row("learner", " ... ", 2000, 2600)])
    assert (m.learner_talk_ms, m.coach_talk_ms, m.learner_talk_ratio) == (0, 1500, 0.0)
    assert (m.learner_words, m.words_per_minute, m.mean_utterance_words, m.filler_rate) == (0, 0.0, 0.0, 0.0)
    assert (m.learner_turns, m.response_latency_ms, m.long_pauses) == (0, 0, 0)
    assert m.session_ms == 2600  # the session still lasted until then


def test_overlapping_rows_are_counted_once_and_a_barge_in_is_no_wait() -> None:
    """Learner rows 0-1000 and 500-1500 are 1.5 s of talk; a learner who starts before the coach
    stopped waited 0 ms."""
    rows = [
        Row("learner", "one two", 0, 1000),
        Row("learner", "three", 500, 1500),
        Row("coach", "four five six", 1600, 4000),
        Row("learner", "seven", 3500, 4500),
    ]
    m = speech_metrics(rows)
    assert m.learner_talk_ms == 2500
    assert (m.response_latency_ms, m.long_pauses) == (0, 0)


def test_words_fold_case_and_keep_contractions() -> None:
    """Apostrophes inside words stay (curly ones become straight), punctuation goes."""
    assert words("Don’t STOP, it's 5 o'clock!") == ["don't", "stop", "it's", "5", "o'clock"]


@pytest.mark.parametrize(
    ("text", "fillers"),
    [
        ("Um I would like a coffee", 1),
        ("It was, like, really good", 1),
        ("Do you know the way?", 0),
        ("You know, I mean, it is fine", 2),
        ("I mean... whatever", 1),
        ("Uh, hmm, like - okay", 3),
        ("Erm I like tea", 1),
    ],
)
def test_fillers_are_hesitations_and_set_off_markers(text: str, fillers: int) -> None:
    """Hesitation sounds always count; like / you know / I mean only when set off by punctuation."""
    assert count_fillers(text) == fillers


def test_vocabulary_variety_is_a_moving_average_past_fifty_words() -> None:
    """50 distinct words then "w0" ten times: windows k = 1..10 hold 51 - k distinct words, so MATTR is
    (50 + 50 + 49 + ... + 41) / (11 * 50) = 505 / 550, where the plain ratio would say 50 / 60."""
    tokens = [f"w{i}" for i in range(50)] + ["w0"] * 10
    assert vocabulary_variety(tokens) == pytest.approx(505 / 550)
    assert vocabulary_variety([f"w{i}" for i in range(80)]) == 1.0
    assert vocabulary_variety(["a", "b", "a"]) == pytest.approx(2 / 3)  # short: the plain ratio
    assert vocabulary_variety([]) == 0.0


def test_every_metric_is_explained_in_one_line() -> None:
    """EXPLANATIONS covers exactly the metrics, in their order, one line each."""
    assert list(EXPLANATIONS) == list(SpeechMetrics().as_dict())
    assert all(text and "\n" not in text for text in EXPLANATIONS.values())
