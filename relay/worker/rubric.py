"""What the rating model is asked, and how its answer is checked.

- :data:`RUBRICS`: per topic difficulty, what each of the four scores (``storage.ratings.DIMENSIONS``)
  means at that level and what 0, 50 and 100 look like, so a beginner is not graded as an advanced
  speaker.
- :func:`build_prompt`: the system and user messages of the Chat Completions call: the rubric of
  the topic's difficulty, the topic, the speech metrics (:mod:`relay.worker.speech`) and the
  transcript as ``Learner:``/``Coach:`` lines, cut to :data:`MAX_TRANSCRIPT_CHARS`.
- :data:`ANSWER_SCHEMA`: the strict JSON schema of the answer (``response_format`` ``json_schema``
  with ``strict: true``), and :func:`parse_answer`, which checks what came back and raises
  :class:`InvalidAnswer` saying what is wrong (never quoting it: answers may echo the transcript).

Nothing here logs; transcript text goes into the prompt and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from relay.worker.speech import EXPLANATIONS, SegmentLike
from storage.ratings import DIMENSIONS

__all__ = [
    "ANSWER_SCHEMA",
    "FEEDBACK_MAX_CHARS",
    "MAX_TRANSCRIPT_CHARS",
    "METRICS_HEADER",
    "RUBRICS",
    "SCHEMA_NAME",
    "InvalidAnswer",
    "Prompt",
    "RatingAnswer",
    "build_prompt",
    "parse_answer",
    "transcript_lines",
]

#: The ``json_schema.name`` of the answer format (letters, digits, ``_`` and ``-``, up to 64).
SCHEMA_NAME: Final = "parley_rating"
#: The longest feedback accepted; the schema's description asks for less.
FEEDBACK_MAX_CHARS: Final = 1200
#: How much transcript the prompt carries at most (characters of ``Learner:``/``Coach:`` lines).
MAX_TRANSCRIPT_CHARS: Final = 16_000
#: The line before the metrics' JSON in the user message (the rating simulator reads what follows).
METRICS_HEADER: Final = "Speech metrics (JSON):"
SCORE_MIN: Final = 0
SCORE_MAX: Final = 100
_CUT_NOTE: Final = "[The transcript is cut here; {n} more lines are not shown.]"
_MIN_PARTIAL: Final = 40

Difficulty = Literal["beginner", "intermediate", "advanced"]
DEFAULT_DIFFICULTY: Final = "intermediate"

#: Per difficulty and dimension: what the score measures at that level, with anchors for 0, 50 and 100.
RUBRICS: Final[dict[str, dict[str, str]]] = {
    "beginner": {
        "fluency": (
            "Can the learner keep a simple exchange going? Short answers and pauses are normal at this "
            "level. 0: no usable speech, or single words after long silences. 50: short phrases with "
            "frequent hesitation, but answers come. 100: answers promptly in short connected sentences."
        ),
        "vocabulary": (
            "Everyday words for the situation (greetings, numbers, food, places). 0: no relevant words. "
            "50: the key words of the task, often repeated. 100: the situation's common words used "
            "correctly, with some variety."
        ),
        "grammar": (
            "Basic structures: present tense, questions, please/thank-you forms. Ignore small slips "
            "that do not hide the meaning. 0: no sentence structure. 50: simple sentences with "
            "frequent errors, meaning clear. 100: simple sentences mostly correct."
        ),
        "task": (
            "Did the learner do what the scenario asks (order, introduce themselves, ask the way)? "
            "0: did not engage. 50: part of the task done, or done with much help from the coach. "
            "100: the task done, with the coach only prompting."
        ),
    },
    "intermediate": {
        "fluency": (
            "Connected speech at a natural pace; some hesitation while searching for words is fine. "
            "0: mostly silence or fragments. 50: speaks in sentences but often stalls, restarts or "
            "relies on fillers. 100: speaks in connected sentences with few long pauses."
        ),
        "vocabulary": (
            "Range beyond the basics: describing, explaining, giving reasons, some idioms. 0: only a "
            "handful of basic words. 50: adequate but repetitive, with gaps worked around. 100: varied "
            "and precise words for the topic, with few gaps."
        ),
        "grammar": (
            "Past and future forms, linking words, questions, comparatives. 0: no control of basic "
            "forms. 50: errors in the less common forms, basic ones mostly right. 100: good control "
            "with occasional slips."
        ),
        "task": (
            "Did the learner handle the scenario (explain, ask follow-up questions, agree on something)? "
            "0: did not engage. 50: engaged but left important parts out. 100: handled the whole "
            "scenario, answering and asking."
        ),
    },
    "advanced": {
        "fluency": (
            "Fluent, spontaneous speech; long pauses or heavy filler use count against it. 0: cannot "
            "sustain speech. 50: fluent in stretches, with noticeable searching and fillers. 100: "
            "effortless, natural pace and rhythm throughout."
        ),
        "vocabulary": (
            "Precise, idiomatic and nuanced words, register fitting the situation (negotiating, "
            "persuading). 0: basic words only. 50: good range with imprecision or repetition. 100: "
            "wide, precise and idiomatic range."
        ),
        "grammar": (
            "Complex structures (conditionals, modals, subordinate clauses) used accurately. 0: errors "
            "at every step. 50: complex forms attempted with frequent errors. 100: consistently "
            "accurate complex grammar."
        ),
        "task": (
            "Did the learner reach the scenario's goal with appropriate strategies (arguing, "
            "conceding, clarifying)? 0: did not engage. 50: pursued the goal without reaching it or "
            "with weak strategies. 100: reached it convincingly."
        ),
    },
}

_SYSTEM: Final = (
    "You rate a language learner's spoken practice session with an AI coach. You get the topic, its "
    "difficulty, speech metrics measured from the recording and the transcript (automatic speech "
    "recognition: ignore spelling and punctuation, which the learner did not choose). Rate only the "
    "learner, never the coach. Give each of fluency, vocabulary, grammar and task an integer from "
    "0 to 100 by the rubric for this difficulty, and feedback to the learner: two to four short "
    "sentences addressed to them ('you'), naming one strength and one thing to practise next, "
    f"in at most {FEEDBACK_MAX_CHARS} characters. Answer with the JSON object of the given schema only."
)

#: The answer's JSON schema, in the subset OpenAI's strict Structured Outputs accepts (every property
#: required, ``additionalProperties: false``, ``minimum``/``maximum`` on integers). String length
#: keywords are not in that subset, so the feedback's bound is in its description and
#: :func:`parse_answer` enforces it.
ANSWER_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "scores": {
            "type": "object",
            "properties": {
                name: {
                    "type": "integer",
                    "minimum": SCORE_MIN,
                    "maximum": SCORE_MAX,
                    "description": f"The learner's {name} score by the rubric, {SCORE_MIN}-{SCORE_MAX}.",
                }
                for name in DIMENSIONS
            },
            "required": list(DIMENSIONS),
            "additionalProperties": False,
        },
        "feedback": {
            "type": "string",
            "description": f"Feedback to the learner, at most {FEEDBACK_MAX_CHARS} characters.",
        },
    },
    "required": ["scores", "feedback"],
    "additionalProperties": False,
}


class InvalidAnswer(ValueError):
    """The model's answer is not a rating: ``kind`` says how, the message says where (no content)."""

    def __init__(self, kind: Literal["invalid_json", "schema_mismatch", "out_of_range"], detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class RatingAnswer:
    """A valid answer: the four scores (0-100) and the feedback."""

    scores: dict[str, int]
    feedback: str


def transcript_lines(segments: Sequence[SegmentLike], max_chars: int = MAX_TRANSCRIPT_CHARS) -> str:
    """The transcript as ``Learner: ...``/``Coach: ...`` lines, at most ``max_chars`` characters.

    Lines are kept from the start; the first one that does not fit is cut after a whole word (marked
    ``...``), and a last line says how many more were left out, all within the bound.
    """
    lines = [
        f"{'Learner' if row.speaker == 'learner' else 'Coach'}: {' '.join(row.text.split())}"
        for row in segments
        if row.speaker in ("learner", "coach") and row.text.strip()
    ]
    whole = "\n".join(lines)
    if len(whole) <= max_chars:
        return whole
    kept: list[str] = []
    used = 0
    reserve = 1 + len(_CUT_NOTE.format(n=len(lines)))  # room for the note that will end it
    for i, line in enumerate(lines):
        sep = 1 if kept else 0
        if used + sep + len(line) + reserve <= max_chars:
            kept.append(line)
            used += sep + len(line)
            continue
        # This line does not fit: keep what does of it (whole words), then say what was left out.
        hidden = len(lines) - i
        room = max_chars - used - sep - reserve
        if room >= _MIN_PARTIAL:
            kept.append(line[: room - 4].rsplit(" ", 1)[0] + " ...")
            used += sep + len(kept[-1])
            hidden -= 1
        note = _CUT_NOTE.format(n=hidden)
        if used + (1 if kept else 0) + len(note) <= max_chars:
            kept.append(note)
        break
    return "\n".join(kept)


@dataclass(frozen=True, slots=True)
class Prompt:
    """The two messages of the rating call: the instructions (``system``) and the session (``user``)."""

    system: str
    user: str


def build_prompt(
    *,
    topic_title: str,
    difficulty: str,
    metrics: Mapping[str, int | float],
    segments: Sequence[SegmentLike],
) -> Prompt:
    """The rating call's messages: the rubric of ``difficulty`` (intermediate's when unknown), the
    topic, the metrics with what each means, and the transcript (:func:`transcript_lines`)."""
    level = difficulty if difficulty in RUBRICS else DEFAULT_DIFFICULTY
    rubric = "\n".join(f"- {name}: {RUBRICS[level][name]}" for name in DIMENSIONS)
    explained = "\n".join(f"- {name}: {EXPLANATIONS[name]}" for name in metrics if name in EXPLANATIONS)
    user = (
        f"Topic: {topic_title}\nDifficulty: {level}\n\n"
        f"Rubric for {level} learners:\n{rubric}\n\n"
        f"What the metrics mean:\n{explained}\n\n"
        f"{METRICS_HEADER}\n{json.dumps(dict(metrics), separators=(',', ':'))}\n\n"
        f"Transcript:\n{transcript_lines(segments)}"
    )
    return Prompt(_SYSTEM, user)


def parse_answer(content: str | None) -> RatingAnswer:
    """Check the model's answer against :data:`ANSWER_SCHEMA` (and the feedback's bound).

    Raises :class:`InvalidAnswer`: ``invalid_json`` (empty, or not JSON), ``schema_mismatch`` (not
    an object, a key missing or extra, a wrong type) or ``out_of_range`` (a score outside 0-100,
    feedback blank or too long).
    """
    if content is None or not content.strip():
        raise InvalidAnswer("invalid_json", "the answer is empty")
    try:
        value = json.loads(content)
    except json.JSONDecodeError as exc:
        raise InvalidAnswer("invalid_json", f"not JSON ({exc.msg} at position {exc.pos})") from None
    _expect_object(value, "answer", ("scores", "feedback"))
    scores = value["scores"]
    _expect_object(scores, "scores", DIMENSIONS)
    checked: dict[str, int] = {}
    for name in DIMENSIONS:
        score = scores[name]
        if isinstance(score, float) and score.is_integer():
            score = int(score)  # JSON Schema's integer: 80.0 is one
        if isinstance(score, bool) or not isinstance(score, int):
            raise InvalidAnswer("schema_mismatch", f"scores.{name} is {_json_type(score)}, not an integer")
        if not SCORE_MIN <= score <= SCORE_MAX:
            raise InvalidAnswer("out_of_range", f"scores.{name} is {score}, outside {SCORE_MIN}-{SCORE_MAX}")
        checked[name] = score
    feedback = value["feedback"]
    if not isinstance(feedback, str):
        raise InvalidAnswer("schema_mismatch", f"feedback is {_json_type(feedback)}, not a string")
    feedback = feedback.strip()
    if not feedback:
        raise InvalidAnswer("out_of_range", "feedback is blank")
    if len(feedback) > FEEDBACK_MAX_CHARS:
        raise InvalidAnswer(
            "out_of_range", f"feedback has {len(feedback)} characters, more than {FEEDBACK_MAX_CHARS}"
        )
    return RatingAnswer(checked, feedback)


def _expect_object(value: object, where: str, keys: Sequence[str]) -> None:
    if not isinstance(value, dict):
        raise InvalidAnswer("schema_mismatch", f"{where} is {_json_type(value)}, not an object")
    missing = [k for k in keys if k not in value]
    if missing:
        raise InvalidAnswer("schema_mismatch", f"{where} lacks {', '.join(missing)}")
    extra = len(value) - len(keys)
    if extra:  # names of unexpected keys are model output: counted, not quoted
        raise InvalidAnswer(
            "schema_mismatch", f"{where} has {extra} unexpected propert{'y' if extra == 1 else 'ies'}"
        )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
