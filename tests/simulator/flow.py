"""Small helpers to drive an SDK realtime connection in tests."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable
from typing import Any

from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime import RealtimeServerEvent

from .audio import frames

MANUAL: dict[str, Any] = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}


WAIT_S = 10.0
"""Longest wait for an expected event; a test waiting longer is stuck, not slow."""


async def until(conn: AsyncRealtimeConnection, *types: str) -> list[RealtimeServerEvent]:
    """Receive events up to and including the first whose type is in ``types``; return them all."""
    got: list[RealtimeServerEvent] = []
    async with asyncio.timeout(WAIT_S):
        while True:
            event = await conn.recv()
            got.append(event)
            if event.type in types:
                return got


async def ready(conn: AsyncRealtimeConnection, session: dict[str, Any] | None = None) -> RealtimeServerEvent:
    """Take ``session.created`` and, if ``session`` is given, apply it and wait for ``session.updated``."""
    created = (await until(conn, "session.created"))[-1]
    if session is not None:
        await conn.session.update(session=session)
        await until(conn, "session.updated")
    return created


async def send_audio(conn: AsyncRealtimeConnection, pcm: bytes, ms: int = 20) -> None:
    """Append ``pcm`` in ``ms`` chunks as fast as the socket takes them (the VAD runs on audio time)."""
    for chunk in frames(pcm, ms):
        await conn.input_audio_buffer.append(audio=chunk)


def types_of(events: Iterable[RealtimeServerEvent]) -> list[str]:
    return [e.type for e in events]


def audio_of(events: Iterable[RealtimeServerEvent]) -> bytes:
    """The decoded output audio of every ``response.output_audio.delta`` in ``events``."""
    return b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")


def without_deltas(events: Iterable[RealtimeServerEvent]) -> list[str]:
    """Event types with the streaming deltas left out, for order assertions."""
    return [t for t in types_of(events) if not t.endswith(".delta")]
