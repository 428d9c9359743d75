"""Load and soak (issue 11): simulated learners against one and two relay nodes, and a long soak.

Run with ``.venv/bin/pytest -m bench tests/bench/bench_load.py -s -p no:randomly`` (``-k "not soak"``:
the load steps, about 12 minutes; ``-k soak``: the soak, ``PARLEY_BENCH_SOAK_S`` seconds, 30 minutes
by default, plus about a minute). Method and results: tests/bench/RESULTS.md, "## Load and soak"
(each test rewrites its part of the block between the ``bench_load`` markers).

Both tests run ``parley serve --workers 1`` processes (through :mod:`tests.bench.relay_probe` with no
probes, pinned to one CPU each) on a fresh PostgreSQL database and a real S3 server (moto), with the
Realtime simulator (:mod:`tests.bench.relay_sim`), and drive them with the learners of
:mod:`tests.bench.relay_peers` from this process. Everything stays on 127.0.0.1.

* **Load**: for each N (``PARLEY_BENCH_LOAD_N``) and node count (``PARLEY_BENCH_LOAD_NODES``): fresh
  relay node(s), idle reading, N learners (split across the nodes) that speak, wait for the coach and
  barge in on a quarter of the turns, a warm-up, a measurement window, then every learner hangs up
  and its stored recording is compared with the audio it sent. For each N, a bare aiortc echo server
  (:mod:`tests.bench.relay_echo`) with N peers gives the baseline CPU and RSS in the same run.
* **Soak**: one node, ``PARLEY_BENCH_SOAK_N`` learners whose sessions end and restart every 2-3
  minutes, the relay's RSS sampled every 10 s, and once a minute, from inside the relay, its C heap
  and Python's allocator (:mod:`tests.bench.mem_probe`: a few fixed-size numbers per sample, so the
  probe itself does not grow).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest

from relay.browser.ice import restore_host_addresses, restrict_host_addresses
from tests.bench.bench_relay import _code_version, _dump, _free_port, _read_port, _signup, _start, _stop
from tests.bench.relay_peers import BenchPeer, Voice, connect_to_relay, encode_voice, hang_up
from tests.bench.relay_stats import (
    Histogram,
    coach_onsets,
    core_busy_s,
    fmt,
    fmt_pair,
    parse_histogram,
    parse_value,
    pct,
    process_cpu_s,
    rss_mb,
    slope,
    udp_receive_errors,
)
from tests.fixtures_s3 import _answers, _moto_command, fresh_bucket_name, with_bucket
from tests.fixtures_s3 import _stop as _stop_moto
from tests.services import fresh_postgres_database

pytestmark = pytest.mark.bench


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {message}", flush=True)


def _ints(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(n) for n in os.environ.get(name, default).split(","))


# Load: total learners per point (split across the nodes), node counts, window.
LOAD_N = _ints("PARLEY_BENCH_LOAD_N", "4,8,12,16,20,24")
LOAD_NODES = _ints("PARLEY_BENCH_LOAD_NODES", "1,2")
WINDOW_S = float(os.environ.get("PARLEY_BENCH_LOAD_WINDOW_S", "15"))
WARMUP_S = 5.0
IDLE_S = 3.0
# Between a learner's microphone stopping and its POST /v1/sessions/{id}/end.
HANGUP_QUIET_S = float(os.environ.get("PARLEY_BENCH_HANGUP_QUIET_S", "0.5"))
# Soak: learners, duration, warm-up, RSS sampling, session lifetimes.
SOAK_N = int(os.environ.get("PARLEY_BENCH_SOAK_N", "8"))
SOAK_S = float(os.environ.get("PARLEY_BENCH_SOAK_S", "1800"))
SOAK_WARMUP_S = min(300.0, SOAK_S / 4)
SOAK_SAMPLE_S = 10.0
SOAK_LIFE_S = (120.0, 180.0)
FLAT_MB_PER_10_MIN = 1.0  # the soak counts as flat when the second half's RSS slope stays below this

FIRST_AUDIO_MS = 250
REALTIME_PACING = False
TOPIC = "doctor-visit"  # intermediate: server VAD silence 650 ms
BARGE_IN = 0.25  # share of turns in which the learner speaks again while the coach talks
P95_LIMIT_MS = 100.0
CONNECT_GAP_S = 0.15
COACH_ONSET_BYTES = 20  # relay coach audio: 40-90 byte packets; its silence: 3 bytes
CORES = (0, 1)  # node k runs on CPU k; the simulator, S3, PostgreSQL's clients and this process on CPU 1
CLIENT_CORE = 1
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Load and soak"
BEGIN, END = "<!-- bench_load:begin -->", "<!-- bench_load:end -->"
SECRET_KEY = "bench-load-secret-key-0123456789abcdefghijklmnopq"


# -- services and nodes ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _s3_server(log: Path) -> AsyncIterator[str]:
    """moto's S3 server (tests/fixtures_s3.py's command) on a free port, started from this pinned
    process so it shares its CPU; yields the ``s3://`` URL of a fresh bucket."""
    port = _free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 (a one-off start, not in a measurement)
            _moto_command(port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        async with asyncio.timeout(20):
            while not await asyncio.to_thread(_answers, port):
                assert proc.poll() is None, "moto_server exited"
                await asyncio.sleep(0.1)
        yield with_bucket(f"s3://test:test@127.0.0.1:{port}/parley?secure=false", fresh_bucket_name())
    finally:
        await asyncio.to_thread(_stop_moto, proc)


@dataclass
class Services:
    tmp: Path
    voice: Voice
    sim: Any
    env: dict[str, str]
    database_url: str  # asyncpg form
    token: str | None = None
    sim_items: dict[str, tuple[float | None, float]] = field(default_factory=dict)

    async def refresh_sim_items(self) -> None:
        dump = await _dump(self.sim, self.tmp / "sim.json")
        self.sim_items.update({k: tuple(v) for k, v in dump["first_delta"].items()})


@contextlib.asynccontextmanager
async def _services(tmp: Path, *, workers_in_process: int) -> AsyncIterator[Services]:
    """PostgreSQL (a fresh database, migrated), S3, the simulator; this process pinned to CPU 1."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CLIENT_CORE})
    restrict_host_addresses(["127.0.0.1"])
    sim = await _start(
        ["-m", "tests.bench.relay_sim", str(CLIENT_CORE), str(tmp / "sim.json"), str(FIRST_AUDIO_MS),
         "1" if REALTIME_PACING else "0"],
        log=tmp / "sim.log",
    )  # fmt: skip
    try:
        sim_port = await _read_port(sim)
        async with fresh_postgres_database() as db_url, _s3_server(tmp / "moto.log") as s3_url:
            env = {
                **os.environ,
                "PARLEY_DATABASE_URL": db_url,
                "PARLEY_OBJECT_STORE_URL": s3_url,
                "PARLEY_SECRET_KEY": SECRET_KEY,
                "PARLEY_UPSTREAM_URL": f"ws://127.0.0.1:{sim_port}/v1",
                "PARLEY_RTC_HOST_ADDRESSES": "127.0.0.1",
                "PARLEY_RTC_REMOTE_ALLOW": "127.0.0.0/8",
                "PARLEY_MAX_SESSIONS": "100",
                "PARLEY_MAX_LOOP_LAG_MS": "10000",  # measure the load offered, not admission control
                "PARLEY_SESSIONS_PER_MINUTE": "10000",
                "PARLEY_CLIENT_SECRETS_PER_MINUTE": "10000",
                "PARLEY_DRAIN_TIMEOUT": "1",
                "PARLEY_WORKERS_IN_PROCESS": str(workers_in_process),
            }
            for name in ("OPENAI_API_KEY", "PARLEY_RATING_URL", "PARLEY_NODE_URL", "PARLEY_PORT"):
                env.pop(name, None)  # the built-in rating simulator; each node on its own loopback URL
            migrate = await _start(["-m", "relay", "migrate"], env=env, log=tmp / "migrate.log")
            assert await migrate.wait() == 0, "parley migrate failed (see migrate.log)"
            pg_url = db_url.replace("postgresql+asyncpg://", "postgresql://", 1)
            yield Services(tmp, encode_voice(), sim, env, pg_url)
    finally:
        await _stop(sim)
        restore_host_addresses()
        os.sched_setaffinity(0, affinity)


@dataclass
class Node:
    proc: Any
    http: aiohttp.ClientSession

    @property
    def pid(self) -> int:
        pid: int = self.proc.pid
        return pid

    async def scrape(self) -> str:
        async with self.http.get("/metrics") as resp:
            return await resp.text()


@contextlib.asynccontextmanager
async def _nodes(
    svc: Services, count: int, name: str, extra_env: dict[str, str] | None = None
) -> AsyncIterator[list[Node]]:
    """``count`` fresh ``parley serve --workers 1`` processes sharing the database and the bucket,
    each with its own data directory (spool) and port, node k pinned to CPU k."""
    nodes: list[Node] = []
    try:
        for k in range(count):
            port = _free_port()
            env = {
                **svc.env,
                **(extra_env or {}),
                "PARLEY_PORT": str(port),
                "PARLEY_DATA_DIR": str(svc.tmp / f"{name}-node{k}"),
            }
            proc = await _start(
                ["-m", "tests.bench.relay_probe", str(CORES[k]), "-"], env=env, log=svc.tmp / f"node{k}.log"
            )
            http = aiohttp.ClientSession(f"http://127.0.0.1:{port}")
            nodes.append(Node(proc, http))
            async with asyncio.timeout(60):
                while True:
                    assert proc.returncode is None, f"node {k} exited (see node{k}.log)"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get("/readyz") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.1)
        if svc.token is None:
            svc.token = await _signup(nodes[0].http)
        yield nodes
    finally:
        for node in nodes:
            await _stop(node.proc, signal.SIGINT)
            await node.http.close()


# -- sessions --------------------------------------------------------------------------------------


@dataclass
class Learner:
    """One learner session's client side: what it sent and saw (kept small: the soak makes hundreds)."""

    session_id: str
    node: int
    sent_ms: int = 0
    onsets: list[tuple[str, float | None]] = field(default_factory=list)
    turns: int = 0
    barge_ins: int = 0
    timeouts: int = 0
    refusals: int = 0
    alive: bool = False  # still receiving audio in the last second before hanging up


@dataclass
class Stored:
    """What the relay stored for one session's learner track."""

    api_ms: int  # GET /v1/sessions/{id}: audio[learner].duration_ms
    db_ms: int  # audio_recordings.duration_ms
    declared_lost_ms: int  # audio_recordings.lost_ms
    gaps: int
    status: str


def _observe(learner: Learner, peer: BenchPeer, start: float, end: float) -> None:
    record = peer.record
    learner.onsets = coach_onsets(record.arrivals, record.events, start, end, COACH_ONSET_BYTES)
    learner.turns = record.turns
    learner.barge_ins = record.barge_ins
    learner.timeouts = record.answer_timeouts
    learner.alive = any(end - 1 <= a[0] < end for a in record.arrivals[-60:])


async def _stored(svc: Services, nodes: list[Node], learners: list[Learner]) -> dict[str, Stored]:
    """Wait until every learner recording is finalized and the spools are empty, then read them."""
    ids = [lr.session_id for lr in learners]
    query = """
        SELECT r.session_id, r.status, r.duration_ms, r.lost_ms,
               (SELECT count(*) FROM audio_gaps g WHERE g.recording_id = r.id) AS gaps
        FROM audio_recordings r WHERE r.track = 'learner' AND r.session_id = ANY($1::text[])
    """
    conn = await asyncpg.connect(svc.database_url)
    try:
        async with asyncio.timeout(180):
            while True:
                rows = {r["session_id"]: r for r in await conn.fetch(query, ids)}
                spooled = [parse_value(await node.scrape(), "parley_spool_bytes") for node in nodes]
                finalized = len(rows) == len(ids) and all(r["status"] != "recording" for r in rows.values())
                if finalized and all(b == 0 for b in spooled):
                    break
                await asyncio.sleep(0.5)
    finally:
        await conn.close()
    out: dict[str, Stored] = {}
    for lr in learners:
        async with nodes[lr.node].http.get(
            f"/v1/sessions/{lr.session_id}", headers={"Authorization": f"Bearer {svc.token}"}
        ) as resp:
            assert resp.status == 200, f"GET /v1/sessions/{{id}}: HTTP {resp.status}"
            view = await resp.json()
        api_ms = sum(a["duration_ms"] for a in view["audio"] if a["track"] == "learner")
        row = rows[lr.session_id]
        out[lr.session_id] = Stored(api_ms, row["duration_ms"], row["lost_ms"], row["gaps"], row["status"])
    return out


def _overheads(
    learners: list[Learner], sim_items: dict[str, tuple[float | None, float]]
) -> tuple[list[float], int]:
    """Client-observed first-response overhead (ms) of every answer, and how many could not be matched."""
    values: list[float] = []
    unmatched = 0
    for lr in learners:
        for item_id, onset in lr.onsets:
            stopped, _first_delta = sim_items.get(item_id, (None, math.nan))
            if onset is None or stopped is None:
                unmatched += 1
                continue
            values.append((onset - stopped) * 1000 - FIRST_AUDIO_MS)
    return values, unmatched


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Reading:
    """CPU seconds and RSS of the server processes, and both CPUs' busy time, at one instant."""

    t: float
    cpu_s: float
    rss: float
    core0: float
    core1: float
    client_s: float
    sim_s: float

    @classmethod
    def now(cls, pids: list[int], sim_pid: int) -> Reading:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            time.monotonic(),
            sum(process_cpu_s(p) for p in pids),
            sum(rss_mb(p) for p in pids),
            core_busy_s(0),
            core_busy_s(1),
            usage.ru_utime + usage.ru_stime,
            process_cpu_s(sim_pid),
        )


def _pct(a: Reading, b: Reading, attr: str) -> float:
    return (getattr(b, attr) - getattr(a, attr)) / (b.t - a.t) * 100


@dataclass
class LoadPoint:
    """One point: ``nodes`` relay processes (0: the echo baseline) with ``n`` learners in all."""

    nodes: int
    n: int
    idle_cpu: float = math.nan  # % of one core, all server processes
    cpu: float = math.nan
    idle_rss: float = math.nan  # MiB, all server processes
    rss: float = math.nan
    core0: float = math.nan  # each CPU's busy %, everything on it
    core1: float = math.nan
    client_cpu: float = math.nan
    sim_cpu: float = math.nan
    overhead: list[float] = field(default_factory=list)
    unmatched: int = 0
    learners: list[Learner] = field(default_factory=list)
    stored: dict[str, Stored] = field(default_factory=dict)
    barge_metric: float = math.nan
    upload: Histogram | None = None
    oldest_pending_max: float = 0.0
    spool_max_mb: float = 0.0
    upload_errors: float = math.nan
    udp_errors: int = 0

    @property
    def cpu_per_session(self) -> float:
        return (self.cpu - self.idle_cpu) / self.n

    @property
    def rss_per_session(self) -> float:
        return (self.rss - self.idle_rss) / self.n

    @property
    def p95(self) -> float:
        return pct(self.overhead, 95)

    @property
    def lost(self) -> list[float]:
        return [
            lr.sent_ms - self.stored[lr.session_id].api_ms
            for lr in self.learners
            if lr.session_id in self.stored
        ]

    @property
    def held(self) -> bool:
        """First-response p95 overhead under the limit, every session alive, no audio lost."""
        return (
            self.p95 < P95_LIMIT_MS
            and all(lr.alive for lr in self.learners)
            and bool(self.lost)
            and max(self.lost) <= 0
        )


async def _window(nodes: list[Node], point: LoadPoint, seconds: float) -> None:
    """Sleep through the measurement window, scraping the spool gauges every 5 s."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(5.0, left))
        for node in nodes:
            text = await node.scrape()
            point.oldest_pending_max = max(
                point.oldest_pending_max, parse_value(text, "parley_upload_oldest_pending_seconds")
            )
            point.spool_max_mb = max(point.spool_max_mb, parse_value(text, "parley_spool_bytes") / 2**20)


async def _relay_point(svc: Services, node_count: int, n: int) -> LoadPoint:
    point = LoadPoint(node_count, n)
    async with _nodes(svc, node_count, f"load-{node_count}x{n}") as nodes:
        assert svc.token is not None
        token = svc.token
        pids = [node.pid for node in nodes]
        await asyncio.sleep(2.0)
        before = [await node.scrape() for node in nodes]
        udp0 = udp_receive_errors()
        a = Reading.now(pids, svc.sim.pid)
        await asyncio.sleep(IDLE_S)
        b = Reading.now(pids, svc.sim.pid)
        point.idle_cpu, point.idle_rss = _pct(a, b, "cpu_s"), b.rss
        rng = random.Random(n * 10 + node_count)
        peers: list[BenchPeer] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            for i in range(n):
                k = i % node_count
                peer = BenchPeer(i, svc.voice, seed=1000 * n + 100 * node_count + i)
                peers.append(peer)
                session_id, refusals = await connect_to_relay(nodes[k].http, peer, token=token, topic=TOPIC)
                point.learners.append(Learner(session_id, k, refusals=refusals))
                learn = peer.learn(
                    time.monotonic() + 3600, initial_delay=rng.uniform(0, 2), barge_in=BARGE_IN
                )
                tasks.append(asyncio.create_task(learn, name=f"bench:learner:{i}"))
                await asyncio.sleep(CONNECT_GAP_S)
            await asyncio.sleep(WARMUP_S)
            c = Reading.now(pids, svc.sim.pid)
            await _window(nodes, point, WINDOW_S)
            d = Reading.now(pids, svc.sim.pid)
        except BaseException:
            await asyncio.gather(*(peer.aclose() for peer in peers), return_exceptions=True)
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        point.cpu, point.rss = _pct(c, d, "cpu_s"), d.rss
        point.core0, point.core1 = _pct(c, d, "core0"), _pct(c, d, "core1")
        point.client_cpu, point.sim_cpu = _pct(c, d, "client_s"), _pct(c, d, "sim_s")
        for peer, learner in zip(peers, point.learners, strict=True):
            _observe(learner, peer, c.t, d.t)
        _say(f"relay x{node_count} N={n}: hanging up")
        sent = await asyncio.gather(
            *(
                hang_up(nodes[lr.node].http, peer, lr.session_id, token=token, quiet_s=HANGUP_QUIET_S)
                for peer, lr in zip(peers, point.learners, strict=True)
            )
        )
        for lr, ms in zip(point.learners, sent, strict=True):
            lr.sent_ms = ms
        _say(f"relay x{node_count} N={n}: waiting for the recordings")
        point.stored = await _stored(svc, nodes, point.learners)
        _say(f"relay x{node_count} N={n}: recordings read")
        point.udp_errors = udp_receive_errors() - udp0
        after = [await node.scrape() for node in nodes]
    await svc.refresh_sim_items()
    point.overhead, point.unmatched = _overheads(point.learners, svc.sim_items)
    lag = "parley_upload_lag_seconds"
    hists = [
        parse_histogram(t1, lag).minus(parse_histogram(t0, lag)) for t0, t1 in zip(before, after, strict=True)
    ]
    point.upload = Histogram(
        {le: sum(h.buckets.get(le, 0.0) for h in hists) for le in hists[0].buckets},
        sum(h.total for h in hists),
        sum(h.count for h in hists),
    )
    point.barge_metric = sum(
        parse_value(t1, "parley_barge_ins_total") - parse_value(t0, "parley_barge_ins_total")
        for t0, t1 in zip(before, after, strict=True)
    )
    point.upload_errors = sum(
        parse_value(t1, "parley_upload_errors_total") - parse_value(t0, "parley_upload_errors_total")
        for t0, t1 in zip(before, after, strict=True)
    )
    return point


async def _echo_point(svc: Services, n: int) -> LoadPoint:
    """The baseline: n peers on a bare aiortc echo server on CPU 0, same warm-up and window."""
    point = LoadPoint(0, n)
    proc = await _start(["-m", "tests.bench.relay_echo", str(CORES[0]), str(svc.tmp / "echo.json")],
                        log=svc.tmp / "echo.log")  # fmt: skip
    peers: list[BenchPeer] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        port = await _read_port(proc)
        await asyncio.sleep(2.0)
        a = Reading.now([proc.pid], svc.sim.pid)
        await asyncio.sleep(IDLE_S)
        b = Reading.now([proc.pid], svc.sim.pid)
        point.idle_cpu, point.idle_rss = _pct(a, b, "cpu_s"), b.rss
        rng = random.Random(n)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for i in range(n):
                peer = BenchPeer(i, svc.voice, seed=1000 * n + i)
                peers.append(peer)
                sdp = await peer.offer()
                async with http.post(f"/offer?peer={i}", data=sdp) as resp:
                    assert resp.status == 200, f"echo offer: HTTP {resp.status}"
                    answer = await resp.text()
                await peer.accept(answer)
                async with asyncio.timeout(30):
                    await peer.connected()
                chatter = peer.chatter(time.monotonic() + 3600, initial_delay=rng.uniform(0, 2))
                tasks.append(asyncio.create_task(chatter, name=f"bench:echo-peer:{i}"))
                await asyncio.sleep(CONNECT_GAP_S)
            await asyncio.sleep(WARMUP_S)
            c = Reading.now([proc.pid], svc.sim.pid)
            await asyncio.sleep(WINDOW_S)
            d = Reading.now([proc.pid], svc.sim.pid)
        point.cpu, point.rss = _pct(c, d, "cpu_s"), d.rss
        point.core0, point.core1 = _pct(c, d, "core0"), _pct(c, d, "core1")
        point.client_cpu, point.sim_cpu = _pct(c, d, "client_s"), _pct(c, d, "sim_s")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in peers:
            await peer.aclose()
        await _stop(proc)
    return point


# -- report ----------------------------------------------------------------------------------------


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ratio(a: float, b: float) -> str:
    return fmt(a / b, 2) if b and b > 0 and not math.isnan(a) and not math.isnan(b) else "–"


def _lost_cell(point: LoadPoint) -> str:
    lost = point.lost
    if not lost:
        return "–"
    return f"{fmt(sum(lost) / len(lost))} / {fmt(max(lost), 0)}"


def _upload_cell(h: Histogram | None) -> str:
    if h is None or h.count <= 0:
        return "–"
    return f"{fmt(h.mean * 1000, 0)} / {fmt(h.quantile(0.95) * 1000, 0)} ({h.count:.0f})"


def _capacity(points: list[LoadPoint], node_count: int) -> str:
    series = sorted((p for p in points if p.nodes == node_count), key=lambda p: p.n)
    held = 0
    for p in series:
        if not p.held:
            break
        held = p.n
    if not series:
        return "–"
    if held == 0:
        return f"{node_count} node(s): not even N={series[0].n} held"
    per_core = fmt(held / node_count)
    failed = next((p.n for p in series if p.n > held), None)
    if failed is None:
        return f"{node_count} node(s): every step held up to N={held}: at least {per_core} sessions per core"
    return f"{node_count} node(s): held up to N={held} (N={failed} did not): {per_core} sessions per core"


def _load_tables(points: list[LoadPoint]) -> str:
    echo = {p.n: p for p in points if p.nodes == 0}
    relay = sorted((p for p in points if p.nodes > 0), key=lambda p: (p.nodes, p.n))
    lines = [
        f"Simulator first_audio_ms={FIRST_AUDIO_MS}, realtime_pacing={REALTIME_PACING}; topic {TOPIC}; "
        f"barge-in share {BARGE_IN}; warm-up {WARMUP_S:.0f} s, window {WINDOW_S:.0f} s; N = learners in all "
        "(split evenly across the nodes). CPU in % of one core, RSS in MiB.",
        "",
        "Latency and capacity:",
        "",
        "| nodes | N (per node) | first-response overhead p50 / p95 (ms) | p95 < 100 ms "
        "| answers (unmatched) | turns / barge-ins (relay metric) / timeouts | alive at hang-up | refusals |",
        "|---" * 8 + "|",
    ]
    for p in relay:
        lines.append(
            _row(
                p.nodes,
                f"{p.n} ({p.n // p.nodes})",
                fmt_pair(p.overhead),
                "yes" if p.p95 < P95_LIMIT_MS else "NO",
                f"{len(p.overhead)} ({p.unmatched})",
                f"{sum(lr.turns for lr in p.learners)} / {sum(lr.barge_ins for lr in p.learners)} "
                f"({p.barge_metric:.0f}) / {sum(lr.timeouts for lr in p.learners)}",
                f"{sum(lr.alive for lr in p.learners)} / {p.n}",
                sum(lr.refusals for lr in p.learners),
            )
        )
    lines += [
        "",
        "Sessions per core at which first-response p95 overhead stays under 100 ms (every smaller step too, "
        "all sessions alive, no audio lost): "
        + "; ".join(_capacity(points, k) for k in sorted({p.nodes for p in relay}))
        + ".",
        "",
        "Cost against the bare aiortc echo (one process, same N, same run); "
        "per session = (window - idle) / N:",
        "",
        "| nodes | N | relay CPU: idle / window (all nodes) | relay CPU per session | echo CPU per session "
        "| CPU relay / echo | relay RSS: idle / window | relay RSS per session | echo RSS per session "
        "| RSS relay / echo | CPU 0 / CPU 1 busy | client / simulator |",
        "|---" * 12 + "|",
    ]
    for p in relay:
        e = echo.get(p.n)
        e_cpu = e.cpu_per_session if e else math.nan
        e_rss = e.rss_per_session if e else math.nan
        lines.append(
            _row(
                p.nodes,
                p.n,
                f"{fmt(p.idle_cpu)} / {fmt(p.cpu)}",
                fmt(p.cpu_per_session, 2),
                fmt(e_cpu, 2),
                _ratio(p.cpu_per_session, e_cpu),
                f"{fmt(p.idle_rss)} / {fmt(p.rss)}",
                fmt(p.rss_per_session, 2),
                fmt(e_rss, 2),
                _ratio(p.rss_per_session, e_rss),
                f"{fmt(p.core0)} / {fmt(p.core1)}",
                f"{fmt(p.client_cpu)} / {fmt(p.sim_cpu)}",
            )
        )
    lines += [
        "",
        "Echo baseline (bare aiortc, one process on CPU 0):",
        "",
        "| N | echo CPU: idle / window | echo RSS: idle / window | CPU 0 / CPU 1 busy |",
        "|---" * 4 + "|",
    ]
    for n, e in sorted(echo.items()):
        lines.append(
            _row(
                n,
                f"{fmt(e.idle_cpu)} / {fmt(e.cpu)}",
                f"{fmt(e.idle_rss)} / {fmt(e.rss)}",
                f"{fmt(e.core0)} / {fmt(e.core1)}",
            )
        )
    lines += [
        "",
        "Storage and audio integrity (upload lag from /metrics over the whole point, all nodes; audio lost = "
        "learner audio sent minus the learner recording's duration_ms in GET /v1/sessions/{id}):",
        "",
        "| nodes | N | upload lag mean / p95 (ms) (segments) | oldest pending max (s) | spool max (MiB) "
        "| upload errors | audio sent per session (s) | audio lost per session: mean / max (ms) "
        "| declared lost_ms / gaps (all sessions) | recordings complete | UDP receive-buffer drops |",
        "|---" * 11 + "|",
    ]
    for p in relay:
        stored = list(p.stored.values())
        sent = [lr.sent_ms for lr in p.learners]
        lines.append(
            _row(
                p.nodes,
                p.n,
                _upload_cell(p.upload),
                fmt(p.oldest_pending_max),
                fmt(p.spool_max_mb, 2),
                fmt(p.upload_errors, 0),
                fmt(sum(sent) / len(sent) / 1000),
                _lost_cell(p),
                f"{sum(s.declared_lost_ms for s in stored)} / {sum(s.gaps for s in stored)}",
                f"{sum(s.status == 'complete' for s in stored)} / {p.n}",
                p.udp_errors,
            )
        )
    return "\n".join(lines)


def _write_part(part: str, body: str) -> None:
    """Replace this test's part (``load`` or ``soak``) of the machine-written block in RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    begin, end = f"<!-- bench_load:{part}:begin -->", f"<!-- bench_load:{part}:end -->"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    block = f"{begin}\nLast {part} run: {stamp} UTC, relay code {_code_version()}.\n\n{body}\n{end}"
    if BEGIN not in text or END not in text:
        empty = f"{BEGIN}\n<!-- bench_load:load:begin -->\n<!-- bench_load:load:end -->\n\n"
        empty += f"<!-- bench_load:soak:begin -->\n<!-- bench_load:soak:end -->\n{END}"
        if SECTION in text:
            head, rest = text.split(SECTION, 1)
            text = f"{head}{SECTION}\n\n{empty}\n{rest}"
        else:
            text = f"{text.rstrip()}\n\n{SECTION}\n\n{empty}\n"
    head, rest = text.split(begin, 1)
    text = head + block + rest.split(end, 1)[1]
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)


# -- the load test ---------------------------------------------------------------------------------


@pytest.mark.timeout(3600)
async def test_load_one_and_two_nodes(tmp_path: Path) -> None:
    """N learners with barge-ins against one and two relay nodes (PostgreSQL + S3), and the echo baseline."""
    points: list[LoadPoint] = []
    async with _services(tmp_path, workers_in_process=0) as svc:
        for n in LOAD_N:
            for node_count in LOAD_NODES:
                if n % node_count:
                    continue
                p = await _relay_point(svc, node_count, n)
                points.append(p)
                print(f"\nrelay x{node_count} N={n}: p95 {fmt(p.p95)} ms, CPU {fmt(p.cpu)} %, "
                      f"lost {_lost_cell(p)} ms", flush=True)  # fmt: skip
            e = await _echo_point(svc, n)
            points.append(e)
            print(f"echo N={n}: CPU {fmt(e.cpu)} %, RSS {fmt(e.rss)} MiB", flush=True)
    tables = _load_tables(points)
    print("\n" + tables)
    await asyncio.to_thread(_write_part, "load", tables)
    relay = [p for p in points if p.nodes > 0]
    assert all(p.overhead for p in relay), "no coach answers measured"
    for p in relay:
        assert len(p.stored) == p.n, f"x{p.nodes} N={p.n}: recordings missing"
        assert max(p.lost) <= 0, f"x{p.nodes} N={p.n}: learner audio lost ({max(p.lost)} ms in one session)"


# -- the soak --------------------------------------------------------------------------------------


@dataclass
class Soak:
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # t, RSS MiB, CPU s
    learners: list[Learner] = field(default_factory=list)
    live: int = 0
    errors: list[str] = field(default_factory=list)
    heap: list[dict[str, Any]] = field(default_factory=list)  # tests/bench/mem_probe.py's samples
    heap_released_mb: float = math.nan


async def _soak_slot(svc: Services, node: Node, k: int, stop_at: float, soak: Soak) -> None:
    """One learner seat: session after session, each 2-3 min long (the first 0.5-3 min), until stop_at."""
    assert svc.token is not None
    rng = random.Random(k)
    j = 0
    await asyncio.sleep(k * 0.5)
    while time.monotonic() < stop_at - 10:
        life = rng.uniform(30.0, SOAK_LIFE_S[1]) if j == 0 else rng.uniform(*SOAK_LIFE_S)
        peer = BenchPeer(k, svc.voice, seed=100_000 * k + j)
        j += 1
        try:
            session_id, refusals = await connect_to_relay(node.http, peer, token=svc.token, topic=TOPIC)
        except (AssertionError, TimeoutError, aiohttp.ClientError) as exc:
            soak.errors.append(f"slot {k}: connect: {type(exc).__name__}")
            await peer.aclose()
            await asyncio.sleep(5)
            continue
        learner = Learner(session_id, 0, refusals=refusals)
        soak.live += 1
        start = time.monotonic()
        end_at = min(stop_at, start + life)
        task = asyncio.create_task(peer.learn(end_at, initial_delay=rng.uniform(0, 2), barge_in=BARGE_IN))
        try:
            await asyncio.sleep(max(0.0, end_at - time.monotonic()))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        _observe(learner, peer, start, time.monotonic())
        learner.sent_ms = await hang_up(node.http, peer, session_id, token=svc.token, quiet_s=HANGUP_QUIET_S)
        soak.live -= 1
        soak.learners.append(learner)


async def _sample_rss(pid: int, soak: Soak, stop: asyncio.Event) -> None:
    while not stop.is_set():
        soak.samples.append((time.monotonic(), rss_mb(pid), process_cpu_s(pid)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SOAK_SAMPLE_S):
                await stop.wait()


def _first(points: list[tuple[float, float]]) -> float:
    return points[0][1] if points else math.nan


def _last(points: list[tuple[float, float]]) -> float:
    return points[-1][1] if points else math.nan


def _soak_report(soak: Soak, t0: float, point: LoadPoint, stored: dict[str, Stored]) -> tuple[str, float]:
    after = [(t - t0, rss) for t, rss, _ in soak.samples if t - t0 >= SOAK_WARMUP_S]
    half = [(t - t0, rss) for t, rss, _ in soak.samples if t - t0 >= SOAK_S / 2]
    per_10_min = slope(half) * 600
    per_10_min_all = slope(after) * 600
    cpu = (soak.samples[-1][2] - soak.samples[0][2]) / (soak.samples[-1][0] - soak.samples[0][0]) * 100
    flat = not math.isnan(per_10_min) and per_10_min < FLAT_MB_PER_10_MIN
    rss_values = [r for _, r in after]
    heap = [(h["monotonic"] - t0, h) for h in soak.heap if h["monotonic"] - t0 >= SOAK_WARMUP_S]
    heap_in_use = [(t, h["heap_in_use"]) for t, h in heap]
    heap_held = [(t, h["heap_arena"] + h["mmap"]) for t, h in heap]
    py_in_use = [(t, h["pymalloc_in_use"]) for t, h in heap if "pymalloc_in_use" in h]
    py_held = [(t, float(h["pymalloc_arenas"])) for t, h in heap if "pymalloc_arenas" in h]
    stored_rows = list(stored.values())
    learners = soak.learners
    sent = sum(lr.sent_ms for lr in learners) / max(1, len(learners)) / 1000
    rows = [
        ("RSS at the end of the warm-up / at the end (MiB)", f"{fmt(_first(after))} / {fmt(_last(after))}"),
        (
            "RSS min / max after the warm-up (MiB)",
            f"{fmt(min(rss_values, default=math.nan))} / {fmt(max(rss_values, default=math.nan))}",
        ),
        (
            f"RSS slope, second half ({len(half)} samples)",
            f"{fmt(per_10_min, 2)} MiB / 10 min: {'flat' if flat else 'NOT flat'}",
        ),
        ("RSS slope, everything after the warm-up", f"{fmt(per_10_min_all, 2)} MiB / 10 min"),
        (
            "C heap in use (malloc) at the end of the warm-up / at the end, slope (MiB / 10 min)",
            f"{fmt(_first(heap_in_use))} / {fmt(_last(heap_in_use))}, {fmt(slope(heap_in_use) * 600, 2)}",
        ),
        (
            "C heap held (arenas + mmap) at the end of the warm-up / at the end (MiB)",
            f"{fmt(_first(heap_held))} / {fmt(_last(heap_held))}",
        ),
        (
            "Python objects (pymalloc): bytes in live blocks at the end of the warm-up / at the end, "
            "slope (MiB / 10 min)",
            f"{fmt(_first(py_in_use))} / {fmt(_last(py_in_use))}, {fmt(slope(py_in_use) * 600, 2)}",
        ),
        (
            "Python objects (pymalloc): 1 MiB arenas held at the end of the warm-up / at the end, "
            "slope (MiB / 10 min)",
            f"{fmt(_first(py_held), 0)} / {fmt(_last(py_held), 0)}, {fmt(slope(py_held) * 600, 2)}",
        ),
        (
            "given back by the periodic heap trim (parley_heap_released_bytes_total)",
            f"{fmt(soak.heap_released_mb)} MiB",
        ),
        ("relay CPU, mean over the soak", f"{fmt(cpu)} % of one core"),
        ("sessions completed (hung up, recording finalized)", len(stored)),
        (
            "turns / barge-ins (relay metric) / answer timeouts",
            f"{sum(lr.turns for lr in learners)} / {sum(lr.barge_ins for lr in learners)} "
            f"({point.barge_metric:.0f}) / {sum(lr.timeouts for lr in learners)}",
        ),
        (
            "first-response overhead p50 / p95 (ms), answers (unmatched)",
            f"{fmt_pair(point.overhead)}, {len(point.overhead)} ({point.unmatched})",
        ),
        ("audio sent per session (s)", fmt(sent)),
        ("audio lost per session: mean / max (ms)", _lost_cell(point)),
        (
            "declared lost_ms / gaps (all sessions)",
            f"{sum(s.declared_lost_ms for s in stored_rows)} / {sum(s.gaps for s in stored_rows)}",
        ),
        ("recordings complete", f"{sum(s.status == 'complete' for s in stored_rows)} / {len(stored)}"),
        (
            "upload lag mean / p95 (ms) (segments), upload errors",
            f"{_upload_cell(point.upload)}, {fmt(point.upload_errors, 0)}",
        ),
        (
            "oldest pending upload max (s) / spool max (MiB)",
            f"{fmt(point.oldest_pending_max)} / {fmt(point.spool_max_mb, 2)}",
        ),
        ("refusals / connect errors", f"{sum(lr.refusals for lr in learners)} / {len(soak.errors)}"),
    ]
    lines = [
        f"One node, {SOAK_N} learner seats, sessions of {SOAK_LIFE_S[0]:.0f}-{SOAK_LIFE_S[1]:.0f} s "
        f"(the first of each seat 30-{SOAK_LIFE_S[1]:.0f} s), barge-in share {BARGE_IN}; {SOAK_S:.0f} s "
        f"in all, warm-up {SOAK_WARMUP_S:.0f} s, RSS sampled every {SOAK_SAMPLE_S:.0f} s from /proc, the C "
        f"heap every {SOAK_SAMPLE_S * 6:.0f} s inside the relay (glibc mallinfo2, tests/bench/mem_probe.py); "
        "the relay trims its heap every 10 s (PARLEY_HEAP_TRIM_SECONDS, its default). "
        f"Flat means: least-squares RSS slope over the second half below {FLAT_MB_PER_10_MIN:g} MiB "
        "per 10 minutes.",
        "",
        "| measure | value |",
        "|---|---|",
        *(_row(k, v) for k, v in rows),
        "",
        "RSS every minute after the warm-up (MiB): "
        + ", ".join(fmt(r) for (_t, r) in after[:: max(1, round(60 / SOAK_SAMPLE_S))]),
    ]
    return "\n".join(lines), per_10_min


@pytest.mark.timeout(SOAK_S + 1200)
async def test_soak_one_node(tmp_path: Path) -> None:
    """One node, moderate churning load for PARLEY_BENCH_SOAK_S seconds: is the relay's RSS flat?"""
    soak = Soak()
    point = LoadPoint(1, SOAK_N)
    memprobe = tmp_path / "memprobe.jsonl"
    probe_env = {"PARLEY_BENCH_MEMPROBE": str(memprobe), "PARLEY_BENCH_MEMPROBE_S": str(SOAK_SAMPLE_S * 6)}
    async with (
        _services(tmp_path, workers_in_process=1) as svc,
        _nodes(svc, 1, "soak", probe_env) as nodes,
    ):
        node = nodes[0]
        before = await node.scrape()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(node.pid, soak, stop))
        t0 = time.monotonic()
        stop_at = t0 + SOAK_S
        slots = [asyncio.create_task(_soak_slot(svc, node, k, stop_at, soak)) for k in range(SOAK_N)]

        async def watch() -> None:
            while not all(s.done() for s in slots):
                await _window([node], point, 60.0)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(*slots)
        finally:
            stop.set()
            watcher.cancel()
            await asyncio.gather(sampler, watcher, return_exceptions=True)
        point.learners = soak.learners
        point.stored = await _stored(svc, nodes, soak.learners)
        after = await node.scrape()
        await svc.refresh_sim_items()
        point.overhead, point.unmatched = _overheads(soak.learners, svc.sim_items)
        lag = "parley_upload_lag_seconds"
        point.upload = parse_histogram(after, lag).minus(parse_histogram(before, lag))
        point.barge_metric = parse_value(after, "parley_barge_ins_total") - parse_value(
            before, "parley_barge_ins_total"
        )
        point.upload_errors = parse_value(after, "parley_upload_errors_total") - parse_value(
            before, "parley_upload_errors_total"
        )
        soak.heap_released_mb = (
            parse_value(after, "parley_heap_released_bytes_total")
            - parse_value(before, "parley_heap_released_bytes_total")
        ) / 2**20
    soak.heap = [json.loads(line) for line in memprobe.read_text().splitlines() if line.strip()]
    body, per_10_min = _soak_report(soak, t0, point, point.stored)
    print("\n" + body)
    await asyncio.to_thread(_write_part, "soak", body)
    assert soak.learners, "no session completed"
    assert max(point.lost) <= 0, f"learner audio lost ({max(point.lost)} ms in one session)"
