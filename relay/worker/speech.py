"""Speech metrics of a finished session: deterministic, explainable, computed from what was stored.

Pure functions over the transcript rows (``speaker``, ``text``, ``start_ms``, ``end_ms``, in
conversation order) and the recorded tracks' durations: no I/O, no model, the same input always
gives the same numbers. Each metric is explained in one line in :data:`EXPLANATIONS`; that text is
part of the product (the learner reads it next to the number, the rating model reads the numbers).

Terms used below:

- a *turn* is a run of consecutive rows of one speaker (rows of the same speaker with no row of the
  other in between belong to one turn);
- *talk time* is the union of a speaker's rows' ``[start_ms, end_ms)`` spans, so overlapping rows
  are not counted twice;
- a *word* is a run of letters or digits, with inner apostrophes (``don't`` is one word), case-folded.

An empty transcript gives zeros everywhere (never a division by zero), and every value is a plain
``int`` or a finite ``float``, so :meth:`SpeechMetrics.as_dict` is JSON as it stands.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Final, Protocol

__all__ = [
    "EXPLANATIONS",
    "LONG_PAUSE_MS",
    "MATTR_WINDOW",
    "RecordingLike",
    "SegmentLike",
    "SpeechMetrics",
    "count_fillers",
    "speech_metrics",
    "vocabulary_variety",
    "words",
]

LEARNER: Final = "learner"
COACH: Final = "coach"
#: A silence longer than this on the learner's side counts as a long pause.
LONG_PAUSE_MS: Final = 3000
#: Window of the moving-average type-token ratio (MATTR); shorter speech gets the plain ratio.
MATTR_WINDOW: Final = 50

# Fillers are English only: Parley's coach speaks English today; another language needs its own lists.
#: Hesitation sounds: always fillers.
HESITATIONS: Final = frozenset({"um", "umm", "uh", "uhh", "uhm", "er", "erm", "ah", "hmm"})
#: Discourse markers: fillers only when set off by a comma, a dash or an ellipsis ("it was, like, fun";
#: not "I would like a coffee" nor "do you know the way").
MARKERS: Final = ("like", "you know", "i mean")
_MARKER: Final = re.compile(
    r"\b(?:" + "|".join(m.replace(" ", r"\s+") for m in MARKERS) + r")\b(?=\s*(?:,|\.\.\.|…|—|–| - ))",
    re.IGNORECASE,
)

_WORD: Final = re.compile(r"\w+(?:['’]\w+)*")

#: One line per metric, in the order of :meth:`SpeechMetrics.as_dict`: what the number means.
EXPLANATIONS: Final[dict[str, str]] = {
    "session_ms": "Length of the session: the longest recorded track (or the transcript, if it ends later).",
    "learner_talk_ms": "Time the learner spent speaking, from the transcript's timings.",
    "coach_talk_ms": "Time the coach spent speaking (what was heard of it, when the learner cut in).",
    "learner_talk_ratio": "The learner's share of the talking: learner talk time / (learner + coach).",
    "learner_turns": "How many times the learner took the floor (lines in a row count as one turn).",
    "learner_words": "Words the learner said, as transcribed.",
    "words_per_minute": "Speaking rate: the learner's words per minute of the learner's own talk time.",
    "mean_utterance_words": "Average length of the learner's turns, in words.",
    "filler_rate": (
        "Fillers per learner word: um, uh, er, hmm, and 'like', 'you know', 'I mean' when set off by a "
        "comma (English only)."
    ),
    "vocabulary_variety": (
        "Share of different words (distinct / total) averaged over every 50-word stretch (plain "
        "share below 50 words), so long and short sessions compare; 0-1, higher is more varied."
    ),
    "response_latency_ms": (
        "Typical wait before the learner answers: median time from the end of the coach's turn to "
        "the start of the learner's."
    ),
    "long_pauses": "Silences over 3 s on the learner's side: before answering the coach, or within a turn.",
}


class SegmentLike(Protocol):
    """What a transcript row needs for the metrics (``storage.models.TranscriptSegment`` is one)."""

    @property
    def speaker(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def start_ms(self) -> int: ...
    @property
    def end_ms(self) -> int: ...


class RecordingLike(Protocol):
    """A recorded track's length (``storage.models.AudioRecording`` is one)."""

    @property
    def duration_ms(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SpeechMetrics:
    """The metrics of one session; :data:`EXPLANATIONS` says what each one means."""

    session_ms: int = 0
    learner_talk_ms: int = 0
    coach_talk_ms: int = 0
    learner_talk_ratio: float = 0.0
    learner_turns: int = 0
    learner_words: int = 0
    words_per_minute: float = 0.0
    mean_utterance_words: float = 0.0
    filler_rate: float = 0.0
    vocabulary_variety: float = 0.0
    response_latency_ms: int = 0
    long_pauses: int = 0

    def as_dict(self) -> dict[str, int | float]:
        """The metrics as a JSON object (the ``metrics`` of API.md's Rating)."""
        return asdict(self)


def words(text: str) -> list[str]:
    """The words of ``text``, case-folded (``"Don't STOP"`` -> ``["don't", "stop"]``)."""
    return [w.replace("’", "'") for w in _WORD.findall(text.casefold())]


def count_fillers(text: str) -> int:
    """Fillers in ``text``: hesitation sounds, and discourse markers set off by punctuation."""
    return sum(w in HESITATIONS for w in words(text)) + len(_MARKER.findall(text))


def vocabulary_variety(tokens: Sequence[str], window: int = MATTR_WINDOW) -> float:
    """Moving-average type-token ratio over ``window``-word windows; the plain ratio when shorter.

    The plain ratio (distinct / total) falls as speech gets longer, whatever the speaker's range;
    averaging it over fixed-size windows (Covington & McFall's MATTR) keeps sessions comparable.
    """
    if not tokens:
        return 0.0
    if len(tokens) < window:
        return len(set(tokens)) / len(tokens)
    seen = Counter(tokens[:window])
    total = len(seen)
    for i in range(window, len(tokens)):
        leaving = tokens[i - window]
        seen[leaving] -= 1
        if seen[leaving] == 0:
            del seen[leaving]
        seen[tokens[i]] += 1
        total += len(seen)
    return total / ((len(tokens) - window + 1) * window)


def _talk_ms(rows: Iterable[SegmentLike]) -> int:
    """The length of the union of the rows' spans (rows that overlap are counted once)."""
    spans = sorted((r.start_ms, r.end_ms) for r in rows if r.end_ms > r.start_ms)
    total, reach = 0, None
    for start, end in spans:
        if reach is None or start >= reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def _turns(segments: Sequence[SegmentLike]) -> list[tuple[str, list[SegmentLike]]]:
    turns: list[tuple[str, list[SegmentLike]]] = []
    for row in segments:
        if row.speaker not in (LEARNER, COACH):
            continue
        if turns and turns[-1][0] == row.speaker:
            turns[-1][1].append(row)
        else:
            turns.append((row.speaker, [row]))
    return turns


def speech_metrics(
    segments: Sequence[SegmentLike], recordings: Iterable[RecordingLike] = ()
) -> SpeechMetrics:
    """The metrics of a session from its transcript rows (in conversation order) and its tracks.

    Rows without a word (noise the transcriber left blank) are left out, as if they were silence.
    """
    ends = [r.end_ms for r in segments] + [r.duration_ms for r in recordings]
    segments = [r for r in segments if _WORD.search(r.text)]
    learner_rows = [r for r in segments if r.speaker == LEARNER]
    coach_rows = [r for r in segments if r.speaker == COACH]
    learner_ms, coach_ms = _talk_ms(learner_rows), _talk_ms(coach_rows)
    turns = _turns(segments)

    tokens: list[str] = []
    fillers = learner_turns = long_pauses = 0
    latencies: list[int] = []
    coach_end: int | None = None  # when the coach's turn before this one ended
    for speaker, rows in turns:
        if speaker == COACH:
            coach_end = max(r.end_ms for r in rows)
            continue
        learner_turns += 1
        tokens.extend(w for r in rows for w in words(r.text))
        fillers += sum(count_fillers(r.text) for r in rows)
        if coach_end is not None:  # an answer to the coach: how long the learner took to start
            wait = max(0, rows[0].start_ms - coach_end)
            latencies.append(wait)
            long_pauses += wait > LONG_PAUSE_MS
        for before, after in zip(rows, rows[1:], strict=False):  # silences within the turn
            long_pauses += after.start_ms - before.end_ms > LONG_PAUSE_MS

    n_words = len(tokens)
    return SpeechMetrics(
        session_ms=max(ends, default=0),
        learner_talk_ms=learner_ms,
        coach_talk_ms=coach_ms,
        learner_talk_ratio=round(learner_ms / (learner_ms + coach_ms), 3) if learner_ms + coach_ms else 0.0,
        learner_turns=learner_turns,
        learner_words=n_words,
        words_per_minute=round(n_words * 60_000 / learner_ms, 1) if learner_ms else 0.0,
        mean_utterance_words=round(n_words / learner_turns, 1) if learner_turns else 0.0,
        filler_rate=round(fillers / n_words, 3) if n_words else 0.0,
        vocabulary_variety=round(vocabulary_variety(tokens), 3),
        response_latency_ms=round(statistics.median(latencies)) if latencies else 0,
        long_pauses=long_pauses,
    )
