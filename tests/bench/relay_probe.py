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
* ``asyncio.Handle._run``: every loop callback longer than 5 ms, with what it ran (the long
  callbacks that make speakers late when many sessions share the loop).
* ``SpeakerTrack._account``: the lateness of every outbound ``recv()`` against its slot, and the
  speaker instances, whose ``stats`` (skips, drains, underruns) are summed into the dump.

With ``PARLEY_BENCH_MEMPROBE`` set, :mod:`tests.bench.mem_probe` samples the process's memory.
Also the names of the live threads (:func:`thread_names`), to split the process's CPU by thread.
``SIGUSR1`` writes everything recorded so far as JSON to ``DUMP_FILE`` (atomically, via rename).
:func:`install_dump_handler` and :func:`install_send_probe` are shared with the echo server.
"""

from __future__ import annotations

import asyncio
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


SLOW_CALLBACK_S = 0.005
_ID_OR_NUMBER = re.compile(r"[-_: ]?([0-9a-f]{8,}|\d+)")


def _describe(handle: Any) -> str:
    """What a loop callback ran: the task's name and where its coroutine now waits, or the function."""
    callback = handle._callback
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        where, at = task.get_coro(), "done"
        while where is not None:  # the innermost awaiting frame outside asyncio itself
            frame = getattr(where, "cr_frame", None) or getattr(where, "gi_frame", None)
            if frame is not None and f"{os.sep}asyncio{os.sep}" not in frame.f_code.co_filename:
                at = f"{frame.f_code.co_qualname} {Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
            where = getattr(where, "cr_await", None) or getattr(where, "gi_yieldfrom", None)
        return f"task {_ID_OR_NUMBER.sub('', task.get_name())} @ {at}"
    func = getattr(callback, "func", callback)  # functools.partial
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', type(func).__name__)}"


def install_slow_callback_probe() -> list[tuple[float, float, str]]:
    """Record ``(time, ms, description)`` of every event-loop callback that ran longer than 5 ms."""
    from asyncio import events

    slow: list[tuple[float, float, str]] = []
    original = events.Handle._run

    def _run(self: Any) -> None:
        start = time.perf_counter()
        original(self)
        took = time.perf_counter() - start
        if took > SLOW_CALLBACK_S:
            slow.append((time.monotonic(), took * 1000, _describe(self)))

    setattr(events.Handle, "_run", _run)  # noqa: B010 (patched in this process only)
    return slow


def _install_relay_probes() -> Callable[[], dict[str, Any]]:
    from relay.browser.speaker import SpeakerTrack

    session_module: Any = importlib.import_module("relay.session.session")

    sends = install_send_probe()
    slow = install_slow_callback_probe()
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
            "slow_callbacks": slow,
        }

    return collect


def main() -> None:
    core, dump_arg = int(sys.argv[1]), sys.argv[2]
    pin(core)
    if dump_arg != "-":  # "-": no probes (their records grow with traffic; bench_load measures RSS)
        install_dump_handler(Path(dump_arg), _install_relay_probes())
    if memprobe := os.environ.get("PARLEY_BENCH_MEMPROBE"):
        from tests.bench.mem_probe import install

        install(Path(memprobe))
    from relay.cli import main as parley_main

    sys.exit(parley_main(["serve", "--workers", "1"]))  # one process: the probes live in it


if __name__ == "__main__":
    main()
