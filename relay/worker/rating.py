"""The rating step of ``finalize``: speech metrics at once, then scores and feedback from the model.

:func:`rating_step` reads the session's topic, final transcript rows and recorded tracks, computes
the speech metrics (:mod:`relay.worker.speech`) and stores the rating as ``pending`` with them, so
the learner sees the numbers while the model is asked. Then it calls the rating model
(:class:`relay.worker.rating_model.RatingModel`) and stores ``done`` with the four scores, the
feedback and the model's name.

- **Too little speech.** Under :data:`MIN_WORDS` learner words there is nothing a model can judge
  fairly (and a model asked anyway tends to invent praise or blame): the rating is ``done`` at once
  with every score 0, feedback that says so, and the model :data:`METRICS_ONLY_MODEL`. No call is
  made, so a silent session costs nothing and never fails for want of a model.
- **Idempotent.** A ``done`` rating is left as it is (the model is not asked again); a ``pending``
  one (an earlier run crashed or failed) is recomputed.
- **Failures.** A model failure raises its :class:`~relay.errors.JobError`; the rating stays
  ``pending`` with its metrics while the job retries. When the job dies, :func:`rating_step`'s
  ``on_dead`` turns a ``pending`` rating ``failed`` with the job's error code, metrics kept. The
  audio and the transcript are only ever read here.

Reads go through ``ctx.db`` (outside the fence, nothing is written there); every write goes through
``ctx.transaction()``. No transcript text is logged.
"""

from __future__ import annotations

import logging
from typing import Final

from relay.worker.finalize import Step
from relay.worker.jobs import JobContext
from relay.worker.rating_model import RatingModel
from relay.worker.speech import speech_metrics
from storage import ratings

__all__ = ["METRICS_ONLY_MODEL", "MIN_WORDS", "TOO_LITTLE_SPEECH", "rating_step"]

log = logging.getLogger("relay.worker.rating")

#: Fewer learner words than this are not sent to the model (see the module docstring).
MIN_WORDS: Final = 5
#: The ``model`` of a rating made from the metrics alone.
METRICS_ONLY_MODEL: Final = "parley-metrics"
TOO_LITTLE_SPEECH: Final = (
    "There was too little speech from you in this session to rate it, so every score is 0. "
    "Next time, try answering the coach in full sentences."
)


def rating_step(model: RatingModel) -> Step:
    """The ``rating`` step of ``finalize``, asking ``model`` for scores and feedback."""

    async def run(ctx: JobContext) -> None:
        sid = ctx.session_id
        async with ctx.db.sessions() as s:
            existing = await ratings.get_rating(s, sid)
            if existing is not None and existing.status == ratings.DONE:
                return  # rated before: running it again changes nothing
            inputs = await ratings.rating_inputs(s, sid)
        if inputs is None:
            return  # deleted meanwhile: finalize's next write finds the fence (or the job gone)
        metrics = speech_metrics(inputs.segments, inputs.recordings).as_dict()
        async with ctx.transaction() as s:
            row = await ratings.start_rating(s, sid, metrics)
            if row.status == ratings.DONE:
                return
            if metrics["learner_words"] < MIN_WORDS:
                await ratings.finish_rating(
                    s,
                    sid,
                    scores=dict.fromkeys(ratings.DIMENSIONS, 0),
                    feedback=TOO_LITTLE_SPEECH,
                    model=METRICS_ONLY_MODEL,
                )
                log.info("rating.done", extra={"session_id": sid, "outcome": "too_little_speech"})
                return
        rated = await model.rate(
            topic_title=inputs.topic_title,
            difficulty=inputs.difficulty,
            metrics=metrics,
            segments=inputs.segments,
        )
        async with ctx.transaction() as s:
            await ratings.finish_rating(
                s, sid, scores=rated.scores, feedback=rated.feedback, model=rated.model
            )
        log.info("rating.done", extra={"session_id": sid, "outcome": "rated", "kind": model.kind})

    async def on_dead(ctx: JobContext, code: str) -> None:
        async with ctx.transaction() as s:
            if await ratings.fail_rating(s, ctx.session_id, code):
                log.info("rating.failed", extra={"session_id": ctx.session_id, "code": code})

    return Step("rating", run, on_dead)
