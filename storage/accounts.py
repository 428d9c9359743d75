"""Users and their identities (built-in email accounts and OIDC subjects)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import User

__all__ = ["EmailTaken", "create_user", "get_user", "get_user_by_email", "create_oidc_user", "get_oidc_user"]


class EmailTaken(Exception):
    """Another account already uses this (normalised) email."""


async def create_user(s: AsyncSession, email: str, password_hash: str) -> User:
    """Insert a built-in account; raises :class:`EmailTaken` (the unique index decides, race-free).

    After :class:`EmailTaken` the unit of work is spoilt; the caller's transaction rolls back.
    """
    user = User(email=email, password_hash=password_hash)
    s.add(user)
    try:
        await s.flush()
    except IntegrityError:
        raise EmailTaken from None
    return user


async def get_user(s: AsyncSession, user_id: str) -> User | None:
    return await s.get(User, user_id)


async def get_user_by_email(s: AsyncSession, email: str) -> User | None:
    return (await s.execute(select(User).where(User.email == email))).scalar_one_or_none()


async def get_oidc_user(s: AsyncSession, issuer: str, subject: str) -> User | None:
    query = select(User).where(User.oidc_issuer == issuer, User.oidc_subject == subject)
    return (await s.execute(query)).scalar_one_or_none()


async def create_oidc_user(s: AsyncSession, issuer: str, subject: str) -> User:
    """Insert the user for issuer + subject; raises IntegrityError if a concurrent first sight won."""
    user = User(oidc_issuer=issuer, oidc_subject=subject)
    s.add(user)
    await s.flush()
    return user
