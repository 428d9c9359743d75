"""The database layer on SQLite and PostgreSQL: migrations, no drift, pragmas, cascades, UTC times."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from storage import migrate
from storage.db import Database, DatabaseUnavailable
from storage.models import (
    AudioChunk,
    AudioGap,
    AudioRecording,
    AuditEvent,
    ClientSecret,
    Job,
    Rating,
    Session,
    Topic,
    TranscriptSegment,
    User,
    utcnow,
)


async def test_migration_from_empty_reaches_head_without_drift(database_url: str) -> None:
    """`upgrade` takes an empty database to the head revision, and the schema equals the models."""
    db = Database(database_url)
    try:
        assert await migrate.current_revision(db) is None
        await migrate.upgrade(db)
        assert await migrate.current_revision(db) == migrate.head_revision()
        assert await migrate.schema_drift(db) == []
        await migrate.upgrade(db)  # idempotent: a second run changes nothing
        assert await migrate.current_revision(db) == migrate.head_revision()
    finally:
        await db.aclose()


async def test_drift_check_notices_a_schema_that_differs(database: Database) -> None:
    """The drift check is real: a column the models do not know shows up as a difference."""
    async with database.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE users ADD COLUMN nickname VARCHAR(20)"))
    drift = await migrate.schema_drift(database)
    assert any("nickname" in repr(d) for d in drift)


async def test_downgrade_removes_every_table(database: Database) -> None:
    """Downgrading to base leaves only alembic's own bookkeeping."""
    await migrate.downgrade(database, "base")
    async with database.engine.connect() as conn:
        names = await conn.run_sync(lambda c: set(__import__("sqlalchemy").inspect(c).get_table_names()))
    assert names <= {"alembic_version"}


async def test_sqlite_connections_use_wal_full_sync_and_foreign_keys(tmp_path: object) -> None:
    """Every SQLite connection runs in WAL mode with synchronous=FULL and foreign keys enforced."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/p.db")
    try:
        async with db.engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            sync = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
            fks = (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one()
        assert (mode, sync, fks) == ("wal", 2, 1)
    finally:
        await db.aclose()


async def _user_with_everything(db: Database) -> tuple[str, str]:
    """A user with a session carrying one row in every owned table; returns (user id, session id)."""
    async with db.sessions.begin() as s:
        user = User(email="learner@example.org", password_hash="x")
        topic = Topic(id="cafe", title="At the café", difficulty="beginner", prompts=["Order"], hints=[])
        s.add_all([user, topic])
        await s.flush()
        session = Session(user_id=user.id, topic_id=topic.id)
        s.add(session)
        await s.flush()
        rec = AudioRecording(session_id=session.id, track="learner", sample_rate=48000)
        s.add_all(
            [
                rec,
                TranscriptSegment(
                    session_id=session.id, seq=1, speaker="learner", text="hi", start_ms=0, end_ms=5
                ),
                Rating(session_id=session.id),
                ClientSecret(jti="j1", session_id=session.id, expires_at=utcnow()),
                Job(kind="rate", session_id=session.id),
                AuditEvent(event="session.created", session_id=session.id),
            ]
        )
        await s.flush()
        s.add_all(
            [
                AudioChunk(
                    recording_id=rec.id,
                    seq=0,
                    start_ms=0,
                    duration_ms=2000,
                    object_key="k",
                    size_bytes=1,
                    sha256="0" * 64,
                ),
                AudioGap(recording_id=rec.id, start_ms=2000, end_ms=3000, reason="reconnect"),
            ]
        )
        return user.id, session.id


async def test_deleting_a_user_cascades_to_everything_it_owns(database: Database) -> None:
    """Deleting a user row removes its sessions and every row they own; the audit trail stays."""
    user_id, session_id = await _user_with_everything(database)
    async with database.sessions.begin() as s:
        await s.execute(User.__table__.delete().where(User.id == user_id))
    async with database.sessions() as s:
        for model in (
            Session,
            TranscriptSegment,
            AudioRecording,
            AudioChunk,
            AudioGap,
            Rating,
            ClientSecret,
            Job,
        ):
            count = (await s.execute(select(func.count()).select_from(model))).scalar_one()
            assert count == 0, model.__tablename__
        audit = (await s.execute(select(func.count()).select_from(AuditEvent))).scalar_one()
        assert audit == 1
        assert (await s.get(Topic, "cafe")) is not None


async def test_foreign_keys_are_enforced(database: Database) -> None:
    """A session for a user that does not exist is refused by the database itself."""
    with pytest.raises(IntegrityError):
        async with database.sessions.begin() as s:
            s.add(Session(user_id="usr_missing", topic_id="nope"))


async def test_status_values_are_checked(database: Database) -> None:
    """A session status outside DESIGN.md's states is refused by a check constraint."""
    user_id, session_id = await _user_with_everything(database)
    with pytest.raises(IntegrityError):
        async with database.sessions.begin() as s:
            await s.execute(Session.__table__.update().where(Session.id == session_id).values(status="bogus"))


async def test_datetimes_round_trip_as_aware_utc(database: Database) -> None:
    """Times come back timezone-aware in UTC on both engines, whatever zone they were written in."""
    user_id, _ = await _user_with_everything(database)
    plus2 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    async with database.sessions.begin() as s:
        user = await s.get(User, user_id)
        assert user is not None
        user.created_at = plus2
    async with database.sessions() as s:
        user = await s.get(User, user_id)
        assert user is not None
        assert user.created_at == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
        assert user.created_at.tzinfo is UTC


async def test_naive_datetimes_are_refused(database: Database) -> None:
    """Writing a naive datetime is a programming error, caught before it reaches the database."""
    with pytest.raises(Exception, match="naive datetime"):
        async with database.sessions.begin() as s:
            s.add(User(email="n@example.org", created_at=datetime(2026, 1, 1)))  # noqa: DTZ001


async def test_check_reports_an_unreachable_server_quickly() -> None:
    """check() raises DatabaseUnavailable, without the URL's password, when nothing listens."""
    db = Database("postgresql+asyncpg://u:hunter2pw@127.0.0.1:1/x")
    try:
        with pytest.raises(DatabaseUnavailable) as info:
            await db.check()
        assert "hunter2pw" not in str(info.value)
    finally:
        await db.aclose()


_SLOW_COUNT = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) SELECT count(*) FROM c"
)


async def test_a_transaction_cancelled_during_a_read_leaves_sqlite_unlocked(tmp_path: Path) -> None:
    """A writer cancelled while its SELECT runs (its cursor still referenced by the cancelled task)
    releases SQLite's write lock: the next writer succeeds instead of failing "database is locked"."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'lock.db'}")
    try:
        async with db.sessions.begin() as s:
            await s.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)"))
            await s.execute(text("INSERT INTO t VALUES (1, 0)"))
        locked = asyncio.Event()

        async def writer() -> None:
            async with db.sessions.begin() as s:
                await s.execute(text("UPDATE t SET v = v + 1"))  # takes the write lock
                locked.set()
                await s.execute(text(_SLOW_COUNT))

        task = asyncio.create_task(writer())
        await locked.wait()
        await asyncio.sleep(0.01)  # the SELECT is running in aiosqlite's thread
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        async with db.sessions.begin() as s:
            await s.execute(text("UPDATE t SET v = v + 10"))
        async with db.sessions() as s:
            # The cancelled +1 was rolled back.
            assert (await s.execute(text("SELECT v FROM t"))).scalar_one() == 10
    finally:
        await db.aclose()
