"""Give the C heap's free memory back to the OS every so often (glibc's ``malloc_trim``).

Every WebRTC session allocates and frees megabytes of small C objects (aiortc's DTLS, SRTP and SCTP
state, libopus and FFmpeg contexts, the recorder's buffers) on several threads. glibc returns freed
memory to the OS only from the top of a heap, so after hundreds of sessions a relay holds tens of
MiB that no object uses: the 30-minute soak grew about 0.24 MiB per session while the bytes in use
stayed flat (tests/bench/RESULTS.md, "Load and soak"). ``malloc_trim(0)`` releases the free pages
inside every arena as well. It runs in a thread, once per interval (10 s by default, jemalloc's
decay time for the same job). It holds each arena's lock while it walks it, about 0.15 ms per MiB
it releases (measured: 7.5 ms for 47 MiB, 26 ms for 178 MiB), so a frequent trim with little to
give back keeps those pauses short for the event loop, which allocates from the same arena.

Trimming alone is not enough: glibc raises its mmap threshold to the size of every large block
freed (up to 32 MiB), so after the first long answer the coach's audio buffers (hundreds of KiB,
growing by reallocation) come from the heap too and leave holes the size of an answer, which no
trim can return while a small live block shares their pages. :func:`pin_mmap_threshold` fixes the
threshold, so blocks from 128 KiB up are mapped and unmapped on their own.

Where the C library has no ``malloc_trim`` or ``mallopt`` (musl, macOS) both do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Callable
from typing import Final

__all__ = ["MMAP_THRESHOLD", "HeapTrimmer", "load_malloc_trim", "pin_mmap_threshold", "resident_bytes"]

log = logging.getLogger(__name__)

_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
MMAP_THRESHOLD: Final = 128 * 1024  # glibc's initial value
_M_MMAP_THRESHOLD: Final = -3  # <malloc.h>


# The symbols already loaded into this process, libc's among them: no library search (which
# ctypes.util.find_library does by running ldconfig, a blocking subprocess at app start-up).
_PROCESS: Final = ctypes.CDLL(None)


def pin_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Make glibc map every block of ``size`` bytes or more on its own, for good (process-wide).

    Returns False where there is no glibc ``mallopt``."""
    mallopt = getattr(_PROCESS, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, size))


def load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    trim = getattr(_PROCESS, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


def resident_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``), 0 where there is no procfs."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Runs ``trim(0)`` (:func:`load_malloc_trim`) in a thread every ``interval_s`` seconds while started.

    ``trim`` None (no ``malloc_trim`` here) makes every method a no-op. ``on_released(bytes)``
    receives how much the resident set shrank (0 when it did not), for
    ``parley_heap_released_bytes_total``. :meth:`aclose` is idempotent; a trim already running in
    its thread finishes on its own (it cannot be interrupted and takes milliseconds).
    """

    def __init__(
        self,
        interval_s: float,
        trim: Callable[[int], int] | None,
        *,
        on_released: Callable[[int], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._interval_s = interval_s
        self._trim = trim
        self._on_released = on_released
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._trim is None or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="heap-trimmer")

    async def trim_now(self) -> int:
        """Trim once (in a thread); return the bytes the resident set shrank by."""
        if self._trim is None:
            return 0
        return await asyncio.to_thread(self._trim_and_measure, self._trim)

    def _trim_and_measure(self, trim: Callable[[int], int]) -> int:
        before = resident_bytes()
        started = time.monotonic()
        trim(0)
        released = max(0, before - resident_bytes())
        log.debug(
            "heap.trimmed",
            extra={"released_bytes": released, "duration_ms": round((time.monotonic() - started) * 1000, 2)},
        )
        return released

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            released = await self.trim_now()  # resident_bytes() reads 0 where /proc is unreadable
            if self._on_released is not None:
                self._on_released(released)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
