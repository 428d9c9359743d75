"""The rating prompt, the answer's strict schema, and the validator's refusals (relay.worker.rubric)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from relay.worker.rubric import (
    ANSWER_SCHEMA,
    FEEDBACK_MAX_CHARS,
    MAX_TRANSCRIPT_CHARS,
    METRICS_HEADER,
    RUBRICS,
    InvalidAnswer,
    build_prompt,
    parse_answer,
    transcript_lines,
)
from relay.worker.speech import EXPLANATIONS, speech_metrics
from storage.ratings import DIMENSIONS

#: What OpenAI's strict Structured Outputs accept of JSON Schema (and what this schema may use).
STRICT_KEYWORDS = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "description",
    "minimum",
    "maximum",
}
SECRET = "My <b>secret</b> sentence"


@dataclass
class Row:
    speaker: str
    text: str
    start_ms: int = 0
    end_ms: int = 1000


def _objects(schema: dict[str, Any]) -> list[dict[str, Any]]:
    found = [schema] if schema.get("type") == "object" else []
    for sub in schema.get("properties", {}).values():
        found += _objects(sub)
    return found


def _keywords(schema: dict[str, Any]) -> set[str]:
    keys = set(schema)
    for sub in schema.get("properties", {}).values():
        keys |= _keywords(sub)
    return keys


def test_the_answer_schema_is_strict() -> None:
    """Every object closed and fully required; integer scores 0-100; only strict-mode keywords."""
    objects = _objects(ANSWER_SCHEMA)
    assert len(objects) == 2
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert sorted(obj["required"]) == sorted(obj["properties"])
    assert list(ANSWER_SCHEMA["properties"]) == ["scores", "feedback"]
    scores = ANSWER_SCHEMA["properties"]["scores"]["properties"]
    assert list(scores) == list(DIMENSIONS)
    assert all(s["type"] == "integer" and (s["minimum"], s["maximum"]) == (0, 100) for s in scores.values())
    assert ANSWER_SCHEMA["properties"]["feedback"]["type"] == "string"
    assert str(FEEDBACK_MAX_CHARS) in ANSWER_SCHEMA["properties"]["feedback"]["description"]
    assert _keywords(ANSWER_SCHEMA) - set(DIMENSIONS) - {"scores", "feedback"} <= STRICT_KEYWORDS


def answer(**changes: Any) -> str:
    value: dict[str, Any] = {
        "scores": {"fluency": 70, "vocabulary": 65, "grammar": 80, "task": 90},
        "feedback": "  Good ordering. Practise past tenses.  ",
    }
    value.update(changes)
    return json.dumps(value)


def test_a_valid_answer_is_accepted() -> None:
    """Scores come back as ints (80.0 is an integer in JSON Schema); the feedback is stripped."""
    got = parse_answer(answer(scores={"fluency": 0, "vocabulary": 100, "grammar": 80.0, "task": 50}))
    assert got.scores == {"fluency": 0, "vocabulary": 100, "grammar": 80, "task": 50}
    assert all(type(v) is int for v in got.scores.values())
    assert got.feedback == "Good ordering. Practise past tenses."
    assert parse_answer(answer(feedback="x" * FEEDBACK_MAX_CHARS)).feedback == "x" * FEEDBACK_MAX_CHARS


BAD_SCORES = {"fluency": 70, "vocabulary": 65, "grammar": 80}


@pytest.mark.parametrize(
    ("content", "kind", "says"),
    [
        (None, "invalid_json", "empty"),
        ("  ", "invalid_json", "empty"),
        ('{"scores": {"fluency": 7', "invalid_json", "not JSON"),
        ("[1, 2]", "schema_mismatch", "answer is an array, not an object"),
        (json.dumps({"scores": {}}), "schema_mismatch", "answer lacks feedback"),
        (answer(comment="hi"), "schema_mismatch", "answer has 1 unexpected property"),
        (answer(scores=BAD_SCORES), "schema_mismatch", "scores lacks task"),
        (answer(scores="all good"), "schema_mismatch", "scores is a string, not an object"),
        (answer(scores={**BAD_SCORES, "task": 50, "style": 3}), "schema_mismatch", "scores has 1 unexpected"),
        (answer(scores={**BAD_SCORES, "task": "good"}), "schema_mismatch", "scores.task is a string"),
        (answer(scores={**BAD_SCORES, "task": True}), "schema_mismatch", "scores.task is a boolean"),
        (
            answer(scores={**BAD_SCORES, "task": 72.5}),
            "schema_mismatch",
            "scores.task is a number, not an integer",
        ),
        (answer(scores={**BAD_SCORES, "task": None}), "schema_mismatch", "scores.task is null"),
        (answer(scores={**BAD_SCORES, "task": 101}), "out_of_range", "scores.task is 101, outside 0-100"),
        (answer(scores={**BAD_SCORES, "task": -1}), "out_of_range", "scores.task is -1, outside 0-100"),
        (answer(feedback=3), "schema_mismatch", "feedback is a number, not a string"),
        (answer(feedback=" \n "), "out_of_range", "feedback is blank"),
        (answer(feedback="y" * (FEEDBACK_MAX_CHARS + 1)), "out_of_range", "more than 1200"),
    ],
)
def test_the_validator_refuses_with_its_reason(content: str | None, kind: str, says: str) -> None:
    """Each refusal names its kind (invalid_json, schema_mismatch, out_of_range) and what is wrong."""
    with pytest.raises(InvalidAnswer) as caught:
        parse_answer(content)
    assert caught.value.kind == kind
    assert says in str(caught.value)


def test_refusals_never_quote_the_answer() -> None:
    """An answer may echo the transcript: the error names places and numbers, never its text."""
    for content in (
        answer(feedback=SECRET * 100),
        answer(**{SECRET: 1}),
        answer(scores={**BAD_SCORES, "task": SECRET}),
        SECRET,
    ):
        with pytest.raises(InvalidAnswer) as caught:
            parse_answer(content)
        assert "secret" not in str(caught.value).lower()


CAFE = [
    Row("coach", "Hello! What would you like?", 0, 2000),
    Row("learner", "Um, I would like a coffee, please.", 2600, 6000),
    Row("coach", "  Sure.\n Anything   else? ", 6300, 7500),
    Row("learner", "No, thanks.", 8000, 9000),
]


@pytest.mark.parametrize("difficulty", ["beginner", "intermediate", "advanced"])
def test_the_prompt_carries_the_rubric_of_its_difficulty(difficulty: str) -> None:
    """Topic, difficulty, that level's rubric (and no other's), the metrics and their meaning, and the
    transcript as Learner:/Coach: lines."""
    metrics = speech_metrics(CAFE).as_dict()
    prompt = build_prompt(
        topic_title="Ordering at a café", difficulty=difficulty, metrics=metrics, segments=CAFE
    )
    assert "0 to 100" in prompt.system and "JSON" in prompt.system
    user = prompt.user
    assert "Topic: Ordering at a café" in user and f"Difficulty: {difficulty}" in user
    for level, rubric in RUBRICS.items():
        for name in DIMENSIONS:
            assert (rubric[name] in user) == (level == difficulty)
    assert all(EXPLANATIONS[name] in user for name in metrics)
    lines = user.splitlines()
    assert json.loads(lines[lines.index(METRICS_HEADER) + 1]) == metrics
    assert user.endswith(
        "Transcript:\nCoach: Hello! What would you like?\nLearner: Um, I would like a coffee, please.\n"
        "Coach: Sure. Anything else?\nLearner: No, thanks."
    )


def test_an_unknown_difficulty_gets_the_intermediate_rubric() -> None:
    prompt = build_prompt(topic_title="T", difficulty="expert", metrics={}, segments=CAFE)
    assert "Difficulty: intermediate" in prompt.user
    assert RUBRICS["intermediate"]["grammar"] in prompt.user


def test_a_long_transcript_is_cut_to_the_bound() -> None:
    """3000 lines of 100 characters: the transcript part stays within MAX_TRANSCRIPT_CHARS, ends with
    a note of what was left out, and the prompt grows by no more than that bound."""
    rows = [Row("learner" if i % 2 else "coach", f"line {i:04d} " + "word " * 18) for i in range(3000)]
    text = transcript_lines(rows)
    assert len(text) <= MAX_TRANSCRIPT_CHARS
    assert text.startswith("Coach: line 0000 word")
    last = text.splitlines()[-1]
    assert last.startswith("[The transcript is cut here;") and "more lines are not shown" in last
    shown = len(text.splitlines()) - 1
    assert f"; {3000 - shown} more lines" in last  # a line cut short counts as shown
    empty = build_prompt(topic_title="T", difficulty="beginner", metrics={}, segments=[])
    full = build_prompt(topic_title="T", difficulty="beginner", metrics={}, segments=rows)
    assert len(full.user) <= len(empty.user) + MAX_TRANSCRIPT_CHARS


def test_one_huge_line_is_cut_after_a_whole_word() -> None:
    rows = [Row("learner", "word " * 10_000)]
    text = transcript_lines(rows, max_chars=500)
    assert len(text) <= 500
    first, note = text.splitlines()
    assert first.startswith("Learner: word") and first.endswith("word ...")
    assert note == "[The transcript is cut here; 0 more lines are not shown.]"


def test_a_transcript_that_fits_is_whole() -> None:
    text = transcript_lines(CAFE, max_chars=len(transcript_lines(CAFE)))
    assert len(text.splitlines()) == 4 and "cut" not in text
