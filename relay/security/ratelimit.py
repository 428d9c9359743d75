"""In-process sliding-window limits (failed logins, session creation, secret minting).

Per process on purpose: each relay node limits what it sees, which bounds abuse per node without a
shared store on the hot path. Keys are ids or addresses held only in memory, never logged.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["SlidingWindow"]

_MAX_KEYS: Final = 100_000


class SlidingWindow:
    """At most ``limit`` hits per ``window_s`` per key."""

    def __init__(self, limit: int, window_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("limit must be >= 1 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}

    def retry_after(self, key: str) -> int:
        """Seconds until ``key`` may try again; 0 when it may now."""
        hits = self._prune(key)
        if hits is None or len(hits) < self.limit:
            return 0
        return max(1, math.ceil(hits[0] + self.window_s - self._clock()))

    def hit(self, key: str) -> int:
        """Record one attempt; returns :meth:`retry_after` as it was *before* this hit (0 = allowed)."""
        wait = self.retry_after(key)
        if wait:
            return wait
        if len(self._hits) >= _MAX_KEYS:
            self._evict()
        self._hits.setdefault(key, deque()).append(self._clock())
        return 0

    def reset(self, key: str) -> None:
        self._hits.pop(key, None)

    def _prune(self, key: str) -> deque[float] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        horizon = self._clock() - self.window_s
        while hits and hits[0] <= horizon:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def _evict(self) -> None:
        # Memory stays bounded under a flood of distinct keys: drop expired ones, then the oldest.
        for key in list(self._hits):
            self._prune(key)
        while len(self._hits) >= _MAX_KEYS:
            del self._hits[next(iter(self._hits))]
