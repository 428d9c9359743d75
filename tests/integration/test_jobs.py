"""The job worker on both engines: finalize, retries and dead letters, the fence, leases, the app's
worker, `parley jobs`, and two `parley worker` processes sharing 200 jobs on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import func, select, update

from relay import cli
from relay.config import ConfigError, Settings
from relay.errors import JobError
from relay.keys import DATABASE, JOBS, METRICS
from relay.observability.metrics import Metrics
from relay.worker.finalize import Step, finalize_kind
from relay.worker.jobs import Handler, JobContext, JobKind, JobKinds, Worker
from relay.worker.kinds import default_kinds
from storage import jobs, migrate, sessions
from storage.db import Database
from storage.deletion import fence
from storage.models import AuditEvent, Job, Session, SessionStatus, User
from storage.objects.local import LocalObjectStore
from tests.api import ended_sessions, signup
from tests.integration.recorded import new_session
from tests.integration.test_cli import PARLEY, ROOT, base_env
from tests.leakscan import DETECTORS, find_leaks
from tests.services import fresh_postgres_database

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalObjectStore]:
    objects = LocalObjectStore(tmp_path / "objects")
    yield objects
    await objects.aclose()


def worker(
    db: Database, store: LocalObjectStore, kinds: JobKinds | None = None, **options: Any
) -> tuple[Worker, Metrics]:
    metrics = Metrics()
    options = {"poll_s": 0.05, "backoff_base_s": 0.01, **options}
    return Worker(db, store, kinds or default_kinds(), metrics=metrics, **options), metrics


async def ended_session(db: Database) -> str:
    """A session that went live and ended through storage.sessions.transition (so it has its job)."""
    async with db.sessions.begin() as s:
        user = User(email=f"{secrets.token_hex(6)}@example.org")
        s.add(user)
        await s.flush()
        row = Session(user_id=user.id, topic_id="cafe-order", status=SessionStatus.LIVE)
        s.add(row)
        await s.flush()
        await sessions.transition(s, row.id, SessionStatus.ENDED, code="learner")
        return row.id


async def status_of(db: Database, session_id: str) -> str | None:
    async with db.sessions() as s:
        return (await s.execute(select(Session.status).where(Session.id == session_id))).scalar_one_or_none()


async def moves(db: Database, session_id: str) -> list[tuple[str | None, str | None, str | None]]:
    """The session's audited state moves after it ended: (from, to, code)."""
    async with db.sessions() as s:
        rows = await s.execute(
            select(AuditEvent.from_status, AuditEvent.to_status, AuditEvent.code)
            .where(AuditEvent.session_id == session_id, AuditEvent.event == "session.state")
            .order_by(AuditEvent.id)
        )
        return [tuple(r) for r in rows.all() if r.from_status != SessionStatus.LIVE]  # type: ignore[misc]


async def job_row(db: Database, session_id: str, kind: str = jobs.FINALIZE) -> Job:
    async with db.sessions() as s:
        return (
            await s.execute(select(Job).where(Job.session_id == session_id, Job.kind == kind))
        ).scalar_one()


def outcome(metrics: Metrics, kind: str, name: str) -> float:
    return (
        metrics.registry.get_sample_value("parley_job_outcomes_total", {"kind": kind, "outcome": name}) or 0.0
    )


def log_tail(log: Path) -> str:
    """The end of a worker's log, for a failure message (read only when an assertion fails)."""
    return log.read_text()[-2000:]


async def until(check: Callable[[], Coroutine[Any, Any, bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


def failing_step(*errors: BaseException) -> tuple[Handler, list[str]]:
    """A finalize step that raises ``errors`` one run after another, then succeeds; records its runs."""
    pending, runs = list(errors), []

    async def step(ctx: JobContext) -> None:
        runs.append(ctx.session_id)
        if pending:
            raise pending.pop(0)

    return step, runs


def finalize_with(step: Handler) -> JobKinds:
    kinds = JobKinds()
    kinds.register(finalize_kind([Step("test", step)]))
    return kinds


async def test_the_worker_finalizes_an_ended_session_once(
    database: Database, store: LocalObjectStore
) -> None:
    """ended -> processing -> processed, audited; running the job again changes nothing."""
    sid = await ended_session(database)
    w, metrics = worker(database, store)
    w.start()
    try:
        w.wake()
        await until(lambda: _job_is(database, sid, "done"))
    finally:
        await w.aclose()
    assert await status_of(database, sid) == SessionStatus.PROCESSED
    assert await moves(database, sid) == [("ended", "processing", None), ("processing", "processed", None)]
    job = await job_row(database, sid)
    assert (job.status, job.attempts, job.runs, job.last_error_code) == ("done", 1, 1, None)
    assert outcome(metrics, "finalize", "done") == 1
    assert metrics.registry.get_sample_value("parley_job_wait_seconds_count", {"kind": "finalize"}) == 1
    # The business measure: one session processed, not rated (no rating step here), so not positive.
    assert metrics.registry.get_sample_value("parley_sessions_processed_total") == 1
    assert metrics.registry.get_sample_value("parley_sessions_rated_positive_total") == 0

    # Idempotent: the same job run a second time leaves the session and its audit trail as they are.
    async with database.sessions.begin() as s:
        await s.execute(update(Job).where(Job.id == job.id).values(status="queued"))
    again, again_metrics = worker(database, store)
    assert await again.run_once() is not None
    assert again_metrics.registry.get_sample_value("parley_sessions_processed_total") == 0
    assert await status_of(database, sid) == SessionStatus.PROCESSED
    assert len(await moves(database, sid)) == 2
    assert (await job_row(database, sid)).runs == 2


async def _job_is(db: Database, session_id: str, status: str) -> bool:
    return (await job_row(db, session_id)).status == status


async def test_retryable_failures_back_off_then_die_and_the_session_says_so(
    database: Database, store: LocalObjectStore
) -> None:
    """A step failing every time is retried with backoff until max_attempts, then the job is dead and
    the session `processing_failed` (with the code); an operator's retry then finishes it."""
    step, runs = failing_step(*(JobError("model down", retryable=True, code="rating_unavailable"),) * 5)
    w, metrics = worker(database, store, finalize_with(step))
    sid = await ended_session(database)
    async with asyncio.timeout(10):
        while (await job_row(database, sid)).status != "dead":
            if await w.run_once() is None:
                await asyncio.sleep(0.01)
    job = await job_row(database, sid)
    assert (job.attempts, job.runs, job.last_error_code) == (5, 5, "rating_unavailable")
    assert len(runs) == 5
    assert await status_of(database, sid) == SessionStatus.PROCESSING_FAILED
    assert (await moves(database, sid))[-1] == ("processing", "processing_failed", "rating_unavailable")
    assert metrics.registry.get_sample_value("parley_job_retries_total", {"kind": "finalize"}) == 4
    assert metrics.registry.get_sample_value("parley_job_dead_letters_total", {"kind": "finalize"}) == 1
    assert outcome(metrics, "finalize", "retried") == 4 and outcome(metrics, "finalize", "dead") == 1

    assert await jobs.retry_dead(database, job.id)
    assert await w.run_once() is not None
    assert await status_of(database, sid) == SessionStatus.PROCESSED
    assert [m[1] for m in await moves(database, sid)][-2:] == ["processing", "processed"]


async def test_a_fatal_error_is_dead_at_once_and_an_unknown_one_is_retried(
    database: Database, store: LocalObjectStore
) -> None:
    """JobError(retryable=False) kills the job on its first run; a plain exception is retried."""
    fatal, _ = failing_step(JobError("bad answer", retryable=False, code="invalid_answer"))
    w, _ = worker(database, store, finalize_with(fatal))
    sid = await ended_session(database)
    assert await w.run_once() is not None
    job = await job_row(database, sid)
    assert (job.status, job.attempts, job.last_error_code) == ("dead", 1, "invalid_answer")
    assert await status_of(database, sid) == SessionStatus.PROCESSING_FAILED

    buggy, _ = failing_step(ValueError("a bug, with a message that must not be stored"))
    w, _ = worker(database, store, finalize_with(buggy), backoff_base_s=60)
    other = await ended_session(database)
    assert await w.run_once() is not None
    job = await job_row(database, other)
    assert (job.status, job.last_error_code) == ("queued", "ValueError")
    assert await status_of(database, other) == SessionStatus.PROCESSING


async def test_a_deleted_sessions_job_stops_without_writing(
    database: Database, store: LocalObjectStore
) -> None:
    """Fenced before the run: nothing of the session changes; fenced mid-run: the run stops there."""
    sid = await ended_session(database)
    await fence(database, sid)
    w, metrics = worker(database, store)
    assert await w.run_once() is not None
    assert await status_of(database, sid) == SessionStatus.ENDED
    assert await moves(database, sid) == []
    job = await job_row(database, sid)
    assert (job.status, job.runs, job.last_error_code) == ("done", 0, jobs.SESSION_DELETED)
    assert outcome(metrics, "finalize", "fenced") == 1

    async def deleted_meanwhile(ctx: JobContext) -> None:
        await fence(ctx.db, ctx.session_id)  # as DELETE /v1/sessions/{id} would, while the job runs

    w, metrics = worker(database, store, finalize_with(deleted_meanwhile))
    other = await ended_session(database)
    assert await w.run_once() is not None
    assert await status_of(database, other) == SessionStatus.PROCESSING  # the last move never happened
    assert [m[1] for m in await moves(database, other)] == ["processing"]
    assert (await job_row(database, other)).last_error_code == jobs.SESSION_DELETED
    assert outcome(metrics, "finalize", "fenced") == 1


async def test_a_crashed_workers_job_is_taken_over_and_finished_once(
    database: Database, store: LocalObjectStore
) -> None:
    """A worker that claimed the job and died: once its lease expires another worker finishes it;
    the dead claim can write nothing afterwards."""
    sid = await ended_session(database)
    crashed = await jobs.claim(database, "crashed-worker", [jobs.FINALIZE], 0.2)
    assert crashed is not None
    w, metrics = worker(database, store)
    assert await w.run_once() is None  # still leased
    await asyncio.sleep(0.3)
    taken = await w.run_once()
    assert taken is not None and taken.id == crashed.id and taken.last_error_code == jobs.LEASE_EXPIRED
    assert await status_of(database, sid) == SessionStatus.PROCESSED
    assert await jobs.finish(database, crashed, jobs.Outcome.FATAL, error_code="late") is None
    job = await job_row(database, sid)
    assert (job.status, job.attempts, job.runs, job.last_error_code) == ("done", 2, 1, None)
    assert outcome(metrics, "finalize", "done") == 1


async def test_a_worker_that_loses_its_lease_stops_its_handler(
    database: Database, store: LocalObjectStore
) -> None:
    """The heartbeat renews the lease while the handler runs; when it finds the job taken over, the
    handler is cancelled and the worker writes nothing more."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(ctx: JobContext) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    kinds = JobKinds()
    kinds.register(JobKind("probe", slow))
    w, metrics = worker(database, store, kinds, lease_s=0.3)
    sid = await ended_session(database)
    async with database.sessions.begin() as s:
        await jobs.enqueue(s, "probe", sid)
    run = asyncio.create_task(w.run_once())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.5)  # longer than the lease: the heartbeat kept it
    job = await job_row(database, sid, "probe")
    assert job.status == "running" and not cancelled.is_set()
    async with database.sessions.begin() as s:  # another worker took it over
        await s.execute(update(Job).where(Job.id == job.id).values(locked_by="thief#1"))
    await asyncio.wait_for(run, 5)
    assert cancelled.is_set()
    job = await job_row(database, sid, "probe")
    assert (job.status, job.locked_by) == ("running", "thief#1")
    assert outcome(metrics, "probe", "lease_lost") == 1


async def test_closing_the_worker_gives_a_running_job_back(
    database: Database, store: LocalObjectStore
) -> None:
    """aclose cancels a running handler and queues its job again, the attempt not counted."""
    started = asyncio.Event()

    async def slow(ctx: JobContext) -> None:
        started.set()
        await asyncio.sleep(60)

    kinds = JobKinds()
    kinds.register(JobKind("probe", slow))
    w, metrics = worker(database, store, kinds)
    sid = await ended_session(database)
    async with database.sessions.begin() as s:
        await jobs.enqueue(s, "probe", sid)
    w.start()
    w.wake()
    await asyncio.wait_for(started.wait(), 5)
    await w.aclose()
    await w.aclose()  # idempotent
    job = await job_row(database, sid, "probe")
    assert (job.status, job.attempts, job.runs, job.locked_by) == ("queued", 0, 1, None)
    assert outcome(metrics, "probe", "released") == 1


async def test_the_apps_worker_processes_a_session_ended_through_the_api(both_client: Client) -> None:
    """`parley serve` runs the worker: POST /end, and the session is processed moments later."""
    assert both_client.app.get(JOBS) is not None
    learner = await signup(both_client)
    sid = await new_session(both_client, learner)
    resp = await both_client.post(f"/v1/sessions/{sid}/end", headers=learner.auth)
    assert resp.status == 200

    async def processed() -> bool:
        got = await both_client.get(f"/v1/sessions/{sid}", headers=learner.auth)
        return bool((await got.json())["status"] == SessionStatus.PROCESSED)

    await until(processed, timeout=5)  # woken at once, not after a poll interval
    db = both_client.app[DATABASE]
    assert [m[1] for m in await moves(db, sid)] == ["ended", "processing", "processed"]
    await until(lambda: _gauge_set(both_client), timeout=10)


async def _gauge_set(client: Client) -> bool:
    value = client.app[METRICS].registry.get_sample_value(
        "parley_jobs", {"kind": "finalize", "status": "queued"}
    )
    return value == 0


@pytest.mark.parametrize("app_env", [{"PARLEY_WORKERS_IN_PROCESS": "0"}])
async def test_no_worker_runs_in_process_when_it_is_turned_off(both_client: Client) -> None:
    """PARLEY_WORKERS_IN_PROCESS=0: the job waits in the queue for a `parley worker`."""
    assert both_client.app.get(JOBS) is None
    learner = await signup(both_client)
    sid = await new_session(both_client, learner)
    assert (await both_client.post(f"/v1/sessions/{sid}/end", headers=learner.auth)).status == 200
    await asyncio.sleep(0.3)
    db = both_client.app[DATABASE]
    assert await status_of(db, sid) == SessionStatus.ENDED
    assert (await job_row(db, sid)).status == "queued"


@pytest.mark.parametrize("raw", ["-1", "17", "two"])
def test_a_bad_worker_count_names_its_variable(tmp_path: Path, raw: str) -> None:
    """PARLEY_WORKERS_IN_PROCESS outside 0..16 (or not a number) stops the start, naming itself."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"PARLEY_DATA_DIR": str(tmp_path), "PARLEY_WORKERS_IN_PROCESS": raw}, dotenv=None)
    assert caught.value.variable == "PARLEY_WORKERS_IN_PROCESS"
    off = Settings.from_env({"PARLEY_DATA_DIR": str(tmp_path), "PARLEY_WORKERS_IN_PROCESS": "0"}, dotenv=None)
    assert off.workers_in_process == 0


# -- `parley jobs` ------------------------------------------------------------------------------


async def _seed_for_cli(url: str) -> tuple[str, str]:
    """One done and one dead job (with planted text in the session's transcript); returns their ids."""
    db = Database(url)
    try:
        done_sid, dead_sid = await ended_session(db), await ended_session(db)
        async with db.sessions.begin() as s:
            await s.execute(
                update(Job).where(Job.session_id == done_sid).values(status="done", attempts=1, runs=1)
            )
            await s.execute(
                update(Job)
                .where(Job.session_id == dead_sid)
                .values(status="dead", attempts=5, runs=5, last_error_code="rating_unavailable")
            )
        return (await job_row(db, done_sid)).id, (await job_row(db, dead_sid)).id
    finally:
        await db.aclose()


def test_parley_jobs_list_and_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`parley jobs list [--status]` prints ids, kinds, states, attempts and codes; `retry` requeues a
    dead job and refuses anything else."""
    for name in list(os.environ):
        if name.startswith(("PARLEY_", "OPENAI_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PARLEY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)  # keep the test run's handlers
    assert cli.main(["migrate"]) == 0
    done_id, dead_id = asyncio.run(_seed_for_cli(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'parley.db'}"))
    capsys.readouterr()

    assert cli.main(["jobs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "SESSION", "STATUS", "ATTEMPTS", "RUNS", "RUN_AFTER", "ERROR"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {done_id, dead_id}
    assert rows[done_id][1] == "finalize" and rows[done_id][3:6] == ["done", "1/5", "1"]
    assert rows[done_id][-1] == "-"
    assert rows[dead_id][3:6] == ["dead", "5/5", "5"] and rows[dead_id][-1] == "rating_unavailable"

    assert cli.main(["jobs", "list", "--status", "dead"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [dead_id]

    assert cli.main(["jobs", "retry", dead_id]) == 0
    assert capsys.readouterr().out.strip() == f"{dead_id}: dead -> queued"
    assert cli.main(["jobs", "retry", dead_id]) == 1
    assert "it is queued, only dead jobs are retried" in capsys.readouterr().err
    assert cli.main(["jobs", "retry", "job_unknown"]) == 1
    assert "no such job" in capsys.readouterr().err
    assert cli.main(["jobs", "list", "--status", "queued"]) == 0
    queued = capsys.readouterr().out.splitlines()[1:]
    assert len(queued) == 1 and queued[0].split()[3:5] == ["queued", "0/5"]


def test_parley_jobs_refuses_a_database_that_was_not_migrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On an empty database `parley jobs list` exits 2 naming the variable and `parley migrate`."""
    for name in list(os.environ):
        if name.startswith(("PARLEY_", "OPENAI_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PARLEY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    assert cli.main(["jobs", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("parley: PARLEY_DATABASE_URL: ") and "parley migrate" in err


# -- two worker processes on PostgreSQL ----------------------------------------------------------

JOBS_FOR_TWO = 200


async def test_two_worker_processes_do_every_job_exactly_once_on_postgresql(tmp_path: Path) -> None:
    """Two `parley worker` processes (two slots each) share 200 finalize jobs: each job is claimed
    once, run once and done; each session moves ended -> processing -> processed once."""
    procs: list[asyncio.subprocess.Process] = []
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    async with fresh_postgres_database() as url:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            env = base_env(tmp_path, PARLEY_DATABASE_URL=url)
            for log in logs:
                with log.open("w") as err:
                    procs.append(
                        await asyncio.create_subprocess_exec(
                            *PARLEY,
                            "worker",
                            "--concurrency",
                            "2",
                            env=env,
                            cwd=ROOT,
                            stdout=subprocess.PIPE,
                            stderr=err,
                            start_new_session=True,
                        )
                    )
            for proc, log in zip(procs, logs, strict=True):
                assert proc.stdout is not None
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
                assert "Parley worker is running" in line, (line, proc.returncode, log_tail(log))
            started = time.monotonic()
            sids = await ended_sessions(db, JOBS_FOR_TWO)

            async def all_done() -> bool:
                async with db.sessions() as s:
                    left = await s.execute(select(func.count()).select_from(Job).where(Job.status != "done"))
                    return left.scalar() == 0

            await until(all_done, timeout=120)
            elapsed = time.monotonic() - started
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                assert await asyncio.wait_for(proc.wait(), 30) == 0

            rows = await jobs.list_jobs(db, limit=1000)
            async with db.sessions() as s:
                found = await s.execute(select(Session.id, Session.status))
                statuses = {sid: status for sid, status in found.all()}
                audit = (
                    await s.execute(
                        select(AuditEvent.session_id, AuditEvent.to_status).where(
                            AuditEvent.to_status.in_(("processing", "processed"))
                        )
                    )
                ).all()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            await db.aclose()
    assert len(rows) == JOBS_FOR_TWO
    assert {(r.status, r.attempts, r.runs, r.last_error_code) for r in rows} == {("done", 1, 1, None)}
    assert {statuses[sid] for sid in sids} == {SessionStatus.PROCESSED}
    assert len(audit) == 2 * JOBS_FOR_TWO and len(set(audit)) == 2 * JOBS_FOR_TWO  # each move once
    by_process: dict[str, int] = {}
    for r in rows:
        assert r.locked_by is not None  # the claim that finished it
        process = r.locked_by.split("#", 1)[0]
        by_process[process] = by_process.get(process, 0) + 1
    assert {key.rsplit(":", 1)[1] for key in by_process} <= {str(p.pid) for p in procs}
    print(
        f"\n[two workers] {JOBS_FOR_TWO} jobs in {elapsed:.1f} s; per process: {sorted(by_process.values())}"
    )
    assert len(by_process) == 2, by_process  # both processes took part
    text = "\n".join(log.read_text() for log in logs)
    assert text.count('"jobs.finished"') == JOBS_FOR_TWO
    found = find_leaks(text, "parley worker stderr", DETECTORS)
    assert not found, "\n".join(map(str, found))


@pytest.mark.parametrize("raw", ["0", "0.5", "3601", "long"])
def test_a_bad_job_lease_names_its_variable(tmp_path: Path, raw: str) -> None:
    """PARLEY_JOB_LEASE_SECONDS outside 1..3600 (or not a number) stops the start, naming itself."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"PARLEY_DATA_DIR": str(tmp_path), "PARLEY_JOB_LEASE_SECONDS": raw}, dotenv=None)
    assert caught.value.variable == "PARLEY_JOB_LEASE_SECONDS"
    short = {"PARLEY_DATA_DIR": str(tmp_path), "PARLEY_JOB_LEASE_SECONDS": "5"}
    assert Settings.from_env(short, dotenv=None).job_lease_s == 5.0
