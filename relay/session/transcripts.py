"""The conversation's final transcript: items, their order and timing, segments stored and announced.

Shared by both kinds of live session (the WebRTC :class:`~relay.session.downlink.Downlink` and the
Realtime socket's :class:`~relay.integrations.tap.RecordingTap`), which differ only in where the
coach's audio goes and so in when an answer starts. Items are placed in conversation order the
first time they are seen (a late learner transcription still goes before the coach answer that
followed it), a final segment is stored through the recorder in a helper task, and only a stored
segment is announced as ``transcript.final``. A coach answer cut short (barge-in, upstream lost,
a client's truncation) is stored as the share of its words that was heard.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from storage.ports import SessionRecorder, Speaker, TranscriptEvent

__all__ = ["CoachItem", "TranscriptBook", "heard_text", "segment_view"]


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


@dataclass(slots=True)
class _LearnerItem:
    start_ms: int = 0
    end_ms: int = 0


@dataclass(slots=True)
class CoachItem:
    """One answer of the coach: its place, its transcript so far, and how much audio it had."""

    previous_item_id: str | None
    transcript: list[str] = field(default_factory=list)
    final_text: str | None = None
    audio_ms: int = 0
    start_ms: int | None = None
    truncated: bool = False

    @property
    def live(self) -> bool:
        """Still taking audio and transcript (not cut short)."""
        return not self.truncated


class TranscriptBook:
    """Items, order and final segments of one session's conversation."""

    def __init__(
        self,
        recorder: SessionRecorder,
        *,
        send: Callable[[dict[str, Any]], None],
        spawn: Callable[[Awaitable[None], str], None],
        now_ms: Callable[[], int],
    ) -> None:
        self._recorder = recorder
        self._send = send
        self._spawn = spawn
        self._now_ms = now_ms
        self._seq = 0
        self._order: dict[str, int] = {}
        self._learner: dict[str, _LearnerItem] = {}
        self._coach: dict[str, CoachItem] = {}
        self.last_item_id: str | None = None

    def place(self, item_id: str) -> int:
        """The item's position in the conversation, assigned the first time the item is seen."""
        seq = self._order.get(item_id)
        if seq is None:
            self._seq += 1
            seq = self._order[item_id] = self._seq
            self.last_item_id = item_id
        return seq

    # -- learner -------------------------------------------------------------------------------
    def speech_started(self, item_id: str, start_ms: int) -> None:
        self._learner.setdefault(item_id, _LearnerItem()).start_ms = start_ms

    def speech_stopped(self, item_id: str, end_ms: int) -> None:
        self._learner.setdefault(item_id, _LearnerItem()).end_ms = end_ms

    def committed(self, item_id: str) -> None:
        self.place(item_id)
        self._learner.setdefault(item_id, _LearnerItem())

    def learner_delta(self, item_id: str, delta: str) -> None:
        self._send({"type": "transcript.delta", "speaker": "learner", "item_id": item_id, "delta": delta})

    def learner_completed(self, item_id: str, transcript: str | None) -> None:
        text = (transcript or "").strip()
        if not text:
            return
        item = self._learner.get(item_id, _LearnerItem())
        end = item.end_ms or self._now_ms()
        self.store(
            TranscriptEvent(
                speaker=Speaker.LEARNER,
                text=text,
                start_ms=item.start_ms,
                end_ms=max(end, item.start_ms),
                item_id=item_id,
                previous_item_id=None,
                seq=self.place(item_id),
            )  # fmt: skip
        )

    def forget_learner_items(self) -> None:
        """A new upstream connection: its item ids and audio clock are new."""
        self._learner.clear()

    # -- coach ---------------------------------------------------------------------------------
    def coach_added(self, item_id: str) -> None:
        self._coach[item_id] = CoachItem(previous_item_id=self.last_item_id)
        self.place(item_id)

    def coach(self, item_id: str) -> CoachItem | None:
        """The answer, while it still takes audio and transcript (None once cut, or unknown)."""
        item = self._coach.get(item_id)
        return item if item is not None and item.live else None

    def known_coach(self, item_id: str) -> CoachItem | None:
        return self._coach.get(item_id)

    def coach_delta(self, item_id: str, delta: str) -> None:
        item = self.coach(item_id)
        if item is None:
            return
        item.transcript.append(delta)
        self._send({"type": "transcript.delta", "speaker": "coach", "item_id": item_id, "delta": delta})

    def coach_done(self, item_id: str, transcript: str | None) -> None:
        item = self.coach(item_id)
        if item is None:
            return
        item.final_text = (transcript or "".join(item.transcript)).strip()
        if item.final_text:
            self._coach_segment(item_id, item, item.final_text, item.audio_ms)

    def cut(self, item_id: str, played_ms: int) -> None:
        """The answer stopped after ``played_ms`` of its audio: store what was heard, take no more."""
        item = self.coach(item_id)
        if item is None:
            return
        item.truncated = True
        full = item.final_text if item.final_text is not None else "".join(item.transcript).strip()
        text = heard_text(full, played_ms, item.audio_ms)
        if text:
            self._coach_segment(item_id, item, text, played_ms, truncated=True)

    def _coach_segment(
        self, item_id: str, item: CoachItem, text: str, audio_ms: int, *, truncated: bool = False
    ) -> None:
        start = item.start_ms if item.start_ms is not None else self._now_ms()
        self.store(
            TranscriptEvent(
                speaker=Speaker.COACH,
                text=text,
                start_ms=start,
                end_ms=start + audio_ms,
                item_id=item_id,
                previous_item_id=item.previous_item_id,
                seq=self.place(item_id),
                truncated=truncated,
            )  # fmt: skip
        )

    # -- storing -------------------------------------------------------------------------------
    def store(self, segment: TranscriptEvent) -> None:
        async def store() -> None:
            segment_id = await self._recorder.transcript(segment)
            if not segment_id:  # the session is being deleted: nothing was stored
                return
            # item_id beside the Segment (which has none): the client replaces that item's partial.
            final = {"type": "transcript.final", "segment": segment_view(segment_id, segment)}
            self._send({**final, "item_id": segment.item_id})

        self._spawn(store(), f"transcript:{segment.item_id}")
