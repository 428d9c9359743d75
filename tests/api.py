"""Small helpers for API tests: sign up learners and call the API as them."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient

from storage import sessions
from storage.db import Database
from storage.models import Session, SessionStatus, User

PASSWORD = "correct horse battery"
#: A session that ended is finalized by the job worker moments later (``ended -> processing ->
#: processed``): a test that looks after the end may see any of these.
ENDED_OR_LATER = ("ended", "processing", "processed")


@dataclass
class Learner:
    id: str
    email: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def signup(client: TestClient, email: str | None = None) -> Learner:  # type: ignore[type-arg]
    email = email or f"learner-{secrets.token_hex(4)}@example.org"
    resp = await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return Learner(body["user"]["id"], body["user"]["email"], body["access_token"])


async def problem(resp: Any, status: int, code: str) -> dict[str, Any]:
    """Assert ``resp`` is a problem+json answer with this status and code; return its body."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = await resp.json()
    assert body["code"] == code and body["status"] == status
    return body


async def ended_sessions(db: Database, n: int) -> list[str]:
    """``n`` sessions of a new learner, moved ``live -> ended``: each with its finalize job queued."""
    async with db.sessions.begin() as s:
        user = User(email=f"{secrets.token_hex(6)}@example.org")
        s.add(user)
        await s.flush()
        rows = [Session(user_id=user.id, topic_id="cafe-order", status=SessionStatus.LIVE) for _ in range(n)]
        s.add_all(rows)
        await s.flush()
        for row in rows:
            await sessions.transition(s, row.id, SessionStatus.ENDED, code="learner")
        return [row.id for row in rows]
