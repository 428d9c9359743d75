"""Delete means gone: a session's rows, objects and spool files, behind a fence, then verified.

Order, per session (DESIGN.md, "Persistence guarantees" 5):

1. **Fence.** A :class:`~storage.models.SessionTombstone` row is committed first (:func:`fence`,
   under the session row's update lock). Every writer checks it (:func:`fenced`) in the same
   transaction as its own write, and the uploader checks it again after its ``put``, so an upload,
   a transcript write, a job or an export that is in flight stops without writing and removes what
   it had just put. An export seals its zip under a share lock on the same row, so a zip is either
   sealed before the tombstone or cut.
2. **Remove.** Objects under ``sessions/<id>/`` (segments, assembled files, event logs), the spool
   directory, then the session row, whose foreign keys cascade to every row that belongs to it.
   One audit event without content stays.
3. **Sweep.** The prefix, the spool directory and the rows are looked at again until nothing is
   left; a writer that raced the fence is given a few rounds to notice it, and an object store
   that fails a round (down for a moment) is tried again in the next. What is still there after
   that is reported (and logged by id), never silently ignored; the rows are only removed once
   the objects are, so an incomplete delete can be retried by its owner.

The caller fences (:func:`fence`) and ends a live session before calling :func:`delete_session`
(the relay owns live sessions; storage never imports relay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage import audit
from storage.db import Database
from storage.models import Session, SessionTombstone, User
from storage.objects import ObjectStore, ObjectStoreError
from storage.spool import Spool

__all__ = ["DeletionReport", "delete_session", "delete_user", "fence", "fenced", "session_prefix"]

log = logging.getLogger("storage.deletion")

SWEEP_ROUNDS: Final = 5
SWEEP_PAUSE_S: Final = 0.5


def session_prefix(session_id: str) -> str:
    """Where every object of a session lives (segments, assembled files, event logs)."""
    return f"sessions/{session_id}/"


async def fenced(s: AsyncSession, session_id: str) -> bool:
    """True if ``session_id`` must not be written: it is being (or was) deleted, or never existed."""
    tombstone = await s.get(SessionTombstone, session_id)
    if tombstone is not None:
        return True
    return (await s.execute(select(Session.id).where(Session.id == session_id))).scalar_one_or_none() is None


async def fence(db: Database, session_id: str) -> None:
    """Commit the session's tombstone (idempotent): from now on no writer may write it.

    The session row is locked for update first, which orders the tombstone against an export's
    seal (a share lock on the same row, see :mod:`relay.api.exports`): whichever commits second
    sees the first.
    """
    async with db.sessions.begin() as s:
        await s.execute(select(Session.id).where(Session.id == session_id).with_for_update())
        if await s.get(SessionTombstone, session_id) is None:
            s.add(SessionTombstone(session_id=session_id))


@dataclass(frozen=True, slots=True)
class DeletionReport:
    session_id: str
    objects_deleted: int
    leftover_objects: int
    leftover_spool_files: int
    leftover_rows: int
    #: The object store failed every round (its error's type): nothing could be verified.
    store_error: str | None = None

    @property
    def complete(self) -> bool:
        return not (
            self.leftover_objects or self.leftover_spool_files or self.leftover_rows or self.store_error
        )


async def delete_session(
    db: Database,
    store: ObjectStore,
    spool_root: Path,
    session_id: str,
    *,
    user_hash: str | None = None,
    reason: str = "owner",
    sweep_rounds: int = SWEEP_ROUNDS,
    sweep_pause_s: float = SWEEP_PAUSE_S,
) -> DeletionReport:
    """Fence, remove and verify one session; idempotent (a second call finds nothing to remove)."""
    await fence(db, session_id)
    spool = Spool(spool_root)
    deleted = 0
    leftovers = (0, 0, 0)
    store_error: str | None = None
    for round_ in range(max(1, sweep_rounds)):
        try:
            deleted += await store.delete_prefix(session_prefix(session_id))
            await asyncio.to_thread(spool.remove_session, session_id)
            # The rows go only once the objects did: a session row left behind lets its owner retry.
            async with db.sessions.begin() as s:
                status = (await s.execute(select(Session.status).where(Session.id == session_id))).scalar()
                if status is not None:
                    await s.execute(delete(Session).where(Session.id == session_id))
                    audit.record(
                        s, "session.deleted", session_id=session_id, user_hash=user_hash,
                        from_status=status, code=reason,
                    )  # fmt: skip
            leftovers = await _leftovers(db, store, spool_root, session_id)
            store_error = None
        except ObjectStoreError as exc:  # down for a moment, maybe: the next round tries again
            store_error = type(exc).__name__
            log.warning(
                "session.delete_store_failed", extra={"session_id": session_id, "error_type": store_error}
            )
        if store_error is None and not any(leftovers):
            break
        if round_ + 1 < sweep_rounds:
            await asyncio.sleep(sweep_pause_s)  # a writer that raced the fence removes its own write
    report = DeletionReport(session_id, deleted, *leftovers, store_error=store_error)
    if report.complete:
        log.info("session.deleted", extra={"session_id": session_id, "objects": deleted})
    else:
        log.error(
            "session.delete_incomplete",
            extra={"session_id": session_id, "objects": leftovers[0], "spool_files": leftovers[1],
                   "rows": leftovers[2], "error_type": store_error},
        )  # fmt: skip
    return report


async def _leftovers(
    db: Database, store: ObjectStore, spool_root: Path, session_id: str
) -> tuple[int, int, int]:
    objects = 0
    async for _ in store.list(session_prefix(session_id)):
        objects += 1
    base = spool_root / session_id
    spool_files = await asyncio.to_thread(lambda: sum(1 for p in base.rglob("*") if p.is_file()))
    async with db.sessions() as s:
        rows = (
            await s.execute(select(func.count()).select_from(Session).where(Session.id == session_id))
        ).scalar_one()
    return objects, spool_files, int(rows)


async def delete_user(
    db: Database,
    store: ObjectStore,
    spool_root: Path,
    user_id: str,
    session_ids: Sequence[str],
    *,
    user_hash: str | None = None,
) -> list[DeletionReport]:
    """Delete every listed session of a user, then the account (its keys and secrets cascade)."""
    reports = [
        await delete_session(db, store, spool_root, sid, user_hash=user_hash, reason="account")
        for sid in session_ids
    ]
    async with db.sessions.begin() as s:
        # Sessions created while this ran are fenced too: the account row's cascade takes their rows,
        # and their objects are removed below.
        late = (await s.execute(select(Session.id).where(Session.user_id == user_id))).scalars().all()
    for sid in late:
        reports.append(
            await delete_session(db, store, spool_root, sid, user_hash=user_hash, reason="account")
        )
    async with db.sessions.begin() as s:
        await s.execute(delete(User).where(User.id == user_id))
        audit.record(s, "user.deleted", user_hash=user_hash)
    return reports
