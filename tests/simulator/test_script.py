"""The coaching script and the placeholder transcript."""

from __future__ import annotations

import re

from relay.simulator import script


def test_the_question_comes_from_the_instructions() -> None:
    """A question in the instructions is what the coach asks, without its 'Ask:' label."""
    instructions = "You are a coach. Topic: food. Ask the learner: What would you like to order today?"
    reply = script.coach_reply(instructions, turn=0, seed=0, heard_learner=True)
    assert reply.endswith(" What would you like to order today?")


def test_questions_rotate_with_the_turn() -> None:
    """With several questions, successive responses ask successive ones."""
    instructions = "Coach the learner. What is your name? Where do you live?"
    replies = [script.coach_reply(instructions, turn=t, seed=0, heard_learner=True) for t in range(3)]
    assert [r.rsplit(". ", 1)[-1] for r in replies] == [
        "What is your name?",
        "Where do you live?",
        "What is your name?",
    ]


def test_a_topic_sentence_is_used_when_there_is_no_question() -> None:
    """Without a question, the sentence naming the topic is turned into the prompt."""
    reply = script.coach_reply("Be kind. The topic is job interviews.", turn=0, seed=0, heard_learner=False)
    assert "the topic is job interviews" in reply


def test_default_instructions_give_generic_practice_questions() -> None:
    """The default system prompt yields one of the built-in practice questions, deterministically."""
    first = script.coach_reply(script.DEFAULT_INSTRUCTIONS, turn=1, seed=4, heard_learner=True)
    assert first == script.coach_reply(script.DEFAULT_INSTRUCTIONS, turn=1, seed=4, heard_learner=True)
    assert first.endswith("?") and "knowledge cutoff" not in first


def test_placeholder_transcript_is_obviously_not_recognition() -> None:
    """The learner 'transcript' is bracketed and made of placeholder words, one per 0.4 s."""
    deltas = script.placeholder_transcript(2400)
    assert deltas[0] == "[simulated speech, 2.4 s]"
    assert re.fullmatch(r"\[simulated speech, 2\.4 s\]( blah){6}", "".join(deltas))
    assert script.placeholder_transcript(50) == ["[simulated speech, 0.1 s]", " blah"]
