"""LiveSession: everything of one practice conversation in this process.

It owns the model link (one logical upstream conversation that survives reconnects), the current
browser peer (replaced when the learner reconnects), the speaker track, the recorder and every
task, each named ``session:<id>:<role>``. :meth:`run` is the one main task; :meth:`end` asks it to
finish and waits. Leaving :meth:`run`, for whatever reason, closes everything in reverse order and
always finalizes the recording.

States (DESIGN.md): ``connecting -> live <-> reconnecting -> ending -> ended``, and ``failed`` when
the first connection never became live.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from relay.browser.ice import rtc_configuration
from relay.browser.peer import BrowserPeer
from relay.browser.speaker import SpeakerTrack
from relay.config import Settings
from relay.errors import Conflict, NotFound
from relay.model import protocol
from relay.model.link import LinkStatus, ModelLink, UpstreamFatal
from relay.observability.logging import ContextLogger, log_failure
from relay.observability.metrics import Metrics
from relay.session.downlink import Downlink
from relay.session.registry import StateWriter
from relay.session.uplink import UpstreamClock, run_uplink
from relay.upstream import Upstream
from storage.models import SessionStatus
from storage.ports import SessionRecorder, Speaker
from storage.uploader import RETRYABLE

__all__ = ["LiveSession", "SessionSpec"]

log = logging.getLogger("relay.session")

TRANSCRIPTION_MODEL: Final = "gpt-4o-mini-transcribe"
FLUSH_ON_ERROR_S: Final = 2.0
STATS_EVERY_S: Final = 5.0
OPEN_STATES: Final = frozenset({SessionStatus.CONNECTING, SessionStatus.LIVE, SessionStatus.RECONNECTING})


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """What a live session needs to know about its session row and topic."""

    session_id: str
    user_id: str
    instructions: str
    turn_detection: dict[str, Any] | None
    earlier: tuple[protocol.HistoryItem, ...] = ()
    """The conversation before this session (it continues one whose relay died), replayed to the
    model before anything else so the coach picks up the thread."""


class LiveSession:
    """One live session. Create it, start :meth:`run` as a task, hand it peers, :meth:`end` it."""

    def __init__(
        self,
        spec: SessionSpec,
        *,
        settings: Settings,
        upstream: Upstream,
        recorder: SessionRecorder,
        metrics: Metrics,
        write_state: StateWriter,
        publish: Callable[[dict[str, Any]], None],
        on_closed: Callable[[LiveSession], None],
    ) -> None:
        """``publish`` gets every event of the browser's ``events`` channel as it is sent (the
        session's :class:`~relay.session.feed.EventFeed`); it must not block."""
        self.spec = spec
        self.id = spec.session_id
        self.state = SessionStatus.CREATED
        self._settings = settings
        self._metrics = metrics
        self._recorder = recorder
        self._write_state = write_state
        self._publish = publish
        self._on_closed = on_closed
        self._log = ContextLogger(log, {"session_id": self.id})
        self.origin = time.monotonic()
        self._client = upstream.client()
        self._clock = UpstreamClock()
        self._speaker = SpeakerTrack(
            bitrate=settings.coach_bitrate,
            complexity=settings.coach_complexity,
            clock_origin=self.origin,
            on_frame=self._on_coach_frame,
            on_item_started=self._on_coach_started,
            on_item_done=self._on_coach_done,
        )
        self.link = ModelLink(
            client=self._client,
            model=settings.model,
            session_config=self._session_config,
            history=self._history,
            on_event=self._on_model_event,
            on_status=self._on_link_status,
            on_audio_queued=self._on_inbound_latency,
            replay_first=bool(spec.earlier),
        )
        self._downlink = Downlink(
            session_id=self.id,
            speaker=self._speaker,
            link=self.link,
            recorder=recorder,
            clock=self._clock,
            send=self._send,
            session_ms=self.now_ms,
            spawn=self._spawn,
            on_barge_in=metrics.barge_ins.inc,
            on_response_latency=self._on_response_latency,
        )
        self.peer: BrowserPeer | None = None
        self._peer_tasks: list[asyncio.Task[None]] = []
        self._helpers: set[asyncio.Task[None]] = set()
        self._end_requested = asyncio.Event()
        self._first_peer = asyncio.Event()
        self._end_reason = "ended"
        self._ended = asyncio.get_running_loop().create_future()
        self._gap_started_ms: int | None = None
        self._grace: asyncio.Task[None] | None = None
        self._state_lock = asyncio.Lock()
        self._ever_live = False
        self._retrying = False
        self._published: dict[str, int] = {}
        metrics.session_state(None, self.state)

    # -- public --------------------------------------------------------------------------------
    @property
    def confirmed_truncations(self) -> dict[str, int]:
        """Barge-in cuts the upstream confirmed: item id -> audio_end_ms."""
        return dict(self._downlink.truncated)

    def now_ms(self) -> int:
        return int((time.monotonic() - self.origin) * 1000)

    async def connect_peer(self, offer_sdp: str) -> tuple[str, str]:
        """Negotiate a new browser leg (first connection or reconnect); returns (peer id, answer SDP).

        A reconnect replaces the old peer at once: same session, same upstream, one recording with
        the gap between the two legs noted.
        """
        if self._end_requested.is_set():
            raise Conflict("The session has ended.", code="session_ended")
        if self.state == SessionStatus.CREATED:
            await self._transition(SessionStatus.CONNECTING)
        peer_id = "peer_" + secrets.token_urlsafe(12)
        peer = BrowserPeer(
            peer_id=peer_id,
            configuration=rtc_configuration(list(self._settings.ice_servers)),
            speaker=self._speaker,
            on_event=self._on_browser_message,
        )
        try:
            answer = await peer.negotiate(offer_sdp)
        except BaseException:
            await peer.aclose()
            if self.peer is None and self._grace is None:
                # Admitted, but no leg came of it (no media port, a negotiation error): like a lost
                # leg, it gets the reconnect grace for a working offer, then the session ends
                # instead of holding its slot until the maximum duration.
                self._grace = asyncio.create_task(
                    self._grace_window("no_peer"), name=f"session:{self.id}:grace"
                )
            raise
        if self._end_requested.is_set():  # ended while negotiating
            await peer.aclose()
            raise Conflict("The session has ended.", code="session_ended")
        old, self.peer = self.peer, peer
        self._first_peer.set()
        await self._stop_peer_tasks()
        if old is not None:
            self._spawn(old.aclose(), "close-old-peer")
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._close_gap()
        mic = peer.mic
        assert mic is not None  # negotiate() guarantees the audio receiver
        self._peer_tasks = [
            asyncio.create_task(
                run_uplink(
                    mic,
                    clock_origin=self.origin,
                    link=self.link,
                    recorder=self._recorder,
                    clock=self._clock,
                ),
                name=f"session:{self.id}:uplink",
            ),  # fmt: skip
            asyncio.create_task(self._watch_peer(peer), name=f"session:{self.id}:watchdog"),
        ]
        await self._transition(SessionStatus.LIVE if self.link.connected else SessionStatus.CONNECTING)
        self._log.info("session.peer_connected", extra={"peer_id": peer_id})
        return peer_id, answer

    async def close_peer(self, peer_id: str) -> None:
        """The browser hung up this leg (DELETE): wait for a reconnect, then end."""
        if self.peer is None or self.peer.peer_id != peer_id:
            raise NotFound("No such peer.", code="peer_not_found")
        await self._peer_lost(self.peer, "closed_by_client")

    async def end(self, reason: str) -> None:
        """End the session and wait until everything is closed and the recording finalized."""
        if not self._end_requested.is_set():
            self._end_reason = reason
            self._end_requested.set()
        await asyncio.shield(self._ended)

    async def wait_ended(self) -> None:
        await asyncio.shield(self._ended)

    async def run(self) -> None:
        """The session's main task: runs the model link until the session ends, then cleans up.

        The upstream is opened only once the first browser leg is negotiated: no model time is
        spent on a learner who never connects.
        """
        link_task: asyncio.Task[None] | None = None
        ender = asyncio.create_task(self._end_requested.wait(), name=f"session:{self.id}:end-wait")
        deadline = asyncio.create_task(self._max_duration(), name=f"session:{self.id}:max-duration")
        first_peer = asyncio.create_task(self._first_peer.wait(), name=f"session:{self.id}:first-peer")
        stats = asyncio.create_task(self._publish_stats_every(STATS_EVERY_S), name=f"session:{self.id}:stats")
        try:
            await asyncio.wait({first_peer, ender, deadline}, return_when=asyncio.FIRST_COMPLETED)
            if self._end_requested.is_set() or deadline.done():
                return
            link_task = asyncio.create_task(self.link.run(), name=f"session:{self.id}:link")
            done, _ = await asyncio.wait({link_task, ender, deadline}, return_when=asyncio.FIRST_COMPLETED)
            if link_task in done and not self._end_requested.is_set():
                exc = link_task.exception()
                code = exc.code if isinstance(exc, UpstreamFatal) else "upstream_failed"
                self._send(
                    {"type": "error", "code": code, "message": _MESSAGES.get(code, _MESSAGES["upstream"])}
                )
                self._end_reason = "upstream_failed"
        except BaseException as exc:  # cancellation included: the recording is finalized regardless
            self._end_reason = "shutdown" if isinstance(exc, asyncio.CancelledError) else "internal_error"
            raise
        finally:
            for task in (ender, deadline, first_peer, stats):
                task.cancel()
            await asyncio.gather(ender, deadline, first_peer, stats, return_exceptions=True)
            await self._shutdown(link_task)

    # -- lifecycle internals -------------------------------------------------------------------
    async def _shutdown(self, link_task: asyncio.Task[None] | None) -> None:
        try:
            await self._transition(SessionStatus.ENDING, self._end_reason)
            self._downlink.interrupt_playout("ending")
            await self._stop_peer_tasks()
            if self._grace is not None:
                self._grace.cancel()
            peer, self.peer = self.peer, None
            if peer is not None:
                if self._end_reason == "upstream_failed":
                    await peer.flush_events(FLUSH_ON_ERROR_S)  # let the learner hear why
                await peer.aclose()
            await self.link.aclose()
            if link_task is not None:
                link_task.cancel()
                await asyncio.gather(link_task, return_exceptions=True)
            self._close_gap()
            helpers = list(self._helpers)
            await asyncio.gather(*helpers, return_exceptions=True)  # transcript writes land first
            await self._recorder.aclose(status="complete")
            await self._client.close()
            final = SessionStatus.ENDED if self._ever_live else SessionStatus.FAILED
            await self._transition(final, self._end_reason)
            self._metrics.session_outcomes.labels(self._end_reason).inc()
            self._publish_stats()
            self._log.info("session.ended", extra={"reason": self._end_reason, "duration_ms": self.now_ms()})
        finally:
            self._metrics.session_state(self.state, None)
            self._on_closed(self)
            if not self._ended.done():
                self._ended.set_result(None)

    async def _publish_stats_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self._publish_stats()

    def _publish_stats(self) -> None:
        """Move counter deltas of the speaker and the link into the process metrics."""
        speaker, link = self._speaker.stats, self.link.stats
        current = {
            "sent": speaker.frames_sent,
            "late": speaker.frames_late_5ms,
            "dropped": speaker.drained_frames + speaker.skipped_slots,
            "upstream_dropped": link.dropped_audio_chunks,
        }
        for key, value in current.items():
            delta = value - self._published.get(key, 0)
            if delta <= 0:
                continue
            if key == "upstream_dropped":
                self._metrics.upstream_audio_dropped.inc(delta)
            else:
                self._metrics.playout_frames.labels(key).inc(delta)
        self._published = current

    async def _max_duration(self) -> None:
        await asyncio.sleep(self._settings.max_session_s)
        self._end_reason = "max_duration"
        self._end_requested.set()

    async def _watch_peer(self, peer: BrowserPeer) -> None:
        reason = await peer.wait_dead()
        self._metrics.peer_losses.labels(reason).inc()
        await self._peer_lost(peer, reason)

    async def _peer_lost(self, peer: BrowserPeer, reason: str) -> None:
        if peer is not self.peer or self._end_requested.is_set():
            return
        self._log.info("session.peer_lost", extra={"peer_id": peer.peer_id, "reason": reason})
        self.peer = None
        self._gap_started_ms = self.now_ms()
        self._downlink.interrupt_playout("peer_lost")
        current = asyncio.current_task()
        for task in self._peer_tasks:
            if task is not current:
                task.cancel()
        self._spawn(peer.aclose(), "close-lost-peer")
        await self._transition(SessionStatus.RECONNECTING, reason)
        self._grace = asyncio.create_task(self._grace_window(), name=f"session:{self.id}:grace")

    async def _grace_window(self, reason: str = "grace_expired") -> None:
        await asyncio.sleep(self._settings.reconnect_grace_s)
        self._end_reason = reason
        self._end_requested.set()

    async def _stop_peer_tasks(self) -> None:
        tasks, self._peer_tasks = self._peer_tasks, []
        current = asyncio.current_task()
        tasks = [t for t in tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _close_gap(self) -> None:
        if self._gap_started_ms is not None:
            now = self.now_ms()
            for speaker in Speaker:
                self._recorder.gap(speaker, self._gap_started_ms, now, "reconnect")
            self._gap_started_ms = None

    async def _transition(self, new: str, code: str | None = None) -> None:
        async with self._state_lock:
            old = self.state
            if old == new or old in (SessionStatus.ENDED, SessionStatus.FAILED):
                return
            if old == SessionStatus.ENDING and new not in (SessionStatus.ENDED, SessionStatus.FAILED):
                return
            self.state = new
            if new == SessionStatus.LIVE:
                self._ever_live = True
            self._metrics.session_state(old, new)
            self._send({"type": "session.state", "status": new})
            try:
                await self._write_state(self.id, new, code)
            except Exception as exc:  # the database is briefly down: the live session goes on
                log_failure(
                    self._log, "session.state_write_failed", exc, expected=RETRYABLE, extra={"status": new}
                )

    def _spawn(self, work: Awaitable[None], role: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                self._log.exception("session.helper_failed", extra={"component": role})

        task = asyncio.create_task(guarded(), name=f"session:{self.id}:{role}")
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    # -- wiring --------------------------------------------------------------------------------
    def _send(self, event: dict[str, Any]) -> None:
        # Published even while no browser leg is up (reconnecting): subscribers miss nothing.
        self._publish(event)
        peer = self.peer
        if peer is not None:
            peer.send_event(event)

    def _session_config(self) -> dict[str, Any]:
        return protocol.session_object(
            instructions=self.spec.instructions,
            turn_detection=self.spec.turn_detection,
            transcription_model=TRANSCRIPTION_MODEL,
        )

    async def _history(self) -> list[protocol.HistoryItem]:
        rows = await self._recorder.history()
        own = [protocol.HistoryItem(speaker=speaker.value, text=text) for speaker, text in rows]
        return [*self.spec.earlier, *own]

    def _on_model_event(self, event: Any) -> None:
        self._downlink.on_event(event)

    def _on_link_status(self, status: LinkStatus, code: str | None) -> None:
        if status == "retrying":
            self._retrying = True
            self._downlink.interrupt_playout("upstream_lost")
            self._downlink.reset_upstream()
            self._send({"type": "error", "code": "upstream_retrying", "message": _MESSAGES["retrying"]})
        elif status == "ready":
            if self._retrying:
                self._retrying = False
                self._metrics.upstream_reconnects.labels("ok").inc()
            self._downlink.reset_upstream()
            if self.peer is not None and self.state == SessionStatus.CONNECTING:
                self._spawn(self._transition(SessionStatus.LIVE), "state")
        elif status == "failed":
            self._metrics.upstream_reconnects.labels("failed").inc()

    def _on_browser_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "session.end":
            self._end_reason = "ended_by_learner"
            self._end_requested.set()

    def _on_coach_frame(self, packet: bytes, session_ms: int, samples48: int) -> None:
        self._downlink.on_coach_frame(packet, session_ms, samples48)

    def _on_coach_started(self, item_id: str) -> None:
        self._downlink.on_coach_started(item_id)

    def _on_coach_done(self, item_id: str) -> None:
        self._downlink.on_coach_done(item_id)

    def _on_inbound_latency(self, seconds: float) -> None:
        """RTP arrival -> audio queued for the upstream writer (the link's batching included)."""
        self._metrics.inbound_latency.observe(seconds)

    def _on_response_latency(self, seconds: float, first: bool) -> None:
        self._metrics.first_response.labels("first" if first else "later").observe(seconds)


_MESSAGES: Final = {
    "retrying": "The connection to the coach dropped; reconnecting. Your audio is still being recorded.",
    "upstream": "The coach is unavailable right now. Your recording is saved.",
    "upstream_auth_failed": "The coach service refused Parley's credentials. Your recording is saved.",
    "upstream_quota": "The coach service is over its quota. Your recording is saved.",
    "upstream_unavailable": "The coach could not be reached after several tries. Your recording is saved.",
}
