"""The job queue on both engines: idempotent enqueue, exclusive claims, leases, backoff, dead letters."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from storage import jobs, sessions
from storage.db import Database
from storage.deletion import fence
from storage.jobs import ClaimedJob, LeaseLost, Outcome, SessionFenced
from storage.models import Job, Session, SessionStatus, User, utcnow

PROBE = "probe"


async def new_session(db: Database, status: str = SessionStatus.ENDED) -> str:
    async with db.sessions.begin() as s:
        user = User(email=f"{secrets.token_hex(6)}@example.org")
        s.add(user)
        await s.flush()
        session = Session(user_id=user.id, topic_id="cafe-order", status=status)
        s.add(session)
        await s.flush()
        return session.id


async def queued(db: Database, n: int, kind: str = PROBE) -> list[str]:
    """``n`` new sessions, each with one queued job of ``kind``; returns the session ids."""
    sids = [await new_session(db) for _ in range(n)]
    async with db.sessions.begin() as s:
        for sid in sids:
            assert await jobs.enqueue(s, kind, sid)
    return sids


async def job_of(db: Database, session_id: str, kind: str = PROBE) -> Job:
    async with db.sessions() as s:
        return (
            await s.execute(select(Job).where(Job.session_id == session_id, Job.kind == kind))
        ).scalar_one()


async def test_enqueue_is_idempotent(database: Database) -> None:
    """A second enqueue of the same kind for the same session adds nothing, whatever the job's state."""
    (sid,) = await queued(database, 1)
    async with database.sessions.begin() as s:
        assert not await jobs.enqueue(s, PROBE, sid)
    job = await jobs.claim(database, "w", [PROBE], 30)
    assert job is not None
    assert await jobs.finish(database, job, Outcome.DONE) == "done"
    async with database.sessions.begin() as s:
        assert not await jobs.enqueue(s, PROBE, sid)
        assert await jobs.enqueue(s, "other", sid)  # another kind is another job
        count = (await s.execute(select(func.count()).select_from(Job).where(Job.session_id == sid))).scalar()
    assert count == 2
    assert (await job_of(database, sid)).status == "done"


async def test_ending_a_session_enqueues_finalize_in_the_same_transaction(database: Database) -> None:
    """transition(..., ended) adds the finalize job; rolled back, neither the state nor the job stays."""
    sid = await new_session(database, SessionStatus.LIVE)
    with pytest.raises(RuntimeError):
        async with database.sessions.begin() as s:
            await sessions.transition(s, sid, SessionStatus.ENDED)
            raise RuntimeError("the end's transaction fails")
    async with database.sessions() as s:
        assert (await s.execute(select(func.count()).select_from(Job))).scalar() == 0
    async with database.sessions.begin() as s:
        await sessions.transition(s, sid, SessionStatus.ENDED)
    job = await job_of(database, sid, jobs.FINALIZE)
    assert (job.status, job.attempts, job.runs) == ("queued", 0, 0)
    async with database.sessions.begin() as s:  # ended again (a no-op move): still one job
        await sessions.transition(s, sid, SessionStatus.ENDED)
    async with database.sessions() as s:
        assert (await s.execute(select(func.count()).select_from(Job))).scalar() == 1


async def test_concurrent_claimers_each_claim_a_job_once(database: Database, database_url: str) -> None:
    """Eight claimers on two engines (two connection pools, as two processes) drain 40 jobs: every
    job is claimed exactly once."""
    await queued(database, 40)
    other = Database(database_url)
    claimed: list[list[str]] = [[] for _ in range(8)]

    async def claimer(n: int) -> None:
        db = database if n % 2 else other
        while (job := await jobs.claim(db, f"w{n}", [PROBE], 30)) is not None:
            claimed[n].append(job.id)
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*(claimer(n) for n in range(8)))
    finally:
        await other.aclose()
    ids = [job_id for per in claimed for job_id in per]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert sum(1 for per in claimed if per) >= 2  # they really did run side by side
    rows = await jobs.list_jobs(database, kind=PROBE)
    assert {(r.status, r.attempts) for r in rows} == {("running", 1)}


async def test_claim_order_kinds_and_due_time(database: Database) -> None:
    """Only due jobs of the asked kinds are claimed, the longest waiting first."""
    now = utcnow()
    a, b, c = [await new_session(database) for _ in range(3)]
    async with database.sessions.begin() as s:
        await jobs.enqueue(s, PROBE, a, run_after=now - timedelta(seconds=5))
        await jobs.enqueue(s, PROBE, b, run_after=now - timedelta(seconds=10))
        await jobs.enqueue(s, PROBE, c, run_after=now + timedelta(seconds=60))
        await jobs.enqueue(s, "other", a, run_after=now - timedelta(seconds=99))
    first = await jobs.claim(database, "w", [PROBE], 300, now=now)
    second = await jobs.claim(database, "w", [PROBE], 300, now=now)
    assert first is not None and second is not None
    assert (first.session_id, second.session_id) == (b, a)
    assert await jobs.claim(database, "w", [PROBE], 30, now=now) is None  # c is not due yet
    assert await jobs.claim(database, "w", [], 30, now=now) is None
    later = await jobs.claim(database, "w", [PROBE], 30, now=now + timedelta(seconds=61))
    assert later is not None and later.session_id == c


async def test_an_expired_lease_is_claimed_again_and_finished_once(database: Database) -> None:
    """A crashed worker's job is claimed again once its lease expires; the first claim can no longer
    renew, write or finish it, and the second finishes it once."""
    (sid,) = await queued(database, 1)
    t0 = utcnow()
    crashed = await jobs.claim(database, "w-crashed", [PROBE], 10, now=t0)
    assert crashed is not None and crashed.attempts == 1
    assert await jobs.claim(database, "w2", [PROBE], 10, now=t0 + timedelta(seconds=9)) is None
    taken = await jobs.claim(database, "w2", [PROBE], 10, now=t0 + timedelta(seconds=11))
    assert taken is not None and taken.id == crashed.id
    assert (taken.attempts, taken.last_error_code, taken.exhausted) == (2, jobs.LEASE_EXPIRED, False)
    assert taken.claim != crashed.claim

    assert not await jobs.extend_lease(database, crashed, 10)
    with pytest.raises(LeaseLost):
        async with jobs.owned_transaction(database, crashed, count_run=True):
            pass
    assert await jobs.finish(database, crashed, Outcome.DONE) is None
    assert await jobs.release(database, crashed) is False
    assert (await job_of(database, sid)).locked_by == taken.claim

    assert await jobs.extend_lease(database, taken, 10)
    async with jobs.owned_transaction(database, taken, count_run=True):
        pass
    assert await jobs.finish(database, taken, Outcome.DONE) == "done"
    assert await jobs.finish(database, taken, Outcome.DONE) is None  # finished once
    row = await job_of(database, sid)
    assert (row.status, row.attempts, row.runs, row.last_error_code) == ("done", 2, 1, None)
    assert (row.locked_by, row.lease_expires_at) == (taken.claim, None)  # who finished it
    assert await jobs.claim(database, "w3", [PROBE], 10, now=t0 + timedelta(hours=1)) is None


async def test_retries_back_off_exponentially_then_the_job_dies(database: Database) -> None:
    """Failed runs come back after 5, 10, 20, 40 s; the fifth failure leaves it dead with its code."""
    (sid,) = await queued(database, 1)
    t = utcnow()
    for attempt in range(1, 6):
        job = await jobs.claim(database, "w", [PROBE], 30, now=t)
        assert job is not None and job.attempts == attempt
        status = await jobs.finish(database, job, Outcome.RETRY, error_code=f"boom_{attempt}", now=t)
        if attempt == 5:
            assert status == "dead"
            break
        assert status == "queued"
        wait = timedelta(seconds=5 * 2 ** (attempt - 1))
        row = await job_of(database, sid)
        assert (row.run_after, row.last_error_code, row.locked_by) == (t + wait, f"boom_{attempt}", None)
        assert await jobs.claim(database, "w", [PROBE], 30, now=t + wait - timedelta(milliseconds=1)) is None
        t += wait
    row = await job_of(database, sid)
    assert (row.status, row.attempts, row.last_error_code) == ("dead", 5, "boom_5")
    assert await jobs.claim(database, "w", [PROBE], 30, now=t + timedelta(days=1)) is None
    assert [jobs.backoff_s(n) for n in (1, 2, 3, 4, 9, 20)] == [5, 10, 20, 40, 600, 600]


async def test_a_fatal_failure_is_dead_at_once_and_an_operator_retry_requeues_it(database: Database) -> None:
    """A fatal outcome skips the retries; retry_dead queues it with fresh attempts, only when dead."""
    (sid,) = await queued(database, 1)
    job = await jobs.claim(database, "w", [PROBE], 30)
    assert job is not None
    assert not await jobs.retry_dead(database, job.id)  # running, not dead
    assert await jobs.finish(database, job, Outcome.FATAL, error_code="bad_input") == "dead"
    assert [j.id for j in await jobs.list_jobs(database, status="dead")] == [job.id]
    assert await jobs.depth(database) == {(PROBE, "dead"): 1}

    assert await jobs.retry_dead(database, job.id)
    assert not await jobs.retry_dead(database, job.id)
    assert not await jobs.retry_dead(database, "job_unknown")
    row = await job_of(database, sid)
    assert (row.status, row.attempts, row.last_error_code) == ("queued", 0, "bad_input")
    again = await jobs.claim(database, "w", [PROBE], 30)
    assert again is not None and again.attempts == 1
    assert await jobs.finish(database, again, Outcome.DONE) == "done"
    assert await jobs.depth(database) == {}


async def test_a_job_whose_workers_keep_dying_is_claimed_exhausted(database: Database) -> None:
    """After max_attempts claims that all expired, the next claim says so, for the worker to bury it."""
    await queued(database, 1)
    t = utcnow()
    job: ClaimedJob | None = None
    for _ in range(6):
        job = await jobs.claim(database, "w", [PROBE], 1, now=t)
        assert job is not None
        t += timedelta(seconds=2)
    assert job is not None and job.attempts == 6 and job.exhausted
    assert await jobs.finish(database, job, Outcome.FATAL, error_code=jobs.LEASE_EXPIRED, now=t) == "dead"


async def test_a_fenced_sessions_job_writes_nothing(database: Database) -> None:
    """Once the session is fenced for deletion, the job's transaction refuses to open (the run is not
    even counted), and the job ends done with `session_deleted`."""
    (sid,) = await queued(database, 1)
    job = await jobs.claim(database, "w", [PROBE], 30)
    assert job is not None
    await fence(database, sid)
    with pytest.raises(SessionFenced):
        async with jobs.owned_transaction(database, job, count_run=True) as s:
            await sessions.transition(s, sid, SessionStatus.PROCESSING)  # never reached
    async with database.sessions() as s:
        assert (await s.get(Session, sid)).status == SessionStatus.ENDED  # type: ignore[union-attr]
    assert (await job_of(database, sid)).runs == 0
    assert await jobs.finish(database, job, Outcome.FENCED) == "done"
    assert (await job_of(database, sid)).last_error_code == jobs.SESSION_DELETED


async def test_release_gives_the_job_back_without_counting_the_attempt(database: Database) -> None:
    """A stopping worker's release makes the job due again at once, attempts as before the claim."""
    (sid,) = await queued(database, 1)
    job = await jobs.claim(database, "w", [PROBE], 30)
    assert job is not None
    assert await jobs.release(database, job)
    row = await job_of(database, sid)
    assert (row.status, row.attempts, row.locked_by, row.lease_expires_at) == ("queued", 0, None, None)
    assert await jobs.claim(database, "w", [PROBE], 30) is not None


async def test_migration_0004_gives_sessions_that_ended_before_it_their_job(database_url: str) -> None:
    """Upgrading from 0003 queues finalize for every session already `ended`, and only for those."""
    from storage import migrate

    db = Database(database_url)
    try:
        await migrate.upgrade(db, "0003")
        ended = await new_session(db, SessionStatus.ENDED)
        await new_session(db, SessionStatus.LIVE)
        await migrate.upgrade(db)
        rows = await jobs.list_jobs(db)
        assert [(r.kind, r.session_id, r.status, r.attempts, r.runs) for r in rows] == [
            (jobs.FINALIZE, ended, "queued", 0, 0)
        ]
        claimed = await jobs.claim(db, "w", [jobs.FINALIZE], 30)
        assert claimed is not None and claimed.session_id == ended
    finally:
        await db.aclose()
