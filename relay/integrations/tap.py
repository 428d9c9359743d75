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
from typing import Any

from relay.integrations.formats import PCM24, AudioFormat, audio_format, to_pcm16
from relay.session.transcripts import TranscriptBook
from relay.session.uplink import UpstreamClock
from storage.ports import SessionRecorder

__all__ = ["RecordingTap"]


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
        item = self._book.coach(item_id)
        if item is not None and isinstance(audio_end_ms, int):
            self._book.cut(item_id, min(max(audio_end_ms, 0), item.audio_ms))

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
        self._book.speech_started(event.item_id, self._clock.to_session(int(event.audio_start_ms)))

    def _on_speech_stopped(self, event: Any) -> None:
        self._book.speech_stopped(event.item_id, self._clock.to_session(int(event.audio_end_ms)))

    def _on_committed(self, event: Any) -> None:
        self._book.committed(event.item_id)

    def _on_transcription_delta(self, event: Any) -> None:
        self._book.learner_delta(event.item_id, event.delta)

    def _on_transcription_completed(self, event: Any) -> None:
        self._book.learner_completed(event.item_id, event.transcript)

    def _on_response_created(self, event: Any) -> None:
        audio = _plain(getattr(event.response, "audio", None))
        spec = (audio.get("output") or {}).get("format")
        if spec is not None and event.response.id:
            self._response_output[event.response.id] = audio_format(spec, self._output)

    def _on_output_item_added(self, event: Any) -> None:
        item = event.item
        if getattr(item, "role", None) == "assistant" and item.id is not None:
            self._book.coach_added(item.id)

    def _on_output_audio_delta(self, event: Any) -> None:
        item = self._book.coach(event.item_id)
        if item is None:
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
        if self._book.known_coach(event.item_id) is not None:
            self._send({"type": "coach.done", "item_id": event.item_id})

    def _on_output_transcript_delta(self, event: Any) -> None:
        self._book.coach_delta(event.item_id, event.delta)

    def _on_output_transcript_done(self, event: Any) -> None:
        self._book.coach_done(event.item_id, event.transcript)


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
