"""Publishing on purpose: two-step confirmation, refusal of bad tokens, withdrawal, the public view.

Every test runs on SQLite + the local object store and on PostgreSQL + S3 (``both_client``).
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select, update

from relay.keys import DATABASE, SETTINGS, TOKENS
from relay.security.tokens import TokenService
from storage.models import AuditEvent, ClientSecret, Session, utcnow
from tests.api import Learner, problem, signup
from tests.integration.recorded import PLANTED, finished_session, new_session, set_status

Client = TestClient[web.Request, web.Application]


async def ask(client: Client, learner: Learner, sid: str) -> dict[str, Any]:
    resp = await client.post(f"/v1/sessions/{sid}/publication", json={}, headers=learner.auth)
    assert resp.status == 202, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def confirm(client: Client, learner: Learner, sid: str, token: str) -> Any:
    return await client.post(
        f"/v1/sessions/{sid}/publication", json={"confirmation_token": token}, headers=learner.auth
    )


async def publish(client: Client, learner: Learner, sid: str) -> dict[str, Any]:
    token = (await ask(client, learner, sid))["confirmation_token"]
    resp = await confirm(client, learner, sid, token)
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def stored(client: Client, sid: str) -> Session:
    async with client.app[DATABASE].sessions() as s:
        row = await s.get(Session, sid)
    assert row is not None
    return row


async def assert_private(client: Client, learner: Learner, sid: str) -> None:
    view = await (await client.get(f"/v1/sessions/{sid}", headers=learner.auth)).json()
    assert view["visibility"] == "private"
    row = await stored(client, sid)
    assert (row.visibility, row.public_slug, row.published_at) == ("private", None, None)


async def test_publish_without_confirmation_publishes_nothing(both_client: Client, tmp_path: Path) -> None:
    """POST {} answers 202 confirmation_required with a token and expiry; the session stays private."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")
    body = await ask(both_client, learner, sid)
    assert body["code"] == "confirmation_required"
    assert set(body) == {"code", "confirmation_token", "expires_at"}
    assert body["expires_at"].endswith("Z")
    await assert_private(both_client, learner, sid)
    async with both_client.app[DATABASE].sessions() as s:
        secrets_ = (
            await s.execute(select(ClientSecret).where(ClientSecret.scope == "publication"))
        ).scalars()
        stored_jtis = [row.jti for row in secrets_]
        events = [e.event for e in (await s.execute(select(AuditEvent))).scalars()]
    assert len(stored_jtis) == 1 and body["confirmation_token"] not in stored_jtis  # only the jti
    assert "session.publication_requested" in events and "session.published" not in events


async def test_confirmed_publication_is_public_with_an_unguessable_slug(
    both_client: Client, tmp_path: Path
) -> None:
    """The token publishes: 201 slug and url; the session reads public; slugs are long and random."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")
    body = await publish(both_client, learner, sid)
    slug = body["slug"]
    assert set(body) == {"slug", "url"} and body["url"] == f"/p/{slug}"
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", slug) and sid not in slug
    view = await (await both_client.get(f"/v1/sessions/{sid}", headers=learner.auth)).json()
    assert view["visibility"] == "public"
    resp = await both_client.get(f"/v1/public/{slug}")
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    # A second session gets a different slug.
    other, _ = await finished_session(both_client, learner, tmp_path / "spool2", coach_ms=0)
    assert (await publish(both_client, learner, other))["slug"] != slug


async def test_public_view_shows_topic_transcript_and_audio_but_no_owner(
    both_client: Client, tmp_path: Path
) -> None:
    """GET /v1/public/{slug} needs no auth and holds no email, user id, session id or row ids."""
    learner = await signup(both_client)
    sid, row_ids = await finished_session(both_client, learner, tmp_path / "spool")
    slug = (await publish(both_client, learner, sid))["slug"]

    resp = await both_client.get(f"/v1/public/{slug}")
    assert resp.status == 200
    raw = await resp.text()
    body = await resp.json()
    assert set(body) >= {"session", "segments", "audio_urls"}
    for secret in (learner.email, learner.id, sid, *row_ids, "item_l1", "item_c1"):
        assert secret not in raw, secret
    session = body["session"]
    assert session["id"] == slug and session["visibility"] == "public" and session["topic_id"] == "cafe-order"
    assert session["created_at"] is None and session["rating"] is None
    assert {a["track"] for a in session["audio"]} == {"learner", "coach"}
    assert body["topic"]["title"] == "Ordering at a café"
    # Final segments only, in conversation order, each with the API.md Segment fields.
    assert [s["text"] for s in body["segments"]] == ["A coffee, please", PLANTED]
    assert set(body["segments"][0]) == {"id", "speaker", "text", "start_ms", "end_ms", "final"}
    assert set(body["audio_urls"]) == {"learner", "coach"}

    # The public audio is served with Range, like the owner's.
    owner_audio = await (
        await both_client.get(f"/v1/sessions/{sid}/audio/learner", headers=learner.auth)
    ).read()
    audio_url = body["audio_urls"]["learner"]
    assert sid not in audio_url
    whole = await both_client.get(audio_url)
    assert whole.status == 200 and whole.headers["Content-Type"] == "audio/ogg"
    assert await whole.read() == owner_audio
    part = await both_client.get(audio_url, headers={"Range": "bytes=10-99"})
    assert part.status == 206 and await part.read() == owner_audio[10:100]


async def test_public_page_escapes_text_and_hides_the_owner(both_client: Client, tmp_path: Path) -> None:
    """/p/{slug} is HTML with the topic, escaped transcript and audio; no script, no email or ids."""
    learner = await signup(both_client)
    sid, row_ids = await finished_session(both_client, learner, tmp_path / "spool")
    slug = (await publish(both_client, learner, sid))["slug"]
    resp = await both_client.get(f"/p/{slug}")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert "Ordering at a café" in page
    assert "A coffee, please" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page and "<b>" not in page
    assert f'src="/v1/public/{slug}/audio/learner"' in page
    for secret in (learner.email, learner.id, sid, *row_ids):
        assert secret not in page
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert resp.headers["Cache-Control"] == "no-store"


async def test_wrong_token_is_refused_and_publishes_nothing(both_client: Client, tmp_path: Path) -> None:
    """Garbage, an access token, and another session's token answer 422 confirmation_invalid."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")
    other_sid, _ = await finished_session(both_client, learner, tmp_path / "spool2", coach_ms=0)
    other_token = (await ask(both_client, learner, other_sid))["confirmation_token"]
    await ask(both_client, learner, sid)
    for token in ("not-a-token", learner.token, other_token, "x" * 9000):
        resp = await confirm(both_client, learner, sid, token)
        if len(token) > 8192:
            await problem(resp, 422, "invalid_request")  # over the schema's limit
            continue
        body = await problem(resp, 422, "confirmation_invalid")
        assert token not in body["detail"]
    await assert_private(both_client, learner, sid)
    # The other session's token was not used up by being tried against this one.
    assert (await confirm(both_client, learner, other_sid, other_token)).status == 201


async def test_another_users_token_is_refused(both_client: Client, tmp_path: Path) -> None:
    """A token minted for someone else (same session id in it) is not the owner's confirmation."""
    owner, intruder = await signup(both_client), await signup(both_client)
    sid, _ = await finished_session(both_client, owner, tmp_path / "spool")
    forged, claims = both_client.app[TOKENS].mint_publication_confirmation(intruder.id, sid)
    async with both_client.app[DATABASE].sessions.begin() as s:
        s.add(ClientSecret(jti=claims.jti, session_id=sid, scope="publication", expires_at=claims.expires_at))
    await problem(await confirm(both_client, owner, sid, forged), 422, "confirmation_invalid")
    # And the intruder cannot even reach the session.
    await problem(await confirm(both_client, intruder, sid, forged), 404, "not_found")
    await assert_private(both_client, owner, sid)


async def test_used_token_is_refused(both_client: Client, tmp_path: Path) -> None:
    """A token publishes once; used again (after a withdrawal, or racing itself) it answers 422."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")
    token = (await ask(both_client, learner, sid))["confirmation_token"]
    assert (await confirm(both_client, learner, sid, token)).status == 201
    assert (await both_client.delete(f"/v1/sessions/{sid}/publication", headers=learner.auth)).status == 204
    await problem(await confirm(both_client, learner, sid, token), 422, "confirmation_invalid")
    await assert_private(both_client, learner, sid)
    # Two requests racing with one token: exactly one publishes.
    token = (await ask(both_client, learner, sid))["confirmation_token"]
    raced = await asyncio.gather(*(confirm(both_client, learner, sid, token) for _ in range(2)))
    assert sorted(r.status for r in raced) == [201, 422]


async def test_expired_token_is_refused(both_client: Client, tmp_path: Path) -> None:
    """A token past its stored expiry, or whose signed expiry has lapsed, answers 422; nothing published."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")

    # 1. Signed expiry still ahead, stored expiry passed.
    token = (await ask(both_client, learner, sid))["confirmation_token"]
    async with both_client.app[DATABASE].sessions.begin() as s:
        await s.execute(
            update(ClientSecret)
            .where(ClientSecret.scope == "publication")
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    await problem(await confirm(both_client, learner, sid, token), 422, "confirmation_invalid")

    # 2. Stored expiry ahead, signed expiry lapsed (minted an hour ago with the app's own key).
    past = TokenService(both_client.app[SETTINGS].secret_key, clock=lambda: time.time() - 3600)
    stale, claims = past.mint_publication_confirmation(learner.id, sid)
    async with both_client.app[DATABASE].sessions.begin() as s:
        s.add(
            ClientSecret(
                jti=claims.jti,
                session_id=sid,
                scope="publication",
                expires_at=utcnow() + timedelta(minutes=5),
            )
        )
    await problem(await confirm(both_client, learner, sid, stale), 422, "confirmation_invalid")
    await assert_private(both_client, learner, sid)


async def test_live_or_unfinalized_session_cannot_be_published(both_client: Client, tmp_path: Path) -> None:
    """Live states, a session never started, and a track still recording answer 409; no token, no slug."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")
    token = (await ask(both_client, learner, sid))["confirmation_token"]  # asked while it was ended
    for status in ("created", "connecting", "live", "reconnecting", "ending", "failed"):
        await set_status(both_client, sid, status)
        resp = await both_client.post(f"/v1/sessions/{sid}/publication", json={}, headers=learner.auth)
        await problem(resp, 409, "session_not_finalized")
        await problem(await confirm(both_client, learner, sid, token), 409, "session_not_finalized")
    await set_status(both_client, sid, "ended", recording_status="recording")
    await problem(await confirm(both_client, learner, sid, token), 409, "session_not_finalized")
    await assert_private(both_client, learner, sid)
    # A fresh session with nothing recorded yet is refused too.
    fresh = await new_session(both_client, learner)
    await problem(
        await both_client.post(f"/v1/sessions/{fresh}/publication", json={}, headers=learner.auth),
        409,
        "session_not_finalized",
    )
    # Once finalized, the token asked for earlier (still unused) publishes.
    await set_status(both_client, sid, "processed", recording_status="complete")
    assert (await confirm(both_client, learner, sid, token)).status == 201


async def test_unpublish_is_immediate(both_client: Client, tmp_path: Path) -> None:
    """After DELETE the JSON view, page and audio answer 404 at once; publishing again gives a new slug."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool")
    slug = (await publish(both_client, learner, sid))["slug"]
    urls = [f"/v1/public/{slug}", f"/p/{slug}", f"/v1/public/{slug}/audio/learner"]
    for url in urls:
        assert (await both_client.get(url)).status == 200, url
    pending = (await ask(both_client, learner, sid))["confirmation_token"]

    resp = await both_client.delete(f"/v1/sessions/{sid}/publication", headers=learner.auth)
    assert resp.status == 204
    await problem(await both_client.get(urls[0]), 404, "not_found")
    assert (await both_client.get(urls[1])).status == 404
    await problem(await both_client.get(urls[2]), 404, "not_found")
    await assert_private(both_client, learner, sid)
    # A confirmation asked for before the withdrawal is void.
    await problem(await confirm(both_client, learner, sid, pending), 422, "confirmation_invalid")
    # Withdrawing again is harmless.
    assert (await both_client.delete(f"/v1/sessions/{sid}/publication", headers=learner.auth)).status == 204

    again = (await publish(both_client, learner, sid))["slug"]
    assert again != slug
    assert (await both_client.get(f"/v1/public/{slug}")).status == 404
    assert (await both_client.get(f"/v1/public/{again}")).status == 200


async def test_publication_is_owner_only_and_audited_without_content(
    both_client: Client, tmp_path: Path
) -> None:
    """Someone else gets 404 for every publication call, no auth 401; audit rows hold no slug or token."""
    owner, other = await signup(both_client), await signup(both_client)
    sid, _ = await finished_session(both_client, owner, tmp_path / "spool")
    path = f"/v1/sessions/{sid}/publication"
    await problem(await both_client.post(path, json={}, headers=other.auth), 404, "not_found")
    await problem(await both_client.delete(path, headers=other.auth), 404, "not_found")
    await problem(await both_client.post(path, json={}), 401, "unauthorized")
    await problem(await both_client.delete(path), 401, "unauthorized")
    await problem(await both_client.get("/v1/public/not-a-published-slug-at-all"), 404, "not_found")
    await problem(await both_client.get("/v1/public/..%2F..%2Fetc"), 404, "not_found")

    token = (await ask(both_client, owner, sid))["confirmation_token"]
    slug = (await (await confirm(both_client, owner, sid, token)).json())["slug"]
    assert (await both_client.delete(path, headers=owner.auth)).status == 204
    async with both_client.app[DATABASE].sessions() as s:
        events = (await s.execute(select(AuditEvent).order_by(AuditEvent.id))).scalars().all()
    mine = [e.event for e in events if e.session_id == sid and e.event.startswith("session.publ")]
    assert mine == ["session.publication_requested", "session.published"]
    assert [e.event for e in events if e.event == "session.unpublished"] == ["session.unpublished"]
    for e in events:
        fields = " ".join(str(v) for v in (e.event, e.user_hash, e.from_status, e.to_status, e.code))
        for secret in (slug, token, owner.email, owner.id):
            assert secret not in fields
