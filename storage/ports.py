"""What the live relay needs from persistence, as Protocols. ``relay/`` depends on these only.

The session hands the recorder every learner frame, every coach frame, every transcript event and
every upstream server event, stamped on the session's timeline (integer ms since the session
started). Audio and event calls are sync and cheap: they run on the media path and the event loop
and must never wait for storage.

Audio comes in one of two shapes per track, fixed by the first call: Opus packets that already
exist on the media path (the browser's packets as received, the coach's packets as sent), which
are stored as they are, or PCM, which the recorder encodes. Passing packets through is what keeps
recording cheap: encoding both tracks a second time cost a third of a relay process's CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

__all__ = ["RecorderFactory", "SessionRecorder", "Speaker", "TranscriptEvent"]


class Speaker(StrEnum):
    LEARNER = "learner"
    COACH = "coach"


@dataclass(frozen=True, slots=True)
class TranscriptEvent:
    """A final transcript segment: what one side said in one conversation item."""

    speaker: Speaker
    text: str
    start_ms: int
    end_ms: int
    item_id: str
    previous_item_id: str | None
    # Position in the conversation (item order upstream), not arrival order.
    seq: int
    truncated: bool = False


class SessionRecorder(Protocol):
    """Everything recorded of one session. ``aclose`` is idempotent and always finalizes."""

    def learner_audio(self, pcm: bytes, *, sample_rate: int, at_ms: int) -> None:
        """Mono s16le learner audio as received from the browser; sync, never blocks."""

    def coach_audio(self, pcm: bytes, *, sample_rate: int, at_ms: int) -> None:
        """Mono s16le coach audio as played to the browser; sync, never blocks."""

    def learner_opus(
        self, packet: bytes, *, at_ms: int, input_rate: int = 48000, samples48: int | None = None
    ) -> None:
        """One Opus packet from the browser as received (its duration is in its TOC byte)."""

    def coach_opus(
        self, packet: bytes, *, at_ms: int, input_rate: int = 24000, samples48: int | None = None
    ) -> None:
        """One Opus packet of coach audio exactly as sent to the browser. ``samples48``: how much
        of it is real audio when its end is padding (an answer's last frame); trimmed from the
        track where the packet ends a stretch of audio."""

    def gap(self, speaker: Speaker, start_ms: int, end_ms: int, reason: str) -> None:
        """A stretch with no audio on a track (peer gone): recorded as a gap, never filled."""

    def upstream_event(self, event: object, *, at_ms: int) -> None:
        """Every upstream server event as received (an SDK pydantic model or a dict), stamped with
        its receive time on the session timeline, for the audit log (JSON lines, audio payloads
        removed). Sync and cheap: it only appends; serializing happens off the event loop."""

    async def transcript(self, event: TranscriptEvent) -> str:
        """Persist a final segment (retries inside); returns the stored segment's id, or ``""``
        when the session is being deleted and nothing may be written."""

    async def history(self) -> Sequence[tuple[Speaker, str]]:
        """The final transcript so far in conversation order, e.g. to replay upstream."""

    async def aclose(self, *, status: str = "complete") -> None:
        """Flush and finalize the recording; idempotent."""


class RecorderFactory(Protocol):
    def open(self, session_id: str) -> SessionRecorder: ...
