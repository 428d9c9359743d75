"""The audit trail: lifecycle facts (ids, states, codes), never content."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import AuditEvent

__all__ = ["record"]


def record(
    s: AsyncSession,
    event: str,
    *,
    session_id: str | None = None,
    user_hash: str | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    code: str | None = None,
) -> None:
    """Add an audit row to the caller's unit of work (committed, or not, with it)."""
    s.add(
        AuditEvent(
            event=event,
            session_id=session_id,
            user_hash=user_hash,
            from_status=from_status,
            to_status=to_status,
            code=code,
        )
    )
