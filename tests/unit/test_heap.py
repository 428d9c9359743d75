"""The periodic heap trim (relay/heap.py) on this machine's glibc."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.heap import HeapTrimmer, load_malloc_trim, resident_bytes

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


async def test_trim_gives_freed_heap_holes_back_to_the_os(malloc_trim: Callable[[int], int]) -> None:
    """Freed blocks between live ones stay resident until the trim; the trim releases most of them."""
    pins = _fragment_heap()
    freed = BLOCK * BLOCKS
    held = resident_bytes()
    trimmer = HeapTrimmer(60, malloc_trim)
    released = await trimmer.trim_now()
    assert released > freed // 2, (released, freed)
    assert resident_bytes() < held - freed // 2
    assert pins  # the pins stayed allocated until here


async def test_started_trimmer_reports_what_each_round_released(malloc_trim: Callable[[int], int]) -> None:
    """Every interval the trimmer trims and reports the bytes released, the first round included."""
    reports: list[int] = []
    got = asyncio.Event()

    def on_released(n: int) -> None:
        reports.append(n)
        if len(reports) >= 2:
            got.set()

    trimmer = HeapTrimmer(0.05, malloc_trim, on_released=on_released)
    pins = _fragment_heap()
    trimmer.start()
    trimmer.start()  # a second start does not start a second task
    try:
        async with asyncio.timeout(10):
            await got.wait()
    finally:
        await trimmer.aclose()
        await trimmer.aclose()  # idempotent
    assert reports[0] > BLOCK * BLOCKS // 2
    assert all(n >= 0 for n in reports)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "heap-trimmer"]
    assert pins


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
