"""Ratings: what counts as a positively rated session (the business measure of progress and metrics)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["DIMENSIONS", "POSITIVE_MEAN", "is_positive"]

#: The four scores of API.md's Rating, each 0-100.
DIMENSIONS: Final = ("fluency", "vocabulary", "grammar", "task")
#: A done rating whose four scores average at least this is "rated positively" (SC-005).
POSITIVE_MEAN: Final = 60.0


def is_positive(status: str, scores: Mapping[str, object]) -> bool:
    """True for a ``done`` rating whose four scores average :data:`POSITIVE_MEAN` or more."""
    if status != "done":
        return False
    values = [scores.get(name) for name in DIMENSIONS]
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(DIMENSIONS):
        return False
    return sum(numbers) / len(numbers) >= POSITIVE_MEAN
