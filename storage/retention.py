"""Retention: how long a session is kept, which sessions have outlived it, and the learner's choice.

A session expires ``days`` after it ended (after it was created, if it never ended), where ``days``
is its own ``retention_days`` when set, else the deployment's default (``None``: kept until the
learner deletes it). ``retain=True`` keeps it forever, whatever the deployment says. A session that
is still going (connecting, live, reconnecting, ending) never expires: its clock has not started.

Expired sessions are deleted exactly like an owner's delete (:func:`storage.deletion.delete_session`);
:func:`fence_if_expired` re-checks the rule under the row lock and writes the tombstone in the same
transaction, so a learner who chooses to keep a session (or starts it) just before the sweep wins.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage import audit
from storage.deletion import fenced
from storage.models import Session, SessionStatus, SessionTombstone

__all__ = [
    "ACTIVE",
    "Expired",
    "Keep",
    "expired_sessions",
    "expires_at",
    "fence_if_expired",
    "policy",
    "set_retention",
]

#: States whose retention clock has not started.
ACTIVE: Final = frozenset(
    {SessionStatus.CONNECTING, SessionStatus.LIVE, SessionStatus.RECONNECTING, SessionStatus.ENDING}
)


class Keep(enum.Enum):
    """``retention_days=Keep.UNCHANGED`` leaves the stored value as it is (``None`` clears it)."""

    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class Expired:
    session_id: str
    user_id: str


def policy(session: Session) -> str:
    """Which rule keeps ``session``: ``retain`` (forever), ``days`` (its own) or ``default``."""
    if session.retain:
        return "retain"
    return "days" if session.retention_days is not None else "default"


def expires_at(session: Session, default_days: int | None) -> datetime | None:
    """When ``session`` may be deleted; ``None`` if it is kept (retained, no limit, or still going)."""
    if session.retain or session.status in ACTIVE:
        return None
    days = session.retention_days if session.retention_days is not None else default_days
    if days is None:
        return None
    return (session.ended_at or session.created_at) + timedelta(days=days)


async def expired_sessions(
    s: AsyncSession,
    *,
    now: datetime,
    default_days: int | None,
    limit: int,
    exclude: Collection[str] = (),
) -> list[Expired]:
    """Up to ``limit`` sessions past their retention, the longest expired first.

    Portable across SQLite and PostgreSQL: instead of date arithmetic on a column, each distinct
    per-session ``retention_days`` (a handful in practice) gets its own bound cutoff.
    """
    basis = func.coalesce(Session.ended_at, Session.created_at)
    expirable = and_(Session.retain.is_(False), Session.status.not_in(ACTIVE))
    own_days = select(Session.retention_days).where(expirable, Session.retention_days.is_not(None))
    per_session = (await s.execute(own_days.distinct())).scalars().all()
    clauses = [
        and_(Session.retention_days == days, basis < now - timedelta(days=days))
        for days in per_session
        if days is not None
    ]
    if default_days is not None:
        clauses.append(and_(Session.retention_days.is_(None), basis < now - timedelta(days=default_days)))
    if not clauses:
        return []
    query = select(Session.id, Session.user_id).where(expirable, or_(*clauses))
    if exclude:
        query = query.where(Session.id.not_in(list(exclude)))
    rows = (await s.execute(query.order_by(basis, Session.id).limit(limit))).all()
    return [Expired(session_id, user_id) for session_id, user_id in rows]


async def fence_if_expired(
    s: AsyncSession, session_id: str, *, now: datetime, default_days: int | None
) -> bool:
    """In the caller's transaction: lock the row, check the rule again and write the tombstone.

    True when the session is fenced for deletion (now, or already by an unfinished delete, which
    the caller then completes); False when it is gone or no longer expired (kept, started, ...).
    """
    session = (
        await s.execute(select(Session).where(Session.id == session_id).with_for_update())
    ).scalar_one_or_none()
    if session is None:
        return False
    if await s.get(SessionTombstone, session_id) is not None:
        return True
    when = expires_at(session, default_days)
    if when is None or when > now:
        return False
    s.add(SessionTombstone(session_id=session_id))
    return True


async def set_retention(
    s: AsyncSession,
    session: Session,
    *,
    retain: bool | None = None,
    retention_days: int | None | Keep = Keep.UNCHANGED,
    user_hash: str | None = None,
) -> bool:
    """Apply the learner's retention choice, with an audit event (the resulting policy, no content).

    ``retain=None`` and ``retention_days=Keep.UNCHANGED`` leave that part as it is. Returns False,
    changing nothing, when the session is fenced (being deleted).
    """
    if await fenced(s, session.id):
        return False
    if retain is not None:
        session.retain = retain
    if not isinstance(retention_days, Keep):
        session.retention_days = retention_days
    audit.record(s, "session.retention", session_id=session.id, user_hash=user_hash, code=policy(session))
    await s.flush()
    return True
