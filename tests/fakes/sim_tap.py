"""A simulator that keeps a log of what it actually sent, to compare with what the relay stored.

:class:`TappedSimulator` is a :class:`~relay.simulator.SimulatorServer` whose connections note every
server event after it went out on the socket (audio deltas are kept as their byte count only).
:func:`coach_audio_ms` and :func:`finals_in_order` turn that log into the numbers a recording test
checks: how much coach audio was sent, and every final transcript in conversation order.

Use it in place of the live fixture's simulator with
``monkeypatch.setattr("tests.live.conftest.SimulatorServer", TappedSimulator)``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection

from relay.simulator import SimulatorServer

__all__ = ["SimFinal", "TappedSimulator", "coach_audio_ms", "finals_in_order", "finished_coach_items"]

PCM24K_BYTES_PER_MS = 48


class TappedSimulator(SimulatorServer):
    """``sent``: every event sent, in order, across connections (``audio_bytes`` replaces audio)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[dict[str, Any]] = []

    async def _handle(self, ws: ServerConnection) -> None:
        send = ws.send
        log = self.sent

        async def tapped(message: Any, *args: Any, **kwargs: Any) -> None:
            await send(message, *args, **kwargs)
            if isinstance(message, str):
                event = json.loads(message)
                if event.get("type") == "response.output_audio.delta":
                    event["audio_bytes"] = len(base64.b64decode(event.pop("delta")))
                log.append(event)

        ws.send = tapped  # type: ignore[method-assign]
        await super()._handle(ws)


@dataclass(frozen=True, slots=True)
class SimFinal:
    """A final transcript the simulator sent."""

    speaker: str
    item_id: str
    text: str


def coach_audio_ms(sent: list[dict[str, Any]], *, item_ids: set[str] | None = None) -> float:
    """Coach audio sent (pcm16 at 24 kHz), optionally only of some items, in ms."""
    total: int = sum(
        e["audio_bytes"]
        for e in sent
        if e["type"] == "response.output_audio.delta" and (item_ids is None or e["item_id"] in item_ids)
    )
    return total / PCM24K_BYTES_PER_MS


def finals_in_order(sent: list[dict[str, Any]]) -> list[SimFinal]:
    """Every non-empty final transcript, ordered by the items' places in the conversation."""
    order: dict[str, int] = {}
    for e in sent:
        if e["type"] == "conversation.item.added":
            order.setdefault(e["item"]["id"], len(order))
    finals: list[SimFinal] = []
    for e in sent:
        if e["type"] == "conversation.item.input_audio_transcription.completed":
            finals.append(SimFinal("learner", e["item_id"], e["transcript"].strip()))
        elif e["type"] == "response.output_audio_transcript.done":
            finals.append(SimFinal("coach", e["item_id"], e["transcript"].strip()))
    missing = [f.item_id for f in finals if f.item_id not in order]
    assert not missing, f"finals of items never added to the conversation: {missing}"
    return sorted((f for f in finals if f.text), key=lambda f: order[f.item_id])


def finished_coach_items(sent: list[dict[str, Any]]) -> set[str]:
    """Coach items whose audio was sent completely (``response.output_audio.done``)."""
    return {e["item_id"] for e in sent if e["type"] == "response.output_audio.done"}
