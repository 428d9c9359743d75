"""The node registry: which ``parley serve`` processes run, where they are reached, who owns a session.

A node registers at start (:func:`register`), renews ``heartbeat_at`` every few seconds
(:func:`heartbeat`) and removes its row on a clean stop (:func:`deregister`). It is *alive* while
its heartbeat is younger than the caller's ``stale_after`` (several heartbeats): a killed node simply
stops renewing. Clocks are the nodes' own (UTC), so nodes of several machines need synchronised
clocks (NTP), within a small part of ``stale_after``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage import sessions
from storage.db import Database
from storage.models import Node, Session, SessionStatus, utcnow

__all__ = [
    "Owner",
    "alive_owners_of_user",
    "claim_session",
    "deregister",
    "heartbeat",
    "interrupt_if_open",
    "list_nodes",
    "owner_of",
    "prune",
    "register",
]


@dataclass(frozen=True, slots=True)
class Owner:
    """The node a session went live on, as the registry knows it now."""

    node_id: str
    url: str | None
    alive: bool


async def register(db: Database, node_id: str, url: str | None) -> None:
    """Insert this node's row (a restarted process has a new id, so the row is always new)."""
    now = utcnow()
    async with db.sessions.begin() as s:
        s.add(Node(id=node_id, url=url, started_at=now, heartbeat_at=now))


async def heartbeat(db: Database, node_id: str, url: str | None) -> None:
    """Renew ``heartbeat_at``; put the row back if it went (pruned after a long stall of this node)."""
    now = utcnow()
    async with db.sessions.begin() as s:
        result = await s.execute(update(Node).where(Node.id == node_id).values(heartbeat_at=now))
        if result.rowcount == 0:  # type: ignore[attr-defined]
            s.add(Node(id=node_id, url=url, started_at=now, heartbeat_at=now))


async def deregister(db: Database, node_id: str) -> None:
    """Remove this node's row: from now on nothing is forwarded to it."""
    async with db.sessions.begin() as s:
        await s.execute(delete(Node).where(Node.id == node_id))


async def list_nodes(db: Database, *, stale_after: timedelta) -> Sequence[tuple[Node, bool]]:
    """Every registered node with whether it is alive, oldest first."""
    cutoff = utcnow() - stale_after
    async with db.sessions() as s:
        rows = (await s.execute(select(Node).order_by(Node.started_at, Node.id))).scalars().all()
    return [(node, node.heartbeat_at >= cutoff) for node in rows]


async def prune(db: Database, *, older_than: timedelta) -> int:
    """Drop rows of nodes silent for ``older_than`` (long dead): each restart adds a row."""
    cutoff = utcnow() - older_than
    async with db.sessions.begin() as s:
        result = await s.execute(delete(Node).where(Node.heartbeat_at < cutoff))
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count


async def owner_of(db: Database, session_id: str, *, stale_after: timedelta) -> Owner | None:
    """The node named by the session's ``node_id`` and whether it is alive; None when none is named.

    A node whose row is gone (stopped cleanly, or pruned) is not alive.
    """
    async with db.sessions() as s:
        row = (
            await s.execute(
                select(Session.node_id, Node.url, Node.heartbeat_at)
                .outerjoin(Node, Node.id == Session.node_id)
                .where(Session.id == session_id)
            )
        ).one_or_none()
    if row is None or row.node_id is None:
        return None
    return _owner(row.node_id, row.url, row.heartbeat_at, stale_after)


async def alive_owners_of_user(db: Database, user_id: str, *, stale_after: timedelta) -> dict[str, Owner]:
    """Session id -> owner, for the user's sessions whose node is alive now (one query)."""
    cutoff = utcnow() - stale_after
    async with db.sessions() as s:
        rows = (
            await s.execute(
                select(Session.id, Session.node_id, Node.url, Node.heartbeat_at)
                .join(Node, Node.id == Session.node_id)
                .where(Session.user_id == user_id, Node.heartbeat_at >= cutoff)
            )
        ).all()
    return {row.id: _owner(row.node_id, row.url, row.heartbeat_at, stale_after) for row in rows}


def _owner(node_id: str, url: str | None, beat: datetime | None, stale_after: timedelta) -> Owner:
    return Owner(node_id=node_id, url=url, alive=beat is not None and beat >= utcnow() - stale_after)


async def claim_session(s: AsyncSession, session_id: str, node_id: str) -> None:
    """Record, in the caller's transaction, that the session goes live on ``node_id``."""
    await s.execute(update(Session).where(Session.id == session_id).values(node_id=node_id))


async def interrupt_if_open(
    db: Database, session_id: str, open_states: Collection[str], *, user_hash: str | None, code: str
) -> bool:
    """Move the session to ``interrupted`` if it is still in one of ``open_states``; returns whether
    it did (its recordings are finalized by the recovery of its node's spool)."""
    async with db.sessions.begin() as s:
        status = (
            await s.execute(select(Session.status).where(Session.id == session_id).with_for_update())
        ).scalar_one_or_none()
        if status not in open_states:
            return False
        await sessions.transition(s, session_id, SessionStatus.INTERRUPTED, user_hash=user_hash, code=code)
    return True
