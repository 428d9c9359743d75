"""Memory probe for the soak (``PARLEY_BENCH_MEMPROBE=<file>``), installed by :mod:`relay_probe`.

The soak sees the relay's RSS only from outside. This probe, in the relay process, writes one JSON
line per ``PARLEY_BENCH_MEMPROBE_S`` seconds (60 by default) that splits it:

* glibc's own accounting (``mallinfo2``): bytes the C heap hands out (``in_use``) against what it
  holds (``arena`` + ``mmap``). Growth of ``in_use`` is a leak (Python's or a C library's); RSS
  growth with a flat ``in_use`` is memory malloc keeps but does not use (fragmentation).
* Python's own allocator (pymalloc, which takes 1 MiB arenas straight from mmap, not from malloc):
  arenas held against bytes in live blocks, from ``sys._debugmallocstats()`` (it prints to the C
  stderr, so fd 2 points at a temporary file for those few ms: a log line written by another
  thread meanwhile lands there, not in the relay's log).
* Python's view, with ``PARLEY_BENCH_MEMPROBE_TYPES=1``: live objects by type (the 25 largest
  counts; walking every object holds the GIL for tens of ms, so off by default) and, with
  ``PARLEY_BENCH_TRACEMALLOC=1``, the 25 source lines whose allocations grew most since the first
  sample (tracemalloc, one frame: slower, so only for diagnosis).
* ``PARLEY_BENCH_MALLOC_TRIM=1`` then calls ``malloc_trim(0)`` and samples the RSS again
  (``rss_trimmed``), to show how much of the RSS is free memory glibc could give back.

It runs in a daemon thread and never touches the event loop; the records stay small (one line
per sample, written and dropped).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from relay.heap import resident_bytes

_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS.split()]  # noqa: RUF012 (ctypes layout)


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2
_MIB = 1024 * 1024


def _rss_mib() -> float:
    return resident_bytes() / _MIB


_PYMALLOC = {
    "pymalloc_arenas": re.compile(r"^# arenas allocated current\s*=\s*([\d,]+)", re.M),
    "pymalloc_in_use": re.compile(r"^# bytes in allocated blocks\s*=\s*([\d,]+)", re.M),
    "pymalloc_free_blocks": re.compile(r"^# bytes in available blocks\s*=\s*([\d,]+)", re.M),
}


def _pymalloc() -> dict[str, float]:
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    out: dict[str, float] = {}
    for key, pattern in _PYMALLOC.items():
        m = pattern.search(text)
        if m:
            value = int(m.group(1).replace(",", ""))
            out[key] = value if key == "pymalloc_arenas" else round(value / _MIB, 2)
    return out


def _sample(t0: float, baseline: tracemalloc.Snapshot | None, trim: bool, census: bool) -> dict[str, Any]:
    info = _libc.mallinfo2()
    record: dict[str, Any] = {
        "t": round(time.monotonic() - t0, 1),
        "monotonic": time.monotonic(),  # CLOCK_MONOTONIC is one clock for every process on the machine
        "rss": round(_rss_mib(), 2),
        "heap_in_use": round(info.uordblks / _MIB, 2),
        "heap_free": round(info.fordblks / _MIB, 2),
        "heap_arena": round(info.arena / _MIB, 2),
        "mmap": round(info.hblkhd / _MIB, 2),
        **_pymalloc(),
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
    }
    if census:
        types = Counter(type(o).__name__ for o in gc.get_objects())
        record["objects"] = sum(types.values())
        record["types"] = dict(types.most_common(25))
    if trim:
        _libc.malloc_trim(0)
        record["rss_trimmed"] = round(_rss_mib(), 2)
    if baseline is not None:
        snapshot = tracemalloc.take_snapshot()
        record["traced"] = round(tracemalloc.get_traced_memory()[0] / _MIB, 2)
        record["tracemalloc_own"] = round(tracemalloc.get_tracemalloc_memory() / _MIB, 2)
        record["grown"] = [
            [str(stat.traceback[0]), round(stat.size_diff / 1024, 1), stat.count_diff]
            for stat in snapshot.compare_to(baseline, "lineno")[:25]
        ]
    return record


def install(path: Path) -> None:
    """Start the sampling thread, writing JSON lines to ``path``."""
    every = float(os.environ.get("PARLEY_BENCH_MEMPROBE_S", "60"))
    trim = os.environ.get("PARLEY_BENCH_MALLOC_TRIM") == "1"
    census = os.environ.get("PARLEY_BENCH_MEMPROBE_TYPES") == "1"
    if os.environ.get("PARLEY_BENCH_TRACEMALLOC") == "1":
        tracemalloc.start(1)

    def run() -> None:
        t0 = time.monotonic()
        baseline: tracemalloc.Snapshot | None = None
        with path.open("a") as out:
            while True:
                time.sleep(every)
                if tracemalloc.is_tracing() and baseline is None:
                    baseline = tracemalloc.take_snapshot()  # after the first interval: past start-up
                out.write(json.dumps(_sample(t0, baseline, trim, census)) + "\n")
                out.flush()

    threading.Thread(target=run, name="mem-probe", daemon=True).start()
