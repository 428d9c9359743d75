"""The post-processing job queue, in the database: enqueue, claim with a lease, finish, retry.

A job is one piece of work of one ``kind`` for one session, at most one per (kind, session), so
enqueueing is idempotent. Its life::

    queued --claim--> running --finish(done)--> done
      ^                  |  \\--finish(retry), attempts left: queued again after a backoff
      |                  |   \\-finish(fatal), or out of attempts: dead --retry_dead--> queued
      \\-- lease expired -/   (a crashed worker's job is claimed again; past max_attempts: dead)

**Claiming.** :func:`claim` picks the due job that has waited longest (``run_after``, then id) of
the kinds a worker runs and marks it ``running`` under a fresh claim token (``locked_by``) with a
lease, in one ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) AND <still claimable> RETURNING``:

- On PostgreSQL the inner ``SELECT`` is ``FOR UPDATE SKIP LOCKED``: concurrent claimers lock
  different rows instead of waiting for each other, and a row that another claimer changed
  meanwhile is re-checked against the claimable predicate and skipped.
- On SQLite there are no row locks, but a write statement runs whole under the database's single
  write lock, on the newest committed data: the subquery and the outer re-check see every claim
  committed before, and no other claim can commit in between. The outer ``AND <still claimable>``
  makes the update a compare-and-set on the row's status and lease even so; a claimer whose row
  was taken gets no row back. A plain read first keeps an idle worker from taking the write lock.

Every later write of the claimer (:func:`extend_lease`, :func:`finish`, :func:`owned_transaction`)
is a compare-and-set on the claim token and ``running``: once a lease has expired and another
worker claimed the job, the first one's writes match nothing, so a job is finished once.

**The fence.** :func:`owned_transaction` is how a job's handler writes: one transaction that holds
the claim (compare-and-set) and checks that the job's session is not being deleted
(:func:`storage.deletion.fenced`), taken in the same order as every other writer (on PostgreSQL
the session row's lock first, then the job row; on SQLite the write lock first, so the fence read
is current).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.orm.util import AliasedClass

from storage.db import Database
from storage.deletion import fenced
from storage.models import Job, JobStatus, Session, new_id, utcnow

__all__ = [
    "FINALIZE",
    "LEASE_EXPIRED",
    "MAX_ATTEMPTS",
    "SESSION_DELETED",
    "ClaimedJob",
    "LeaseLost",
    "Outcome",
    "SessionFenced",
    "backoff_s",
    "claim",
    "depth",
    "enqueue",
    "extend_lease",
    "finish",
    "get_job",
    "list_jobs",
    "owned_transaction",
    "release",
    "retry_dead",
]

#: The job every ended session gets (enqueued by :func:`storage.sessions.transition`).
FINALIZE: Final = "finalize"
MAX_ATTEMPTS: Final = 5
BACKOFF_BASE_S: Final = 5.0
BACKOFF_CAP_S: Final = 600.0
#: ``last_error_code`` of a job whose worker stopped renewing its lease (crashed, stalled).
LEASE_EXPIRED: Final = "lease_expired"
#: ``last_error_code`` of a job that stopped because its session is being deleted.
SESSION_DELETED: Final = "session_deleted"
_TOKEN_BYTES: Final = 4
_LOCKED_BY_LEN: Final = 64


class LeaseLost(Exception):
    """This claim no longer holds the job: its lease expired and it was claimed again (or it is gone)."""


class SessionFenced(Exception):
    """The job's session is being (or was) deleted: nothing of it may be written."""


class Outcome(StrEnum):
    """How a claimed run ended, for :func:`finish`."""

    DONE = "done"
    #: Failed, may succeed later: queued again after a backoff while attempts are left, else dead.
    RETRY = "retry"
    #: Failed for good: dead at once.
    FATAL = "fatal"
    #: Stopped because the session is being deleted: done, with ``session_deleted``.
    FENCED = "fenced"


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """What a claim returned: the job as claimed, and the token every later write compares."""

    id: str
    kind: str
    session_id: str | None
    #: Claims so far, this one included.
    attempts: int
    max_attempts: int
    run_after: datetime
    created_at: datetime
    lease_expires_at: datetime
    #: ``locked_by`` of this claim: the worker's id and a random token, unique per claim.
    claim: str
    #: ``last_error_code`` as claimed (``lease_expired`` when a crashed worker's claim was taken over).
    last_error_code: str | None = None

    @property
    def exhausted(self) -> bool:
        """Claimed more often than it may run: earlier workers died with it every time."""
        return self.attempts > self.max_attempts


def backoff_s(attempt: int, *, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S) -> float:
    """Wait before the next try after failed ``attempt`` (1-based): base, 2x base, 4x base ... capped."""
    return float(min(cap_s, base_s * 2 ** max(0, attempt - 1)))


def _insert_for(s: AsyncSession) -> Any:
    return pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert


async def enqueue(s: AsyncSession, kind: str, session_id: str, *, run_after: datetime | None = None) -> bool:
    """Queue ``kind`` for ``session_id`` in the caller's transaction; True if it was not there yet.

    Idempotent: a job of the same kind for the same session (in any state, done included) is left
    as it is (``INSERT ... ON CONFLICT DO NOTHING`` on the unique (kind, session_id)).
    """
    now = utcnow()
    stmt = (
        _insert_for(s)(Job)
        .values(
            id=new_id("job"),
            kind=kind,
            session_id=session_id,
            status=JobStatus.QUEUED,
            attempts=0,
            max_attempts=MAX_ATTEMPTS,
            run_after=run_after or now,
            runs=0,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["kind", "session_id"])
        .returning(Job.id)
    )
    return (await s.execute(stmt)).first() is not None


def _claimable(
    job: type[Job] | AliasedClass[Job], kinds: Collection[str], now: datetime
) -> ColumnElement[bool]:
    return and_(
        job.kind.in_(list(kinds)),
        or_(
            and_(job.status == JobStatus.QUEUED, job.run_after <= now),
            and_(job.status == JobStatus.RUNNING, job.lease_expires_at < now),
        ),
    )


def claim_token(worker_id: str) -> str:
    """A ``locked_by`` value unique to one claim: the worker's id (shortened to fit) and a token."""
    token = secrets.token_hex(_TOKEN_BYTES)
    return f"{worker_id[: _LOCKED_BY_LEN - len(token) - 1]}#{token}"


async def claim(
    db: Database,
    worker_id: str,
    kinds: Collection[str],
    lease_s: float,
    *,
    now: datetime | None = None,
) -> ClaimedJob | None:
    """Claim the due job of ``kinds`` that has waited longest, or None when there is none.

    Due: ``queued`` with ``run_after`` passed, or ``running`` with an expired lease (its worker
    died or stalled; ``last_error_code`` becomes ``lease_expired``). The claim counts an attempt;
    a job claimed past its ``max_attempts`` comes back with :attr:`ClaimedJob.exhausted` set, for
    the caller to finish as dead without running it. Never returns the same claim twice, across
    processes and engines (see the module docstring).
    """
    if not kinds:
        return None
    now = now or utcnow()
    due = _claimable(Job, kinds, now)
    if db.dialect == "sqlite":
        # A read first, in its own transaction: an idle poll must not take SQLite's write lock.
        async with db.sessions() as s:
            if (await s.execute(select(Job.id).where(due).limit(1))).first() is None:
                return None
    # An alias, so the subquery reads the table itself instead of correlating to the UPDATE's row.
    candidate = aliased(Job, name="candidate")
    pick = (
        select(candidate.id)
        .where(_claimable(candidate, kinds, now))
        .order_by(candidate.run_after, candidate.id)
        .limit(1)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite renders no locking clause
        .scalar_subquery()
    )
    token = claim_token(worker_id)
    lease_until = now + timedelta(seconds=lease_s)
    stmt = (
        update(Job)
        .where(Job.id == pick, due)  # the compare-and-set: still claimable when the row is written
        .values(
            status=JobStatus.RUNNING,
            locked_by=token,
            lease_expires_at=lease_until,
            attempts=Job.attempts + 1,
            last_error_code=case((Job.status == JobStatus.RUNNING, LEASE_EXPIRED), else_=Job.last_error_code),
            updated_at=now,
        )
        .returning(
            Job.id,
            Job.kind,
            Job.session_id,
            Job.attempts,
            Job.max_attempts,
            Job.run_after,
            Job.created_at,
            Job.last_error_code,
        )
        .execution_options(synchronize_session=False)
    )
    async with db.sessions.begin() as s:
        row = (await s.execute(stmt)).first()
    if row is None:
        return None
    return ClaimedJob(
        id=row.id,
        kind=row.kind,
        session_id=row.session_id,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        run_after=row.run_after,
        created_at=row.created_at,
        lease_expires_at=lease_until,
        claim=token,
        last_error_code=row.last_error_code,
    )


def _held(job: ClaimedJob) -> ColumnElement[bool]:
    return and_(Job.id == job.id, Job.locked_by == job.claim, Job.status == JobStatus.RUNNING)


async def extend_lease(db: Database, job: ClaimedJob, lease_s: float, *, now: datetime | None = None) -> bool:
    """Renew the claim's lease to ``lease_s`` from now; False when the claim was lost (stop working)."""
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(_held(job))
        .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    async with db.sessions.begin() as s:
        return (await s.execute(stmt)).first() is not None


async def finish(
    db: Database,
    job: ClaimedJob,
    outcome: Outcome,
    *,
    error_code: str | None = None,
    now: datetime | None = None,
    backoff_base_s: float = BACKOFF_BASE_S,
    backoff_cap_s: float = BACKOFF_CAP_S,
) -> str | None:
    """Record how the claim's run ended; returns the job's new status, None when the claim was lost.

    ``RETRY`` queues the job again ``backoff_s(attempts)`` from now while it has attempts left, else
    it goes ``dead``; ``FATAL`` goes ``dead`` at once. Nothing is written for a lost claim: the job
    belongs to whoever claimed it since.
    """
    now = now or utcnow()
    # A finished job keeps ``locked_by`` (who ran it last, for operators); a queued one has none.
    values: dict[str, Any] = {"lease_expires_at": None, "updated_at": now}
    if outcome is Outcome.DONE:
        values.update(status=JobStatus.DONE, last_error_code=None)
    elif outcome is Outcome.FENCED:
        values.update(status=JobStatus.DONE, last_error_code=SESSION_DELETED)
    elif outcome is Outcome.RETRY and job.attempts < job.max_attempts:
        wait = backoff_s(job.attempts, base_s=backoff_base_s, cap_s=backoff_cap_s)
        values.update(
            status=JobStatus.QUEUED, run_after=now + timedelta(seconds=wait), last_error_code=error_code,
            locked_by=None,
        )  # fmt: skip
    else:
        values.update(status=JobStatus.DEAD, last_error_code=error_code)
    stmt = (
        update(Job)
        .where(_held(job))
        .values(**values)
        .returning(Job.status)
        .execution_options(synchronize_session=False)
    )
    async with db.sessions.begin() as s:
        row = (await s.execute(stmt)).first()
    return None if row is None else str(row.status)


async def release(db: Database, job: ClaimedJob, *, now: datetime | None = None) -> bool:
    """Give an unfinished claim back (the worker is stopping): queued, due now, the attempt not counted."""
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(_held(job))
        .values(
            status=JobStatus.QUEUED,
            locked_by=None,
            lease_expires_at=None,
            run_after=now,
            attempts=Job.attempts - 1,
            updated_at=now,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    async with db.sessions.begin() as s:
        return (await s.execute(stmt)).first() is not None


async def _check_fence(s: AsyncSession, job: ClaimedJob) -> None:
    if job.session_id is None:
        return
    await s.execute(select(Session.id).where(Session.id == job.session_id).with_for_update())
    if await fenced(s, job.session_id):
        raise SessionFenced(job.session_id)


@asynccontextmanager
async def owned_transaction(
    db: Database, job: ClaimedJob, *, count_run: bool = False
) -> AsyncIterator[AsyncSession]:
    """A transaction for the job's writes that still holds the claim and whose session is not fenced.

    Raises :class:`LeaseLost` or :class:`SessionFenced` (rolled back, nothing written) instead of
    yielding; the claim and the fence stay checked until the transaction commits, because other
    claimers and :func:`storage.deletion.fence` wait for the locks taken here. ``count_run`` adds
    one to ``runs`` (the worker does, once, right before it calls the handler).
    """
    values: dict[str, Any] = {"updated_at": utcnow()}
    if count_run:
        values["runs"] = Job.runs + 1
    hold = update(Job).where(_held(job)).values(**values).returning(Job.id)
    hold = hold.execution_options(synchronize_session=False)
    async with db.sessions.begin() as s:
        if db.dialect != "sqlite":
            # Session row first, then job row: the order of storage.sessions.transition (which
            # enqueues) and of deletion (the session row, whose delete cascades to its jobs).
            await _check_fence(s, job)
        if (await s.execute(hold)).first() is None:
            raise LeaseLost(job.id)
        if db.dialect == "sqlite":
            # The UPDATE above took SQLite's write lock, so this read is current until commit.
            await _check_fence(s, job)
        yield s


async def retry_dead(db: Database, job_id: str, *, now: datetime | None = None) -> bool:
    """Queue a ``dead`` job again with fresh attempts (an operator's retry); False if it is not dead."""
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.DEAD)
        .values(
            status=JobStatus.QUEUED,
            attempts=0,
            run_after=now,
            locked_by=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    async with db.sessions.begin() as s:
        return (await s.execute(stmt)).first() is not None


async def get_job(db: Database, job_id: str) -> Job | None:
    async with db.sessions() as s:
        return await s.get(Job, job_id)


async def list_jobs(
    db: Database, *, status: str | None = None, kind: str | None = None, limit: int = 100
) -> Sequence[Job]:
    """Jobs, those due first (``run_after``, then id), optionally of one status and kind."""
    query = select(Job)
    if status is not None:
        query = query.where(Job.status == status)
    if kind is not None:
        query = query.where(Job.kind == kind)
    async with db.sessions() as s:
        return (await s.execute(query.order_by(Job.run_after, Job.id).limit(limit))).scalars().all()


async def depth(db: Database) -> dict[tuple[str, str], int]:
    """How many jobs are queued, running and dead, by (kind, status); done jobs are not counted."""
    query = (
        select(Job.kind, Job.status, func.count())
        .where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DEAD)))
        .group_by(Job.kind, Job.status)
    )
    async with db.sessions() as s:
        return {(kind, status): int(n) for kind, status, n in (await s.execute(query)).all()}
