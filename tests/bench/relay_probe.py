"""Server-side probes for ``bench_relay.py``, and the relay launcher that installs them.

``python -m tests.bench.relay_probe CORE DUMP_FILE`` pins itself to CPU ``CORE``, installs the
probes below and then runs exactly what ``parley serve --workers 1`` runs (``relay.cli.main``,
configured by the environment). ``DUMP_FILE`` ``-`` pins and serves without any probe
(``bench_load.py``: the probes' records grow with the traffic and would show up in the RSS it
measures). No relay code is edited; the probes wrap a few functions in this process only, each
costing one ``time.monotonic()`` and one list append per call:

* ``RTCDtlsTransport._send_rtp``: ``(send time, RTP timestamp)`` of every outgoing RTP packet, per
  transport: the "wire" pacing of AIORTC.md A.1, measured where the packet leaves aiortc.
* ``LiveSession._on_inbound_latency`` (what feeds ``parley_inbound_latency_seconds``, RTP arrival
  until the audio's batch is queued for the upstream writer): every raw value.
* ``LiveSession._on_response_latency`` (what feeds ``parley_first_response_seconds``): every raw value.
* ``SpeakerTrack._account``: the lateness of every outbound ``recv()`` against its slot, and the
  speaker instances, whose ``stats`` (skips, drains, underruns) are summed into the dump.

Also the names of the live threads (:func:`thread_names`), to split the process's CPU by thread.
``SIGUSR1`` writes everything recorded so far as JSON to ``DUMP_FILE`` (atomically, via rename).
:func:`install_dump_handler` and :func:`install_send_probe` are shared with the echo server.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SendLog = dict[int, list[tuple[float, int]]]


def pin(core: int) -> None:
    """Pin this process (and the threads it creates afterwards) to one CPU."""
    os.sched_setaffinity(0, {core})


def install_dump_handler(path: Path, collect: Callable[[], dict[str, Any]]) -> None:
    """On SIGUSR1, write ``collect()`` as JSON to ``path`` (write to a temporary file, then rename)."""

    def dump(signum: int, frame: object) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(collect()))
        tmp.replace(path)

    signal.signal(signal.SIGUSR1, dump)


def thread_names() -> dict[str, str]:
    """This process's live threads: native thread id -> name with digits dropped."""
    return {str(t.native_id): re.sub(r"[-_ ]?\d+", "", t.name) for t in threading.enumerate()}


def install_send_probe() -> SendLog:
    """Record ``(time.monotonic(), RTP timestamp)`` of every RTP packet aiortc sends, per transport."""
    from aiortc.rtcdtlstransport import RTCDtlsTransport
    from aiortc.rtp import is_rtcp

    log: SendLog = {}
    original = RTCDtlsTransport._send_rtp

    async def _send_rtp(self: Any, data: bytes) -> None:
        if not is_rtcp(data):
            log.setdefault(id(self), []).append((time.monotonic(), int.from_bytes(data[4:8], "big")))
        await original(self, data)

    setattr(RTCDtlsTransport, "_send_rtp", _send_rtp)  # noqa: B010 (a method, patched in this process)
    return log


def _install_relay_probes() -> Callable[[], dict[str, Any]]:
    from relay.browser.speaker import SpeakerTrack

    session_module: Any = importlib.import_module("relay.session.session")

    sends = install_send_probe()
    inbound: list[tuple[float, float]] = []
    first_response: list[tuple[float, float]] = []
    lateness: list[tuple[float, float]] = []
    speakers: list[SpeakerTrack] = []

    original_inbound = session_module.LiveSession._on_inbound_latency

    def _on_inbound_latency(self: Any, seconds: float) -> None:
        original_inbound(self, seconds)
        inbound.append((time.monotonic(), seconds))

    session_module.LiveSession._on_inbound_latency = _on_inbound_latency

    original_latency = session_module.LiveSession._on_response_latency

    def _on_response_latency(self: Any, seconds: float, first: bool) -> None:
        original_latency(self, seconds, first)
        first_response.append((time.monotonic(), seconds))

    session_module.LiveSession._on_response_latency = _on_response_latency

    original_init = SpeakerTrack.__init__
    original_account = SpeakerTrack._account

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        speakers.append(self)

    def _account(self: Any, due: float) -> None:
        original_account(self, due)
        now = time.monotonic()
        lateness.append((now, (now - due) * 1000))

    setattr(SpeakerTrack, "__init__", __init__)  # noqa: B010
    setattr(SpeakerTrack, "_account", _account)  # noqa: B010

    def collect() -> dict[str, Any]:
        totals: dict[str, float] = {}
        for speaker in speakers:
            for name in ("frames_sent", "frames_late_5ms", "schedule_skips", "skipped_slots",
                         "drained_frames", "underruns", "hook_errors"):  # fmt: skip
                totals[name] = totals.get(name, 0) + getattr(speaker.stats, name)
            totals["max_late_ms"] = max(totals.get("max_late_ms", 0.0), speaker.stats.max_late_ms)
        return {
            "sends": [rows for rows in sends.values()],
            "inbound": inbound,
            "first_response": first_response,
            "lateness": lateness,
            "speaker_totals": totals,
            "thread_names": thread_names(),
        }

    return collect


def main() -> None:
    core, dump_arg = int(sys.argv[1]), sys.argv[2]
    pin(core)
    if dump_arg != "-":  # "-": no probes (their records grow with traffic; bench_load measures RSS)
        install_dump_handler(Path(dump_arg), _install_relay_probes())
    from relay.cli import main as parley_main

    sys.exit(parley_main(["serve", "--workers", "1"]))  # one process: the probes live in it


if __name__ == "__main__":
    main()
