"""What Parley keeps of a Realtime socket session, taken from the frames it relays.

The client's ``input_audio_buffer.append`` audio is the learner track; the upstream's
``response.output_audio.delta`` audio is the coach track; the upstream's VAD, transcription and
transcript events become final transcript segments exactly as for a WebRTC session (through the
shared :class:`~relay.session.transcripts.TranscriptBook`), and every upstream event goes to the
recorder's event log. All of it is sync and cheap: the recorder only appends.

Timelines. A socket client may send audio faster than real time (a file) or in real time (a phone
call), so learner audio is placed back to back from where the last chunk ended, or at its arrival
when the client paused (a pause is a gap in the track, never filled). The coach's audio arrives
faster than real time and is played by the client, so each answer is placed back to back from its
first delta's arrival; what the client reports with ``conversation.item.truncate`` (how much it
played) cuts the answer's transcript to what was heard and stops recording the rest of it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.integrations.formats import PCM24, AudioFormat, audio_format, to_pcm16
from relay.session.transcripts import TranscriptBook, heard_text
from relay.session.uplink import UpstreamClock
from storage.ports import SessionRecorder

__all__ = ["RecordingTap"]


@dataclass(slots=True)
class _LearnerItem:
    start_ms: int = 0
    end_ms: int = 0


@dataclass(slots=True)
class _CoachItem:
    previous_item_id: str | None
    transcript: list[str] = field(default_factory=list)
    final_text: str | None = None
    start_ms: int | None = None
    audio_ms: int = 0
    truncated: bool = False


class _TrackCursor:
    """Where the next chunk of one track goes: back to back, or at its arrival after a pause."""

    def __init__(self) -> None:
        self.end_ms = 0
        self._samples = 0
        self._rate = 0
        self._base_ms = 0

    def place(self, now_ms: int, samples: int, rate: int, *, contiguous: bool = False) -> tuple[int, int]:
        """(start, duration) in ms of ``samples`` at ``rate`` arriving at ``now_ms``."""
        if rate != self._rate or (not contiguous and now_ms > self.end_ms):
            # A new run: exact sample counting starts again from here (no drift from rounding).
            self._rate, self._samples, self._base_ms = rate, 0, max(now_ms, self.end_ms)
        start = self._base_ms + self._samples * 1000 // rate
        self._samples += samples
        self.end_ms = self._base_ms + self._samples * 1000 // rate
        return start, self.end_ms - start


class RecordingTap:
    """Feed it every client event Parley forwards and every upstream event it relays."""

    def __init__(
        self,
        *,
        recorder: SessionRecorder,
        book: TranscriptBook,
        now_ms: Callable[[], int],
        send: Callable[[dict[str, Any]], None],
    ) -> None:
        self._recorder = recorder
        self._book = book
        self._now_ms = now_ms
        self._send = send
        self._clock = UpstreamClock()
        self._learner_cursor = _TrackCursor()
        self._coach_cursor = _TrackCursor()
        self._input = PCM24
        self._output = PCM24
        self._response_output: dict[str, AudioFormat] = {}
        self._learner: dict[str, _LearnerItem] = {}
        self._coach: dict[str, _CoachItem] = {}
        self._server: dict[str, Callable[[Any], None]] = {
            "session.updated": self._on_session_updated,
            "input_audio_buffer.speech_started": self._on_speech_started,
            "input_audio_buffer.speech_stopped": self._on_speech_stopped,
            "input_audio_buffer.committed": self._on_committed,
            "conversation.item.input_audio_transcription.delta": self._on_transcription_delta,
            "conversation.item.input_audio_transcription.completed": self._on_transcription_completed,
            "response.created": self._on_response_created,
            "response.output_item.added": self._on_output_item_added,
            "response.output_audio.delta": self._on_output_audio_delta,
            "response.output_audio.done": self._on_output_audio_done,
            "response.output_audio_transcript.delta": self._on_output_transcript_delta,
            "response.output_audio_transcript.done": self._on_output_transcript_done,
        }

    # -- client -> upstream --------------------------------------------------------------------
    def client_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self._learner_audio(event.get("audio"))
        elif kind == "session.update":
            audio_in = ((event.get("session") or {}).get("audio") or {}).get("input") or {}
            if "format" in audio_in:  # the client sends the new format from its next append on
                self._input = audio_format(audio_in["format"], self._input)
        elif kind == "conversation.item.truncate":
            self._truncate(str(event.get("item_id", "")), event.get("audio_end_ms"))

    def _learner_audio(self, audio: object) -> None:
        pcm = _pcm(audio, self._input)
        if not pcm:
            return
        start, duration = self._learner_cursor.place(self._now_ms(), len(pcm) // 2, self._input.rate)
        self._recorder.learner_audio(pcm, sample_rate=self._input.rate, at_ms=start)
        self._clock.pushed(start, duration)

    def _truncate(self, item_id: str, audio_end_ms: object) -> None:
        item = self._coach.get(item_id)
        if item is None or item.truncated or not isinstance(audio_end_ms, int):
            return
        item.truncated = True
        played = min(max(audio_end_ms, 0), item.audio_ms)
        full = item.final_text if item.final_text is not None else "".join(item.transcript).strip()
        text = heard_text(full, played, item.audio_ms)
        if text:
            self._coach_segment(item_id, item, text, played, truncated=True)

    # -- upstream -> client --------------------------------------------------------------------
    def server_event(self, event: Any) -> None:
        self._recorder.upstream_event(event, at_ms=self._now_ms())
        handler = self._server.get(getattr(event, "type", ""))
        if handler is not None:
            handler(event)

    def _on_session_updated(self, event: Any) -> None:
        audio = _plain(getattr(event.session, "audio", None))
        self._input = audio_format((audio.get("input") or {}).get("format"), self._input)
        self._output = audio_format((audio.get("output") or {}).get("format"), self._output)

    def _on_speech_started(self, event: Any) -> None:
        item = self._learner.setdefault(event.item_id, _LearnerItem())
        item.start_ms = self._clock.to_session(int(event.audio_start_ms))

    def _on_speech_stopped(self, event: Any) -> None:
        item = self._learner.setdefault(event.item_id, _LearnerItem())
        item.end_ms = self._clock.to_session(int(event.audio_end_ms))

    def _on_committed(self, event: Any) -> None:
        self._book.place(event.item_id)
        self._learner.setdefault(event.item_id, _LearnerItem())

    def _on_transcription_delta(self, event: Any) -> None:
        self._send({"type": "transcript.delta", "speaker": "learner", "item_id": event.item_id,
                    "delta": event.delta})  # fmt: skip

    def _on_transcription_completed(self, event: Any) -> None:
        item = self._learner.get(event.item_id, _LearnerItem())
        text = (event.transcript or "").strip()
        if text:
            self._book.learner(event.item_id, text, item.start_ms, item.end_ms or self._now_ms())

    def _on_response_created(self, event: Any) -> None:
        audio = _plain(getattr(event.response, "audio", None))
        spec = (audio.get("output") or {}).get("format")
        if spec is not None and event.response.id:
            self._response_output[event.response.id] = audio_format(spec, self._output)

    def _on_output_item_added(self, event: Any) -> None:
        item = event.item
        if getattr(item, "role", None) != "assistant" or item.id is None:
            return
        self._coach[item.id] = _CoachItem(previous_item_id=self._book.last_item_id)
        self._book.place(item.id)

    def _on_output_audio_delta(self, event: Any) -> None:
        item = self._coach.get(event.item_id)
        if item is None or item.truncated:
            return
        fmt = self._response_output.get(event.response_id, self._output)
        pcm = _pcm(event.delta, fmt)
        if not pcm:
            return
        start, duration = self._coach_cursor.place(
            self._now_ms(), len(pcm) // 2, fmt.rate, contiguous=item.start_ms is not None
        )
        if item.start_ms is None:
            item.start_ms = start
            self._send({"type": "coach.speaking", "item_id": event.item_id})
        self._recorder.coach_audio(pcm, sample_rate=fmt.rate, at_ms=start)
        item.audio_ms += duration

    def _on_output_audio_done(self, event: Any) -> None:
        self._response_output.pop(event.response_id, None)
        if event.item_id in self._coach:
            self._send({"type": "coach.done", "item_id": event.item_id})

    def _on_output_transcript_delta(self, event: Any) -> None:
        item = self._coach.get(event.item_id)
        if item is None or item.truncated:
            return
        item.transcript.append(event.delta)
        self._send({"type": "transcript.delta", "speaker": "coach", "item_id": event.item_id,
                    "delta": event.delta})  # fmt: skip

    def _on_output_transcript_done(self, event: Any) -> None:
        item = self._coach.get(event.item_id)
        if item is None or item.truncated:
            return
        item.final_text = (event.transcript or "".join(item.transcript)).strip()
        if item.final_text:
            self._coach_segment(event.item_id, item, item.final_text, item.audio_ms)

    def _coach_segment(
        self, item_id: str, item: _CoachItem, text: str, audio_ms: int, *, truncated: bool = False
    ) -> None:
        start = item.start_ms if item.start_ms is not None else self._now_ms()
        self._book.coach(
            item_id, text, start_ms=start, audio_ms=audio_ms, previous_item_id=item.previous_item_id,
            truncated=truncated,
        )  # fmt: skip


def _pcm(audio: object, fmt: AudioFormat) -> bytes:
    if not isinstance(audio, str) or not audio:
        return b""
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        return b""  # the upstream answers the client with its own error; nothing to record
    return to_pcm16(raw, fmt)


def _plain(value: object) -> dict[str, Any]:
    """An SDK model (or dict, or None) as a plain dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    dump = getattr(value, "model_dump", None)
    return dump(mode="json", exclude_none=False) if callable(dump) else {}
