"""Publishing on purpose: a two-step opt-in, withdrawal, and the public read side.

``POST /v1/sessions/{id}/publication`` with ``{}`` publishes nothing: it answers 202 with a
short-lived, single-use confirmation token (a JWT bound to the user and the session, whose ``jti``
alone is stored). Only the same request with ``{"confirmation_token"}`` publishes; a wrong, used or
expired token is 422 ``confirmation_invalid``. A session still going, or whose recording is not
finalized, is 409 ``session_not_finalized``. ``DELETE`` makes it private again at once.

Anyone with the slug may read ``GET /v1/public/{slug}`` (JSON), ``/v1/public/{slug}/audio/{track}``
and the page ``/p/{slug}``: the topic, the transcript and the audio, nothing that names the owner
(no email, no user or session id; ``id`` fields are the slug and transcript positions). Public
answers are ``Cache-Control: no-store``, so a withdrawn session is not served from a cache either.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from pydantic import Field

from relay.api.body import Schema, read_json
from relay.api.deps import current_principal, owned_session
from relay.api.recordings import TRACKS, serve_track
from relay.api.views import iso, public_segment_view, public_session_view, topic_summary
from relay.errors import BadRequest, Conflict, NotFound
from relay.keys import DATABASE, TOKENS
from relay.observability.logging import hash_id
from relay.security.tokens import MAX_TOKEN_BYTES, TokenError
from storage import publication, sessions, topics
from storage.models import AudioRecording, Session, Topic, TranscriptSegment

__all__ = ["public_audio_url", "public_page_url", "routes"]

log = logging.getLogger("relay.api.publication")
routes = web.RouteTableDef()

PUBLIC_NOT_FOUND: Final = "Nothing is published under this link."
CONFIRMATION_INVALID: Final = "The confirmation token is wrong, used or expired; ask for a new one."
# What secrets.token_urlsafe produces; anything else is answered 404 without a database round trip.
_SLUG: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")
_PUBLIC_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class PublicationRequest(Schema):
    confirmation_token: str | None = Field(default=None, min_length=1, max_length=MAX_TOKEN_BYTES)


def public_page_url(slug: str) -> str:
    return f"/p/{slug}"


def public_audio_url(slug: str, track: str) -> str:
    return f"/v1/public/{slug}/audio/{track}"


@routes.post("/v1/sessions/{session_id}/publication")
async def request_publication(request: web.Request) -> web.Response:
    """202 and a confirmation token for ``{}``; 201 ``{"slug", "url"}`` for a valid token."""
    principal = await current_principal(request)
    body = await read_json(request, PublicationRequest)
    user_hash = hash_id(principal.user_id)
    tokens = request.app[TOKENS]
    async with request.app[DATABASE].sessions.begin() as s:
        session = await owned_session(s, request.match_info["session_id"], principal.user_id)
        reason = await publication.not_publishable_reason(s, session)
        if reason is not None:
            raise Conflict(
                f"Only a finished session can be published ({reason}).", code="session_not_finalized"
            )
        if body.confirmation_token is None:
            token, claims = tokens.mint_publication_confirmation(principal.user_id, session.id)
            await publication.record_confirmation(
                s, jti=claims.jti, session_id=session.id, expires_at=claims.expires_at, user_hash=user_hash
            )
            log.info("publication.requested", extra={"session_id": session.id, "user": user_hash})
            return web.json_response(
                {
                    "code": "confirmation_required",
                    "confirmation_token": token,
                    "expires_at": iso(claims.expires_at),
                },
                status=202,
                headers={"Cache-Control": "no-store"},
            )
        try:
            confirmed = tokens.verify_publication_confirmation(
                body.confirmation_token, user_id=principal.user_id, session_id=session.id
            )
        except TokenError as exc:
            log.info("publication.refused", extra={"session_id": session.id, "reason": exc.reason})
            raise BadRequest(CONFIRMATION_INVALID, code="confirmation_invalid") from None
        if not await publication.redeem_confirmation(s, jti=confirmed.jti, session_id=session.id):
            log.info("publication.refused", extra={"session_id": session.id, "reason": "redeemed"})
            raise BadRequest(CONFIRMATION_INVALID, code="confirmation_invalid")
        slug = await publication.publish(s, session.id, user_hash=user_hash)
    log.info("publication.published", extra={"session_id": session.id, "user": user_hash})
    return web.json_response(
        {"slug": slug, "url": public_page_url(slug)}, status=201, headers={"Cache-Control": "no-store"}
    )


@routes.delete("/v1/sessions/{session_id}/publication")
async def withdraw_publication(request: web.Request) -> web.Response:
    """204: the session is private from this moment; its public link answers 404 from now on."""
    principal = await current_principal(request)
    user_hash = hash_id(principal.user_id)
    async with request.app[DATABASE].sessions.begin() as s:
        session = await owned_session(s, request.match_info["session_id"], principal.user_id)
        was_public = await publication.unpublish(s, session.id, user_hash=user_hash)
    if was_public:
        log.info("publication.withdrawn", extra={"session_id": session.id, "user": user_hash})
    return web.Response(status=204)


@dataclass(frozen=True, slots=True)
class _Published:
    session: Session
    slug: str
    topic: Topic | None
    recordings: Sequence[AudioRecording]
    segments: Sequence[TranscriptSegment]
    tracks: Sequence[str]


async def _published(request: web.Request, *, content: bool) -> _Published:
    slug = request.match_info["slug"]
    if not _SLUG.fullmatch(slug):
        raise NotFound(PUBLIC_NOT_FOUND)
    async with request.app[DATABASE].sessions() as s:
        session = await publication.published_session(s, slug)
        if session is None:
            raise NotFound(PUBLIC_NOT_FOUND)
        if not content:
            return _Published(session, slug, None, (), (), ())
        topic = await topics.get_topic(s, session.topic_id, include_retired=True)
        recordings = (await sessions.recordings(s, [session.id])).get(session.id, [])
        rows = [row for row in await sessions.transcript_segments(s, session.id) if row.final]
        tracks = await publication.tracks_with_audio(s, session.id)
    return _Published(session, slug, topic, recordings, rows, tracks)


def _public_json(p: _Published) -> dict[str, Any]:
    return {
        "session": public_session_view(p.session, p.slug, p.recordings),
        "segments": [public_segment_view(row, n) for n, row in enumerate(p.segments, start=1)],
        "audio_urls": {track: public_audio_url(p.slug, track) for track in p.tracks},
        "topic": topic_summary(p.topic) if p.topic is not None else None,
        "url": public_page_url(p.slug),
    }


@routes.get("/v1/public/{slug}")
async def public_session(request: web.Request) -> web.Response:
    """200 the published session's topic, transcript and audio URLs; 404 when not published."""
    published = await _published(request, content=True)
    return web.json_response(_public_json(published), headers=_PUBLIC_HEADERS)


@routes.get("/v1/public/{slug}/audio/{track}")
async def public_audio(request: web.Request) -> web.StreamResponse:
    """One track of a published session, honouring ``Range``; 404 once it is private again."""
    published = await _published(request, content=False)
    track = request.match_info["track"]
    if track not in TRACKS:
        raise NotFound(PUBLIC_NOT_FOUND)
    return await serve_track(request, published.session.id, track, cache_control="no-store")


# --------------------------------------------------------------------------------------------------
# The public page: server-rendered, no script, every text HTML-escaped.

_STYLE: Final = (
    "body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#fafafa;color:#222}"
    "main{max-width:42rem;margin:0 auto;padding:1.5rem}"
    "h1{font-size:1.5rem;margin:0 0 .25rem}.meta{color:#666;margin:0 0 1rem}"
    "audio{width:100%;margin:.25rem 0 1rem}ol{list-style:none;padding:0}"
    "li{margin:.5rem 0;padding:.5rem .75rem;border-radius:.5rem;background:#fff}"
    "li.coach{background:#eef4ff}.who{font-weight:600;margin-right:.5rem}.at{color:#888;font-size:.85em}"
)
_STYLE_HASH: Final = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
_PAGE_HEADERS: Final = {
    **_PUBLIC_HEADERS,
    "Content-Security-Policy": (
        f"default-src 'none'; media-src 'self'; style-src 'sha256-{_STYLE_HASH}'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}
_SPEAKERS: Final = {"learner": "Learner", "coach": "Coach"}


def _clock(ms: int) -> str:
    minutes, seconds = divmod(max(ms, 0) // 1000, 60)
    return f"{minutes}:{seconds:02d}"


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} · Parley</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def render_page(p: _Published) -> str:
    """The public page of a published session; every value from storage is escaped."""
    e = html.escape
    title = p.topic.title if p.topic is not None else "Practice session"
    meta = [p.topic.difficulty] if p.topic is not None else []
    if p.session.duration_ms:
        meta.append(_clock(p.session.duration_ms))
    parts = [f"<h1>{e(title)}</h1>", f'<p class="meta">{e(" · ".join(meta))}</p>']
    for track in p.tracks:
        parts.append(
            f"<h2>{e(_SPEAKERS.get(track, track))}</h2>"
            f'<audio controls preload="none" src="{e(public_audio_url(p.slug, track))}"></audio>'
        )
    parts.append("<ol>")
    for row in p.segments:
        speaker = row.speaker if row.speaker in _SPEAKERS else "learner"
        parts.append(
            f'<li class="{speaker}"><span class="who">{_SPEAKERS[speaker]}</span>'
            f'<span class="at">{_clock(row.start_ms)}</span><br>{e(row.text)}</li>'
        )
    parts.append("</ol>")
    return _page(title, "".join(parts))


@routes.get("/p/{slug}")
async def public_page(request: web.Request) -> web.Response:
    """The published session as a small HTML page; a plain 404 page once it is private again."""
    try:
        published = await _published(request, content=True)
    except NotFound:
        body = _page("Not found", f"<h1>Not found</h1><p>{html.escape(PUBLIC_NOT_FOUND)}</p>")
        return web.Response(status=404, text=body, content_type="text/html", headers=_PAGE_HEADERS)
    return web.Response(text=render_page(published), content_type="text/html", headers=_PAGE_HEADERS)
