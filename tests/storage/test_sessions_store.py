"""Practice-session queries on both engines: owner scoping, paging, single-use client secrets."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta

from storage import sessions
from storage.db import Database
from storage.models import User, utcnow
from storage.sessions import Redemption


async def _session(db: Database) -> tuple[str, str]:
    async with db.sessions.begin() as s:
        user = User(email=f"{secrets.token_hex(6)}@example.org")
        s.add(user)
        await s.flush()
        session = await sessions.create_session(s, user_id=user.id, topic_id="cafe-order", user_hash="h")
        return user.id, session.id


async def _redeem(db: Database, jti: str, session_id: str) -> Redemption:
    async with db.sessions.begin() as s:
        return await sessions.redeem_client_secret(s, jti=jti, session_id=session_id)


async def test_concurrent_redemptions_let_exactly_one_win(database: Database) -> None:
    """Of many simultaneous redemptions of one secret exactly one succeeds; the rest see it used."""
    _, sid = await _session(database)
    async with database.sessions.begin() as s:
        await sessions.record_client_secret(
            s, jti="j-race", session_id=sid, expires_at=utcnow() + timedelta(minutes=1)
        )
    results = await asyncio.gather(*(_redeem(database, "j-race", sid) for _ in range(8)))
    assert results.count(Redemption.OK) == 1
    assert results.count(Redemption.USED) == 7


async def test_expired_unknown_and_foreign_secrets_are_refused(database: Database) -> None:
    """An expired secret, an unknown jti and a jti of another session never redeem."""
    _, sid = await _session(database)
    _, other_sid = await _session(database)
    async with database.sessions.begin() as s:
        await sessions.record_client_secret(
            s, jti="j-old", session_id=sid, expires_at=utcnow() - timedelta(seconds=1)
        )
        await sessions.record_client_secret(
            s, jti="j-ok", session_id=sid, expires_at=utcnow() + timedelta(minutes=1)
        )
    assert await _redeem(database, "j-old", sid) is Redemption.EXPIRED
    assert await _redeem(database, "j-nope", sid) is Redemption.UNKNOWN
    assert await _redeem(database, "j-ok", other_sid) is Redemption.UNKNOWN
    assert await _redeem(database, "j-ok", sid) is Redemption.OK


async def test_owned_lookup_hides_other_users_sessions(database: Database) -> None:
    """get_owned_session finds a session for its owner only."""
    owner, sid = await _session(database)
    other, _ = await _session(database)
    async with database.sessions() as s:
        assert (await sessions.get_owned_session(s, sid, owner)) is not None
        assert (await sessions.get_owned_session(s, sid, other)) is None


async def test_pages_break_ties_on_identical_times(database: Database) -> None:
    """Sessions created in the same instant are still paged without gaps or repeats."""
    owner, _ = await _session(database)
    now = utcnow()
    async with database.sessions.begin() as s:
        for _ in range(5):
            made = await sessions.create_session(s, user_id=owner, topic_id="cafe-order", user_hash="h")
            made.created_at = now
    seen: list[str] = []
    cursor = None
    while True:
        async with database.sessions() as s:
            page = await sessions.list_owned_sessions(s, owner, limit=2, cursor=cursor)
        seen += [x.id for x in page.sessions]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen)) == 6
