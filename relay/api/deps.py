"""What handlers need from a request: the caller, and a key for per-client limits."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession

from relay.errors import Forbidden, NotFound
from relay.keys import AUTHENTICATOR
from relay.security.principals import Principal
from storage import sessions
from storage.models import Session

__all__ = ["client_key", "current_principal", "owned_session", "require_admin"]


async def current_principal(request: web.Request) -> Principal:
    """The authenticated caller; 401 ``unauthorized`` when the credentials are missing or bad."""
    return await request.app[AUTHENTICATOR].authenticate(request.headers.get("Authorization"))


async def require_admin(request: web.Request) -> Principal:
    principal = await current_principal(request)
    if not principal.is_admin:
        raise Forbidden("Only administrators may change topics.")
    return principal


def client_key(request: web.Request) -> str:
    """The peer address, for per-address limits only (kept in memory, never logged)."""
    return request.remote or "unknown"


async def owned_session(s: AsyncSession, session_id: str, user_id: str) -> Session:
    """The caller's session; someone else's answers the same 404 as one that does not exist."""
    session = await sessions.get_owned_session(s, session_id, user_id)
    if session is None:
        raise NotFound("No such session.")
    return session
