"""A `parley worker` killed (SIGKILL) in the middle of rating a session: once its lease expires a
second worker finishes the job once, and the learner's recording never changed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import func, select

from relay.keys import DATABASE, SETTINGS
from relay.simulator.rating import RatingSimulator, RatingSimulatorOptions
from storage.models import AuditEvent, Job, Rating, SessionStatus
from tests.api import signup
from tests.integration.test_cli import PARLEY, ROOT, base_env
from tests.integration.test_jobs import log_tail, status_of, until
from tests.integration.test_rating import kept, recorded_session, session_json

Client = TestClient[web.Request, web.Application]

LEASE_S = "2"


@pytest.fixture
def app_env() -> dict[str, str]:
    """The app only serves the API: the jobs are the `parley worker` processes'."""
    return {"PARLEY_WORKERS_IN_PROCESS": "0"}


async def start_worker(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            *PARLEY, "worker", env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    assert "Parley worker is running" in line, (line, proc.returncode, log_tail(log))
    return proc


async def test_a_worker_killed_mid_rating_is_taken_over_and_the_recording_is_intact(
    both_client: Client, tmp_path: Path
) -> None:
    """Worker 1 is killed while the model is answering; worker 2 takes the job after the lease
    (2 s) and finishes it: processed once, rated once, transcript and audio byte-identical."""
    learner = await signup(both_client)
    sid = await recorded_session(both_client, learner, tmp_path / "spool")
    before = await kept(both_client, learner, sid)
    settings = both_client.app[SETTINGS]
    db = both_client.app[DATABASE]
    procs: list[asyncio.subprocess.Process] = []
    async with RatingSimulator(RatingSimulatorOptions(delay_s=120)) as sim:
        env = base_env(
            tmp_path,
            PARLEY_DATABASE_URL=settings.database_url,
            PARLEY_OBJECT_STORE_URL=settings.object_store_url,
            PARLEY_RATING_URL=sim.base_url,
            PARLEY_JOB_LEASE_SECONDS=LEASE_S,
        )
        try:
            first = await start_worker(env, tmp_path / "worker1.log")
            procs.append(first)

            async def asked() -> bool:
                return sim.calls >= 1

            await until(asked, timeout=30)  # worker 1 is inside the rating step, waiting for the model
            os.killpg(first.pid, signal.SIGKILL)
            await first.wait()
            assert await status_of(db, sid) == SessionStatus.PROCESSING
            pending = (await session_json(both_client, learner, sid))["rating"]
            assert pending["status"] == "pending" and pending["metrics"]["learner_words"] > 0
            assert await kept(both_client, learner, sid) == before  # nothing lost while it hangs

            sim.options = replace(sim.options, delay_s=0.0)
            second = await start_worker(env, tmp_path / "worker2.log")
            procs.append(second)

            async def processed() -> bool:
                return await status_of(db, sid) == SessionStatus.PROCESSED

            await until(processed, timeout=30)
            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), 30) == 0
        finally:
            for proc in procs:
                if proc.returncode is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
    async with db.sessions() as s:
        job = (await s.execute(select(Job).where(Job.session_id == sid))).scalar_one()
        ratings = (
            await s.execute(select(func.count()).select_from(Rating).where(Rating.session_id == sid))
        ).scalar()
        moves = (
            await s.execute(
                select(AuditEvent.to_status).where(
                    AuditEvent.session_id == sid, AuditEvent.to_status.in_(("processing", "processed"))
                )
            )
        ).all()
    assert (job.status, job.attempts) == ("done", 2)  # claimed twice, finished once
    assert sorted(m[0] for m in moves) == ["processed", "processing"]  # each move once
    assert ratings == 1 and sim.calls == 2
    assert (await session_json(both_client, learner, sid))["rating"]["status"] == "done"
    assert await kept(both_client, learner, sid) == before
