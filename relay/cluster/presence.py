"""This node's row in the node registry (storage/nodes.py): registered, kept fresh, removed.

One task owns the heartbeat. A heartbeat that fails (database briefly down) is logged and tried
again at the next beat; the node counts as dead to the others only after ``STALE_BEATS`` missed
beats, which is what they wait for before they stop forwarding to it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Final

from sqlalchemy.exc import SQLAlchemyError

from relay.cluster.identity import NodeIdentity
from relay.observability.logging import log_failure
from storage import nodes
from storage.db import Database
from storage.uploader import RETRYABLE

__all__ = ["STALE_BEATS", "NodePresence"]

log = logging.getLogger("relay.cluster.presence")

#: A node is alive while its last heartbeat is younger than this many heartbeat intervals.
STALE_BEATS: Final = 3
#: Rows of nodes silent this long are dropped (each restart registers a new node id).
PRUNE_AFTER: Final = timedelta(days=1)
PRUNE_EVERY_BEATS: Final = 100
# Any database error of the registry is the database's state (down, or gone under a test), logged
# by its class only: the row simply goes stale, which the other nodes treat as this node dead.
_DB_FAILURES: Final = (*RETRYABLE, SQLAlchemyError)


class NodePresence:
    """Registers the node on :meth:`start`, heartbeats in one task, deregisters on :meth:`aclose`
    (idempotent)."""

    def __init__(self, db: Database, identity: NodeIdentity, *, heartbeat_s: float) -> None:
        self._db = db
        self.identity = identity
        self.heartbeat_s = heartbeat_s
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._fields = {"node_id": identity.id}

    @property
    def stale_after(self) -> timedelta:
        return timedelta(seconds=self.heartbeat_s * STALE_BEATS)

    async def start(self) -> None:
        try:
            await nodes.register(self._db, self.identity.id, self.identity.url)
        except _DB_FAILURES as exc:  # the first heartbeat puts the row in
            log_failure(log, "node.register_failed", exc, expected=_DB_FAILURES, extra=self._fields)
        self._task = asyncio.create_task(self._beat(), name=f"node:heartbeat:{self.identity.id}")
        log.info("node.registered", extra={"node_id": self.identity.id})

    async def _beat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.heartbeat_s)
            beats += 1
            try:
                await nodes.heartbeat(self._db, self.identity.id, self.identity.url)
                if beats % PRUNE_EVERY_BEATS == 0:
                    pruned = await nodes.prune(self._db, older_than=PRUNE_AFTER)
                    if pruned:
                        log.info("node.pruned", extra={"count": pruned})
            except Exception as exc:
                log_failure(log, "node.heartbeat_failed", exc, expected=_DB_FAILURES, extra=self._fields)

    async def aclose(self) -> None:
        """Stop heartbeating and remove the row: nothing is forwarded here any more."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await nodes.deregister(self._db, self.identity.id)
        except Exception as exc:  # the row goes stale instead, which the others treat the same
            log_failure(log, "node.deregister_failed", exc, expected=_DB_FAILURES, extra=self._fields)
            return
        log.info("node.deregistered", extra={"node_id": self.identity.id})
