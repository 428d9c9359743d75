"""Model events -> browser speaker, the events channel, the recorder and the transcript store.

Every event is also handed to the recorder as it is, for the audit log of the upstream stream.

One handler per server event type, named after it (``_on_response_output_audio_delta``), looked up
in a table: a grep of the OpenAI docs finds the handler. Unknown types are ignored.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from relay.browser.speaker import SpeakerTrack
from relay.model import protocol
from relay.model.link import ModelLink
from relay.session.transcripts import TranscriptBook
from relay.session.uplink import UpstreamClock
from storage.ports import SessionRecorder

__all__ = ["Downlink"]

log = logging.getLogger("relay.session.downlink")


class Downlink:
    """Handles the model's events for one session (across upstream reconnects and peers)."""

    def __init__(
        self,
        *,
        session_id: str,
        speaker: SpeakerTrack,
        link: ModelLink,
        recorder: SessionRecorder,
        clock: UpstreamClock,
        send: Callable[[dict[str, Any]], None],
        session_ms: Callable[[], int],
        spawn: Callable[[Awaitable[None], str], None],
        on_barge_in: Callable[[], None],
        on_response_latency: Callable[[float, bool], None],
    ) -> None:
        self.session_id = session_id
        self._speaker = speaker
        self._link = link
        self._recorder = recorder
        self._clock = clock
        self._send = send
        self._now_ms = session_ms
        self._spawn = spawn
        self._on_barge_in = on_barge_in
        self._on_response_latency = on_response_latency
        self._book = TranscriptBook(recorder, send=send, spawn=spawn, now_ms=session_ms)
        self._awaiting_answer_since: float | None = None
        self._answered_once = False
        self._handlers: dict[str, Callable[[Any], None]] = {
            "input_audio_buffer.speech_started": self._on_input_audio_buffer_speech_started,
            "input_audio_buffer.speech_stopped": self._on_input_audio_buffer_speech_stopped,
            "input_audio_buffer.committed": self._on_input_audio_buffer_committed,
            "conversation.item.input_audio_transcription.delta": self._on_input_audio_transcription_delta,
            "conversation.item.input_audio_transcription.completed": (
                self._on_input_audio_transcription_completed
            ),
            "response.output_item.added": self._on_response_output_item_added,
            "response.output_audio.delta": self._on_response_output_audio_delta,
            "response.output_audio.done": self._on_response_output_audio_done,
            "response.output_audio_transcript.delta": self._on_response_output_audio_transcript_delta,
            "response.output_audio_transcript.done": self._on_response_output_audio_transcript_done,
            "conversation.item.truncated": self._on_conversation_item_truncated,
        }
        # Upstream confirmations of barge-in cuts, item id -> audio_end_ms (for operators and tests).
        self.truncated: dict[str, int] = {}

    # -- entry points --------------------------------------------------------------------------
    def on_event(self, event: Any) -> None:
        # Every event goes to the audit log first (an append; serialized off the loop).
        self._recorder.upstream_event(event, at_ms=self._now_ms())
        handler = self._handlers.get(getattr(event, "type", ""))
        if handler is not None:
            handler(event)

    def on_coach_frame(self, packet: bytes, session_ms: int, samples48: int) -> None:
        """Speaker hook: a coach frame went to the browser (its packet; ``samples48`` of it is audio)."""
        self._recorder.coach_opus(packet, at_ms=session_ms, input_rate=24000, samples48=samples48)
        if self._awaiting_answer_since is not None:
            self._on_response_latency(time.monotonic() - self._awaiting_answer_since, not self._answered_once)
            self._awaiting_answer_since = None
            self._answered_once = True

    def on_coach_started(self, item_id: str) -> None:
        item = self._book.known_coach(item_id)
        if item is not None and item.start_ms is None:
            item.start_ms = self._now_ms()
        self._send({"type": "coach.speaking", "item_id": item_id})

    def on_coach_done(self, item_id: str) -> None:
        self._send({"type": "coach.done", "item_id": item_id})

    def interrupt_playout(self, reason: str) -> None:
        """Drop queued coach audio now and tell the upstream what the learner actually heard."""
        played = self._speaker.clear()
        for item_id, ms in played.items():
            item = self._book.known_coach(item_id)
            if item is None:
                continue
            # Never 0 for an item that had none played (nothing to cut) and never more than was received.
            if ms > 0:
                self._link.send(protocol.truncate(item_id, min(ms, max(item.audio_ms, 1))))
            self._book.cut(item_id, ms)
            self._send({"type": "coach.done", "item_id": item_id})
        if played:
            log.info("downlink.interrupted", extra={"session_id": self.session_id, "reason": reason,
                                                    "count": len(played)})  # fmt: skip

    def reset_upstream(self) -> None:
        """A new upstream connection: its item ids are new, its audio clock starts again."""
        self._clock.reset()
        self._book.forget_learner_items()
        self._awaiting_answer_since = None

    # -- learner side --------------------------------------------------------------------------
    def _on_input_audio_buffer_speech_started(self, event: Any) -> None:
        self._book.speech_started(event.item_id, self._clock.to_session(int(event.audio_start_ms)))
        if self._speaker.speaking:
            self._on_barge_in()
            self.interrupt_playout("barge_in")

    def _on_input_audio_buffer_speech_stopped(self, event: Any) -> None:
        self._book.speech_stopped(event.item_id, self._clock.to_session(int(event.audio_end_ms)))
        self._awaiting_answer_since = time.monotonic()

    def _on_input_audio_buffer_committed(self, event: Any) -> None:
        self._book.committed(event.item_id)

    def _on_input_audio_transcription_delta(self, event: Any) -> None:
        self._book.learner_delta(event.item_id, event.delta)

    def _on_input_audio_transcription_completed(self, event: Any) -> None:
        self._book.learner_completed(event.item_id, event.transcript)

    # -- coach side ----------------------------------------------------------------------------
    def _on_response_output_item_added(self, event: Any) -> None:
        item = event.item
        if getattr(item, "role", None) == "assistant" and item.id is not None:
            self._book.coach_added(item.id)

    def _on_response_output_audio_delta(self, event: Any) -> None:
        item = self._book.coach(event.item_id)
        if item is None:
            return
        pcm = base64.b64decode(event.delta)
        item.audio_ms += len(pcm) // 48
        self._speaker.feed(pcm, item_id=event.item_id)

    def _on_response_output_audio_done(self, event: Any) -> None:
        self._speaker.finish(event.item_id)

    def _on_response_output_audio_transcript_delta(self, event: Any) -> None:
        self._book.coach_delta(event.item_id, event.delta)

    def _on_response_output_audio_transcript_done(self, event: Any) -> None:
        self._book.coach_done(event.item_id, event.transcript)

    def _on_conversation_item_truncated(self, event: Any) -> None:
        self.truncated[event.item_id] = int(event.audio_end_ms)
