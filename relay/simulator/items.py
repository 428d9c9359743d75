"""Conversation items as the simulator stores them: the JSON the server shows, plus their audio."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from relay.simulator.formats import AudioFormat


@dataclass(slots=True, eq=False)
class Item:
    """One conversation item. ``data`` is its server-side JSON without audio; ``audio`` holds the bytes."""

    data: dict[str, Any]
    audio: bytearray | None = None
    fmt: AudioFormat | None = None
    evicted_ms: float = 0.0
    """Duration of audio dropped by the retention limit (still counted in usage)."""

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def audio_ms(self) -> float:
        if self.audio is None or self.fmt is None:
            return self.evicted_ms
        return len(self.audio) / self.fmt.bytes_per_ms

    def evict_audio(self) -> None:
        self.evicted_ms = self.audio_ms
        self.audio = None

    def public(self, *, with_audio: bool = False) -> dict[str, Any]:
        """The item as the server shows it; audio bytes only when retrieved."""
        data = dict(self.data)
        if "content" in data:
            content = [dict(part) for part in data["content"]]
            for part in content:
                part.pop("audio", None)
                if with_audio and self.audio is not None and part.get("type") in _AUDIO_PARTS:
                    part["audio"] = base64.b64encode(self.audio).decode("ascii")
            data["content"] = content
        return data


_AUDIO_PARTS = frozenset({"input_audio", "output_audio"})


def user_audio_item(item_id: str, audio: bytearray, fmt: AudioFormat) -> Item:
    """A committed stretch of the learner's audio (transcript filled in by transcription, if on)."""
    data = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_audio", "transcript": None}],
    }
    return Item(data, audio, fmt)


def assistant_item(item_id: str, fmt: AudioFormat | None) -> Item:
    """The coach's answer while it streams (``fmt`` is None for a text-only answer)."""
    data = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    return Item(data, bytearray() if fmt is not None else None, fmt)
