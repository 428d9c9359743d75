"""A session's recorded audio: one Ogg Opus stream per track, owner only, honouring ``Range``."""

from __future__ import annotations

import logging
import re
from typing import Final

from aiohttp import web

from relay.api.deps import current_principal
from relay.api.problems import abort_started_response, problem
from relay.errors import NotFound, StorageError
from relay.keys import DATABASE, OBJECTS
from storage import sessions
from storage.assembly import AssembledTrack, assembled_track
from storage.objects import ObjectStoreError

__all__ = ["TRACKS", "parse_range", "routes", "serve_track"]

log = logging.getLogger("relay.api.recordings")
routes = web.RouteTableDef()

TRACKS: Final = frozenset({"learner", "coach"})
NOT_FOUND: Final = "No such session."
_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)")


class _Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """The inclusive byte range asked for, ``None`` for the whole body; ``_Unsatisfiable`` if none fits.

    A malformed or multi-range header is ignored (the whole body is sent), as RFC 9110 allows.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last n bytes
        n = int(last)
        if n == 0 or length == 0:
            raise _Unsatisfiable
        return max(0, length - n), length - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= length:
        raise _Unsatisfiable
    return start, min(int(last), length - 1) if last else length - 1


@routes.get("/v1/sessions/{session_id}/audio/{track}")
async def get_audio(request: web.Request) -> web.StreamResponse:
    """200 the track's audio (``audio/ogg``), 206 for a satisfiable ``Range``, 416 otherwise."""
    principal = await current_principal(request)
    session_id, track = request.match_info["session_id"], request.match_info["track"]
    async with request.app[DATABASE].sessions() as s:
        session = await sessions.get_owned_session(s, session_id, principal.user_id)
    if session is None or track not in TRACKS:
        raise NotFound(NOT_FOUND)
    return await serve_track(request, session_id, track, cache_control="private, no-cache")


async def serve_track(
    request: web.Request, session_id: str, track: str, *, cache_control: str
) -> web.StreamResponse:
    """Answer with one track of a session the caller may hear: the whole stream or a ``Range`` of it.

    Also serves the public copy of a published session (``relay.api.publication``).
    """
    try:
        audio = await assembled_track(request.app[DATABASE], request.app[OBJECTS], session_id, track)
    except ObjectStoreError as exc:
        raise StorageError("The audio store is unavailable; try again shortly.") from exc
    if audio is None:
        raise NotFound("This session has no audio for this track yet.", code="audio_not_found")
    try:
        wanted = parse_range(request.headers.get("Range"), audio.length)
    except _Unsatisfiable:
        return problem(
            416,
            "range_not_satisfiable",
            f"The audio is {audio.length} bytes long.",
            headers={"Content-Range": f"bytes */{audio.length}"},
        )
    return await _stream(request, session_id, audio, wanted, cache_control)


async def _stream(
    request: web.Request,
    session_id: str,
    audio: AssembledTrack,
    wanted: tuple[int, int] | None,
    cache_control: str,
) -> web.StreamResponse:
    start, end = wanted if wanted is not None else (0, audio.length - 1)
    response = web.StreamResponse(status=200 if wanted is None else 206)
    response.content_type = audio.content_type
    response.content_length = end - start + 1
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["Cache-Control"] = cache_control
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end}/{audio.length}"
    chunks = audio.read(start, end)
    try:
        first = await anext(chunks, b"")  # fail before the headers go out when the store is down
    except ObjectStoreError as exc:
        raise StorageError("The audio store is unavailable; try again shortly.") from exc
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    try:
        await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
    except ObjectStoreError:
        log.warning("audio.stream_failed", extra={"session_id": session_id})
        abort_started_response(request)
        return response
    await response.write_eof()
    return response
