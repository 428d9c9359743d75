"""Reading transcripts back: JSON in conversation order, WebVTT, owner-only."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from relay.api.transcripts import to_vtt
from relay.keys import DATABASE
from storage.models import AudioRecording, TranscriptSegment
from tests.api import problem, signup


async def _session_with_transcript(client: TestClient) -> tuple[str, dict[str, str]]:  # type: ignore[type-arg]
    learner = await signup(client)
    body = await (
        await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    ).json()
    sid = body["session"]["id"]
    async with client.app[DATABASE].sessions.begin() as s:
        # Stored out of arrival order: a late learner transcription belongs before the coach's answer.
        s.add_all(
            [
                TranscriptSegment(session_id=sid, seq=2, speaker="coach", text="Hello <there> & welcome",
                                  start_ms=2500, end_ms=4000, item_id="item_c1"),
                TranscriptSegment(session_id=sid, seq=1, speaker="learner", text="A coffee, please",
                                  start_ms=300, end_ms=2100, item_id="item_l1"),
                AudioRecording(session_id=sid, track="learner", sample_rate=24000, duration_ms=4100),
            ]
        )  # fmt: skip
    return sid, learner.auth


async def test_transcript_json_is_in_conversation_order(client: TestClient) -> None:  # type: ignore[type-arg]
    """GET transcript lists segments by conversation position with the API.md Segment fields."""
    sid, auth = await _session_with_transcript(client)
    resp = await client.get(f"/v1/sessions/{sid}/transcript", headers=auth)
    assert resp.status == 200
    segments = (await resp.json())["segments"]
    assert [s["speaker"] for s in segments] == ["learner", "coach"]
    assert set(segments[0]) == {"id", "speaker", "text", "start_ms", "end_ms", "final"}
    assert segments[0]["text"] == "A coffee, please" and segments[0]["final"] is True
    session = await (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
    assert session["audio"] == [{"track": "learner", "duration_ms": 4100, "format": "ogg/opus"}]


async def test_transcript_vtt(client: TestClient) -> None:  # type: ignore[type-arg]
    """?format=vtt answers text/vtt with one escaped cue per segment."""
    sid, auth = await _session_with_transcript(client)
    resp = await client.get(f"/v1/sessions/{sid}/transcript", params={"format": "vtt"}, headers=auth)
    assert resp.status == 200 and resp.content_type == "text/vtt"
    text = await resp.text()
    assert text.startswith("WEBVTT\n\n")
    assert "00:00:00.300 --> 00:00:02.100\n<v learner>A coffee, please" in text
    assert "<v coach>Hello &lt;there&gt; &amp; welcome" in text


async def test_transcript_is_owner_only_and_validates_format(client: TestClient) -> None:  # type: ignore[type-arg]
    """Another user gets 404 like a missing session; an unknown format is 422."""
    sid, auth = await _session_with_transcript(client)
    other = await signup(client)
    theirs = await client.get(f"/v1/sessions/{sid}/transcript", headers=other.auth)
    missing = await client.get("/v1/sessions/ses_nope/transcript", headers=other.auth)
    assert await problem(theirs, 404, "not_found") == await problem(missing, 404, "not_found")
    bad = await client.get(f"/v1/sessions/{sid}/transcript", params={"format": "srt"}, headers=auth)
    assert (await problem(bad, 422, "invalid_request"))["field"] == "format"


def test_vtt_timestamps_cover_hours() -> None:
    """Cue times are HH:MM:SS.mmm, also past an hour, and a zero-length cue gets 1 ms."""
    vtt = to_vtt([{"id": "s", "speaker": "coach", "text": "x", "start_ms": 3_723_004, "end_ms": 3_723_004}])
    assert "01:02:03.004 --> 01:02:03.005" in vtt
