"""Export: everything a learner owns, as a zip streamed while it is produced.

``GET /v1/sessions/{id}/export`` (owner only; someone else's session is the same 404 as a missing
one) and ``GET /v1/me/export`` (every session of the caller under ``sessions/<id>/``, plus
``account.json``). One session's layout::

    transcript.json          {"segments": [Segment]}: every stored transcript row, in conversation order
    transcript.vtt           the same as WebVTT
    rating.json              API.md's Rating, when the session was rated
    audio/learner.ogg        each track as one playable Ogg Opus stream (as GET .../audio/{track})
    audio/coach.ogg
    audio/segments/<track>/<seq>.ogg   every committed segment of the manifest, byte for byte
    session.json             the Session, the manifest, "partial", and the SHA-256 of every file above

The segments' SHA-256 in ``session.json`` are computed while streaming and carried next to the ones
the recorder stored at upload (``manifest_sha256``), so the archive can be checked end to end.
``partial`` is true when the session is live, was interrupted, or a track is still recording (or a
listed segment could not be read). The response has no ``Content-Length``: it is sent chunked, and
only one store chunk (64 KiB) is held at a time (see :mod:`relay.api.zipstream`).

An export is fenced like every other writer (DESIGN.md, "Persistence guarantees" 5): a session that
is being deleted is not found (404), an export under way checks the tombstone between files (and
every :data:`FENCE_CHECK_S` within a long one) and is cut as soon as it sees it, and the zip is
*sealed* before its central directory is written: the fence is checked once more under a share lock
on the session row, in the same transaction as the ``session.exported`` audit event. A delete takes
that row's lock to write its tombstone, so either the seal committed first (the export was produced
before the delete began, and only its last few bytes may still be on their way) or the export sees
the tombstone and is cut: a complete zip is never produced from a session being deleted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

from aiohttp import web
from sqlalchemy import select

from relay.api.deps import current_principal, owned_session
from relay.api.problems import abort_started_response
from relay.api.transcripts import to_vtt
from relay.api.views import (
    iso,
    rating_view,
    segment_view,
    session_view,
    topic_summary,
    user_view,
)
from relay.api.zipstream import Digest, ZipStream
from relay.errors import NotFound, StorageError, Unauthorized
from relay.keys import DATABASE, OBJECTS, SETTINGS
from relay.observability.logging import hash_id
from storage import accounts, audit, exports, sessions
from storage.assembly import AssembledTrack, assembled_track
from storage.db import Database
from storage.deletion import fenced
from storage.exports import SessionBundle
from storage.models import Session, utcnow
from storage.objects import ObjectNotFound, ObjectStore, ObjectStoreError

__all__ = ["EXPORT_FORMAT", "routes"]

log = logging.getLogger("relay.api.exports")
routes = web.RouteTableDef()

EXPORT_FORMAT: Final = "parley.session-export/1"
ACCOUNT_FORMAT: Final = "parley.account-export/1"
#: Sessions read per query while exporting an account.
ACCOUNT_PAGE: Final = 50
_STORE_DOWN: Final = "The audio store is unavailable; try again shortly."
#: Within one long file (an hour of audio), the fence is checked again at most this often.
FENCE_CHECK_S: Final = 0.25


class SessionFenced(Exception):
    """A session being exported is being deleted: the export stops and the response is cut."""


class _Fence:
    """Checks that none of ``session_ids`` is being deleted; ``seal`` is the final, locked check."""

    def __init__(self, db: Database, session_ids: Sequence[str] = ()) -> None:
        self._db = db
        self.session_ids = list(session_ids)
        self._checked = 0.0

    async def check(self, *, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._checked < FENCE_CHECK_S:
            return
        async with self._db.sessions() as s:
            for session_id in self.session_ids:
                if await fenced(s, session_id):
                    raise SessionFenced(session_id)
        self._checked = time.monotonic()

    async def seal(self, event: str, *, session_id: str | None, user_hash: str, code: str) -> None:
        """The last check, under a share lock on the session rows, recorded by the export's audit event.

        :func:`storage.deletion.fence` locks the row for update before writing the tombstone, so the
        two serialize: a seal that commits is ordered before the tombstone (and before the delete's
        own audit event), and a seal that waited for a delete sees its tombstone.
        """
        async with self._db.sessions.begin() as s:
            if self.session_ids:
                await s.execute(
                    select(Session.id).where(Session.id.in_(self.session_ids)).with_for_update(read=True)
                )
            for sid in self.session_ids:
                if await fenced(s, sid):
                    raise SessionFenced(sid)
            audit.record(s, event, session_id=session_id, user_hash=user_hash, code=code)

    async def guarded(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            await self.check(force=False)
            yield chunk


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, indent=2).encode("utf-8")


async def _assemble(app: web.Application, bundle: SessionBundle) -> dict[str, AssembledTrack]:
    """The playable stream of each track that has audio (reads the segments once to plan them).

    A track with a listed segment whose object is gone has no playable stream here (the assembly
    needs every segment); its remaining segments are still exported and the gap is declared.
    """
    found: dict[str, AssembledTrack] = {}
    for track in bundle.tracks:
        try:
            audio = await assembled_track(app[DATABASE], app[OBJECTS], bundle.session.id, track)
        except ObjectNotFound:
            log.warning("export.segment_missing", extra={"session_id": bundle.session.id, "track": track})
            continue
        if audio is not None and audio.length > 0:
            found[track] = audio
    return found


async def _first_then_rest(chunks: AsyncIterator[bytes], first: bytes) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in chunks:
        yield chunk


async def _write_session(
    zs: ZipStream,
    prefix: str,
    bundle: SessionBundle,
    assembled: dict[str, AssembledTrack],
    store: ObjectStore,
    fence: _Fence,
    *,
    default_retention_days: int | None,
) -> bool:
    """Write one session's files under ``prefix``; returns its ``partial`` flag.

    Raises :class:`SessionFenced` before any file once ``fence`` sees the session being deleted.
    """
    files: dict[str, Digest] = {}
    segments = [segment_view(row) for row in bundle.segments]
    await fence.check()
    files["transcript.json"] = await zs.add_bytes(f"{prefix}transcript.json", _json({"segments": segments}))
    files["transcript.vtt"] = await zs.add_bytes(f"{prefix}transcript.vtt", to_vtt(segments).encode())
    if bundle.rating is not None and bundle.rating.status == "done":
        files["rating.json"] = await zs.add_bytes(f"{prefix}rating.json", _json(rating_view(bundle.rating)))
    for track, audio in assembled.items():
        name = f"audio/{track}.ogg"
        await fence.check()
        files[name] = await zs.add_stream(f"{prefix}{name}", fence.guarded(audio.read(0)), size=audio.length)
    reasons = exports.partial_reasons(bundle)
    recordings: list[dict[str, Any]] = []
    for track, tb in bundle.tracks.items():
        listed: list[dict[str, Any]] = []
        for chunk in tb.chunks:
            name = f"audio/segments/{track}/{chunk.seq:06d}.ogg"
            entry: dict[str, Any] = {
                "seq": chunk.seq,
                "start_ms": chunk.start_ms,
                "duration_ms": chunk.duration_ms,
                "manifest_sha256": chunk.sha256,
                "manifest_size": chunk.size_bytes,
            }
            await fence.check()
            data = store.get(chunk.object_key)
            try:
                first = await anext(data, b"")
            except ObjectNotFound:  # listed but gone: say so instead of failing the whole export
                entry["missing"] = True
                listed.append(entry)
                if "segments_missing" not in reasons:
                    reasons.append("segments_missing")
                continue
            digest = await zs.add_stream(
                f"{prefix}{name}", _first_then_rest(data, first), size=chunk.size_bytes
            )
            files[name] = digest
            entry.update(path=name, sha256=digest.sha256, size=digest.size)
            listed.append(entry)
        rec = tb.recording
        recordings.append(
            {
                "track": track,
                "format": rec.format,
                "sample_rate": rec.sample_rate,
                "channels": rec.channels,
                "status": rec.status,
                "duration_ms": rec.duration_ms,
                "lost_ms": rec.lost_ms,
                "assembled": f"audio/{track}.ogg" if track in assembled else None,
                "segments": listed,
                "gaps": [{"start_ms": g.start_ms, "end_ms": g.end_ms, "reason": g.reason} for g in tb.gaps],
            }
        )
    session = bundle.session
    view = session_view(
        session,
        [tb.recording for tb in bundle.tracks.values()],
        default_retention_days=default_retention_days,
    )
    if bundle.rating is not None:
        view["rating"] = rating_view(bundle.rating)
    await fence.check()
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "exported_at": iso(utcnow()),
        "partial": bool(reasons),
        "partial_reasons": reasons,
        "session": view,
        "topic": topic_summary(bundle.topic) if bundle.topic is not None else None,
        "publication": (
            {"slug": session.public_slug, "published_at": iso(session.published_at)}
            if session.visibility == "public" and session.public_slug
            else None
        ),
        "transcript": {"segments": len(segments)},
        "recordings": recordings,
        "files": {name: {"sha256": d.sha256, "size": d.size} for name, d in files.items()},
    }
    await zs.add_bytes(f"{prefix}session.json", _json(manifest))
    return bool(reasons)


def _zip_response(filename: str) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    response.content_type = "application/zip"
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # No Content-Length: aiohttp sends HTTP/1.1 chunked (HTTP/1.0: the body ends with the connection).
    return response


@routes.get("/v1/sessions/{session_id}/export", allow_head=False)
async def export_session(request: web.Request) -> web.StreamResponse:
    """200 ``application/zip`` of one session (see the module docstring for the layout)."""
    principal = await current_principal(request)
    db = request.app[DATABASE]
    async with db.sessions() as s:
        session = await owned_session(s, request.match_info["session_id"], principal.user_id)
        if await fenced(s, session.id):  # being deleted: gone, as it will be in a moment
            raise NotFound("No such session.")
        bundle = await exports.load_bundle(s, session)
    fence = _Fence(db, [session.id])
    try:  # planned before the first byte, so a store outage is still an honest 503
        assembled = await _assemble(request.app, bundle)
        await fence.check()
    except ObjectStoreError as exc:
        raise StorageError(_STORE_DOWN) from exc
    except SessionFenced:
        raise NotFound("No such session.") from None
    response = _zip_response(f"parley-session-{session.id}.zip")
    await response.prepare(request)
    zs = ZipStream(response)
    user_hash = hash_id(principal.user_id)
    try:
        partial = await _write_session(
            zs, "", bundle, assembled, request.app[OBJECTS], fence,
            default_retention_days=request.app[SETTINGS].retention_days,
        )  # fmt: skip
        outcome = "partial" if partial else "complete"
        await fence.seal("session.exported", session_id=session.id, user_hash=user_hash, code=outcome)
        await zs.finish()
    except SessionFenced:
        log.info("export.fenced", extra={"session_id": session.id, "kind": "session"})
        zs.discard()
        abort_started_response(request)
        return response
    except Exception as exc:  # a failing store mid-stream: expected, so its class, not its text
        log.warning(
            "export.aborted",
            extra={"session_id": session.id, "kind": "session", "error_type": type(exc).__name__},
        )
        zs.discard()
        abort_started_response(request)
        return response
    log.info("export.done", extra={"session_id": session.id, "outcome": outcome, "bytes": zs.bytes_sent})
    return response


@routes.get("/v1/me/export", allow_head=False)
async def export_account(request: web.Request) -> web.StreamResponse:
    """200 ``application/zip``: ``account.json`` and every session of the caller under ``sessions/<id>/``."""
    principal = await current_principal(request)
    async with request.app[DATABASE].sessions() as s:
        user = await accounts.get_user(s, principal.user_id)
    if user is None:
        raise Unauthorized("Missing or invalid credentials.")
    response = _zip_response("parley-account.zip")
    await response.prepare(request)
    zs = ZipStream(response)
    exported: list[dict[str, Any]] = []
    # Every session written so far stays fenced-checked: one deleted meanwhile cuts the export.
    fence = _Fence(request.app[DATABASE])
    try:
        cursor: str | None = None
        while True:
            async with request.app[DATABASE].sessions() as s:
                page = await sessions.list_owned_sessions(
                    s, principal.user_id, limit=ACCOUNT_PAGE, cursor=cursor
                )
            for listed in page.sessions:
                # One session at a time: its rows and track plans are dropped before the next is read.
                async with request.app[DATABASE].sessions() as s:
                    session = await sessions.get_owned_session(s, listed.id, principal.user_id)
                    if session is None or await fenced(s, listed.id):  # deleted meanwhile
                        continue
                    bundle = await exports.load_bundle(s, session)
                fence.session_ids.append(session.id)
                assembled = await _assemble(request.app, bundle)
                prefix = f"sessions/{session.id}/"
                partial = await _write_session(
                    zs, prefix, bundle, assembled, request.app[OBJECTS], fence,
                    default_retention_days=request.app[SETTINGS].retention_days,
                )  # fmt: skip
                exported.append({"id": session.id, "path": prefix, "partial": partial})
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        account = {
            "format": ACCOUNT_FORMAT,
            "exported_at": iso(utcnow()),
            "user": user_view(user),
            "sessions": exported,
        }
        await zs.add_bytes("account.json", _json(account))
        await fence.seal("account.exported", session_id=None, user_hash=hash_id(principal.user_id),
                         code="complete")  # fmt: skip
        await zs.finish()
    except SessionFenced as exc:
        log.info("export.fenced", extra={"session_id": str(exc), "kind": "account"})
        zs.discard()
        abort_started_response(request)
        return response
    except Exception as exc:
        log.warning(
            "export.aborted",
            extra={"kind": "account", "count": len(exported), "error_type": type(exc).__name__},
        )
        zs.discard()
        abort_started_response(request)
        return response
    log.info("export.done", extra={"kind": "account", "sessions": len(exported), "bytes": zs.bytes_sent})
    return response
