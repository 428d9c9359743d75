"""Session resources: creation, client secrets, listing, reading, isolation, limits, audit."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import select

from relay.app import build_app
from relay.config import Secret, Settings
from relay.keys import DATABASE, TOKENS
from storage.models import AuditEvent, ClientSecret
from tests.api import problem, signup
from tests.conftest import FAST_PASSWORDS

SESSION_FIELDS = {
    "id", "topic_id", "status", "visibility", "created_at", "started_at", "ended_at", "duration_ms",
    "audio", "rating",
    "retention",  # added by issue #7 (tests/integration/test_retention.py)
    "continued_from",  # added by issue #11 (tests/integration/test_nodes.py)
}  # fmt: skip


async def test_create_session_returns_a_private_session_and_a_client_secret(client: TestClient) -> None:  # type: ignore[type-arg]
    """POST /v1/sessions answers 201 with a private `created` session and a webrtc client secret."""
    learner = await signup(client)
    resp = await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    assert resp.status == 201
    body = await resp.json()
    session, secret = body["session"], body["client_secret"]
    assert set(session) == SESSION_FIELDS
    assert (session["status"], session["visibility"], session["topic_id"]) == (
        "created",
        "private",
        "cafe-order",
    )
    assert session["audio"] == [] and session["rating"] is None and session["continued_from"] is None
    assert session["retention"] == {"retain": False, "retention_days": None, "expires_at": None}
    assert resp.headers["Location"] == f"/v1/sessions/{session['id']}"
    claims = client.app[TOKENS].verify_client_secret(secret["value"], session_id=session["id"])
    assert claims.user_id == learner.id and claims.scope == "webrtc"
    expires = datetime.fromisoformat(secret["expires_at"].replace("Z", "+00:00"))
    assert abs((expires - claims.expires_at).total_seconds()) < 1
    async with client.app[DATABASE].sessions() as s:
        rows = (await s.execute(select(ClientSecret))).scalars().all()
        assert [r.jti for r in rows] == [claims.jti]  # only the jti and expiry are stored
        audit = (await s.execute(select(AuditEvent))).scalars().all()
    assert [(a.event, a.session_id, a.to_status) for a in audit] == [
        ("session.created", session["id"], "created")
    ]
    assert learner.id not in {a.user_hash for a in audit}


async def test_fresh_client_secret_for_an_owned_session(client: TestClient) -> None:  # type: ignore[type-arg]
    """POST /v1/sessions/{id}/client-secret mints a new, different secret for the owner."""
    learner = await signup(client)
    created = await (
        await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    ).json()
    sid = created["session"]["id"]
    resp = await client.post(f"/v1/sessions/{sid}/client-secret", headers=learner.auth)
    assert resp.status == 201
    fresh = await resp.json()
    assert set(fresh) == {"value", "expires_at", "ice_servers"}
    assert fresh["ice_servers"] == []  # no STUN or TURN configured
    assert fresh["value"] != created["client_secret"]["value"]


async def test_client_secrets_carry_a_fresh_turn_credential_when_turn_is_configured(
    migrated_settings: Settings, aiohttp_client: Any
) -> None:
    """With PARLEY_TURN_SECRET/URLS each client secret brings TURN servers with a credential that
    coturn accepts until the TTL, named by a hash of the user (never the id or email)."""
    secret = "coturn-static-auth-secret-0123456789"
    settings = replace(
        migrated_settings,
        turn_secret=Secret(secret),
        turn_urls=("turn:turn.example.org:3478",),
        turn_ttl_s=600,
    )
    client = await aiohttp_client(build_app(settings, passwords=FAST_PASSWORDS))
    learner = await signup(client)
    before = time.time()
    created = await (
        await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    ).json()
    (turn,) = created["client_secret"]["ice_servers"]
    assert turn["urls"] == ["turn:turn.example.org:3478"]
    expiry, label = turn["username"].split(":", 1)
    assert before + 600 <= int(expiry) + 1 <= time.time() + 601
    assert label not in (learner.id, learner.email) and learner.id not in turn["username"]
    expected = hmac.new(secret.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert base64.b64decode(turn["credential"]) == expected


async def test_ended_session_gets_no_client_secret(client: TestClient) -> None:  # type: ignore[type-arg]
    """A session that has ended answers 409 session_ended to a secret request."""
    learner = await signup(client)
    created = await (
        await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    ).json()
    sid = created["session"]["id"]
    from storage.models import Session

    async with client.app[DATABASE].sessions.begin() as s:
        row = await s.get(Session, sid)
        assert row is not None
        row.status = "ended"
    await problem(
        await client.post(f"/v1/sessions/{sid}/client-secret", headers=learner.auth), 409, "session_ended"
    )


async def test_session_schema_errors(client: TestClient) -> None:  # type: ignore[type-arg]
    """Missing or unknown topics answer 422 naming topic_id."""
    learner = await signup(client)
    for body in ({}, {"topic_id": "nope"}, {"topic_id": ""}):
        resp = await client.post("/v1/sessions", json=body, headers=learner.auth)
        assert (await problem(resp, 422, "invalid_request"))["field"] == "topic_id"


async def test_list_is_newest_first_with_a_cursor(client: TestClient) -> None:  # type: ignore[type-arg]
    """GET /v1/sessions pages newest first with limit and cursor, without gaps or repeats."""
    learner = await signup(client)
    made = []
    for _ in range(5):
        body = await (
            await client.post("/v1/sessions", json={"topic_id": "introductions"}, headers=learner.auth)
        ).json()
        made.append(body["session"]["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await (await client.get("/v1/sessions", params=query, headers=learner.auth)).json()
        seen += [x["id"] for x in page["sessions"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made)) and pages == 3
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "ten"}, {"cursor": "garbage!"}):
        resp = await client.get("/v1/sessions", params=bad, headers=learner.auth)
        await problem(resp, 422, "invalid_request")


async def test_another_users_sessions_answer_404_everywhere(client: TestClient) -> None:  # type: ignore[type-arg]
    """Every session endpoint answers the second user 404, exactly as for a session that does not exist."""
    owner, other = await signup(client), await signup(client)
    sid = (
        await (await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=owner.auth)).json()
    )["session"]["id"]
    for path, method in ((f"/v1/sessions/{sid}", "GET"), (f"/v1/sessions/{sid}/client-secret", "POST")):
        theirs = await client.request(method, path, headers=other.auth)
        missing = await client.request(
            method, path.replace(sid, "ses_doesnotexist0000000000"), headers=other.auth
        )
        a, b = await problem(theirs, 404, "not_found"), await problem(missing, 404, "not_found")
        assert a == b
    listing = await (await client.get("/v1/sessions", headers=other.auth)).json()
    assert listing == {"sessions": [], "next_cursor": None}
    assert (await client.get(f"/v1/sessions/{sid}", headers=owner.auth)).status == 200


async def test_session_creation_is_rate_limited_per_user(client: TestClient) -> None:  # type: ignore[type-arg]
    """Past 10 new sessions a minute a user gets 429 with Retry-After; another user is unaffected."""
    learner, other = await signup(client), await signup(client)
    statuses = []
    for _ in range(11):
        resp = await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
        statuses.append(resp.status)
    assert statuses == [201] * 10 + [429]
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert (
        await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=other.auth)
    ).status == 201


async def test_secret_minting_is_rate_limited_per_user(client: TestClient) -> None:  # type: ignore[type-arg]
    """Past 30 client secrets a minute a user gets 429 with Retry-After."""
    learner = await signup(client)
    sid = (
        await (
            await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
        ).json()
    )["session"]["id"]
    results = await asyncio.gather(
        *(client.post(f"/v1/sessions/{sid}/client-secret", headers=learner.auth) for _ in range(30))
    )
    assert sorted(r.status for r in results) == [201] * 29 + [429]  # the creation minted one already


@pytest.mark.parametrize("path", ["/v1/sessions", "/v1/sessions/ses_x", "/v1/me"])
async def test_session_endpoints_need_authentication(client: TestClient, path: str) -> None:  # type: ignore[type-arg]
    """Without a bearer token the session endpoints answer 401."""
    await problem(await client.get(path), 401, "unauthorized")
