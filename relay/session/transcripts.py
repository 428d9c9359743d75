"""The conversation's final transcript: item order, segments, storing and announcing them.

Shared by both kinds of live session (the WebRTC :class:`~relay.session.downlink.Downlink` and the
Realtime socket's :class:`~relay.integrations.tap.RecordingTap`): items are placed in conversation
order the first time they are seen (a late learner transcription still goes before the coach answer
that followed it), a final segment is stored through the recorder in a helper task, and only a
stored segment is announced as ``transcript.final``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from storage.ports import SessionRecorder, Speaker, TranscriptEvent

__all__ = ["TranscriptBook", "heard_text", "segment_view"]


def heard_text(full: str, played_ms: int, audio_ms: int) -> str:
    """The words of a cut coach answer that were heard: the share of its audio that played."""
    words = full.split()
    if not words or played_ms <= 0:
        return ""
    heard = max(1, round(len(words) * min(1.0, played_ms / max(audio_ms, 1))))
    return " ".join(words[:heard])


def segment_view(segment_id: str, segment: TranscriptEvent) -> dict[str, Any]:
    """API.md's Segment, as the ``transcript.final`` event carries it."""
    return {
        "id": segment_id,
        "speaker": segment.speaker.value,
        "text": segment.text,
        "start_ms": segment.start_ms,
        "end_ms": segment.end_ms,
        "final": True,
    }


class TranscriptBook:
    """Conversation order and final segments of one session."""

    def __init__(
        self,
        recorder: SessionRecorder,
        *,
        send: Callable[[dict[str, Any]], None],
        spawn: Callable[[Awaitable[None], str], None],
    ) -> None:
        self._recorder = recorder
        self._send = send
        self._spawn = spawn
        self._seq = 0
        self._order: dict[str, int] = {}
        self.last_item_id: str | None = None

    def place(self, item_id: str) -> int:
        """The item's position in the conversation, assigned the first time the item is seen."""
        seq = self._order.get(item_id)
        if seq is None:
            self._seq += 1
            seq = self._order[item_id] = self._seq
            self.last_item_id = item_id
        return seq

    def learner(self, item_id: str, text: str, start_ms: int, end_ms: int) -> None:
        self.store(
            TranscriptEvent(
                speaker=Speaker.LEARNER,
                text=text,
                start_ms=start_ms,
                end_ms=max(end_ms, start_ms),
                item_id=item_id,
                previous_item_id=None,
                seq=self.place(item_id),
            )  # fmt: skip
        )

    def coach(
        self,
        item_id: str,
        text: str,
        *,
        start_ms: int,
        audio_ms: int,
        previous_item_id: str | None,
        truncated: bool = False,
    ) -> None:
        self.store(
            TranscriptEvent(
                speaker=Speaker.COACH,
                text=text,
                start_ms=start_ms,
                end_ms=start_ms + audio_ms,
                item_id=item_id,
                previous_item_id=previous_item_id,
                seq=self.place(item_id),
                truncated=truncated,
            )  # fmt: skip
        )

    def store(self, segment: TranscriptEvent) -> None:
        async def store() -> None:
            segment_id = await self._recorder.transcript(segment)
            if not segment_id:  # the session is being deleted: nothing was stored
                return
            self._send({"type": "transcript.final", "segment": segment_view(segment_id, segment)})

        self._spawn(store(), f"transcript:{segment.item_id}")
