"""Integration API keys: stored by hash only, scoped to their owner, revocable."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Final

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ApiKey, utcnow

__all__ = [
    "MAX_KEYS_PER_USER",
    "TOUCH_EVERY",
    "count_keys",
    "create_key",
    "find_by_hash",
    "list_keys",
    "revoke_key",
    "touch",
]

#: A user's live keys; a leaked-key clean-up is easier to reason about with a bound.
MAX_KEYS_PER_USER: Final = 50
#: ``last_used_at`` is written at most this often per key: a socket client authenticating many
#: times a second must not turn every request into a write.
TOUCH_EVERY: Final = timedelta(minutes=1)


async def create_key(s: AsyncSession, user_id: str, name: str, key_hash: str) -> ApiKey:
    row = ApiKey(user_id=user_id, name=name, key_hash=key_hash)
    s.add(row)
    await s.flush()
    return row


async def count_keys(s: AsyncSession, user_id: str) -> int:
    return (
        await s.execute(select(func.count()).select_from(ApiKey).where(ApiKey.user_id == user_id))
    ).scalar_one()


async def list_keys(s: AsyncSession, user_id: str) -> Sequence[ApiKey]:
    """The user's keys, newest first (never the key: only its name, id and times)."""
    rows = await s.execute(
        select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at.desc(), ApiKey.id)
    )
    return rows.scalars().all()


async def revoke_key(s: AsyncSession, key_id: str, user_id: str) -> bool:
    """Delete the user's key; False when there is none by that id *for this user*."""
    result = await s.execute(delete(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id))
    return bool(getattr(result, "rowcount", 0))


async def find_by_hash(s: AsyncSession, key_hash: str) -> ApiKey | None:
    return (await s.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))).scalar_one_or_none()


async def touch(s: AsyncSession, key: ApiKey) -> None:
    """Record a use, unless one was recorded within :data:`TOUCH_EVERY`."""
    now = utcnow()
    await s.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key.id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - TOUCH_EVERY)
        )
        .values(last_used_at=now)
    )
