"""RealtimeBridge: one session on Parley's OpenAI-compatible socket, relayed and recorded.

::

    client socket --admit_client_event--> tap.client_event --> upstream (Parley's key)
    client socket <------ raw frame ------ tap.server_event <-- upstream

The bridge is a transparent relay: frames go through unchanged (a refused client event is
answered with an ``error`` event and not forwarded). Before relaying anything it configures the
upstream session for the topic (instructions, turn detection, input transcription) and hands the
client a ``session.created`` carrying that configuration, so a client's own ``session.update``
comes after and wins. It does not reconnect upstream by itself, unlike the WebRTC session's model
link: the conversation state lives in the client's protocol view, so a lost upstream closes the
socket (1011, or 1001 when the upstream session expired) and the client reconnects into a new
Parley session if it wants to.

Like :class:`~relay.session.session.LiveSession`, it is a member of the process's session
registry (admission, ``end``, drain) and writes its states through the same writer: ``connecting
-> live -> ending -> ended``, or ``failed`` when the upstream never became ready. Leaving
:meth:`run`, whatever happened, closes both sockets and finalizes the recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import WSCloseCode, WSMsgType, web
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from websockets.exceptions import ConnectionClosed

from relay.config import Settings
from relay.integrations.policy import ClientEventError, admit_client_event, error_event
from relay.integrations.tap import RecordingTap
from relay.model import protocol
from relay.model.link import classify
from relay.model.protocol import MalformedEvent
from relay.observability.logging import ContextLogger, log_failure
from relay.observability.metrics import Metrics
from relay.session.registry import StateWriter
from relay.session.transcripts import TranscriptBook
from relay.upstream import Upstream
from storage.models import SessionStatus
from storage.ports import SessionRecorder
from storage.uploader import RETRYABLE

__all__ = ["RealtimeBridge", "TopicConfig"]

log = logging.getLogger("relay.integrations.bridge")

CONNECT_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0
TRANSCRIPTION_MODEL: Final = "gpt-4o-mini-transcribe"
#: Application close codes of the socket (RFC 6455 leaves 4000-4999 to applications).
CLOSE_UPSTREAM_FAILED: Final = WSCloseCode.INTERNAL_ERROR  # 1011: the client may retry later
CLOSE_GOING_AWAY: Final = WSCloseCode.GOING_AWAY  # 1001: this node is shutting down / upstream expired


class TopicConfig:
    """What the bridge applies before the client speaks: the topic's coaching setup."""

    __slots__ = ("instructions", "turn_detection")

    def __init__(self, instructions: str, turn_detection: dict[str, Any] | None) -> None:
        self.instructions = instructions
        self.turn_detection = turn_detection


class _UpstreamRefused(Exception):
    """The upstream would not configure the session (an ``error`` answer to Parley's update)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


#: Upstream failures logged by class only (their text names hosts).
_UPSTREAM_EXPECTED: Final = (*RETRYABLE, _UpstreamRefused, TimeoutError, ConnectionClosed)


class RealtimeBridge:
    """Create it, register it, ``await run()`` in the socket's handler; :meth:`end` from anywhere."""

    def __init__(
        self,
        session_id: str,
        *,
        ws: web.WebSocketResponse,
        topic: TopicConfig,
        settings: Settings,
        upstream: Upstream,
        recorder: SessionRecorder,
        metrics: Metrics,
        write_state: StateWriter,
        send: Callable[[dict[str, Any]], None],
        on_closed: Callable[[RealtimeBridge], None],
    ) -> None:
        self.id = session_id
        self.state = SessionStatus.CREATED
        self._ws = ws
        self._topic = topic
        self._settings = settings
        self._client = upstream.client()
        self._recorder = recorder
        self._metrics = metrics
        self._write_state = write_state
        self._send_event = send
        self._on_closed = on_closed
        self._log = ContextLogger(log, {"session_id": session_id})
        self.origin = time.monotonic()
        self._helpers: set[asyncio.Task[None]] = set()
        self._book = TranscriptBook(recorder, send=self._publish, spawn=self._spawn, now_ms=self.now_ms)
        self._tap = RecordingTap(recorder=recorder, book=self._book, now_ms=self.now_ms, send=self._publish)
        self._end_requested = asyncio.Event()
        self._end_reason = "ended_by_client"
        self._close_code: int = WSCloseCode.OK
        self._ended = asyncio.get_running_loop().create_future()
        self._ever_live = False
        self._client_lock = asyncio.Lock()
        self.refused_events = 0
        metrics.session_state(None, self.state)

    def now_ms(self) -> int:
        return int((time.monotonic() - self.origin) * 1000)

    # -- the registry's view -------------------------------------------------------------------
    async def end(self, reason: str) -> None:
        """End the session (close the socket) and wait until the recording is finalized."""
        if not self._end_requested.is_set():
            self._end_reason = reason
            self._close_code = CLOSE_GOING_AWAY if reason == "shutdown" else WSCloseCode.OK
            self._end_requested.set()
        await asyncio.shield(self._ended)

    async def wait_ended(self) -> None:
        await asyncio.shield(self._ended)

    # -- main ----------------------------------------------------------------------------------
    async def run(self) -> None:
        conn: AsyncRealtimeConnection | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self._transition(SessionStatus.CONNECTING)
            opened = await self._open_upstream()
            if opened is None:
                return
            conn, created = opened
            await self._transition(SessionStatus.LIVE)
            await self._to_client(created)  # the client may start once the session is live
            tasks = [
                asyncio.create_task(self._client_to_upstream(conn), name=f"realtime:{self.id}:from-client"),
                asyncio.create_task(self._upstream_to_client(conn), name=f"realtime:{self.id}:from-upstream"),
                asyncio.create_task(self._end_requested.wait(), name=f"realtime:{self.id}:end-wait"),
                asyncio.create_task(self._max_duration(), name=f"realtime:{self.id}:max-duration"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    self._log.warning(
                        "realtime.pump_failed", extra={"error_type": type(task.exception()).__name__}
                    )
                    self._end_reason, self._close_code = "internal_error", WSCloseCode.INTERNAL_ERROR
        except BaseException as exc:
            self._end_reason = "shutdown" if isinstance(exc, asyncio.CancelledError) else "internal_error"
            self._close_code = (
                CLOSE_GOING_AWAY if self._end_reason == "shutdown" else WSCloseCode.INTERNAL_ERROR
            )
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._shutdown(conn)

    async def _open_upstream(self) -> tuple[AsyncRealtimeConnection, str] | None:
        """Connect with Parley's key and configure the topic; the client's ``session.created`` with it."""
        manager = self._client.realtime.connect(model=self._settings.model)
        conn: AsyncRealtimeConnection | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                conn = await manager.enter()
                created = await self._next_event(conn)
                if created.get("type") != "session.created":
                    raise _UpstreamRefused(
                        str((created.get("error") or {}).get("code") or "upstream_rejected")
                    )
                await conn.send_raw(json.dumps(protocol.session_update_event(self._session_config())))
                while True:
                    event = await self._next_event(conn)
                    if event.get("type") == "session.updated":
                        break
                    if event.get("type") == "error":
                        raise _UpstreamRefused(
                            str((event.get("error") or {}).get("code") or "upstream_rejected")
                        )
            # The client sees the session as created with the topic's setup.
            return conn, json.dumps({**created, "session": event["session"]})
        except Exception as exc:
            code = exc.code if isinstance(exc, _UpstreamRefused) else _upstream_code(exc)
            log_failure(
                self._log, "realtime.upstream_failed", exc, expected=_UPSTREAM_EXPECTED, extra={"code": code}
            )
            self._end_reason, self._close_code = "upstream_failed", CLOSE_UPSTREAM_FAILED
            await self._refuse(
                ClientEventError(
                    code,
                    "The coach service is unavailable; try again shortly.",
                    None,
                    None,
                    type="server_error",
                )
            )
            if conn is not None:
                await _close_quietly(conn)
            return None

    async def _next_event(self, conn: AsyncRealtimeConnection) -> dict[str, Any]:
        """The next upstream event as a dict (recorded in the event log like every other)."""
        raw = await conn.recv_bytes()
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise MalformedEvent("server event is not an object")
        self._tap.server_event(protocol.decode(raw))
        return data

    async def _client_to_upstream(self, conn: AsyncRealtimeConnection) -> None:
        async for msg in self._ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            admitted = admit_client_event(msg.data, model=self._settings.model)
            if isinstance(admitted, ClientEventError):
                self.refused_events += 1
                self._metrics.realtime_refused.labels(admitted.code).inc()
                self._log.info("realtime.event_refused", extra={"code": admitted.code})
                await self._refuse(admitted)
                continue
            self._tap.client_event(admitted)
            await conn.send_raw(json.dumps(admitted, separators=(",", ":")))
        self._end_reason = "ended_by_client"

    async def _upstream_to_client(self, conn: AsyncRealtimeConnection) -> None:
        try:
            while True:
                raw = await conn.recv_bytes()
                try:
                    self._tap.server_event(protocol.decode(raw))
                except MalformedEvent:
                    self._log.warning("realtime.upstream_event_malformed", extra={"bytes": len(raw)})
                await self._to_client(raw.decode("utf-8", errors="replace"))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            self._log.info("realtime.upstream_closed", extra={"code": code})
            self._end_reason = "upstream_closed"
            # An expired upstream session (1001) is a normal end the client's SDK may reconnect after.
            self._close_code = (
                CLOSE_GOING_AWAY
                if code == 1001
                else (WSCloseCode.OK if code == 1000 else CLOSE_UPSTREAM_FAILED)
            )

    async def _max_duration(self) -> None:
        await asyncio.sleep(self._settings.max_session_s)
        self._end_reason = "max_duration"

    # -- output --------------------------------------------------------------------------------
    async def _to_client(self, text: str) -> None:
        if self._ws.closed:
            return
        async with self._client_lock:  # one frame at a time from both pumps
            with contextlib.suppress(ConnectionError):
                await self._ws.send_str(text)

    async def _refuse(self, error: ClientEventError) -> None:
        await self._to_client(json.dumps(error_event(error)))

    def _publish(self, event: dict[str, Any]) -> None:
        self._send_event(event)

    def _spawn(self, work: Awaitable[None], role: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                self._log.exception("realtime.helper_failed", extra={"component": role})

        task = asyncio.create_task(guarded(), name=f"realtime:{self.id}:{role}")
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    def _session_config(self) -> dict[str, Any]:
        return protocol.session_object(
            instructions=self._topic.instructions,
            turn_detection=self._topic.turn_detection,
            transcription_model=TRANSCRIPTION_MODEL,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    async def _transition(self, new: str, code: str | None = None) -> None:
        old = self.state
        if old == new:
            return
        self.state = new
        if new == SessionStatus.LIVE:
            self._ever_live = True
        self._metrics.session_state(old, new)
        self._publish({"type": "session.state", "status": new})
        try:
            await self._write_state(self.id, new, code)
        except Exception as exc:  # the database is briefly down: the session goes on
            log_failure(
                self._log, "realtime.state_write_failed", exc, expected=RETRYABLE, extra={"status": new}
            )

    async def _shutdown(self, conn: AsyncRealtimeConnection | None) -> None:
        try:
            await self._transition(SessionStatus.ENDING, self._end_reason)
            if not self._ws.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await self._ws.close(code=self._close_code, message=self._end_reason.encode())
            if conn is not None:
                await _close_quietly(conn)
            await asyncio.gather(*list(self._helpers), return_exceptions=True)  # transcript writes land first
            await self._recorder.aclose(status="complete")
            await self._client.close()
            final = SessionStatus.ENDED if self._ever_live else SessionStatus.FAILED
            await self._transition(final, self._end_reason)
            self._metrics.session_outcomes.labels(self._end_reason).inc()
            self._log.info("realtime.ended", extra={"reason": self._end_reason, "duration_ms": self.now_ms(),
                                                    "count": self.refused_events})  # fmt: skip
        finally:
            self._metrics.session_state(self.state, None)
            self._on_closed(self)
            if not self._ended.done():
                self._ended.set_result(None)


def _upstream_code(exc: BaseException) -> str:
    classified = classify(exc)
    return classified.code if classified is not None and classified.code else "upstream_unavailable"


async def _close_quietly(conn: AsyncRealtimeConnection) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await conn.close()
