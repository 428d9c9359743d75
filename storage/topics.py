"""The topic catalogue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Topic, utcnow

__all__ = ["TopicExists", "create_topic", "get_topic", "list_topics", "retire_topic", "update_topic"]

_DIFFICULTY_ORDER = {"beginner": 0, "intermediate": 1, "advanced": 2}


class TopicExists(Exception):
    """A topic with this id already exists."""


async def list_topics(s: AsyncSession, *, include_retired: bool = False) -> Sequence[Topic]:
    query = select(Topic)
    if not include_retired:
        query = query.where(Topic.retired_at.is_(None))
    topics = (await s.execute(query)).scalars().all()
    return sorted(topics, key=lambda t: (_DIFFICULTY_ORDER.get(t.difficulty, 9), t.title))


async def get_topic(s: AsyncSession, topic_id: str, *, include_retired: bool = False) -> Topic | None:
    topic = await s.get(Topic, topic_id)
    if topic is None or (topic.retired_at is not None and not include_retired):
        return None
    return topic


async def create_topic(s: AsyncSession, **fields: Any) -> Topic:
    topic = Topic(**fields)
    s.add(topic)
    try:
        await s.flush()
    except IntegrityError:
        raise TopicExists from None
    return topic


async def update_topic(s: AsyncSession, topic: Topic, **fields: Any) -> Topic:
    for name, value in fields.items():
        setattr(topic, name, value)
    topic.updated_at = utcnow()
    await s.flush()
    return topic


async def retire_topic(s: AsyncSession, topic: Topic) -> None:
    """Hide a topic from the catalogue; sessions that used it keep pointing at it."""
    if topic.retired_at is None:
        topic.retired_at = utcnow()
        await s.flush()
