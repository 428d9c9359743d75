"""The ``finalize`` job: an ended session goes ``processing``, through its steps, then ``processed``.

Every session that ends gets one (:func:`storage.sessions.transition` enqueues it in the same
transaction). It moves the session ``ended -> processing``, runs the post-processing steps it was
built with in order (assembly, then rating: :mod:`relay.worker.kinds`), then
``processing -> processed``. Each move goes through :func:`storage.sessions.transition` in the
job's fenced transaction, so it is audited and never touches a session that is being deleted.

Idempotent: a session already ``processed`` is left as it is, one still ``processing`` (a run that
crashed midway) goes on from there, and steps must be idempotent too. When the job goes dead the
session goes ``processing_failed``; its audio and transcript are untouched either way, and an
operator's ``parley jobs retry`` takes it through again. Sessions in any other state (``interrupted``
by a relay that died, say) are not post-processed: the job ends without writing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from relay.observability.logging import log_failure
from relay.worker.jobs import DeadHandler, Handler, JobContext, JobKind
from storage import jobs, sessions
from storage.jobs import LeaseLost, SessionFenced
from storage.models import Rating, Session, SessionStatus
from storage.ratings import is_positive
from storage.uploader import RETRYABLE

__all__ = ["Step", "finalize_kind"]

log = logging.getLogger("relay.worker.finalize")

#: Where finalize starts from: just ended, a run that stopped midway, or an operator's retry after it died.
STARTS_FROM: Final = frozenset(
    {SessionStatus.ENDED, SessionStatus.PROCESSING, SessionStatus.PROCESSING_FAILED}
)


@dataclass(frozen=True, slots=True)
class Step:
    """One post-processing step of ``finalize``: an idempotent handler, and what it records when the job dies.

    ``on_dead`` runs (before the session goes ``processing_failed``) for every step, also those that
    never ran or finished before: each decides from what it finds stored, say a rating still
    ``pending`` becomes ``failed``. A failure of its own is logged and does not stop the others.
    """

    name: str
    run: Handler
    on_dead: DeadHandler | None = None


def finalize_kind(steps: Sequence[Step] = ()) -> JobKind:
    """The ``finalize`` job kind, running ``steps`` in order between the two moves."""

    async def run(ctx: JobContext) -> None:
        sid = ctx.session_id
        async with ctx.transaction() as s:
            status = await _status(s, sid)
            if status == SessionStatus.PROCESSED:
                return  # done before: running it again changes nothing
            if status not in STARTS_FROM:
                log.info("finalize.skipped", extra={"session_id": sid, "status": status})
                return
            await sessions.transition(s, sid, SessionStatus.PROCESSING)
        for step in steps:
            await step.run(ctx)
        async with ctx.transaction() as s:
            if await _status(s, sid) != SessionStatus.PROCESSING:
                return
            await sessions.transition(s, sid, SessionStatus.PROCESSED)
            rating = (
                await s.execute(select(Rating.status, Rating.scores).where(Rating.session_id == sid))
            ).one_or_none()
        # Counted once per session: a rerun finds it processed above and returns before this.
        if ctx.metrics is not None:
            ctx.metrics.session_processed(rating is not None and is_positive(rating.status, rating.scores))

    async def on_dead(ctx: JobContext, code: str) -> None:
        sid = ctx.session_id
        for step in steps:
            if step.on_dead is None:
                continue
            try:
                await step.on_dead(ctx, code)
            except (LeaseLost, SessionFenced):
                raise
            except Exception as exc:  # one step's bookkeeping must not keep the session from saying it failed
                log_failure(
                    log,
                    "finalize.step_on_dead_failed",
                    exc,
                    expected=RETRYABLE,
                    extra={"session_id": sid, "step": step.name},
                )
        async with ctx.transaction() as s:
            if await _status(s, sid) in (SessionStatus.ENDED, SessionStatus.PROCESSING):
                await sessions.transition(s, sid, SessionStatus.PROCESSING_FAILED, code=code)

    return JobKind(jobs.FINALIZE, run, on_dead=on_dead)


async def _status(s: AsyncSession, session_id: str) -> str | None:
    return (await s.execute(select(Session.status).where(Session.id == session_id))).scalar_one_or_none()
