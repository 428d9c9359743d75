"""Benchmark: N live WebRTC sessions through one relay process, against a bare aiortc echo server.

Run with ``.venv/bin/pytest -m bench tests/bench/bench_relay.py -s -p no:cacheprovider``.
Method and results: tests/bench/RESULTS.md, "## Live relay" (the table between its markers is
rewritten by every run).

Processes (all on 127.0.0.1): the relay (``parley serve --workers 1``, one process,
through the probe launcher :mod:`tests.bench.relay_probe`) pinned to CPU 0; the Realtime simulator
(:mod:`tests.bench.relay_sim`) and this process, which runs the N client peers
(:mod:`tests.bench.relay_peers`), pinned to CPU 1. For each N, a fresh relay, then a fresh bare
aiortc echo server (:mod:`tests.bench.relay_echo`, also on CPU 0) driven by the same peers.

Per point: connect N peers (staggered), warm up, a measurement window without loss, then a window
in which every peer loses 1 % of its outgoing RTP packets (random single losses). Relay peers speak
1.0-1.5 s bursts and wait for the coach's whole answer; echo peers speak the same bursts every
~3.5 s. Everything is timed with ``time.monotonic()``, which is one clock for all processes.
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
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import Any

import aiohttp
import pytest

from relay.browser.ice import restore_host_addresses, restrict_host_addresses
from tests.bench.relay_peers import BenchPeer, Voice, connect_to_relay, encode_voice
from tests.bench.relay_stats import (
    Histogram,
    Pacing,
    core_busy_s,
    first_at_least,
    fmt,
    fmt_pair,
    in_window,
    parse_counter,
    parse_histogram,
    pct,
    process_cpu_s,
    share_above,
    thread_cpu_s,
)

# Override for a quick look: PARLEY_BENCH_N="1,15" PARLEY_BENCH_WINDOW_S=10 (RESULTS.md is still rewritten).
N_VALUES = tuple(int(n) for n in os.environ.get("PARLEY_BENCH_N", "1,5,10,15,20").split(","))
TARGET_N = 15
FIRST_AUDIO_MS = 250
# False: the simulator sends each answer as fast as it can (OpenAI too streams faster than real time).
REALTIME_PACING = False
TOPIC = "doctor-visit"  # intermediate: silence_duration_ms 650
WARMUP_S = 5.0
WINDOW_S = float(os.environ.get("PARLEY_BENCH_WINDOW_S", "20"))
LOSS_WINDOW_S = 10.0
LOSS = 0.01
CONNECT_GAP_S = 0.15
RELAY_CORE, OTHER_CORE = 0, 1
COACH_ONSET_BYTES = 20  # relay coach audio: 40-90 byte packets; its silence: 3 bytes
ECHO_ONSET_BYTES = 150  # echoed speech at aiortc's 96 kbit/s stereo: 190-400 bytes; echoed silence: 3-91
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Live relay"
BEGIN, END = "<!-- bench_relay:begin -->", "<!-- bench_relay:end -->"
SECRET_KEY = "bench-relay-secret-key-0123456789abcdefghijklmnop"


@dataclass
class Point:
    """All the numbers of one (server, N) run; latencies in ms, CPU in % of one core."""

    server: str
    n: int
    cpu: float = math.nan
    loop_cpu: float = math.nan  # the server's main thread: its event loop
    thread_cpu: dict[str, float] = field(default_factory=dict)  # by thread name (relay only)
    other_core0: float = math.nan
    other_core1: float = math.nan
    client_cpu: float = math.nan
    sim_cpu: float = math.nan
    response_e2e: list[float] = field(default_factory=list)  # relay: sim speech_stopped -> client RTP - 250
    response_path: list[float] = field(default_factory=list)  # app audio available -> client RTP
    response_own: list[float] = field(default_factory=list)  # relay's own first-response value - 250
    sim_slack: list[float] = field(default_factory=list)  # sim speech_stopped -> first delta - 250
    inbound: list[float] = field(default_factory=list)
    inbound_loss: list[float] = field(default_factory=list)
    metrics_inbound: Histogram | None = None
    metrics_inbound_loss: Histogram | None = None
    metrics_first: Histogram | None = None
    playout_late_share: float = math.nan
    client_pacing: Pacing | None = None
    wire_pacing: Pacing | None = None
    speaker_late: list[float] = field(default_factory=list)
    speaker_totals: dict[str, float] = field(default_factory=dict)
    slow_callbacks: list[tuple[float, str]] = field(default_factory=list)  # ms, what ran (> 5 ms)
    turns: int = 0
    answer_timeouts: int = 0
    unmatched: int = 0
    client_late_sends: int = 0
    dropped_rtp: int = 0
    refusals: int = 0
    alive_end: int = 0  # peers still receiving audio in the last second of the loss window

    @property
    def cpu_per_session(self) -> float:
        return self.cpu / self.n


# -- processes -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _start(args: list[str], *, env: dict[str, str] | None = None, log: Path) -> Any:
    with log.open("ab") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, *args, stdin=DEVNULL, stdout=PIPE, stderr=err, env=env
        )


async def _stop(proc: Any, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _read_port(proc: Any) -> int:
    async with asyncio.timeout(60):
        return int(await proc.stdout.readline())


async def _dump(proc: Any, path: Path) -> dict[str, Any]:
    """Ask a probed process for its records (SIGUSR1) and read them (after the windows: blocking is fine)."""
    path.unlink(missing_ok=True)  # noqa: ASYNC240
    proc.send_signal(signal.SIGUSR1)
    async with asyncio.timeout(60):
        while not path.exists():  # noqa: ASYNC240
            await asyncio.sleep(0.05)
    data: dict[str, Any] = json.loads(path.read_text())  # noqa: ASYNC240
    path.unlink()  # noqa: ASYNC240
    return data


@dataclass
class Meter:
    """CPU and time at one instant: the server (and its loop thread), this (client) process, the
    simulator, both CPUs."""

    t: float
    server: float
    server_loop: float
    server_threads: dict[int, float]
    client: float
    sim: float
    core0: float
    core1: float

    @classmethod
    def now(cls, server_pid: int, sim_pid: int) -> Meter:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            time.monotonic(),
            process_cpu_s(server_pid),
            process_cpu_s(server_pid, server_pid),
            thread_cpu_s(server_pid),
            usage.ru_utime + usage.ru_stime,
            process_cpu_s(sim_pid),
            core_busy_s(RELAY_CORE),
            core_busy_s(OTHER_CORE),
        )


def _cpu(point: Point, a: Meter, b: Meter) -> None:
    wall = b.t - a.t
    point.cpu = (b.server - a.server) / wall * 100
    point.loop_cpu = (b.server_loop - a.server_loop) / wall * 100
    point.client_cpu = (b.client - a.client) / wall * 100
    point.sim_cpu = (b.sim - a.sim) / wall * 100
    # Everything else that ran on each CPU (other engineers' processes, the kernel), clamped at 0.
    point.other_core0 = max(0.0, (b.core0 - a.core0) / wall * 100 - point.cpu)
    point.other_core1 = max(0.0, (b.core1 - a.core1) / wall * 100 - point.client_cpu - point.sim_cpu)


# -- one point -------------------------------------------------------------------------------------


def _thread_split(point: Point, a: Meter, b: Meter, names: dict[str, str]) -> None:
    """CPU of the server's threads in the window, summed by thread name (threads that ended: "gone")."""
    wall = b.t - a.t
    for tid, seconds in b.server_threads.items():
        name = names.get(str(tid), "gone")
        used = (seconds - a.server_threads.get(tid, 0.0)) / wall * 100
        point.thread_cpu[name] = point.thread_cpu.get(name, 0.0) + used


@dataclass
class Run:
    """What a point's driver hands back to the analysis."""

    peers: list[BenchPeer]
    t0: float  # measurement window (no loss) [t0, t1), loss window [t1, t2)
    t1: float
    t2: float
    dump: dict[str, Any]


async def _drive(
    n: int,
    connect: Callable[[int, BenchPeer], Awaitable[None]],
    talk: Callable[[BenchPeer, float], Coroutine[Any, Any, None]],
    server_pid: int,
    sim_pid: int,
    point: Point,
    voice: Voice,
    scrape: Callable[[], Awaitable[str]] | None,
    metrics: list[str],
) -> tuple[list[BenchPeer], Meter, Meter, float]:
    rng = random.Random(n)
    peers: list[BenchPeer] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(n):
            peer = BenchPeer(i, voice, seed=1000 * n + i)
            peers.append(peer)
            await connect(i, peer)
            tasks.append(asyncio.create_task(talk(peer, rng.uniform(0.0, 2.0)), name=f"bench:peer:{i}"))
            await asyncio.sleep(CONNECT_GAP_S)
        await asyncio.sleep(WARMUP_S)
        if scrape is not None:
            metrics.append(await scrape())
        a = Meter.now(server_pid, sim_pid)
        await asyncio.sleep(WINDOW_S)
        b = Meter.now(server_pid, sim_pid)
        if scrape is not None:
            metrics.append(await scrape())
        _cpu(point, a, b)
        for peer in peers:
            peer.loss = LOSS
        await asyncio.sleep(LOSS_WINDOW_S)
        t2 = time.monotonic()
        for peer in peers:
            peer.loss = 0.0
        if scrape is not None:
            metrics.append(await scrape())
        return peers, a, b, t2
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _relay_point(n: int, ctx: Context) -> Point:
    point = Point("relay", n)
    port = _free_port()
    dump_file = ctx.tmp / f"relay-{n}.json"
    env = {**ctx.relay_env, "PARLEY_PORT": str(port)}
    proc = await _start(
        ["-m", "tests.bench.relay_probe", str(RELAY_CORE), str(dump_file)], env=env, log=ctx.tmp / "relay.log"
    )
    base = f"http://127.0.0.1:{port}"
    peers: list[BenchPeer] = []
    try:
        async with aiohttp.ClientSession(base) as http:
            async with asyncio.timeout(60):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get("/healthz") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.1)
            if ctx.token is None:
                ctx.token = await _signup(http)

            async def connect(i: int, peer: BenchPeer) -> None:
                assert ctx.token is not None
                _, refusals = await connect_to_relay(http, peer, token=ctx.token, topic=TOPIC)
                point.refusals += refusals

            async def scrape() -> str:
                async with http.get("/metrics") as resp:
                    return await resp.text()

            metrics: list[str] = []
            peers, a, b, t2 = await _drive(
                n,
                connect,
                lambda peer, delay: peer.converse(time.monotonic() + 600, initial_delay=delay),
                proc.pid,
                ctx.sim.pid,
                point,
                ctx.voice,
                scrape,
                metrics,
            )
            dump = await _dump(proc, dump_file)
            _thread_split(point, a, b, dump["thread_names"])
            ctx.sim_items.update(
                {k: tuple(v) for k, v in (await _dump(ctx.sim, ctx.tmp / "sim.json"))["first_delta"].items()}
            )
    finally:
        for peer in peers:
            await peer.aclose()
        await _stop(proc, signal.SIGINT)
    _analyse_relay(point, Run(peers, a.t, b.t, t2, dump), ctx.sim_items, metrics)
    return point


async def _signup(http: aiohttp.ClientSession) -> str:
    body = {"email": "bench-relay@example.org", "password": "correct horse battery staple"}
    async with http.post("/v1/auth/signup", json=body) as resp:
        if resp.status == 201:
            token: str = (await resp.json())["access_token"]
            return token
    async with http.post("/v1/auth/token", json=body) as resp:
        assert resp.status == 200, await resp.text()
        token = (await resp.json())["access_token"]
        return token


async def _echo_point(n: int, ctx: Context) -> Point:
    point = Point("echo", n)
    dump_file = ctx.tmp / f"echo-{n}.json"
    proc = await _start(
        ["-m", "tests.bench.relay_echo", str(RELAY_CORE), str(dump_file)], log=ctx.tmp / "echo.log"
    )
    peers: list[BenchPeer] = []
    try:
        port = await _read_port(proc)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:

            async def connect(i: int, peer: BenchPeer) -> None:
                sdp = await peer.offer()
                async with http.post(f"/offer?peer={i}", data=sdp) as resp:
                    assert resp.status == 200, await resp.text()
                    answer = await resp.text()
                await peer.accept(answer)
                async with asyncio.timeout(30):
                    await peer.connected()

            peers, a, b, t2 = await _drive(
                n,
                connect,
                lambda peer, delay: peer.chatter(time.monotonic() + 600, initial_delay=delay),
                proc.pid,
                ctx.sim.pid,
                point,
                ctx.voice,
                None,
                [],
            )
            dump = await _dump(proc, dump_file)
    finally:
        for peer in peers:
            await peer.aclose()
        await _stop(proc)
    _analyse_echo(point, Run(peers, a.t, b.t, t2, dump))
    return point


# -- analysis --------------------------------------------------------------------------------------


def _client_side(point: Point, run: Run) -> None:
    streams = [[(t, ts) for t, _, ts, _ in peer.record.arrivals] for peer in run.peers]
    point.client_pacing = Pacing.of(streams, run.t0, run.t1)
    point.wire_pacing = Pacing.of(run.dump["sends"], run.t0, run.t1)
    point.turns = sum(p.record.turns for p in run.peers)
    point.answer_timeouts = sum(p.record.answer_timeouts for p in run.peers)
    point.client_late_sends = sum(p.source.late_sends for p in run.peers)
    point.dropped_rtp = sum(p.record.dropped_rtp for p in run.peers)
    point.alive_end = sum(any(run.t2 - 1 <= a[0] < run.t2 for a in p.record.arrivals) for p in run.peers)


def _analyse_relay(
    point: Point, run: Run, sim_items: dict[str, tuple[float | None, float]], metrics: list[str]
) -> None:
    _client_side(point, run)
    for peer in run.peers:
        arrivals = peer.record.arrivals
        times = [a[0] for a in arrivals]
        for t, kind, item_id in peer.record.events:
            if kind != "coach.speaking" or not run.t0 <= t < run.t2:
                continue
            onset = first_at_least(arrivals, times, t - 0.2, t + 0.3, COACH_ONSET_BYTES)
            stopped, first_delta = sim_items.get(item_id, (None, math.nan))
            if onset is None or stopped is None or math.isnan(first_delta):
                point.unmatched += 1
                continue
            point.response_e2e.append((onset - stopped) * 1000 - FIRST_AUDIO_MS)
            point.response_path.append((onset - first_delta) * 1000)
            point.sim_slack.append((first_delta - stopped) * 1000 - FIRST_AUDIO_MS)
    dump = run.dump
    point.response_own = [
        v * 1000 - FIRST_AUDIO_MS for v in in_window(dump["first_response"], run.t0, run.t2)
    ]
    point.inbound = [v * 1000 for v in in_window(dump["inbound"], run.t0, run.t1)]
    point.inbound_loss = [v * 1000 for v in in_window(dump["inbound"], run.t1, run.t2)]
    point.speaker_late = in_window(dump["lateness"], run.t0, run.t1)
    point.speaker_totals = dump["speaker_totals"]
    point.slow_callbacks = [(ms, what) for t, ms, what in dump["slow_callbacks"] if run.t0 <= t < run.t2]
    m0, m1, m2 = metrics
    inbound = "parley_inbound_latency_seconds"
    point.metrics_inbound = parse_histogram(m1, inbound).minus(parse_histogram(m0, inbound))
    point.metrics_inbound_loss = parse_histogram(m2, inbound).minus(parse_histogram(m1, inbound))
    first = "parley_first_response_seconds"
    point.metrics_first = parse_histogram(m2, first).minus(parse_histogram(m0, first))
    sent = parse_counter(m1, "parley_playout_frames_total", "sent") - parse_counter(
        m0, "parley_playout_frames_total", "sent"
    )
    late = parse_counter(m1, "parley_playout_frames_total", "late") - parse_counter(
        m0, "parley_playout_frames_total", "late"
    )
    point.playout_late_share = late / sent if sent else math.nan


def _analyse_echo(point: Point, run: Run) -> None:
    _client_side(point, run)
    peers = run.dump["peers"]
    for peer in run.peers:
        log = peers.get(str(peer.index), {"inbound": [], "onsets": []})
        point.inbound += [v * 1000 for v in in_window(log["inbound"], run.t0, run.t1)]
        point.inbound_loss += [v * 1000 for v in in_window(log["inbound"], run.t1, run.t2)]
        arrivals = peer.record.arrivals
        times = [a[0] for a in arrivals]
        for _arrived, returned in log["onsets"]:
            if not run.t0 <= returned < run.t2:
                continue
            onset = first_at_least(arrivals, times, returned, returned + 0.5, ECHO_ONSET_BYTES)
            if onset is None:
                point.unmatched += 1
                continue
            point.response_path.append((onset - returned) * 1000)


# -- report ----------------------------------------------------------------------------------------


def _late_pct(values: list[float]) -> str:
    return fmt(share_above(values, 5.0) * 100, 2)


def _hist(h: Histogram) -> str:
    return f"{fmt(h.quantile(0.5) * 1000)} / {fmt(h.quantile(0.95) * 1000)} / {fmt(h.mean * 1000, 2)}"


def _ratio(a: float, b: float) -> str:
    return fmt(a / b, 2) if b and not math.isnan(a) and not math.isnan(b) else "–"


def _p99(values: list[float]) -> str:
    return fmt(pct(values, 99))


def _tables(points: list[Point]) -> str:
    relay = {p.n: p for p in points if p.server == "relay"}
    echo = {p.n: p for p in points if p.server == "echo"}
    both = sorted(set(relay) & set(echo))
    lines = [
        f"Simulator first_audio_ms={FIRST_AUDIO_MS}, realtime_pacing={REALTIME_PACING}; topic {TOPIC}; "
        "latencies in ms as p50 / p95; CPU in % of one core.",
        "",
        "CPU (measurement window without loss):",
        "",
        "| N | relay: total (loop thread) | relay per session | echo: total (loop thread) | echo per session "
        "| per session relay / echo | other load on CPU 0, relay / echo run "
        "| CPU 1 in the relay run: client / simulator / other |",
        "|---" * 8 + "|",
    ]
    for n in both:
        r, e = relay[n], echo[n]
        lines.append(
            f"| {n} | {fmt(r.cpu)} ({fmt(r.loop_cpu)}) | {fmt(r.cpu_per_session)} "
            f"| {fmt(e.cpu)} ({fmt(e.loop_cpu)}) | {fmt(e.cpu_per_session)} "
            f"| {_ratio(r.cpu_per_session, e.cpu_per_session)} | {fmt(r.other_core0)} / {fmt(e.other_core0)} "
            f"| {fmt(r.client_cpu)} / {fmt(r.sim_cpu)} / {fmt(r.other_core1)} |"
        )
    names = sorted({name for p in relay.values() for name in p.thread_cpu})
    lines += [
        "",
        "Relay CPU by thread (% of one core, window without loss):",
        "",
        "| N | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for n, p in sorted(relay.items()):
        lines.append(f"| {n} | " + " | ".join(fmt(p.thread_cpu.get(k, 0.0)) for k in names) + " |")
    lines += [
        "",
        "Latency (first response: both windows; inbound: each window):",
        "",
        "| N | relay first-response overhead (client) | relay's own first-response - 250 "
        "| response path: relay / echo | inbound no loss: relay / echo | inbound 1 % loss: relay / echo "
        "| inbound p99 1 % loss: relay / echo | responses (unmatched) | alive at the end: relay / echo |",
        "|---" * 9 + "|",
    ]
    for n in both:
        r, e = relay[n], echo[n]
        lines.append(
            f"| {n} | {fmt_pair(r.response_e2e)} | {fmt_pair(r.response_own)} "
            f"| {fmt_pair(r.response_path)} / {fmt_pair(e.response_path)} "
            f"| {fmt_pair(r.inbound, 2)} / {fmt_pair(e.inbound)} "
            f"| {fmt_pair(r.inbound_loss, 2)} / {fmt_pair(e.inbound_loss)} "
            f"| {fmt(pct(r.inbound_loss, 99), 2)} / {_p99(e.inbound_loss)} "
            f"| {len(r.response_e2e)} ({r.unmatched}) | {r.alive_end} / {e.alive_end} |"
        )
    lines += [
        "",
        "Outbound pacing (window without loss): |interval - 20 ms| p99 and share of packets > 5 ms late:",
        "",
        "| N | jitter p99 relay: client / wire | jitter p99 echo: client / wire | ratio relay / echo (wire) "
        "| > 5 ms late relay: client / wire / speaker | > 5 ms late echo: client / wire |",
        "|---" * 6 + "|",
    ]
    for n in both:
        r, e = relay[n], echo[n]
        assert r.client_pacing and e.client_pacing and r.wire_pacing and e.wire_pacing
        lines.append(
            f"| {n} | {_p99(r.client_pacing.jitter_ms)} / {_p99(r.wire_pacing.jitter_ms)} "
            f"| {_p99(e.client_pacing.jitter_ms)} / {_p99(e.wire_pacing.jitter_ms)} "
            f"| {_ratio(pct(r.wire_pacing.jitter_ms, 99), pct(e.wire_pacing.jitter_ms, 99))} "
            f"| {_late_pct(r.client_pacing.late_ms)} / {_late_pct(r.wire_pacing.late_ms)} "
            f"/ {_late_pct(r.speaker_late)} % "
            f"| {_late_pct(e.client_pacing.late_ms)} / {_late_pct(e.wire_pacing.late_ms)} % |"
        )
    lines += [
        "",
        "Relay cross-checks: GET /metrics window deltas (bucket interpolation; mean = _sum/_count), "
        "speaker stats, simulator, clients:",
        "",
        "| N | inbound p50 / p95 / mean, no loss | inbound p50 / p95 / mean, 1 % loss "
        "| first-response - 250: p50 / p95 / mean | playout late (metric) "
        "| speaker skips / drained / max late | sim slack p50 / p95 | turns / timeouts "
        "| client late sends | RTP dropped | refusals |",
        "|---" * 11 + "|",
    ]
    for n, p in sorted(relay.items()):
        h, hl, hf = p.metrics_inbound, p.metrics_inbound_loss, p.metrics_first
        assert h is not None and hl is not None and hf is not None
        s = p.speaker_totals
        ms = FIRST_AUDIO_MS
        lines.append(
            f"| {n} | {_hist(h)} | {_hist(hl)} "
            f"| {fmt(hf.quantile(0.5) * 1000 - ms)} / {fmt(hf.quantile(0.95) * 1000 - ms)}"
            f" / {fmt(hf.mean * 1000 - ms)} | {fmt(p.playout_late_share * 100, 2)} % "
            f"| {s.get('schedule_skips', 0):.0f} / {s.get('drained_frames', 0):.0f} "
            f"/ {s.get('max_late_ms', 0):.1f} "
            f"| {fmt_pair(p.sim_slack)} | {p.turns} / {p.answer_timeouts} | {p.client_late_sends} "
            f"| {p.dropped_rtp} | {p.refusals} |"
        )
    lines += _slow_callback_table(relay)
    target = relay.get(TARGET_N)
    if target is not None and target.client_pacing and target.wire_pacing:
        checks = [
            ("outbound jitter p99 < 7 ms (wire)", pct(target.wire_pacing.jitter_ms, 99) < 7),
            ("outbound jitter p99 < 7 ms (client)", pct(target.client_pacing.jitter_ms, 99) < 7),
            ("< 1 % of frames > 5 ms late (speaker)", share_above(target.speaker_late, 5) < 0.01),
            ("< 1 % of frames > 5 ms late (client)", share_above(target.client_pacing.late_ms, 5) < 0.01),
            ("first-response overhead p95 < 30 ms (client)", pct(target.response_e2e, 95) < 30),
        ]
        lines += [
            "",
            f"Targets at N={TARGET_N}: "
            + "; ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in checks),
        ]
    return "\n".join(lines)


def _slow_callback_table(relay: dict[int, Point]) -> list[str]:
    """Loop callbacks over 5 ms in the relay's measurement windows, and the three costliest kinds."""
    lines = [
        "",
        "Relay event-loop callbacks longer than 5 ms (both windows), and the three kinds with the most time:",
        "",
        "| N | count | per second | total ms | max ms | costliest (count, total ms) |",
        "|---|---|---|---|---|---|",
    ]
    for n, p in sorted(relay.items()):
        by_kind: dict[str, list[float]] = {}
        for ms, what in p.slow_callbacks:
            by_kind.setdefault(what, []).append(ms)
        top = sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))[:3]
        window = WINDOW_S + LOSS_WINDOW_S
        lines.append(
            f"| {n} | {len(p.slow_callbacks)} | {fmt(len(p.slow_callbacks) / window, 2)} "
            f"| {fmt(sum(ms for ms, _ in p.slow_callbacks))} "
            f"| {fmt(max((ms for ms, _ in p.slow_callbacks), default=0.0))} "
            f"| {'; '.join(f'`{k}` ({len(v)}, {fmt(sum(v))})' for k, v in top)} |"
        )
    return lines


def _code_version() -> str:
    """The commit the relay ran from, and whether relay/ or storage/ had uncommitted changes."""
    root = RESULTS.parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "relay", "storage"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes in relay/ or storage/" if dirty else head


def _write_results(tables: str) -> None:
    """Replace the machine-written block of the "## Live relay" section (create it if missing)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    stamp = time.strftime("%Y-%m-%d %H:%M")
    block = f"{BEGIN}\nLast run: {stamp}, relay code {_code_version()}.\n\n{tables}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif SECTION in text:
        head, rest = text.split(SECTION, 1)
        text = f"{head}{SECTION}\n\n{block}\n{rest}"
    else:
        text = f"{text.rstrip()}\n\n{SECTION}\n\n{block}\n"
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)


# -- the test --------------------------------------------------------------------------------------


@dataclass
class Context:
    tmp: Path
    voice: Voice
    sim: Any
    relay_env: dict[str, str]
    token: str | None = None
    sim_items: dict[str, tuple[float | None, float]] = field(default_factory=dict)


@pytest.mark.bench
@pytest.mark.timeout(1500)
async def test_live_relay_against_bare_aiortc_echo(tmp_path: Path) -> None:
    """N = 1..20 live sessions on one relay process vs a bare aiortc echo: CPU, latency, pacing."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {OTHER_CORE})
    restrict_host_addresses(["127.0.0.1"])
    sim = await _start(
        ["-m", "tests.bench.relay_sim", str(OTHER_CORE), str(tmp_path / "sim.json"), str(FIRST_AUDIO_MS),
         "1" if REALTIME_PACING else "0"],
        log=tmp_path / "sim.log",
    )  # fmt: skip
    points: list[Point] = []
    try:
        sim_port = await _read_port(sim)
        env = {
            **os.environ,
            "PARLEY_DATA_DIR": str(tmp_path / "data"),
            "PARLEY_SECRET_KEY": SECRET_KEY,
            "PARLEY_UPSTREAM_URL": f"ws://127.0.0.1:{sim_port}/v1",
            "PARLEY_RTC_HOST_ADDRESSES": "127.0.0.1",
            "PARLEY_RTC_REMOTE_ALLOW": "127.0.0.0/8",
            "PARLEY_MAX_SESSIONS": "50",
            "PARLEY_SESSIONS_PER_MINUTE": "10000",
            "PARLEY_CLIENT_SECRETS_PER_MINUTE": "10000",
            "PARLEY_DRAIN_TIMEOUT": "1",
        }
        migrate = await _start(["-m", "relay", "migrate"], env=env, log=tmp_path / "migrate.log")
        assert await migrate.wait() == 0, (tmp_path / "migrate.log").read_text()
        ctx = Context(tmp_path, encode_voice(), sim, env)
        for n in N_VALUES:
            points.append(await _relay_point(n, ctx))
            points.append(await _echo_point(n, ctx))
            print(f"\n{points[-2].server} N={n}: CPU {points[-2].cpu:.1f} %, "
                  f"{points[-1].server} N={n}: CPU {points[-1].cpu:.1f} %", flush=True)  # fmt: skip
    finally:
        await _stop(sim)
        restore_host_addresses()
        os.sched_setaffinity(0, affinity)
    tables = _tables(points)
    print("\n" + tables)
    _write_results(tables)
    for p in points:
        assert p.client_pacing is not None and p.client_pacing.packets > 0, f"{p.server} N={p.n}: no audio"
    assert all(len(p.response_e2e) > 0 for p in points if p.server == "relay"), "no coach answers measured"
