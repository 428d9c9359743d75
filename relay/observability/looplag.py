"""Event-loop lag: how late a timer fires. One relay process is bounded by its loop (AIORTC.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

__all__ = ["LoopLagMonitor"]

INTERVAL_S: Final = 0.1
# The admission decision uses the worst lag over the last second, so one slow tick refuses briefly.
WINDOW: Final = 10


class LoopLagMonitor:
    """Samples the loop's lag every 100 ms; ``lag_ms`` is the worst of the last second."""

    def __init__(self, on_sample: Callable[[float], None] | None = None) -> None:
        self._samples: list[float] = []
        self._on_sample = on_sample
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_ms(self) -> float:
        return max(self._samples, default=0.0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-lag-monitor")

    async def _run(self) -> None:
        while True:
            due = time.perf_counter() + INTERVAL_S
            await asyncio.sleep(INTERVAL_S)
            lag_ms = max(0.0, (time.perf_counter() - due) * 1000)
            self._samples = [*self._samples[-(WINDOW - 1) :], lag_ms]
            if self._on_sample is not None:
                self._on_sample(lag_ms / 1000)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
