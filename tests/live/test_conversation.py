"""A live session end to end: aiortc browser <-> relay <-> simulator, with the database behind."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import av
from sqlalchemy import select

from relay.keys import DATABASE, METRICS, OBJECTS, REGISTRY
from storage.models import AudioGap, AudioRecording, AuditEvent, TranscriptSegment
from tests.api import ENDED_OR_LATER
from tests.fakes.rtc_client import rms, speech_like
from tests.live.conftest import Relay, start_call

SILENCE_S = 1.2  # longer than the beginner topic's 900 ms silence window
LONGEST_STRING = 2000  # base64 audio of even 20 ms is longer than this; instructions and transcripts are not


async def speak(call_rtc: object, seconds: float) -> None:
    call_rtc.send_pcm(speech_like(seconds) + bytes(int(SILENCE_S * 48000) * 2))  # type: ignore[attr-defined]


def strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


async def event_log(relay: Relay, session_id: str) -> tuple[list[dict[str, Any]], int]:
    """The session's upstream event log as stored (its lines in order) and its size in bytes."""
    store = relay.client.app[OBJECTS]
    keys = sorted([info.key async for info in store.list(f"sessions/{session_id}/events/")])
    assert keys and keys[0] == f"sessions/{session_id}/events/000000.jsonl", keys
    lines: list[dict[str, Any]] = []
    size = 0
    for key in keys:
        data = await store.read(key)
        size += len(data)
        assert data.endswith(b"\n")
        lines += [json.loads(line) for line in data.decode().splitlines()]  # every line is JSON
    return lines, size


async def test_three_turn_conversation_with_audio_both_ways(relay: Relay) -> None:
    """Three learner turns get three coach answers: audio back to the browser, transcripts live and stored,
    and the upstream event stream kept as JSON lines without audio under the session's events/ prefix."""
    call = await start_call(relay)
    started = asyncio.get_running_loop().time()
    await call.wait_event(lambda m: m == {"type": "session.state", "status": "live"})
    sent_ms = 0
    for turn in range(1, 4):
        await speak(call.rtc, 1.5)
        sent_ms += 1500
        await call.wait_count("coach.done", turn, timeout=30)

    def learner_finals() -> int:
        return len([e for e in call.events("transcript.final") if e["segment"]["speaker"] == "learner"])

    await call.wait_event(lambda m: m["type"] == "transcript.final" and learner_finals() >= 3)

    # The browser heard the coach: real (non-silent) audio decoded from the relay's own Opus.
    assert call.rtc.received_frames > 100
    assert rms(bytes(call.rtc.received_pcm)) > 100
    assert call.rtc.received_layouts <= {"mono", "stereo"}
    deltas = {e["speaker"] for e in call.events("transcript.delta")}
    assert deltas == {"learner", "coach"}

    resp = await relay.client.post(f"/v1/sessions/{call.session_id}/end", headers=call.learner.auth)
    assert resp.status == 200
    assert (await resp.json())["status"] in ENDED_OR_LATER
    session_s = asyncio.get_running_loop().time() - started
    await call.rtc.aclose()

    # The audit log of the upstream stream: every line JSON, in receive order, nothing of the audio.
    lines, log_bytes = await event_log(relay, call.session_id)
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "session.created" and kinds.count("response.done") >= 3, sorted(set(kinds))
    assert kinds.count("conversation.item.input_audio_transcription.completed") >= 3
    assert kinds.count("response.output_audio_transcript.done") >= 3
    assert "response.output_audio_transcript.delta" in kinds
    at = [line["at_ms"] for line in lines]
    assert at == sorted(at) and at[0] >= 0
    audio_deltas = [line for line in lines if line["type"] == "response.output_audio.delta"]
    assert audio_deltas and all("delta" not in d and d["omitted_bytes"] > 0 for d in audio_deltas)
    assert all(len(x) <= LONGEST_STRING for line in lines for x in strings(line))
    print(
        f"\n[event log] lines={len(lines)} bytes={log_bytes} audio_deltas={len(audio_deltas)} "
        f"session_s={session_s:.1f} bytes_per_min={log_bytes * 60 / session_s:.0f}",
        flush=True,
    )

    async with relay.client.app[DATABASE].sessions() as s:
        segments = (
            (
                await s.execute(
                    select(TranscriptSegment)
                    .where(TranscriptSegment.session_id == call.session_id)
                    .order_by(TranscriptSegment.seq)
                )
            )
            .scalars()
            .all()
        )
        recordings = {
            r.track: r
            for r in (
                await s.execute(select(AudioRecording).where(AudioRecording.session_id == call.session_id))
            ).scalars()
        }
        audit = (
            await s.execute(select(AuditEvent.to_status).where(AuditEvent.session_id == call.session_id))
        ).all()
    speakers = [x.speaker for x in segments]
    assert speakers[:6] == ["learner", "coach"] * 3, speakers
    assert all(x.text for x in segments)
    live_finals = {e["segment"]["id"] for e in call.events("transcript.final")}
    assert live_finals <= {x.id for x in segments}  # the live ids are the stored ids
    # Each final names the item whose partials it completes, as the deltas did.
    stored_items = {x.id: x.item_id for x in segments}
    finals = call.events("transcript.final")
    assert finals and all(e["item_id"] == stored_items[e["segment"]["id"]] for e in finals)
    delta_items = {e["item_id"] for e in call.events("transcript.delta")}
    assert {e["item_id"] for e in finals if e["segment"]["speaker"] == "coach"} <= delta_items
    assert [x.start_ms for x in segments] == sorted(x.start_ms for x in segments)
    # The learner track holds at least what was spoken, and the coach track what was played.
    assert recordings["learner"].duration_ms >= sent_ms
    assert recordings["coach"].duration_ms > 1000
    moved = [a[0] for a in audit]
    assert moved[:5] == ["created", "connecting", "live", "ending", "ended"]
    assert moved[5:] in ([], ["processing"], ["processing", "processed"])  # the finalize job
    # The same transcript and tracks through the API.
    listed = await (
        await relay.client.get(f"/v1/sessions/{call.session_id}/transcript", headers=call.learner.auth)
    ).json()
    assert [x["id"] for x in listed["segments"]] == [x.id for x in segments]
    session = await (
        await relay.client.get(f"/v1/sessions/{call.session_id}", headers=call.learner.auth)
    ).json()
    assert {a["track"] for a in session["audio"]} == {"learner", "coach"}
    audio = await relay.client.get(f"/v1/sessions/{call.session_id}/audio/learner", headers=call.learner.auth)
    assert audio.status == 200 and audio.content_type == "audio/ogg"
    with av.open(io.BytesIO(await audio.read())) as container:
        decoded_ms = sum(f.samples for f in container.decode(audio=0)) * 1000 // 48000
    assert decoded_ms >= sent_ms  # the learner's speech, playable as one stream
    metrics = relay.client.app[METRICS].render().decode()
    assert 'parley_first_response_seconds_count{turn="first"} 1.0' in metrics
    assert 'parley_session_outcomes_total{reason="ended_by_user"} 1.0' in metrics


async def test_barge_in_truncates_what_was_heard(relay: Relay) -> None:
    """Speaking over the coach stops its audio at once and truncates the item at the audio actually played."""
    call = await start_call(relay)
    await speak(call.rtc, 1.5)
    await call.wait_count("coach.speaking", 1, timeout=30)
    await asyncio.sleep(0.6)  # let some of the answer play
    call.rtc.send_pcm(speech_like(1.5) + bytes(int(SILENCE_S * 48000) * 2))
    live = relay.client.app[REGISTRY].get(call.session_id)
    assert live is not None
    async with asyncio.timeout(15):
        while not live.confirmed_truncations:
            await asyncio.sleep(0.05)
    ((item_id, audio_end_ms),) = live.confirmed_truncations.items()
    assert 300 <= audio_end_ms <= 3000
    await call.wait_event(lambda m: m["type"] == "transcript.final" and m["segment"]["speaker"] == "coach")
    await relay.client.post(f"/v1/sessions/{call.session_id}/end", headers=call.learner.auth)
    await call.rtc.aclose()
    async with relay.client.app[DATABASE].sessions() as s:
        coach = (
            await s.execute(
                select(TranscriptSegment).where(
                    TranscriptSegment.session_id == call.session_id, TranscriptSegment.item_id == item_id
                )
            )
        ).scalar_one()
    assert coach.truncated
    assert coach.end_ms - coach.start_ms == audio_end_ms  # the stored cut is what the upstream was told
    metrics = relay.client.app[METRICS].render().decode()
    assert "parley_barge_ins_total 1.0" in metrics


async def test_learner_can_end_from_the_data_channel(relay: Relay) -> None:
    """{"type": "session.end"} on the data channel ends the session and finalizes the recording."""
    call = await start_call(relay)
    await call.wait_event(lambda m: m.get("status") == "live")
    call.rtc.send_pcm(speech_like(0.5))
    await asyncio.sleep(0.8)
    call.rtc.send_json({"type": "session.end"})
    await call.wait_event(lambda m: m.get("status") == "ending")
    live = relay.client.app[REGISTRY].get(call.session_id)
    if live is not None:
        await live.wait_ended()
    await call.rtc.aclose()
    resp = await relay.client.get(f"/v1/sessions/{call.session_id}", headers=call.learner.auth)
    body = await resp.json()
    assert body["status"] in ENDED_OR_LATER and body["duration_ms"] > 0
    async with relay.client.app[DATABASE].sessions() as s:
        rec = (
            await s.execute(
                select(AudioRecording).where(
                    AudioRecording.session_id == call.session_id, AudioRecording.track == "learner"
                )
            )
        ).scalar_one()
        gaps = (await s.execute(select(AudioGap))).scalars().all()
    assert rec.duration_ms >= 500 and rec.status == "complete"
    assert gaps == []
