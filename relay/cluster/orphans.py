"""Recovery of spools whose process died while this one runs (storage/spool_claims.py).

A process recovers its own spool at start (``relay.app``). When a sibling on the same data dir is
killed (``parley serve --workers N``, or two processes started by hand) its spool would otherwise
wait for the next start: this task takes the lock of every orphaned spool at start and then every
few seconds, uploads what it holds and marks its unfinished sessions ``interrupted`` with
:func:`storage.recorder.recover_spool`, exactly as a restart would, then removes the emptied
per-node directory.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from relay.observability.logging import log_failure
from storage.db import Database
from storage.objects import ObjectStore
from storage.recorder import recover_spool
from storage.spool import Spool
from storage.spool_claims import NODE_SPOOLS, SpoolClaim, claim_orphans
from storage.uploader import RETRYABLE

__all__ = ["OrphanSpoolReaper"]

log = logging.getLogger("relay.cluster.orphans")


class OrphanSpoolReaper:
    """One task; :meth:`aclose` is idempotent and gives back any spool it holds."""

    def __init__(
        self, db: Database, store: ObjectStore, data_dir: Path, *, own: Path, interval_s: float
    ) -> None:
        self._db = db
        self._store = store
        self._data_dir = data_dir
        self._own = own
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recorder:recover-orphans")

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:
                log_failure(
                    log, "recorder.orphan_recovery_failed", exc, expected=(*RETRYABLE, SQLAlchemyError)
                )
            await asyncio.sleep(self._interval_s)

    async def sweep(self) -> int:
        """Recover every orphaned spool now; returns how many sessions were marked interrupted."""
        claims = await asyncio.to_thread(claim_orphans, self._data_dir, own=self._own)
        interrupted = 0
        try:
            while claims:
                claim = claims.pop(0)
                try:
                    interrupted += await self._recover(claim)
                finally:
                    claim.release(remove=self._emptied(claim))
        finally:
            for claim in claims:  # cancelled: the others are someone else's to take
                claim.release()
        return interrupted

    async def _recover(self, claim: SpoolClaim) -> int:
        spool = await asyncio.to_thread(Spool, claim.path)  # counts the directory's bytes
        recovered = await recover_spool(self._db, self._store, claim.path, spool=spool)
        if recovered:
            log.warning("recorder.recovered_orphan", extra={"sessions": len(recovered)})
        return len(recovered)

    def _emptied(self, claim: SpoolClaim) -> bool:
        # Only a per-node directory goes; the shared one is where the next first process writes.
        if claim.path.parent.name != NODE_SPOOLS:
            return False
        try:
            return not any(p.is_dir() for p in claim.path.iterdir())
        except OSError:
            return False

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
