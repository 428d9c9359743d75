"""The periodic heap trim (relay/heap.py) on this machine's glibc."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.heap import HeapTrimmer, load_malloc_trim

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 64 * 1024  # below glibc's mmap threshold: these come from the heap, not from their own mmap
BLOCKS = 800


def _fragment_heap() -> list[bytearray]:
    """Allocate BLOCKS heap blocks each followed by a small pinned one, then free the blocks: the
    freed memory sits in holes between live allocations, which ``free`` never returns to the OS."""
    blocks, pins = [], []
    for _ in range(BLOCKS):
        blocks.append(bytearray(BLOCK))  # zero-filled, so every page is resident
        pins.append(bytearray(1024))  # above pymalloc's 512-byte limit: a malloc'd neighbour
    del blocks
    return pins


@pytest.fixture
def malloc_trim() -> Callable[[int], int]:
    trim = load_malloc_trim()
    assert trim is not None, "this machine runs glibc, which has malloc_trim"
    return trim


def test_trim_gives_freed_heap_holes_back_to_the_os() -> None:
    """Freed blocks between live ones stay resident until the trim, and the trim (once, and as the
    started trimmer's first round) releases most of them. In a fresh process: a test process's own
    heap, with whatever earlier tests freed, would decide where the blocks land."""
    script = """
import asyncio
from relay.heap import HeapTrimmer, load_malloc_trim, resident_bytes
from tests.unit.test_heap import BLOCK, BLOCKS, _fragment_heap

freed = BLOCK * BLOCKS

async def main():
    trim = load_malloc_trim()
    pins = _fragment_heap()
    held = resident_bytes()
    released = await HeapTrimmer(60, trim).trim_now()
    assert released > freed // 2, (released, freed)
    assert resident_bytes() < held - freed // 2
    reports = []
    trimmer = HeapTrimmer(0.05, trim, on_released=reports.append)
    pins += _fragment_heap()
    trimmer.start()
    while len(reports) < 2:
        await asyncio.sleep(0.01)
    await trimmer.aclose()
    assert reports[0] > freed // 2, reports
    assert pins
    print("ok")

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


async def test_started_trimmer_reports_every_round_and_stops_with_aclose(
    malloc_trim: Callable[[int], int],
) -> None:
    """Every interval the trimmer trims and reports the bytes released (never negative); start twice
    runs one task, aclose twice is harmless and leaves no task behind."""
    reports: list[int] = []
    got = asyncio.Event()

    def on_released(n: int) -> None:
        reports.append(n)
        if len(reports) >= 2:
            got.set()

    trimmer = HeapTrimmer(0.05, malloc_trim, on_released=on_released)
    trimmer.start()
    trimmer.start()  # a second start does not start a second task
    assert len([t for t in asyncio.all_tasks() if t.get_name() == "heap-trimmer"]) == 1
    try:
        async with asyncio.timeout(10):
            await got.wait()
    finally:
        await trimmer.aclose()
        await trimmer.aclose()  # idempotent
    assert all(n >= 0 for n in reports)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "heap-trimmer"]


async def test_without_malloc_trim_the_trimmer_does_nothing() -> None:
    """Where the C library has no malloc_trim (musl, macOS) nothing runs and nothing is reported."""
    reports: list[int] = []
    trimmer = HeapTrimmer(0.01, None, on_released=reports.append)
    trimmer.start()
    await asyncio.sleep(0.05)
    assert await trimmer.trim_now() == 0
    await trimmer.aclose()
    assert reports == []
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "heap-trimmer"]


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        HeapTrimmer(0, None)


def test_pinned_mmap_threshold_keeps_large_blocks_out_of_the_heap_after_a_larger_one_was_freed() -> None:
    """glibc alone raises its mmap threshold when a large block is freed, so the next 512 KiB
    buffer comes from the heap; with the threshold pinned it is mapped on its own (fresh processes)."""
    script = """
import ctypes, sys
from relay.heap import pin_mmap_threshold

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pinned":
    assert pin_mmap_threshold() is True
libc.free(libc.malloc(1 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(512 << 10)
print(libc.mallinfo2().hblkhd - before >= 512 << 10)
libc.free(block)
"""

    def mapped(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert mapped("dynamic") == "False"
    assert mapped("pinned") == "True"
