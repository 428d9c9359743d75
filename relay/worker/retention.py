"""The retention sweeper: deletes expired sessions in the background of ``parley serve``.

Every ``PARLEY_RETENTION_SWEEP_SECONDS`` (first right after start-up) it asks storage for sessions
past their retention (:mod:`storage.retention`) and deletes each exactly as ``DELETE
/v1/sessions/{id}`` does: fence (after checking the rule again under the row lock), let uploads in
flight settle, remove rows, objects and spool files, sweep, with the audit reason ``retention``. A
session that is live on this node is skipped until it ends; one whose deletion was left incomplete
is tried again on the next sweep.

:class:`RetentionSweeper` owns its one task: :meth:`start` creates it, :meth:`aclose` cancels it
and waits for it (idempotent). Cancelling mid-deletion is safe: the tombstone is already written,
and the next sweep (here or on another node) finishes the deletion.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Final

from relay.observability.logging import hash_id, log_failure
from relay.observability.metrics import Metrics
from storage.db import Database
from storage.deletion import delete_session
from storage.models import utcnow
from storage.objects import ObjectStore
from storage.retention import expired_sessions, fence_if_expired
from storage.uploader import RETRYABLE

__all__ = ["RetentionSweeper"]

log = logging.getLogger("relay.worker.retention")

BATCH: Final = 100
REASON: Final = "retention"


class RetentionSweeper:
    """Deletes sessions past their retention, one sweep every ``interval_s``."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        spool_root: Path,
        *,
        default_days: int | None,
        interval_s: float,
        is_live: Callable[[str], bool],
        metrics: Metrics,
        settle: Callable[[str], Awaitable[object]] | None = None,
        clock: Callable[[], datetime] = utcnow,
        batch: int = BATCH,
    ) -> None:
        """``default_days`` is the deployment's retention (``None``: only sessions that set their own
        ``retention_days`` expire); ``is_live(id)`` tells whether this node is running the session;
        ``settle(id)``, awaited after the fence, lets in-flight uploads of the session notice it (as
        ``DELETE /v1/sessions/{id}`` does)."""
        self._db = db
        self._store = store
        self._spool_root = spool_root
        self._default_days = default_days
        self._interval_s = interval_s
        self._is_live = is_live
        self._metrics = metrics
        self._settle = settle
        self._clock = clock
        self._batch = batch
        # Fenced sessions whose deletion left something behind (id -> hashed owner), retried first.
        self._incomplete: dict[str, str | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start sweeping in the background (once; a closed sweeper does not start again)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="retention:sweeper")

    async def aclose(self) -> None:
        """Cancel the sweeping task and wait until it has stopped; idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def sweep(self) -> int:
        """Delete every session that is expired now; returns how many were deleted completely."""
        now = self._clock()
        deleted = 0
        # Deletions that left something behind last time first (their rows may already be gone).
        retried = sorted(self._incomplete.items())
        for session_id, user_hash in retried:
            if await self._delete(session_id, user_hash):
                deleted += 1
        # What this sweep does not delete (live, kept meanwhile, failed) is not asked for again.
        passed: set[str] = {session_id for session_id, _ in retried}
        skipped = 0
        while True:
            async with self._db.sessions() as s:
                batch = await expired_sessions(
                    s, now=now, default_days=self._default_days, limit=self._batch, exclude=passed
                )
            for expired in batch:
                if self._is_live(expired.session_id):
                    passed.add(expired.session_id)
                    skipped += 1
                    continue
                async with self._db.sessions.begin() as s:
                    fenced = await fence_if_expired(
                        s, expired.session_id, now=now, default_days=self._default_days
                    )
                if not fenced:
                    passed.add(expired.session_id)
                    skipped += 1  # kept or started since the query
                elif await self._delete(expired.session_id, hash_id(expired.user_id)):
                    deleted += 1  # its row is gone, so no later batch returns it
                else:
                    passed.add(expired.session_id)
            if len(batch) < self._batch:
                break
        if deleted or skipped:
            log.info("retention.swept", extra={"count": deleted, "skipped": skipped})
        return deleted

    async def _delete(self, session_id: str, user_hash: str | None) -> bool:
        try:
            if self._settle is not None:
                await self._settle(session_id)
            report = await delete_session(
                self._db, self._store, self._spool_root, session_id, user_hash=user_hash, reason=REASON
            )
        except Exception as exc:
            # The tombstone stays, so nothing writes to the session meanwhile; the next sweep retries.
            log_failure(
                log, "retention.delete_failed", exc, expected=RETRYABLE, extra={"session_id": session_id}
            )
            self._incomplete[session_id] = user_hash
            self._metrics.retention_deleted("failed")
            return False
        if report.complete:
            self._incomplete.pop(session_id, None)
            self._metrics.retention_deleted("deleted")
            return True
        self._incomplete[session_id] = user_hash
        self._metrics.retention_deleted("incomplete")
        return False

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:
                # A database or object store outage costs one sweep, never the sweeper.
                log_failure(log, "retention.sweep_failed", exc, expected=RETRYABLE)
                self._metrics.retention_swept("failed")
            else:
                self._metrics.retention_swept("ok")
            await asyncio.sleep(self._interval_s)
