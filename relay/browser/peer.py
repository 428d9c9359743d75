"""One WebRTC connection attempt with the learner's browser: an aiortc ``RTCPeerConnection``.

A :class:`BrowserPeer` lives for one offer/answer. aiortc cannot ICE-restart and reports a dead
network path only after about 30 s, as ``closed`` (AIORTC.md B), so a reconnect is a new offer
and a new ``BrowserPeer``, and deadness is detected here: connection state ``failed``/``closed``,
or no inbound RTP and no data-channel message for ``dead_after_s``.

Media: one ``sendrecv`` audio transceiver, negotiated once. The outbound side is the session's
:class:`~relay.browser.speaker.SpeakerTrack`; the inbound side gets the low-latency jitter buffer
and mono decoder from :mod:`relay.browser.jitter`. Events: the relay opens the data channel
``events`` (allowed for an answerer because the offer carried an application m-section; an
offer without one gets no channel, and :meth:`BrowserPeer.send_event` drops everything).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from relay.browser.close_race import install_close_race_guard
from relay.browser.ice import install_consent_guard
from relay.browser.jitter import LowLatencyJitterBuffer, install_low_latency_jitter_buffer
from relay.browser.sdp import InvalidOffer
from relay.browser.speaker import SpeakerTrack

__all__ = ["EVENTS_LABEL", "BrowserPeer", "PeerStats"]

logger = logging.getLogger(__name__)

EVENTS_LABEL = "events"
# Inbound data-channel messages are small control messages; anything bigger is not ours.
_MAX_MESSAGE_BYTES = 16 * 1024
_POLL_S = 0.1
_MAX_PENDING_EVENTS = 64


@dataclass(slots=True)
class PeerStats:
    """Counters of one :class:`BrowserPeer`."""

    events_sent: int = 0
    events_dropped_not_open: int = 0
    events_dropped_backpressure: int = 0
    messages_received: int = 0
    messages_malformed: int = 0
    heartbeats: int = 0
    handler_errors: int = 0


def _tasks_of(pc: RTCPeerConnection, existing: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks created since ``existing`` that run a method of ``pc`` (aiortc keeps no handle on them)."""
    found = []
    for task in asyncio.all_tasks() - existing:
        frame = getattr(task.get_coro(), "cr_frame", None)
        if frame is not None and frame.f_locals.get("self") is pc:
            found.append(task)
    return found


class BrowserPeer:
    """Owns one ``RTCPeerConnection`` for one connection attempt of a session.

    Lifecycle: ``negotiate(offer)`` once, then media flows on its own; ``wait_dead()`` tells when
    the browser is gone; ``aclose()`` (also ``async with``) releases everything: the peer
    connection, its UDP sockets, the decoder thread and this object's watchdog task.

    ``on_event(message)`` receives every JSON object the browser sends on any data channel except
    heartbeats (``{"type": "ping"}``, answered with ``{"type": "pong"}``). It is called on the
    event loop and must not block; an exception in it is logged and counted, not propagated.
    """

    def __init__(
        self,
        *,
        peer_id: str,
        configuration: RTCConfiguration,
        speaker: SpeakerTrack,
        on_event: Callable[[dict[str, Any]], None],
        dead_after_s: float = 4.0,
        connect_timeout_s: float = 10.0,
        max_buffered_bytes: int = 256 * 1024,
    ) -> None:
        self.peer_id = peer_id
        self.stats = PeerStats()
        self._configuration = configuration
        self._speaker = speaker
        self._on_event = on_event
        self._dead_after_s = dead_after_s
        self._connect_timeout_s = connect_timeout_s
        self._max_buffered = max_buffered_bytes
        self._pc: RTCPeerConnection | None = None
        self._events: RTCDataChannel | None = None
        self._mic: MediaStreamTrack | None = None
        self._jitter: LowLatencyJitterBuffer | None = None
        self._last_message: float | None = None
        self._dead: asyncio.Future[str] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._pc_tasks: list[asyncio.Task[Any]] = []
        self._pending: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_PENDING_EVENTS)

    async def __aenter__(self) -> BrowserPeer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- negotiation ---------------------------------------------------------------------------

    async def negotiate(self, offer_sdp: str) -> str:
        """Apply the browser's offer and return the complete answer SDP (all candidates included).

        Expects an offer that passed :func:`relay.browser.sdp.validate_offer`. Raises
        :class:`~relay.browser.sdp.InvalidOffer` if aiortc still rejects it (the peer is then
        closed), ``RuntimeError`` if called twice or after :meth:`aclose`. Takes as long as ICE
        gathering (host candidates: milliseconds; a STUN/TURN server: up to aioice's 5 s). If it
        is cancelled, call :meth:`aclose` as always.
        """
        if self._pc is not None or self._closing is not None:
            raise RuntimeError("BrowserPeer.negotiate() may be called once, before aclose()")
        install_consent_guard()
        install_close_race_guard()
        pc = self._pc = RTCPeerConnection(self._configuration)
        pc.on("datachannel", self._attach_channel)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc's parser raises assorted types on bad input
            await self.aclose()
            raise InvalidOffer("offer could not be applied") from exc
        audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
        if len(audio) != 1 or audio[0].receiver.track is None:
            await self.aclose()
            raise InvalidOffer("offer must contain exactly one audio section the browser sends on")
        transceiver = audio[0]
        # Fills this transceiver's sender and makes it sendrecv; the outlet retires the previous peer's.
        pc.addTrack(self._speaker.outlet())
        self._jitter = install_low_latency_jitter_buffer(transceiver.receiver)
        self._mic = transceiver.receiver.track
        if pc.sctp is not None:
            self._events = pc.createDataChannel(EVENTS_LABEL)
            self._events.on("open", self._on_events_open)
            self._attach_channel(self._events)
        answer = await pc.createAnswer()
        existing = asyncio.all_tasks()
        await pc.setLocalDescription(answer)
        self._pc_tasks = _tasks_of(pc, existing)
        self._watchdog = asyncio.create_task(self._watch(), name=f"peer:{self.peer_id}:watchdog")
        return str(pc.localDescription.sdp)

    @property
    def mic(self) -> MediaStreamTrack | None:
        """The learner's inbound audio track, once :meth:`negotiate` has applied the offer."""
        return self._mic

    @property
    def connection_state(self) -> str:
        """aiortc's ``connectionState`` (``new`` before negotiation); it has no ``disconnected``."""
        return "new" if self._pc is None else str(self._pc.connectionState)

    @property
    def jitter_buffer(self) -> LowLatencyJitterBuffer | None:
        """The inbound jitter buffer (for its counters), once negotiated."""
        return self._jitter

    # -- events ------------------------------------------------------------------------------

    def send_event(self, event: dict[str, Any]) -> None:
        """Send ``event`` as JSON on the ``events`` channel; never blocks.

        Between :meth:`negotiate` and the channel opening (the browser still has to apply the
        answer and connect), up to 64 events wait and are sent in order on open, the oldest
        dropped first beyond that, so the first ``session.state`` is not lost. Otherwise dropped
        and counted: before negotiation, once the channel has closed, when the offer had no data
        channel section, or when more than ``max_buffered_bytes`` are still waiting to be sent (a
        stalled browser must not grow relay memory).
        """
        channel = self._events
        if channel is not None and channel.readyState == "connecting":
            if len(self._pending) == self._pending.maxlen:
                self.stats.events_dropped_not_open += 1
            self._pending.append(event)
            return
        if channel is None or channel.readyState != "open":
            self.stats.events_dropped_not_open += 1
            return
        self._send_now(channel, event)

    def _send_now(self, channel: RTCDataChannel, event: dict[str, Any]) -> None:
        if channel.bufferedAmount > self._max_buffered:
            self.stats.events_dropped_backpressure += 1
            return
        try:
            channel.send(json.dumps(event, separators=(",", ":")))
        except Exception:  # closing underneath us: same as not open
            self.stats.events_dropped_not_open += 1
            return
        self.stats.events_sent += 1

    async def flush_events(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until every event sent so far has left for the browser.

        Used before closing the peer on a fatal error, so the learner learns why. Safe to cancel.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            channel = self._events
            if channel is None or channel.readyState in ("closing", "closed"):
                return
            if channel.readyState == "open" and not self._pending and channel.bufferedAmount == 0:
                return
            await asyncio.sleep(0.02)

    def _on_events_open(self) -> None:
        channel = self._events
        while self._pending and channel is not None:
            self._send_now(channel, self._pending.popleft())

    def _attach_channel(self, channel: RTCDataChannel) -> None:
        channel.on("message", lambda message: self._on_message(channel, message))

    def _on_message(self, channel: RTCDataChannel, message: str | bytes) -> None:
        self.stats.messages_received += 1
        if len(message) > _MAX_MESSAGE_BYTES:
            self.stats.messages_malformed += 1
            return
        try:
            decoded = json.loads(message)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
            decoded = None
        if not isinstance(decoded, dict) or not isinstance(decoded.get("type"), str):
            self.stats.messages_malformed += 1
            return
        self._last_message = time.monotonic()
        if decoded["type"] == "ping":
            self.stats.heartbeats += 1
            if channel.readyState == "open":
                channel.send('{"type":"pong"}')
            return
        try:
            self._on_event(decoded)
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("peer.event_handler_failed", extra={"peer_id": self.peer_id})

    # -- liveness ----------------------------------------------------------------------------

    async def wait_dead(self) -> str:
        """Wait until the peer is gone and return why.

        Reasons: ``"connection_failed"`` / ``"connection_closed"`` (aiortc's state; ``closed`` is
        what it reports after its ~30 s consent timeout), ``"inactive"`` (no inbound RTP and no
        data-channel message for ``dead_after_s``), ``"connect_timeout"`` (nothing at all within
        ``connect_timeout_s`` of the answer), ``"closed"`` (:meth:`aclose` was called). Any number
        of callers may wait; cancelling a waiter is safe and affects no one else.
        """
        return await asyncio.shield(self._dead_future())

    def _dead_future(self) -> asyncio.Future[str]:
        if self._dead is None:
            self._dead = asyncio.get_running_loop().create_future()
        return self._dead

    def _set_dead(self, reason: str) -> None:
        dead = self._dead_future()
        if not dead.done():
            logger.info("peer.gone", extra={"peer_id": self.peer_id, "reason": reason})
            dead.set_result(reason)

    def _on_connection_state(self) -> None:
        if self._pc is not None and self._pc.connectionState in ("failed", "closed"):
            self._set_dead(f"connection_{self._pc.connectionState}")

    async def _watch(self) -> None:
        """Inbound-activity watchdog: aiortc itself notices a vanished browser only after ~30 s."""
        started = time.monotonic()
        while True:
            last_rtp = self._jitter.last_arrival if self._jitter is not None else None
            seen = [t for t in (self._last_message, last_rtp) if t is not None]
            if seen:
                deadline, reason = max(seen) + self._dead_after_s, "inactive"
            else:
                deadline, reason = started + self._connect_timeout_s, "connect_timeout"
            now = time.monotonic()
            if now >= deadline:
                self._set_dead(reason)
                return
            # Activity only moves an "inactive" deadline later, so sleeping until it is exact;
            # before the first packet the inactivity clock may start at any moment, so poll.
            await asyncio.sleep(deadline - now if seen else min(deadline - now, _POLL_S))

    # -- shutdown ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the peer connection and stop this peer's task; idempotent and concurrent-safe.

        Every caller waits for the same close; cancelling one caller does not interrupt it.
        Afterwards :meth:`wait_dead` returns (``"closed"`` unless it had another reason already),
        the mic track ends (its reader sees ``MediaStreamError``) and the decoder thread is gone.
        The speaker track itself stays usable for the next peer.
        """
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"peer:{self.peer_id}:close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._set_dead("closed")
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.wait([self._watchdog])
        if self._pc is not None:
            await self._pc.close()
        # aiortc does not cancel its connect task on close; it ends on its own one ICE tick
        # (20 ms) later. Waiting for it makes "closed" mean no task of this peer is left.
        pending = [t for t in self._pc_tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        self._events = None
        self._pending.clear()
