"""The job kinds Parley runs: the one place they are registered (rating and assembly come here)."""

from __future__ import annotations

from relay.worker.finalize import finalize_kind
from relay.worker.jobs import JobKinds

__all__ = ["default_kinds"]


def default_kinds() -> JobKinds:
    """Every job kind ``parley serve`` and ``parley worker`` run."""
    kinds = JobKinds()
    kinds.register(finalize_kind())
    return kinds
