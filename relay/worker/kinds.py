"""The job kinds Parley runs: the one place they are registered, with the steps ``finalize`` runs."""

from __future__ import annotations

from relay.worker.assembly import assembly_step
from relay.worker.finalize import Step, finalize_kind
from relay.worker.jobs import JobKinds
from relay.worker.rating import rating_step
from relay.worker.rating_model import RatingModel

__all__ = ["default_kinds"]


def default_kinds(rating: RatingModel | None = None) -> JobKinds:
    """Every job kind ``parley serve`` and ``parley worker`` run.

    ``finalize`` runs its steps in order: assembly (one verified file per track), then, with
    ``rating`` given, the rating (:func:`relay.worker.rating.rating_step`) with that model. Assembly
    goes first because it needs no network beyond the object store and a failing rating model
    must not keep the tracks from being assembled.
    """
    steps: list[Step] = [assembly_step()]
    if rating is not None:
        steps.append(rating_step(rating))
    kinds = JobKinds()
    kinds.register(finalize_kind(steps))
    return kinds
