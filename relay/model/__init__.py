"""The model edge of the live relay: the OpenAI Realtime upstream (or the simulator), over WebSocket.

``protocol`` is the Sans-I/O core (encode client events, decode server events with the SDK's
types); ``link`` is :class:`ModelLink`, one logical upstream conversation per live session with
a single-writer send queue and its own reconnect, ``session.update`` and history replay.
"""

from __future__ import annotations

from relay.model.link import (
    LinkStats,
    LinkStatus,
    ModelLink,
    OutboundQueue,
    RetryPolicy,
    UpstreamFatal,
    classify,
    classify_error_event,
)
from relay.model.protocol import Event, HistoryItem, MalformedEvent, UnknownEvent, decode

__all__ = [
    "Event",
    "HistoryItem",
    "LinkStats",
    "LinkStatus",
    "MalformedEvent",
    "ModelLink",
    "OutboundQueue",
    "RetryPolicy",
    "UnknownEvent",
    "UpstreamFatal",
    "classify",
    "classify_error_event",
    "decode",
]
