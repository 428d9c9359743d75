"""``parley serve --workers N``: N relay processes on one machine, all answering on one port.

One event loop saturates one core (see AIORTC.md), so a machine runs one relay process per core.
The parent here starts N children (``parley serve --worker-of <parent pid> --worker-index <i>``,
i in 0..N-1: the ``worker`` label of its metrics, relay/observability/fanin.py). Each child is a
whole relay node: it listens on ``PARLEY_HOST:PARLEY_PORT`` with ``SO_REUSEPORT`` (Linux spreads
new connections over the processes), on its own loopback port for forwarded signalling, writes its
own spool and registers as its own node. The parent only starts, watches and stops them:

- a child that fails to start stops the start: the others are stopped and the parent exits with
  that child's code (2 for a configuration error);
- SIGTERM/SIGINT to the parent is sent on to every child as SIGTERM, and the parent waits for them
  to drain and exit;
- a child that dies while running is not restarted (an operator's supervisor restarts the whole
  thing); its siblings go on serving, recover its spool and stop forwarding to it once its
  heartbeat is stale; the parent's exit code then says a child failed;
- the children die with the parent (``PR_SET_PDEATHSIG``): a killed parent leaves no orphan on
  the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = ["READY_LINE", "WORKER_INDEX_ARG", "default_workers", "die_with_parent", "supervise"]

log = logging.getLogger("relay.cluster.workers")

#: What a child prints on stdout, with its node id, once it serves.
READY_LINE: Final = "parley-worker-ready"
#: Added to each child's command with its index: stable across restarts, unlike its node id.
WORKER_INDEX_ARG: Final = "--worker-index"
_PR_SET_PDEATHSIG: Final = 1
_CGROUP_CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")
EXIT_FAILED: Final = 1


def default_workers() -> int:
    """One process per core this process may use: its CPU affinity, capped by a cgroup v2 CPU
    quota (a container limited to 2 CPUs on a 64-core host runs 2, not 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def die_with_parent(parent_pid: int) -> None:
    """In a child: be killed when the parent dies, and leave at once if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        raise SystemExit(EXIT_FAILED)


@dataclass(slots=True)
class _Child:
    index: int
    proc: asyncio.subprocess.Process
    node_id: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    relay: asyncio.Task[None] | None = None


async def supervise(count: int, command: list[str], *, banner: str) -> int:
    """Run ``count`` children of ``command`` (each with ``--worker-index <i>`` added) until a signal
    or until all have exited; returns the exit code (0: every child started, and stopped cleanly when
    asked)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children: list[_Child] = []
    try:
        for index in range(count):
            proc = await asyncio.create_subprocess_exec(
                *command, WORKER_INDEX_ARG, str(index),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                start_new_session=True,  # signals reach children only through this parent
            )  # fmt: skip
            child = _Child(index, proc)
            child.relay = asyncio.create_task(_relay_stdout(child), name=f"serve:worker-{index}:stdout")
            children.append(child)
        failed = await _wait_started(children, stop)
        if failed is not None:
            code = failed.proc.returncode or EXIT_FAILED
            log.error("serve.worker_failed_to_start", extra={"count": count, "code": code})
            await _stop_all(children)
            return code
        if stop.is_set():
            await _stop_all(children)
            return 0 if all(c.proc.returncode == 0 for c in children) else EXIT_FAILED
        print(banner, flush=True)
        log.info("serve.started", extra={"count": count})
        crashed = await _run_until_stopped(children, stop)
        log.info("serve.stopping", extra={"count": count})
        await _stop_all(children)
        clean = not crashed and all(c.proc.returncode == 0 for c in children)
        log.info("serve.stopped", extra={"count": count})
        return 0 if clean else EXIT_FAILED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for child in children:  # only reached with children still running if this task is cancelled
            if child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()
            if child.relay is not None:
                await asyncio.gather(child.relay, return_exceptions=True)


async def _relay_stdout(child: _Child) -> None:
    """Read the child's ready line, then pass anything else it prints on to our stdout."""
    stream = child.proc.stdout
    assert stream is not None
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\n")
        if not child.ready.is_set() and text.startswith(READY_LINE):
            child.node_id = text[len(READY_LINE) :].strip() or None
            child.ready.set()
            continue
        print(text, flush=True)


async def _wait_started(children: list[_Child], stop: asyncio.Event) -> _Child | None:
    """Wait until every child is ready (None), or return the first child that exits before it is;
    a stop request ends the wait early (None too)."""
    pending = {
        asyncio.ensure_future(_started(child)): child for child in children
    }  # fmt: skip
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while pending:
            done, _ = await asyncio.wait([*pending, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                return None  # asked to stop before all started: not a failure
            for future in done:
                child = pending.pop(future)
                if not future.result():
                    return child
        return None
    finally:
        for future in [*pending, stopping]:
            future.cancel()
        await asyncio.gather(*pending, stopping, return_exceptions=True)


async def _started(child: _Child) -> bool:
    """True once the child said it is ready, False if it exited first."""
    ready = asyncio.ensure_future(child.ready.wait())
    exited = asyncio.ensure_future(child.proc.wait())
    try:
        await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
        return child.ready.is_set() and child.proc.returncode is None
    finally:
        ready.cancel()
        exited.cancel()
        await asyncio.gather(ready, exited, return_exceptions=True)


async def _run_until_stopped(children: list[_Child], stop: asyncio.Event) -> bool:
    """Serve until asked to stop or until no child is left; returns whether a child died meanwhile."""
    exits = {asyncio.ensure_future(c.proc.wait()): c for c in children}
    stopping = asyncio.ensure_future(stop.wait())
    crashed = False
    try:
        while exits and not stop.is_set():
            done, _ = await asyncio.wait([*exits, stopping], return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                if future is stopping:
                    continue
                child = exits.pop(future)
                crashed = True
                log.error(
                    "serve.worker_exited", extra={"node_id": child.node_id, "code": child.proc.returncode}
                )
        return crashed
    finally:
        for future in [*exits, stopping]:
            future.cancel()
        await asyncio.gather(*exits, stopping, return_exceptions=True)


async def _stop_all(children: list[_Child]) -> None:
    """SIGTERM every child still running and wait for each to drain and exit."""
    for child in children:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*(child.proc.wait() for child in children))
    await asyncio.gather(*(c.relay for c in children if c.relay is not None), return_exceptions=True)
