"""Event-loop lag: how late a timer fires. One relay process is bounded by its loop (AIORTC.md).

Admission reads :attr:`LoopLagMonitor.sustained_lag_ms`, a high percentile of the last few seconds
of samples rather than the worst one: a single stall (one garbage collection, one slow callback)
passes and is over before a new session would add any load, while an overloaded loop is late on
most ticks, which is what has to stop new sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["LoopLagMonitor"]

INTERVAL_S: Final = 0.1
RECENT: Final = 10
"""``lag_ms`` is the worst of this many latest samples (one second at 10 a second)."""
WINDOW_S: Final = 5.0
"""``sustained_lag_ms`` looks at the samples of this many seconds."""
PERCENTILE: Final = 0.9
"""Which percentile of the window is ``sustained_lag_ms``: with at least 10 samples, one stall
alone never reaches it; lag on more than a tenth of the ticks does."""
MIN_SAMPLES: Final = 10
"""Fewer samples than this say nothing sustained (``sustained_lag_ms`` is 0). A loop so late that
the window holds fewer (each tick a second late) is judged on the latest ``MIN_SAMPLES`` instead."""


class LoopLagMonitor:
    """Samples the loop's lag every 100 ms.

    ``lag_ms`` is the worst of the last second; ``sustained_lag_ms`` the 90th percentile of the
    last 5 s. ``clock`` (seconds, monotonic) only stamps samples, so tests can feed :meth:`record`
    on a fake clock.
    """

    def __init__(
        self,
        on_sample: Callable[[float], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = WINDOW_S,
        percentile: float = PERCENTILE,
        min_samples: int = MIN_SAMPLES,
    ) -> None:
        if window_s <= 0 or not 0 < percentile <= 1 or min_samples < 1:
            raise ValueError("need window_s > 0, 0 < percentile <= 1 and min_samples >= 1")
        self._samples: deque[tuple[float, float]] = deque()  # (stamped at, lag ms), oldest first
        self._on_sample = on_sample
        self._clock = clock
        self._window_s = window_s
        self._percentile = percentile
        self._min_samples = min_samples
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_ms(self) -> float:
        """The worst lag of the latest second of samples: one stall shows here."""
        return max((lag for _, lag in itertools.islice(reversed(self._samples), RECENT)), default=0.0)

    @property
    def sustained_lag_ms(self) -> float:
        """The ``percentile`` of the lag samples of the last ``window_s`` (nearest rank)."""
        if len(self._samples) < self._min_samples:
            return 0.0
        since = self._clock() - self._window_s
        lags = [lag for at, lag in self._samples if at >= since]
        if len(lags) < self._min_samples:
            lags = [lag for _, lag in itertools.islice(reversed(self._samples), self._min_samples)]
        lags.sort()
        return lags[math.ceil(self._percentile * len(lags)) - 1]

    def record(self, lag_ms: float) -> None:
        """Add one sample (what the sampling task does every 100 ms)."""
        now = self._clock()
        self._samples.append((now, lag_ms))
        since = now - self._window_s
        keep = max(self._min_samples, RECENT)
        while len(self._samples) > keep and self._samples[0][0] < since:
            self._samples.popleft()
        if self._on_sample is not None:
            self._on_sample(lag_ms / 1000)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-lag-monitor")

    async def _run(self) -> None:
        while True:
            due = time.perf_counter() + INTERVAL_S
            await asyncio.sleep(INTERVAL_S)
            self.record(max(0.0, (time.perf_counter() - due) * 1000))

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
