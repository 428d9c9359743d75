"""The upstream for ``bench_relay.py``: the Realtime simulator in its own process, with timestamps.

``python -m tests.bench.relay_sim CORE DUMP_FILE FIRST_AUDIO_MS REALTIME_PACING`` pins itself to
CPU ``CORE``, serves ``SimulatorServer(SimulatorOptions(first_audio_ms=..., chunk_ms=100,
realtime_pacing=...))`` on a free loopback port, prints the port, and runs until SIGTERM/SIGINT.

Probe: ``RealtimeSession.drain`` (called as soon as the session produced events, just before they
are queued for the socket) is wrapped to note, per coach item, when its session's last
``input_audio_buffer.speech_stopped`` and the item's first ``response.output_audio.delta`` were
emitted (``time.monotonic()``). ``SIGUSR1`` dumps ``{item_id: [stopped_at, first_delta_at]}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from relay.simulator import SimulatorOptions, SimulatorServer
from relay.simulator.state import RealtimeSession
from tests.bench.relay_probe import install_dump_handler, pin


def _install_probe() -> dict[str, tuple[float | None, float]]:
    first_delta: dict[str, tuple[float | None, float]] = {}
    stopped_at: dict[int, float] = {}
    original = RealtimeSession.drain

    def drain(self: RealtimeSession) -> Any:
        events, actions = original(self)
        now = time.monotonic()
        for event in events:
            kind = event["type"]
            if kind == "input_audio_buffer.speech_stopped":
                stopped_at[id(self)] = now
            elif kind == "response.output_audio.delta" and event["item_id"] not in first_delta:
                first_delta[event["item_id"]] = (stopped_at.get(id(self)), now)
        return events, actions

    RealtimeSession.drain = drain  # type: ignore[method-assign]
    return first_delta


async def _serve(first_audio_ms: int, realtime_pacing: bool) -> None:
    options = SimulatorOptions(first_audio_ms=first_audio_ms, chunk_ms=100, realtime_pacing=realtime_pacing)
    async with SimulatorServer(options) as server:
        print(server.port, flush=True)
        await asyncio.Event().wait()


def main() -> None:
    core, dump_file = int(sys.argv[1]), Path(sys.argv[2])
    first_audio_ms, realtime_pacing = int(sys.argv[3]), sys.argv[4] == "1"
    pin(core)
    records = _install_probe()
    install_dump_handler(dump_file, lambda: {"first_delta": records})
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(first_audio_ms, realtime_pacing))


if __name__ == "__main__":
    main()
