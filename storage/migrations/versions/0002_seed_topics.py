"""Seed the topic catalogue.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Each topic carries the coaching instructions and the turn detection the live session sends
upstream. Beginners get a longer silence window, so a pause to find a word does not end their turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEEDED = datetime(2026, 11, 28, tzinfo=UTC)


def _vad(silence_ms: int, threshold: float = 0.5) -> dict[str, Any]:
    return {
        "type": "server_vad",
        "threshold": threshold,
        "prefix_padding_ms": 300,
        "silence_duration_ms": silence_ms,
        "create_response": True,
        "interrupt_response": True,
    }


TURNS = {"beginner": _vad(900), "intermediate": _vad(650), "advanced": _vad(450)}

COACH = (
    "You are a warm, patient language coach in a spoken practice conversation. Speak naturally and "
    "briefly (one to three sentences), ask one question at a time, and let the learner do most of the "
    "talking. When the learner makes a mistake, recast the sentence correctly in your reply instead of "
    "lecturing. {level} Scenario: {scenario} Open with: {opener}"
)
LEVEL = {
    "beginner": "Use short sentences, common words and a slow pace; offer two choices when the learner is stuck.",
    "intermediate": "Use everyday vocabulary with some idioms; ask the learner to explain and give reasons.",
    "advanced": "Speak at natural speed, challenge opinions politely and introduce precise vocabulary.",
}

TOPICS: list[dict[str, Any]] = [
    {
        "id": "cafe-order",
        "title": "Ordering at a café",
        "difficulty": "beginner",
        "scenario": "You are a friendly barista; the learner is a customer ordering breakfast.",
        "prompts": ["What would you like to drink?", "Would you like something to eat with that?",
                    "Is that for here or to take away?"],
        "hints": ["I would like ...", "Can I have ..., please?", "How much is it?"],
    },
    {
        "id": "introductions",
        "title": "Introducing yourself",
        "difficulty": "beginner",
        "scenario": "You meet the learner at a language exchange evening.",
        "prompts": ["What is your name and where are you from?", "What do you do in your free time?",
                    "Why are you learning this language?"],
        "hints": ["My name is ...", "I live in ...", "I like ... because ..."],
    },
    {
        "id": "directions",
        "title": "Asking for directions",
        "difficulty": "beginner",
        "scenario": "The learner is a tourist asking you, a local, how to get to the train station.",
        "prompts": ["Where do you want to go?", "Do you want to walk or take the bus?"],
        "hints": ["Excuse me, where is ...?", "Turn left / right", "Is it far from here?"],
    },
    {
        "id": "doctor-visit",
        "title": "At the doctor's",
        "difficulty": "intermediate",
        "scenario": "You are a general practitioner; the learner describes symptoms they have had for a few days.",
        "prompts": ["What seems to be the problem?", "When did it start?", "Are you taking any medication?"],
        "hints": ["I have had ... since ...", "It hurts when ...", "Should I ...?"],
    },
    {
        "id": "weekend-plans",
        "title": "Making weekend plans",
        "difficulty": "intermediate",
        "scenario": "You and the learner are friends deciding what to do together this weekend.",
        "prompts": ["What do you feel like doing this weekend?", "What if it rains?",
                    "Where should we meet?"],
        "hints": ["How about ...?", "I'd rather ... than ...", "Let's meet at ..."],
    },
    {
        "id": "apartment-hunting",
        "title": "Renting an apartment",
        "difficulty": "intermediate",
        "scenario": "You are a landlord showing a flat; the learner is a prospective tenant with questions.",
        "prompts": ["What are you looking for in a flat?", "How long would you like to stay?",
                    "Do you have any questions about the contract?"],
        "hints": ["Is ... included in the rent?", "When is it available?", "Could I ...?"],
    },
    {
        "id": "job-interview",
        "title": "A job interview",
        "difficulty": "advanced",
        "scenario": "You interview the learner for a job they want; probe their experience and motivation.",
        "prompts": ["Tell me about a project you are proud of.", "How do you handle disagreement in a team?",
                    "Where do you see yourself in five years?"],
        "hints": ["In my previous role, I ...", "One challenge I faced was ...", "What I learned was ..."],
    },
    {
        "id": "debate-remote-work",
        "title": "Debate: remote work",
        "difficulty": "advanced",
        "scenario": "Hold a friendly debate: you argue that offices matter, the learner defends remote work.",
        "prompts": ["Is remote work better for productivity?", "What do teams lose without an office?"],
        "hints": ["On the one hand ..., on the other ...", "I see your point, but ...", "The evidence suggests ..."],
    },
    {
        "id": "news-discussion",
        "title": "Discussing the news",
        "difficulty": "advanced",
        "scenario": "Discuss a recent science or technology story the learner found interesting.",
        "prompts": ["Which story caught your attention this week?", "Why do you think it matters?",
                    "What might happen next?"],
        "hints": ["According to ...", "It raises the question of ...", "I'm sceptical about ..."],
    },
]  # fmt: skip


def _table() -> sa.TableClause:
    json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
    return sa.table(
        "topics",
        sa.column("id", sa.String),
        sa.column("title", sa.String),
        sa.column("difficulty", sa.String),
        sa.column("prompts", json),
        sa.column("hints", json),
        sa.column("instructions", sa.Text),
        sa.column("turn_detection", json),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )


def upgrade() -> None:
    rows = []
    for t in TOPICS:
        instructions = COACH.format(
            level=LEVEL[t["difficulty"]], scenario=t["scenario"], opener=t["prompts"][0]
        )
        rows.append(
            {
                "id": t["id"],
                "title": t["title"],
                "difficulty": t["difficulty"],
                "prompts": t["prompts"],
                "hints": t["hints"],
                "instructions": instructions,
                "turn_detection": TURNS[t["difficulty"]],
                "created_at": SEEDED,
                "updated_at": SEEDED,
            }
        )
    op.bulk_insert(_table(), rows)


def downgrade() -> None:
    topics = _table()
    op.execute(topics.delete().where(topics.c.id.in_([t["id"] for t in TOPICS])))
