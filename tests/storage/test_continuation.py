"""Continuation sessions on both engines: who may continue, at most once, and the history they carry."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta

import pytest
from sqlalchemy import select

from storage import continuation, sessions
from storage.continuation import AlreadyContinued
from storage.db import Database
from storage.models import AuditEvent, Session, SessionStatus, TranscriptSegment, User, new_id, utcnow
from storage.ports import Speaker

WINDOW = timedelta(seconds=30)


async def _interrupted(db: Database, *, ended_ago: timedelta = timedelta(seconds=1)) -> Session:
    async with db.sessions.begin() as s:
        user = User(email=f"{secrets.token_hex(6)}@example.org")
        s.add(user)
        await s.flush()
        row = await sessions.create_session(s, user_id=user.id, topic_id="cafe-order", user_hash="h")
        row.status = SessionStatus.INTERRUPTED
        row.ended_at = utcnow() - ended_ago
        row.visibility = "public"
        row.public_slug = secrets.token_hex(8)
    return row


async def _continue(db: Database, previous: Session) -> Session:
    async with db.sessions.begin() as s:
        return await continuation.create_continuation(s, previous, session_id=new_id("ses"), user_hash="h")


def _say(session_id: str, seq: int, speaker: Speaker, text: str, *, final: bool = True) -> TranscriptSegment:
    return TranscriptSegment(
        session_id=session_id, seq=seq, speaker=speaker.value, text=text, start_ms=seq * 1000,
        end_ms=seq * 1000 + 500, final=final,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "ended_ago", "expected"),
    [
        (SessionStatus.INTERRUPTED, timedelta(seconds=5), True),
        (SessionStatus.INTERRUPTED, timedelta(seconds=31), False),
        (SessionStatus.ENDED, timedelta(seconds=1), False),
        (SessionStatus.FAILED, timedelta(seconds=1), False),
        (SessionStatus.PROCESSED, timedelta(seconds=1), False),
    ],
)
def test_only_a_recently_interrupted_session_is_continuable(
    status: str, ended_ago: timedelta, expected: bool
) -> None:
    """Interrupted (its relay died) within the window: yes; past it, or ended any other way: no."""
    now = utcnow()
    row = Session(status=status, ended_at=now - ended_ago)
    assert continuation.continuable(row, now=now, window=WINDOW) is expected


async def test_a_continuation_is_a_private_session_of_the_same_learner_and_topic(database: Database) -> None:
    """The new session links back, starts in `created`, keeps user and topic, and is never public."""
    previous = await _interrupted(database)
    new = await _continue(database, previous)
    async with database.sessions() as s:
        row = await s.get(Session, new.id)
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.session_id == new.id))).scalars().all()
    assert row is not None
    assert (row.continued_from_id, row.user_id, row.topic_id) == (
        previous.id,
        previous.user_id,
        previous.topic_id,
    )
    assert (row.status, row.visibility, row.public_slug) == (SessionStatus.CREATED, "private", None)
    assert [(a.event, a.code) for a in audit] == [("session.created", "continuation")]


async def test_a_session_continues_at_most_once_even_when_offers_race(database: Database) -> None:
    """Of several simultaneous continuations exactly one is created; the others are refused."""
    previous = await _interrupted(database)
    results = await asyncio.gather(*(_continue(database, previous) for _ in range(5)), return_exceptions=True)
    created = [r for r in results if isinstance(r, Session)]
    assert len(created) == 1
    assert all(isinstance(r, AlreadyContinued) for r in results if not isinstance(r, Session))
    async with database.sessions() as s:
        linked = (
            (await s.execute(select(Session.id).where(Session.continued_from_id == previous.id)))
            .scalars()
            .all()
        )
    assert linked == [created[0].id]


async def test_history_runs_through_every_earlier_session_oldest_first(database: Database) -> None:
    """A continuation of a continuation hears the whole conversation, final text only, in order."""
    first = await _interrupted(database)
    second = await _continue(database, first)
    async with database.sessions.begin() as s:
        s.add_all([
            _say(first.id, 1, Speaker.LEARNER, "one"),
            _say(first.id, 2, Speaker.COACH, "two"),
            _say(first.id, 3, Speaker.LEARNER, "cut off", final=False),
            _say(second.id, 1, Speaker.LEARNER, "three"),
        ])  # fmt: skip
        (await s.get(Session, second.id)).status = SessionStatus.INTERRUPTED  # type: ignore[union-attr]
        (await s.get(Session, second.id)).ended_at = utcnow()  # type: ignore[union-attr]
    async with database.sessions() as s:
        second_row = await s.get(Session, second.id)
    assert second_row is not None
    third = await _continue(database, second_row)
    async with database.sessions() as s:
        assert await continuation.conversation_history(s, second.id) == [
            (Speaker.LEARNER, "one"), (Speaker.COACH, "two"), (Speaker.LEARNER, "three"),
        ]  # fmt: skip
        assert await continuation.conversation_history(s, third.id) == [
            (Speaker.LEARNER, "one"), (Speaker.COACH, "two"), (Speaker.LEARNER, "three"),
        ]  # fmt: skip
        assert await continuation.conversation_history(s, first.id) == [
            (Speaker.LEARNER, "one"), (Speaker.COACH, "two"),
        ]  # fmt: skip
