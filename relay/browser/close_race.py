"""A guard for aiortc's race between ``RTCPeerConnection.close()`` and its connect task.

aiortc 1.x connects transports in a task (``__connect``) that awaits the ICE and DTLS handshakes and
then starts the RTP senders and receivers. ``close()`` stops the senders and receivers first, then
awaits the data channel transport, and only then stops DTLS. When a DTLS handshake completes in
that window, the connect task resumes on a closing peer whose DTLS is still "connected" and starts
the senders and receivers that ``close()`` has already passed: their RTCP tasks then run for the
life of the process, waking every second (a peer closed while connecting: a learner who hangs up
at once, a session ended right after its offer, a shutdown).

The guard runs after the connect task on a peer that was closed meanwhile and stops what it
started. ``stop()`` of a sender or receiver that never started is a no-op, and one that
``close()`` already stopped has no running tasks, so the guard only touches the leaked ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from aiortc import RTCPeerConnection

__all__ = ["install_close_race_guard", "running_media_tasks"]

_CONNECT_ATTR = "_RTCPeerConnection__connect"
# Kept so the guard can call it, and so tests can put it back: the class attribute is replaced.
_ORIGINAL_CONNECT: Callable[[Any], Coroutine[Any, Any, None]] = getattr(RTCPeerConnection, _CONNECT_ATTR)

_TASK_ATTRS = {
    "sender": ("_RTCRtpSender__rtp_task", "_RTCRtpSender__rtcp_task"),
    "receiver": ("_RTCRtpReceiver__rtcp_task",),
}


def _running(part: Any, attrs: tuple[str, ...]) -> list[asyncio.Task[Any]]:
    tasks = (getattr(part, attr, None) for attr in attrs)
    return [t for t in tasks if isinstance(t, asyncio.Task) and not t.done()]


def running_media_tasks(pc: RTCPeerConnection) -> list[asyncio.Task[Any]]:
    """The RTP/RTCP tasks of ``pc``'s senders and receivers that have not ended."""
    return [
        task
        for transceiver in pc.getTransceivers()
        for role, attrs in _TASK_ATTRS.items()
        for task in _running(getattr(transceiver, role), attrs)
    ]


async def _connect_then_stop_if_closed(self: RTCPeerConnection) -> None:
    try:
        await _ORIGINAL_CONNECT(self)
    finally:
        if self.signalingState == "closed":
            for transceiver in self.getTransceivers():
                for role, attrs in _TASK_ATTRS.items():
                    part = getattr(transceiver, role)
                    if _running(part, attrs):  # only what close() passed before it started
                        await part.stop()


def install_close_race_guard() -> None:
    """Stop the media a peer's connect task starts after ``close()`` (process-wide, idempotent)."""
    setattr(RTCPeerConnection, _CONNECT_ATTR, _connect_then_stop_if_closed)
