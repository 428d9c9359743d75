"""Simulating a killed process around a SpoolRecorder in one test process."""

from __future__ import annotations

import asyncio
import contextlib

from storage.recorder import SpoolRecorder, SpoolRecorderFactory


async def kill(rec: SpoolRecorder, factory: SpoolRecorderFactory) -> None:
    """Stop everything where it is, as SIGKILL would: no aclose, no flush, no finalize."""
    rec._pump_task.cancel()
    await factory.uploader.aclose()
    await asyncio.to_thread(factory.pool.shutdown, True)


def bury(rec: SpoolRecorder) -> None:
    """Close the file handles a killed recorder left open, once the test has looked at the spool
    (the kernel closes them for a real dead process; here they would leak as ResourceWarnings)."""
    handles = [t.seg.fh for t in rec._tracks.values() if t.seg is not None]
    if rec._event_log is not None:
        handles.append(rec._event_log.fh)
    for fh in handles:
        with contextlib.suppress(OSError):  # recovered and removed meanwhile: nothing to keep
            fh.close()
