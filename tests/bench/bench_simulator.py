"""Benchmark: first-audio latency of the simulator under 50 concurrent real-time sessions.

Run with ``.venv/bin/pytest -m bench tests/bench/bench_simulator.py -s``.

The simulator runs in its own process (``python -c`` with :data:`SERVER_SCRIPT`); this process
runs the clients, official ``openai`` SDK connections. Each client streams 20 ms appends paced in
real time on an absolute schedule: a burst of speech-shaped audio, then silence, over and over, so
the default server VAD ends a turn and starts a response every cycle (the next burst barges in
on the answer). For each response the client takes the time from ``response.created`` (and from
``input_audio_buffer.speech_stopped``) to the first ``response.output_audio.delta``. The same
measurement with one connection, in the same run, is the baseline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import Any

import pytest
from openai import AsyncOpenAI

from relay.simulator.voice import Utterance

FIRST_AUDIO_MS = 250
CONNECTIONS = 50
LOAD_SECONDS = 30.0
BASELINE_SECONDS = 24.0
APPEND_MS = 20
SPEECH_WORDS = 3
CYCLE_MS = 3000
TOLERANCE_MS = 20.0

SERVER_SCRIPT = """
import asyncio, sys
from relay.simulator import SimulatorOptions, SimulatorServer

async def main() -> None:
    options = SimulatorOptions(first_audio_ms=int(sys.argv[1]), chunk_ms=100, realtime_pacing=True)
    async with SimulatorServer(options) as server:
        print(server.port, flush=True)
        await asyncio.Event().wait()

try:
    asyncio.run(main())
except KeyboardInterrupt:
    pass
"""


def _cycle_frames() -> list[str]:
    """One speech burst then silence up to CYCLE_MS, as serialized ``input_audio_buffer.append`` events.

    They are serialized once and sent with the SDK connection's ``send_raw``: the typed helper
    ``conn.input_audio_buffer.append`` runs the SDK's TypedDict transform on every call (about 1 ms
    of CPU each, measured), which alone would need 2.5 cores for 50 real-time clients.
    """
    utterance = Utterance(["lalala"] * SPEECH_WORDS, seed=11)
    pcm = utterance.render(0, utterance.total_samples)
    pcm += bytes(CYCLE_MS * 48 - len(pcm))
    step = APPEND_MS * 48
    return [
        json.dumps(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()}
        )
        for i in range(0, len(pcm), step)
    ]


@dataclass
class Samples:
    from_created_ms: list[float] = field(default_factory=list)
    from_stopped_ms: list[float] = field(default_factory=list)
    late_appends: int = 0
    responses: int = 0


async def _client(client: AsyncOpenAI, frames: list[str], seconds: float, samples: Samples) -> None:
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.recv_bytes()
        stop_at = time.monotonic() + seconds

        async def sender() -> None:
            start = time.monotonic()
            i = 0
            while time.monotonic() < stop_at:
                deadline = start + i * APPEND_MS / 1000
                delay = deadline - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -APPEND_MS / 1000:
                    samples.late_appends += 1
                await conn.send_raw(frames[i % len(frames)])
                i += 1

        async def receiver() -> None:
            created_at = stopped_at = None
            while True:
                event: dict[str, Any] = json.loads(await conn.recv_bytes())
                now = time.monotonic()
                kind = event["type"]
                if kind == "input_audio_buffer.speech_stopped":
                    stopped_at = now
                elif kind == "response.created":
                    created_at = now
                    samples.responses += 1
                elif kind == "response.output_audio.delta" and created_at is not None:
                    samples.from_created_ms.append((now - created_at) * 1000)
                    if stopped_at is not None:
                        samples.from_stopped_ms.append((now - stopped_at) * 1000)
                    created_at = stopped_at = None

        receiving = asyncio.create_task(receiver(), name="bench:receiver")
        try:
            await sender()
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)


async def _run(base_url: str, connections: int, seconds: float) -> Samples:
    samples = Samples()
    frames = _cycle_frames()
    client = AsyncOpenAI(api_key="sk-bench", websocket_base_url=base_url)
    try:
        tasks = []
        for n in range(connections):
            # Stagger the starts over one cycle so that turns do not all end on the same tick.
            rotated = frames[n * len(frames) // connections :] + frames[: n * len(frames) // connections]
            tasks.append(
                asyncio.create_task(_client(client, rotated, seconds, samples), name=f"bench:client:{n}")
            )
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return samples


def _percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[94], "p99": cuts[98], "max": max(values)}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _row(name: str, p: dict[str, float]) -> str:
    return f"| {name} | {p['p50']:.1f} | {p['p95']:.1f} | {p['p99']:.1f} | {p['max']:.1f} |"


@pytest.mark.bench
async def test_first_audio_latency_under_50_realtime_sessions() -> None:
    """p95 first-audio latency with 50 real-time sessions stays within 20 ms of the configured value."""
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER_SCRIPT, str(FIRST_AUDIO_MS), stdin=DEVNULL, stdout=PIPE
    )
    try:
        assert server.stdout is not None
        port = int(await server.stdout.readline())
        base_url = f"ws://127.0.0.1:{port}/v1"
        baseline = await _run(base_url, 1, BASELINE_SECONDS)
        cpu_before, wall_before = _cpu_seconds(server.pid), time.monotonic()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        load = await _run(base_url, CONNECTIONS, LOAD_SECONDS)
        wall = time.monotonic() - wall_before
        server_cpu = (_cpu_seconds(server.pid) - cpu_before) / wall
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = (
            usage_after.ru_utime + usage_after.ru_stime - usage_before.ru_utime - usage_before.ru_stime
        ) / wall
    finally:
        server.send_signal(signal.SIGINT)  # the server closes its sessions and exits
        await server.wait()

    one, many = _percentiles(baseline.from_created_ms), _percentiles(load.from_created_ms)
    one_stop, many_stop = _percentiles(baseline.from_stopped_ms), _percentiles(load.from_stopped_ms)
    print(f"\nfirst_audio_ms={FIRST_AUDIO_MS}  (ms; response.created -> first output_audio.delta)")
    print("| run | p50 | p95 | p99 | max |")
    print("|---|---|---|---|---|")
    print(_row(f"1 connection ({len(baseline.from_created_ms)} responses)", one))
    print(_row(f"{CONNECTIONS} connections ({len(load.from_created_ms)} responses)", many))
    print(_row("1 connection, from speech_stopped", one_stop))
    print(_row(f"{CONNECTIONS} connections, from speech_stopped", many_stop))
    print(f"p95 ratio {CONNECTIONS}/1: {many['p95'] / one['p95']:.3f}")
    print(f"server CPU {server_cpu:.0%} of one core; client process CPU {client_cpu:.0%} of one core")
    print(f"late client appends (>{APPEND_MS} ms behind schedule): {load.late_appends}")
    assert len(load.from_created_ms) >= CONNECTIONS * 5
    assert many["p95"] - FIRST_AUDIO_MS <= TOLERANCE_MS
    assert many["p50"] >= FIRST_AUDIO_MS
