"""Reading a session's transcript back: JSON segments in conversation order, or WebVTT."""

from __future__ import annotations

from aiohttp import web

from relay.api.deps import current_principal, owned_session
from relay.api.views import segment_view
from relay.errors import BadRequest
from relay.keys import DATABASE
from storage import sessions

__all__ = ["routes", "to_vtt"]

routes = web.RouteTableDef()


def _timestamp(ms: int) -> str:
    hours, rest = divmod(max(ms, 0), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def to_vtt(segments: list[dict[str, object]]) -> str:
    """WebVTT with one cue per segment; the speaker as a voice tag, text escaped as VTT requires."""
    lines = ["WEBVTT", ""]
    for seg in segments:
        start, end = int(str(seg["start_ms"])), int(str(seg["end_ms"]))
        text = str(seg["text"]).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        text = text.replace("-->", "--&gt;").replace("\n", " ")
        lines += [str(seg["id"]), f"{_timestamp(start)} --> {_timestamp(max(end, start + 1))}",
                  f"<v {seg['speaker']}>{text}", ""]  # fmt: skip
    return "\n".join(lines)


@routes.get("/v1/sessions/{session_id}/transcript")
async def transcript(request: web.Request) -> web.Response:
    """The stored segments in conversation order; ``?format=vtt`` gives ``text/vtt``."""
    principal = await current_principal(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "vtt"):
        raise BadRequest("format: must be json or vtt", code="invalid_request", field="format")
    async with request.app[DATABASE].sessions() as s:
        session = await owned_session(s, request.match_info["session_id"], principal.user_id)
        rows = await sessions.transcript_segments(s, session.id)
    segments = [segment_view(row) for row in rows]
    if fmt == "vtt":
        return web.Response(text=to_vtt(segments), content_type="text/vtt", charset="utf-8")
    return web.json_response({"segments": segments})
