"""The job worker: claims post-processing jobs from the database queue and runs their handlers.

What a job does is a :class:`JobKind` registered in a :class:`JobKinds` registry by name
(``finalize`` now; rating and assembly slot in the same way): ``run(ctx)`` does the work, and
``on_dead(ctx)``, if given, records the failure where the learner sees it when the job goes dead.
A handler receives a :class:`JobContext` (the database, the object store and the session id) and
makes its writes in ``ctx.transaction()``, which holds the claim and checks the session's
deletion fence until it commits. Handlers are idempotent: running one twice gives the same result,
which is what makes a re-claimed job (its first worker crashed mid-run) safe.

A handler fails by raising. :class:`~relay.errors.JobError` says itself whether a later try may
help (``retryable``); any other :class:`~relay.errors.RelayError` is fatal unless
:func:`~relay.errors.is_retryable` says otherwise; anything else (a database that dropped the
connection, a bug) is retried. Retries back off exponentially (``storage.jobs.backoff_s``); past
``max_attempts`` the job goes ``dead``, where ``parley jobs list --status dead`` shows it and
``parley jobs retry ID`` queues it again.

:class:`Worker` runs ``concurrency`` slots (1 by default), each a loop: claim, run, finish. An idle
slot polls every ``poll_s``, or at once when :meth:`Worker.wake` is called (the app does, after it
ends a session). While a handler runs, its lease is renewed every third of ``lease_s``; a renewal
that finds the claim gone (the lease expired and another worker took the job) cancels the
handler. :meth:`Worker.aclose` cancels the slots and gives unfinished jobs back to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy.ext.asyncio import AsyncSession

from relay.errors import JobError, RelayError, is_retryable
from relay.observability.logging import log_failure
from relay.observability.metrics import Metrics
from storage import jobs
from storage.db import Database
from storage.jobs import ClaimedJob, LeaseLost, Outcome, SessionFenced
from storage.models import utcnow
from storage.objects import ObjectStore
from storage.uploader import RETRYABLE

__all__ = ["DeadHandler", "Handler", "JobContext", "JobKind", "JobKinds", "Worker", "worker_id"]

log = logging.getLogger("relay.worker.jobs")

POLL_S: Final = 1.0
LEASE_S: Final = 60.0
TIMEOUT_S: Final = 900.0
DEPTH_EVERY_S: Final = 5.0
#: How long a stopping worker tries to give its unfinished job back before the lease does it.
RELEASE_TIMEOUT_S: Final = 2.0
#: How long a stopping worker waits for a finished run's outcome to be recorded.
SETTLE_TIMEOUT_S: Final = 10.0
TIMED_OUT: Final = "timeout"
_UNRECORDED: Final = "unrecorded"
# The job's status after finish() -> the outcome label of parley_job_outcomes_total.
_OUTCOME_LABELS: Final[dict[str | None, str]] = {
    "done": "done", "queued": "retried", "dead": "dead", None: "lease_lost", _UNRECORDED: "failed_to_record",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler gets: where to read and write, and which session the job is for."""

    db: Database
    store: ObjectStore
    job: ClaimedJob
    #: The worker's metrics, for outcomes a handler alone knows (a session processed, rated positively).
    metrics: Metrics | None = None

    @property
    def session_id(self) -> str:
        if self.job.session_id is None:
            raise JobError("job without a session", retryable=False, code="no_session")
        return self.job.session_id

    def transaction(self) -> AbstractAsyncContextManager[AsyncSession]:
        """The one way a handler writes: a transaction that holds this claim and the session's fence.

        Raises :class:`storage.jobs.LeaseLost` or :class:`storage.jobs.SessionFenced` instead of
        opening (the worker handles both); let them through.
        """
        return jobs.owned_transaction(self.db, self.job)


Handler = Callable[[JobContext], Coroutine[Any, Any, None]]
#: Called with the context and the error code that killed the job.
DeadHandler = Callable[[JobContext, str], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class JobKind:
    """One kind of job: its name (the ``kind`` column), its handler and what to do when it dies."""

    name: str
    run: Handler
    #: Called with the error code before the job goes dead, to record the failure where it shows
    #: (writing through ``ctx.transaction()``); a failure of its own is logged only.
    on_dead: DeadHandler | None = None
    #: A run that takes longer is cancelled and retried (code ``timeout``).
    timeout_s: float = TIMEOUT_S


@dataclass
class JobKinds:
    """The registry of job kinds a worker runs, by name."""

    _kinds: dict[str, JobKind] = field(default_factory=dict)

    def register(self, kind: JobKind) -> JobKind:
        if kind.name in self._kinds:
            raise ValueError(f"job kind {kind.name!r} is registered already")
        self._kinds[kind.name] = kind
        return kind

    def get(self, name: str) -> JobKind | None:
        return self._kinds.get(name)

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def __iter__(self) -> Iterator[JobKind]:
        return iter(self._kinds.values())


def worker_id() -> str:
    """This process as a worker: host name and process id (what ``locked_by`` starts with)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, RelayError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return TIMED_OUT
    return type(exc).__name__[:64]


async def _despite_cancel(work: Coroutine[Any, Any, None], *, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (then re-raise), but give up
    on it after ``timeout_s`` once cancelled: a stopping worker records what it did, and still stops."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        raise


def _retryable(exc: BaseException) -> bool:
    """Fatal only when Parley says so; unknown failures (a dropped connection, a bug) get retries."""
    if isinstance(exc, RelayError):
        return is_retryable(exc)
    return True


class Worker:
    """Runs the jobs of ``kinds`` from the database queue; :meth:`start`, then :meth:`aclose`."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        kinds: JobKinds,
        *,
        metrics: Metrics,
        concurrency: int = 1,
        poll_s: float = POLL_S,
        lease_s: float = LEASE_S,
        backoff_base_s: float = jobs.BACKOFF_BASE_S,
        backoff_cap_s: float = jobs.BACKOFF_CAP_S,
        name: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.id = name or worker_id()
        self._db = db
        self._store = store
        self._kinds = kinds
        self._metrics = metrics
        self._concurrency = concurrency
        self._poll_s = poll_s
        self._lease_s = lease_s
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def start(self) -> None:
        """Start the slots and the queue-depth gauge (once; a closed worker does not start again)."""
        if self._tasks or self._closed:
            return
        self._tasks = [
            asyncio.create_task(self._slot(), name=f"jobs:slot-{n}") for n in range(self._concurrency)
        ]
        self._tasks.append(asyncio.create_task(self._gauge(), name="jobs:depth"))
        log.info("jobs.started", extra={"count": self._concurrency})

    def wake(self) -> None:
        """Tell idle slots that a job was enqueued (after its transaction committed); cheap, sync."""
        self._wakeup.set()

    async def aclose(self) -> None:
        """Stop every slot and wait for them; a job still running is given back to the queue. Idempotent."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run_once(self) -> ClaimedJob | None:
        """Claim one due job and run it to its outcome; None when nothing was due (for tests, tools)."""
        job = await jobs.claim(self._db, self.id, self._kinds.names(), self._lease_s)
        if job is not None:
            await self._run(job)
        return job

    # -- the loops -------------------------------------------------------------------------------
    async def _slot(self) -> None:
        while True:
            try:
                job = await self.run_once()
            except Exception as exc:
                # The database is down, say: this poll is lost, never the worker.
                log_failure(log, "jobs.poll_failed", exc, expected=RETRYABLE)
                self._metrics.job_poll_failed()
                job = None
            if job is None:
                await self._idle()

    async def _idle(self) -> None:
        try:
            async with asyncio.timeout(self._poll_s):
                await self._wakeup.wait()
        except TimeoutError:
            return
        self._wakeup.clear()

    async def _gauge(self) -> None:
        while True:
            try:
                self._metrics.job_depth(await jobs.depth(self._db), self._kinds.names())
            except Exception as exc:
                log_failure(log, "jobs.depth_failed", exc, expected=RETRYABLE)
                self._metrics.job_poll_failed()
            await asyncio.sleep(DEPTH_EVERY_S)

    # -- one job ---------------------------------------------------------------------------------
    async def _run(self, job: ClaimedJob) -> None:
        kind = self._kinds.get(job.kind)
        assert kind is not None, job.kind  # claim only returns registered kinds
        started = time.monotonic()
        due = max(job.run_after, job.created_at)
        self._metrics.job_claimed(job.kind, (utcnow() - due).total_seconds())
        ctx = JobContext(self._db, self._store, job, self._metrics)
        outcome, code = Outcome.DONE, None
        try:
            if job.exhausted:  # its workers died with it every time: do not run it again
                outcome, code = Outcome.FATAL, jobs.LEASE_EXPIRED
            else:
                await self._execute(kind, ctx)
        except LeaseLost:
            self._done(job, "lease_lost", started)
            log.warning("jobs.lease_lost", extra={"job_id": job.id, "kind": job.kind})
            return
        except SessionFenced:
            outcome = Outcome.FENCED
        except asyncio.CancelledError:
            await _despite_cancel(self._release(job, started))
            raise
        except Exception as exc:
            code = _error_code(exc)
            outcome = Outcome.RETRY if _retryable(exc) else Outcome.FATAL
            extra = {"job_id": job.id, "kind": job.kind, "code": code, "attempt": job.attempts}
            if isinstance(exc, RelayError | TimeoutError):
                log.warning("jobs.failed", extra=extra)
            else:
                log.exception("jobs.failed", extra=extra)  # unexpected: keep its type and traceback
        # The run is over: its outcome is recorded even if the worker is being stopped meanwhile.
        await _despite_cancel(self._settle(kind, ctx, outcome, code, started))

    async def _settle(
        self, kind: JobKind, ctx: JobContext, outcome: Outcome, code: str | None, started: float
    ) -> None:
        job = ctx.job
        if outcome is Outcome.FATAL or (outcome is Outcome.RETRY and job.attempts >= job.max_attempts):
            await self._dying(kind, ctx, code or "job_failed")
        status = await self._finish(job, outcome, code)
        label = _OUTCOME_LABELS.get(status, "failed_to_record")
        if outcome is Outcome.FENCED and status == "done":
            label = "fenced"
        self._done(job, label, started)
        elapsed_ms = round((time.monotonic() - started) * 1000)
        log.info(
            "jobs.finished",
            extra={"job_id": job.id, "kind": job.kind, "outcome": label, "code": code,
                   "attempt": job.attempts, "session_id": job.session_id, "duration_ms": elapsed_ms},
        )  # fmt: skip

    async def _execute(self, kind: JobKind, ctx: JobContext) -> None:
        """Check the claim and the fence, count the run, then run the handler beside its heartbeat."""
        async with jobs.owned_transaction(self._db, ctx.job, count_run=True):
            pass
        work = asyncio.create_task(kind.run(ctx), name=f"jobs:{kind.name}:{ctx.job.id}")
        beat = asyncio.create_task(self._heartbeat(ctx.job), name=f"jobs:lease:{ctx.job.id}")
        try:
            async with asyncio.timeout(kind.timeout_s):
                await asyncio.wait({work, beat}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                beat.result()  # raises why the heartbeat stopped (LeaseLost)
            work.result()
        finally:
            for task in (work, beat):
                task.cancel()
            await asyncio.gather(work, beat, return_exceptions=True)

    async def _heartbeat(self, job: ClaimedJob) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                held = await jobs.extend_lease(self._db, job, self._lease_s)
            except Exception:
                # One failed renewal is no loss yet: the lease is three renewals long.
                log.warning("jobs.lease_renewal_failed", extra={"job_id": job.id, "kind": job.kind})
                continue
            if not held:
                raise LeaseLost(job.id)

    async def _dying(self, kind: JobKind, ctx: JobContext, code: str) -> None:
        if kind.on_dead is None:
            return
        try:
            await kind.on_dead(ctx, code)
        except (LeaseLost, SessionFenced):
            pass  # someone else owns it now, or the session is going: nothing to record
        except Exception:
            log.exception("jobs.on_dead_failed", extra={"job_id": ctx.job.id, "kind": kind.name})

    async def _finish(self, job: ClaimedJob, outcome: Outcome, code: str | None) -> str | None:
        """The job's new status; None when the claim was lost meanwhile, ``unrecorded`` on an error."""
        try:
            return await jobs.finish(
                self._db, job, outcome, error_code=code, backoff_base_s=self._backoff[0],
                backoff_cap_s=self._backoff[1],
            )  # fmt: skip
        except Exception as exc:
            # The lease runs out and the job is claimed again: a run is never lost, at worst repeated.
            log_failure(
                log, "jobs.finish_failed", exc, expected=RETRYABLE, extra={"job_id": job.id, "kind": job.kind}
            )
            return _UNRECORDED

    async def _release(self, job: ClaimedJob, started: float) -> None:
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await jobs.release(self._db, job)
        except Exception:
            log.warning("jobs.release_failed", extra={"job_id": job.id, "kind": job.kind})
        self._done(job, "released", started)

    def _done(self, job: ClaimedJob, outcome: str, started: float) -> None:
        self._metrics.job_finished(job.kind, outcome, time.monotonic() - started)
