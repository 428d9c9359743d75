"""Delete during in-flight work, 20 times with random timing (issue #7, "Done when").

One relay (in-process, real aiortc browser, strict simulator upstream, PostgreSQL, moto's S3 behind
a :class:`TcpProxy`) serves 20 rounds in sequence, each with its own learner and session. A round:

1. starts a live call and lets the learner talk, so both tracks and the upstream event log are
   being recorded (the production recorder, with 0.5 s segments and event logs closed every
   second, so that several uploads of the session are queued or in flight when the delete lands
   and an export has several objects to read; with the default 5 s segments a round this short
   would upload only at its end);
2. at a random moment makes the object store fail: either *cut* (connections refused and reset:
   segments wait in the spool, the uploader retries) or *slow* (a few KiB/s: puts, reads and the
   delete's own calls are in flight for a while);
3. runs the activities of :data:`IN_FLIGHT` concurrently, each from its own random moment: an
   export of the same session, read slowly by the client, and (in most rounds) the end of the call,
   whose finalize job then assembles the tracks and rates the session on a model that takes
   0.5-3 s to answer, so the DELETE often lands while the job runs or the model call is in flight;
4. at a random moment 0-3 s into the round sends ``DELETE /v1/sessions/{id}``, and gives the store
   back at a random moment around it (up to 0.5 s before, up to 2 s after). A delete that answers
   ``503 delete_incomplete`` (the store was still down) is retried, as the learner is told to;
5. checks at once: the delete ended in 204; zero rows of the session (every table with a
   ``session_id``, plus audio chunks by object key and orphaned chunks and gaps), zero objects under
   ``sessions/<id>/``, zero files in the session's spool directory, the tombstone in place, and what
   each activity saw is allowed (see :func:`check_export`).

After the last round, every round's session is checked again once the uploader holds nothing of it
and more than :data:`~storage.uploader.MAX_RETRY_INTERVAL_S` (plus a margin) has passed since its
delete: no object, spool file or row came back later.

Timing is drawn from a seeded ``random.Random`` per round (the base seed is printed, and is part of
every failure message). ``PARLEY_DELETE_RACE_SEED=<base>`` replays a run's timings,
``PARLEY_DELETE_RACE_ROUNDS=<n>`` runs another number of rounds, and
``PARLEY_DELETE_RACE_ONLY=<round>`` runs one round of that seed. Run with ``-s`` to see each round.
Every round runs even if an earlier one failed, and all failures are reported together.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import os
import random
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from sqlalchemy import func, select

from relay.keys import DATABASE, RECORDERS, SETTINGS
from relay.simulator.rating import RatingSimulator
from storage.db import Database
from storage.deletion import session_prefix
from storage.models import (
    AudioChunk,
    AudioGap,
    AudioRecording,
    AuditEvent,
    Base,
    Job,
    Rating,
    Session,
    SessionTombstone,
    TranscriptSegment,
)
from storage.objects import ObjectStore, open_object_store
from storage.recorder import SpoolRecorderFactory
from storage.uploader import MAX_RETRY_INTERVAL_S
from tests.api import Learner, signup
from tests.fakes.tcp_proxy import TcpProxy
from tests.live.conftest import Call, Relay, start_call
from tests.live.test_resilience import say
from tests.services import fresh_postgres_database

ROUNDS: Final = int(os.environ.get("PARLEY_DELETE_RACE_ROUNDS", "20"))
ONLY: Final = os.environ.get("PARLEY_DELETE_RACE_ONLY")
SEED_ENV: Final = "PARLEY_DELETE_RACE_SEED"
SEGMENT_MS: Final = 500
DELETE_WINDOW_S: Final = (0.0, 3.0)  # when the DELETE is sent, after the call is up
RESTORE_AROUND_S: Final = (-0.5, 2.0)  # when the store comes back, relative to the DELETE
SLOW_BYTES_PER_S: Final = (1_500, 6_000)
DELETE_TRIES: Final = 5
ACTIVITY_TIMEOUT_S: Final = 30.0
# "Later": the uploader retries at most this far apart; a margin for the attempt itself.
LATER_S: Final = MAX_RETRY_INTERVAL_S + 2.0
SIGNUPS_PER_ADDRESS: Final = 20  # relay.security.limits: more rounds reuse learners
# Tables whose rows outlive a deleted session on purpose: the fence and the content-free audit.
KEPT_TABLES: Final = frozenset({"audit_events", "session_tombstones"})


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def store_proxy(s3_store_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of the S3 server; requested before the relay so it outlives its shutdown."""
    port = urlsplit(s3_store_url).port
    assert port is not None
    proxy = TcpProxy(port).start()
    yield proxy
    proxy.close()


@pytest.fixture
def short_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay's recorder closes a segment every 0.5 s and an event log every second."""
    monkeypatch.setattr(
        "relay.app.SpoolRecorderFactory",
        functools.partial(SpoolRecorderFactory, segment_ms=SEGMENT_MS, events_segment_s=1.0),
    )


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


# -- one round's plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Every random choice of a round, drawn from its seed (times in s after the call is up)."""

    seed: int
    store: str  # "cut" or "slow"
    fault_at: float
    slow_bytes_per_s: int
    delete_at: float
    restore_at: float
    export_at: float
    read_bytes: int
    read_pause_s: float
    end_at: float | None  # the learner ends the call (its finalize job starts), or None: deleted live
    rating_delay_s: float  # how long the rating model takes to answer

    @classmethod
    def draw(cls, seed: int) -> Plan:
        rng = random.Random(seed)
        store = rng.choice(["cut", "slow"])
        slow = rng.randint(*SLOW_BYTES_PER_S)
        delete_at = rng.uniform(*DELETE_WINDOW_S)
        # The store fails after the first segments closed (every 0.5 s): those may be uploaded and
        # listed (an export has objects to read), the next ones wait. It comes back around the
        # DELETE, mostly after it.
        fault_at = rng.uniform(0.8, 1.6) if delete_at > 1.6 else rng.uniform(0.0, delete_at)
        restore_at = max(fault_at + 0.3, delete_at + rng.uniform(*RESTORE_AROUND_S))
        # Mostly before the DELETE (the export is under way when it lands), sometimes just after;
        # through a slow store from its start (a cut one answers 503 at once: it may start earlier).
        earliest = fault_at if store == "slow" else max(0.1, fault_at - 1.0)
        export_at = rng.uniform(earliest, delete_at + 0.3)
        # Mostly the call ends shortly before the DELETE, so its finalize job (assembly, then the
        # rating waiting on a slow model) is under way when the delete lands; else it is deleted live.
        end_at = (
            rng.uniform(max(0.0, delete_at - 2.5), max(0.0, delete_at - 0.2)) if rng.random() < 0.7 else None
        )
        rating_delay_s = rng.uniform(0.5, 3.0)
        return cls(
            seed=seed, store=store, fault_at=round(fault_at, 3), slow_bytes_per_s=slow,
            delete_at=round(delete_at, 3), restore_at=round(restore_at, 3),
            export_at=round(export_at, 3), read_bytes=rng.choice([1024, 4096, 16384]),
            read_pause_s=round(rng.uniform(0.02, 0.15), 3),
            end_at=None if end_at is None else round(end_at, 3), rating_delay_s=round(rating_delay_s, 3),
        )  # fmt: skip

    def describe(self) -> str:
        fault = "cut" if self.store == "cut" else f"slow({self.slow_bytes_per_s} B/s)"
        return (
            f"seed={self.seed} store {fault}@{self.fault_at}s back@{self.restore_at}s "
            f"delete@{self.delete_at}s export@{self.export_at}s "
            f"read {self.read_bytes}B/{self.read_pause_s}s "
            f"end@{self.end_at if self.end_at is not None else '-'}s rating {self.rating_delay_s}s"
        )


@dataclass
class Round:
    """What one round did and saw; ``failures`` collects what must not have happened."""

    number: int
    plan: Plan
    relay: Relay
    learner: Learner
    proxy: TcpProxy
    store: ObjectStore  # the bucket itself, not through the proxy: what is really there
    rating_sim: RatingSimulator
    call: Call | None = None
    model_calls_before: int = 0
    t0: float = 0.0
    delete_sent: float | None = None  # loop time
    delete_done: float | None = None
    delete_statuses: list[int] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def session_id(self) -> str:
        assert self.call is not None
        return self.call.session_id

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    async def until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self.now()))

    def fail(self, what: str) -> None:
        self.failures.append(what)


# -- activities in flight during the delete ---------------------------------------------------------


@dataclass(frozen=True)
class Activity:
    """Work on the session that is under way when the delete lands.

    ``run`` starts at its own moment of the round and returns a short outcome once it has ended
    (the delete cut it, it finished, or it was refused); ``check`` turns that outcome, and what the
    database says about it, into failures on the round. Uploads are not listed: the recorder
    produces them on its own from the call's audio, and the store's fault keeps them pending.
    """

    name: str
    run: Callable[[Round], Coroutine[Any, Any, Any]]
    check: Callable[[Round, Any], Awaitable[None]]


@dataclass
class ExportSeen:
    status: int
    code: str | None = None
    complete: bool = False
    error: str | None = None
    received: int = 0
    headers_at: float | None = None  # loop time the answer's headers arrived
    done_at: float | None = None  # loop time the body ended (or broke)
    zip_bytes: bytes = b""


async def stream_export(r: Round) -> ExportSeen:
    """``GET /v1/sessions/{id}/export``, read slowly, from the plan's moment on."""
    await r.until(r.plan.export_at)
    loop = asyncio.get_running_loop()
    resp = await r.relay.client.get(f"/v1/sessions/{r.session_id}/export", headers=r.learner.auth)
    headers_at = loop.time()
    if resp.status != 200:
        body = await resp.json(content_type=None)
        return ExportSeen(resp.status, code=body.get("code"), headers_at=headers_at, done_at=loop.time())
    body = bytearray()
    try:
        while chunk := await resp.content.read(r.plan.read_bytes):
            body += chunk
            await asyncio.sleep(r.plan.read_pause_s)
    except (aiohttp.ClientError, ConnectionError) as exc:  # the server cut the transfer
        return ExportSeen(
            200, error=type(exc).__name__, received=len(body), headers_at=headers_at, done_at=loop.time()
        )
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(body))) as zf:
            complete = zf.testzip() is None and "session.json" in zf.namelist()
    except zipfile.BadZipFile:
        complete = False
    return ExportSeen(
        200,
        complete=complete,
        received=len(body),
        headers_at=headers_at,
        done_at=loop.time(),
        zip_bytes=bytes(body) if complete else b"",
    )


async def check_export(r: Round, seen: ExportSeen) -> None:
    """What an export running into a delete may do.

    * Refused: 404 (the session is being or was deleted) or 503 (the store is down before the
      first byte).
    * Cut: 200, then a broken transfer or a body that is not a whole zip.
    * Complete: only if it was *sealed before the fence*: its ``session.exported`` audit event was
      written before the tombstone (the seal takes a share lock on the session row, the fence an
      update lock; relay/api/exports.py). A complete zip must also be whole: every file listed in
      ``session.json`` with its checksum, no listed segment missing (nothing was deleted yet when it
      was read). Bytes of a sealed zip may still reach a slow reader after the 204; no zip is ever
      completed from a session once the delete has begun.

    In every case no export of the session may be sealed after the tombstone.
    """
    r.outcomes["export"] = (
        f"{seen.status} {seen.code}"
        if seen.status != 200
        else ("complete" if seen.complete else f"cut after {seen.received} B ({seen.error or 'not a zip'})")
    )
    if seen.headers_at and seen.done_at and r.delete_sent:
        # When the answer started and ended, relative to the DELETE being sent.
        start, end = seen.headers_at - r.delete_sent, seen.done_at - r.delete_sent
        r.outcomes["export"] += f" [{start:+.2f}s..{end:+.2f}s]"
    async with r.relay.client.app[DATABASE].sessions() as s:
        tomb = await s.get(SessionTombstone, r.session_id)
        exported = (
            (
                await s.execute(
                    select(AuditEvent)
                    .where(AuditEvent.session_id == r.session_id, AuditEvent.event == "session.exported")
                    .order_by(AuditEvent.id)
                )
            )
            .scalars()
            .all()
        )
    if tomb is None:
        r.fail("export check: no tombstone")
        return
    late = [e for e in exported if e.at >= tomb.deleted_at]
    if late:
        r.fail(f"an export was sealed after the fence: {[(e.id, e.at.isoformat()) for e in late]}")
    if seen.status != 200:
        if (seen.status, seen.code) not in {(404, "not_found"), (503, "storage_unavailable")}:
            r.fail(f"export answered {seen.status} {seen.code}")
        return
    if not seen.complete:
        if exported:
            r.fail(f"the export was cut but recorded as exported ({len(exported)} audit events)")
        return
    if len(exported) != 1:
        r.fail(f"a complete export with {len(exported)} session.exported audit events (want 1)")
    problems = zip_problems(seen.zip_bytes)
    if problems:
        r.fail(f"complete export is not whole: {problems}")


def zip_problems(data: bytes) -> list[str]:
    problems: list[str] = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        meta = json.loads(zf.read("session.json"))
        names = set(zf.namelist()) - {"session.json"}
        if set(meta["files"]) != names:
            problems.append(f"files {sorted(names ^ set(meta['files']))} listed or present only once")
        for name, digest in meta["files"].items():
            if name in names and hashlib.sha256(zf.read(name)).hexdigest() != digest["sha256"]:
                problems.append(f"{name}: checksum")
        for rec in meta["recordings"]:
            missing = [s["seq"] for s in rec["segments"] if s.get("missing")]
            if missing:
                problems.append(f"{rec['track']}: segments {missing} missing")
    return problems


EARLIER_TURNS: Final = (
    ("learner", "I would like a large coffee with oat milk please"),
    ("coach", "Of course, anything else for you today?"),
    ("learner", "Maybe a croissant and a glass of water too"),
)


@dataclass
class JobSeen:
    ended: int | None = None  # the status of POST /end, None if the plan deletes the call live
    job: str | None = None  # the finalize job's status last seen before the DELETE
    rating: str | None = None  # the rating's status last seen before the DELETE
    model_calls: int = 0  # rating calls the model received before the DELETE


async def end_and_post_process(r: Round) -> JobSeen:
    """End the call at the plan's moment, then watch its finalize job until the DELETE is sent."""
    seen = JobSeen()
    if r.plan.end_at is None:
        return seen
    await r.until(r.plan.end_at)
    if r.delete_sent is not None:
        return seen
    db = r.relay.client.app[DATABASE]
    # Earlier turns of the conversation, so the rating has enough speech to ask the (slow) model;
    # the round's own call is too short to be transcribed in time.
    async with db.sessions.begin() as s:
        s.add_all(
            TranscriptSegment(session_id=r.session_id, seq=100 + i, speaker=speaker, text=text,
                              start_ms=100 + 2000 * i, end_ms=1900 + 2000 * i, item_id=f"earlier_{i}")
            for i, (speaker, text) in enumerate(EARLIER_TURNS)
        )  # fmt: skip
    resp = await r.relay.client.post(f"/v1/sessions/{r.session_id}/end", headers=r.learner.auth)
    seen.ended = resp.status
    while r.delete_sent is None:
        async with db.sessions() as s:
            seen.job = (await s.execute(select(Job.status).where(Job.session_id == r.session_id))).scalar()
            seen.rating = (
                await s.execute(select(Rating.status).where(Rating.session_id == r.session_id))
            ).scalar()
        seen.model_calls = r.rating_sim.calls - r.model_calls_before
        await asyncio.sleep(0.05)
    return seen


async def check_post_processing(r: Round, seen: JobSeen) -> None:
    """The end answered 200 (or 404 once the delete had begun); what the job did is reported, and
    the row, object and spool checks (every table with a session_id, ratings and jobs included)
    prove it wrote nothing that outlives the delete."""
    if seen.ended is None:
        r.outcomes["job"] = "none (deleted live)"
        return
    r.outcomes["job"] = (
        f"end {seen.ended}, job {seen.job}, rating {seen.rating}, model calls {seen.model_calls}"
    )
    if seen.ended not in (200, 404):
        r.fail(f"POST /end answered {seen.ended}")


#: Everything that is running against the session when the delete lands, besides the live call and
#: its uploads: an export streaming, and (in most rounds) the finalize job of the just-ended call,
#: assembling its tracks or waiting on the rating model.
IN_FLIGHT: list[Activity] = [
    Activity("export", stream_export, check_export),
    Activity("job", end_and_post_process, check_post_processing),
]


# -- what is left of a session ----------------------------------------------------------------------


async def leftover_rows(db: Database, session_id: str) -> dict[str, int]:
    """Rows that still belong to the session, by table (only non-zero counts)."""
    counts: dict[str, int] = {}
    async with db.sessions() as s:
        counts["sessions"] = (
            await s.execute(select(func.count()).select_from(Session).where(Session.id == session_id))
        ).scalar_one()
        for table in Base.metadata.sorted_tables:
            if "session_id" in table.c and table.name not in KEPT_TABLES:
                counts[table.name] = (
                    await s.execute(
                        select(func.count()).select_from(table).where(table.c.session_id == session_id)
                    )
                ).scalar_one()
        counts["audio_chunks (by object key)"] = (
            await s.execute(
                select(func.count())
                .select_from(AudioChunk)
                .where(AudioChunk.object_key.startswith(session_prefix(session_id)))
            )
        ).scalar_one()
        # Chunks and gaps hang off recordings: none may outlive theirs (whatever session it was).
        recordings = select(AudioRecording.id)
        counts["audio_chunks (orphaned)"] = (
            await s.execute(
                select(func.count()).select_from(AudioChunk).where(AudioChunk.recording_id.not_in(recordings))
            )
        ).scalar_one()
        counts["audio_gaps (orphaned)"] = (
            await s.execute(
                select(func.count()).select_from(AudioGap).where(AudioGap.recording_id.not_in(recordings))
            )
        ).scalar_one()
    return {name: int(n) for name, n in counts.items() if n}


async def leftover_objects(store: ObjectStore, session_id: str) -> list[str]:
    return [o.key async for o in store.list(session_prefix(session_id))]


def leftover_spool_files(spool_dir: Path, session_id: str) -> list[str]:
    base = spool_dir / session_id
    return sorted(str(p.relative_to(spool_dir)) for p in base.rglob("*") if p.is_file())


async def check_nothing_left(r: Round, when: str) -> None:
    app = r.relay.client.app
    rows = await leftover_rows(app[DATABASE], r.session_id)
    if rows:
        r.fail(f"{when}: rows left {rows}")
    objects = await leftover_objects(r.store, r.session_id)
    if objects:
        r.fail(f"{when}: objects left {objects}")
    spool = leftover_spool_files(app[SETTINGS].spool_dir, r.session_id)
    if spool:
        r.fail(f"{when}: spool files left {spool}")


# -- the round --------------------------------------------------------------------------------------


async def store_fault(r: Round) -> None:
    """The plan's store fault, from ``fault_at`` to ``restore_at``."""
    await r.until(r.plan.fault_at)
    if r.plan.store == "cut":
        r.proxy.cut()
    else:
        r.proxy.throttle(r.plan.slow_bytes_per_s)
    try:
        await r.until(r.plan.restore_at)
    finally:
        r.proxy.restore()
        r.proxy.throttle(None)


async def delete(r: Round, fault: asyncio.Task[None]) -> None:
    """DELETE at the plan's moment; a retryable 503 is retried once the store is back, as a client would."""
    await r.until(r.plan.delete_at)
    loop = asyncio.get_running_loop()
    r.delete_sent = loop.time()
    recorders = r.relay.client.app[RECORDERS]
    assert isinstance(recorders, SpoolRecorderFactory)
    r.outcomes["at delete"] = (
        f"{recorders.uploader.pending(r.session_id)} uploads pending, "
        f"{len(await leftover_objects(r.store, r.session_id))} objects"
    )
    for attempt in range(DELETE_TRIES):
        resp = await r.relay.client.delete(f"/v1/sessions/{r.session_id}", headers=r.learner.auth)
        r.delete_statuses.append(resp.status)
        if resp.status == 204:
            break
        body = await resp.json(content_type=None)
        if resp.status != 503 or body.get("code") != "delete_incomplete":
            r.fail(f"DELETE answered {resp.status} {body.get('code')} (attempt {attempt + 1})")
            break
        await asyncio.wait({fault}, timeout=10)
        await asyncio.sleep(0.5)
    r.delete_done = loop.time()
    if r.delete_statuses[-1] != 204:
        r.fail(f"DELETE never answered 204: {r.delete_statuses}")


async def run_round(r: Round) -> None:
    r.rating_sim.options = replace(r.rating_sim.options, delay_s=r.plan.rating_delay_s)
    r.model_calls_before = r.rating_sim.calls
    r.call = await start_call(r.relay, r.learner)
    r.t0 = asyncio.get_running_loop().time()
    say(r.call)
    fault = asyncio.create_task(store_fault(r), name="race:store-fault")
    activities = {a.name: asyncio.create_task(a.run(r), name=f"race:{a.name}") for a in IN_FLIGHT}
    try:
        await delete(r, fault)
        await fault
        for activity in IN_FLIGHT:
            try:
                async with asyncio.timeout(ACTIVITY_TIMEOUT_S):
                    seen = await activities[activity.name]
            except TimeoutError:
                r.fail(f"{activity.name} did not end within {ACTIVITY_TIMEOUT_S} s of the delete")
                continue
            await activity.check(r, seen)
        await check_tombstone(r)
        await check_nothing_left(r, "right after the delete")
    finally:
        for task in (fault, *activities.values()):
            task.cancel()
        await asyncio.gather(fault, *activities.values(), return_exceptions=True)
        r.proxy.restore()
        r.proxy.throttle(None)
        if r.call is not None:
            await r.call.rtc.aclose()


async def check_tombstone(r: Round) -> None:
    async with r.relay.client.app[DATABASE].sessions() as s:
        if await s.get(SessionTombstone, r.session_id) is None:
            r.fail("no tombstone: the fence is gone")


def base_seed() -> int:
    raw = os.environ.get(SEED_ENV)
    return int(raw) if raw else random.SystemRandom().randrange(2**31)


async def test_delete_during_in_flight_work_leaves_nothing_20_times(
    pg_url: str,
    store_proxy: TcpProxy,
    s3_store_url: str,
    short_segments: None,
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    """20 rounds: DELETE mid-call or mid-post-processing, with uploads pending, an export streaming
    and the finalize job rating on a slow model, leaves nothing, ever."""
    seed = base_seed()
    numbers = [int(ONLY)] if ONLY is not None else list(range(ROUNDS))
    print(f"\n[delete races] base seed {seed} ({SEED_ENV}={seed} replays), rounds {numbers}", flush=True)
    rating_sim = RatingSimulator()
    await rating_sim.start()
    relay = await relay_factory(
        PARLEY_DATABASE_URL=pg_url,
        PARLEY_OBJECT_STORE_URL=via(s3_store_url, store_proxy.port),
        PARLEY_RATING_URL=rating_sim.base_url,
    )
    bucket = open_object_store(s3_store_url)
    started = time.monotonic()
    rounds: list[Round] = []
    learners: list[Learner] = []
    try:
        for n in numbers:
            if len(learners) < SIGNUPS_PER_ADDRESS:
                learners.append(await signup(relay.client))
            r = Round(
                n, Plan.draw(seed + n), relay, learners[n % len(learners)], store_proxy, bucket, rating_sim
            )
            rounds.append(r)
            round_started = time.monotonic()
            try:
                await run_round(r)
            except Exception as exc:  # a broken round is a failure of that round; the others still run
                r.fail(f"round raised {type(exc).__name__}: {exc}")
            print(
                f"[delete races] round {n:2d} {r.plan.describe()} | delete {r.delete_statuses} "
                f"in {(r.delete_done or 0) - (r.delete_sent or 0):.2f}s | "
                + " ".join(f"{k}: {v}" for k, v in r.outcomes.items())
                + f" | {time.monotonic() - round_started:.1f}s"
                + (f" | FAILED: {r.failures}" if r.failures else ""),
                flush=True,
            )
        # Later: once the uploader holds nothing of a session and its longest retry interval has
        # passed since the delete, nothing of the session came back.
        recorders = relay.client.app[RECORDERS]
        assert isinstance(recorders, SpoolRecorderFactory)
        loop = asyncio.get_running_loop()
        later_started = time.monotonic()
        for r in rounds:
            if r.call is None:
                continue
            if not await recorders.uploader.wait_session(r.session_id, 30):
                r.fail("later: the uploader still holds files of the session 30 s on")
            await asyncio.sleep(max(0.0, (r.delete_done or 0) + LATER_S - loop.time()))
            await check_nothing_left(r, f"{LATER_S:.0f}+ s after the delete")
        print(
            f"[delete races] later: {len(rounds)} sessions checked again, the last "
            f"{loop.time() - (rounds[-1].delete_done or 0):.1f}s after its delete "
            f"(waited {time.monotonic() - later_started:.1f}s)",
            flush=True,
        )
    finally:
        await bucket.aclose()
        await rating_sim.aclose()
    elapsed = time.monotonic() - started
    # The job activity must really have raced: in some rounds the finalize job was running (assembling
    # or waiting on the rating model) when the DELETE was sent.
    running = [r for r in rounds if "job running" in r.outcomes.get("job", "")]
    print(f"[delete races] the finalize job was running at the delete in {len(running)} rounds", flush=True)
    if ONLY is None and ROUNDS >= 10:
        assert running, "no round had its finalize job running when the DELETE was sent"
    failed = [r for r in rounds if r.failures]
    print(f"[delete races] {len(rounds)} rounds in {elapsed:.1f}s, {len(failed)} failed", flush=True)
    assert not failed, "\n".join(
        [f"{len(failed)} of {len(rounds)} rounds left something (base seed {seed}; replay one with "
         f"{SEED_ENV}={seed} PARLEY_DELETE_RACE_ONLY=<round>):"]
        + [f"round {r.number} [{r.plan.describe()}]: {'; '.join(r.failures)}" for r in failed]
    )  # fmt: skip
