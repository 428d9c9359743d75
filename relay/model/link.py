"""ModelLink: one logical upstream conversation for one live session, across upstream reconnects.

::

    push_audio() / send()            (sync, never await the network)
          |
          v  audio coalesced into one append per ``append_ms`` (40 ms); send() flushes it first
    OutboundQueue (bounded; audio overflow drops the oldest audio, control is never dropped for audio)
          |
          v  single writer                                  on_status(connecting|ready|retrying|failed, code)
    [send loop] --> SDK AsyncRealtimeConnection --> [recv loop] --> decode --> link handlers --> on_event

Each upstream connection runs a receive loop and a single-writer send loop as named tasks, waited
with ``asyncio.wait(FIRST_COMPLETED)`` and cancelled and awaited in ``finally``. After every
``session.created`` the link sends ``session.update``; after a *re*-connect it replays the stored
transcript as items *before* any new audio goes out. Whether a failure is retried is decided by the
pure function :func:`classify`.

Transport: the official SDK connection (``client.realtime.connect``), with the SDK's own reconnect
feature left off (``on_reconnecting`` unset): it would silently move to a brand-new upstream
session with the default config and no conversation, keep flushing audio queued during the outage
late, and tell nobody (REALTIME.md §1.4). The link reconnects itself so it can re-send
``session.update``, replay the history, drop stale audio and report its status to the owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import openai
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime import RealtimeErrorEvent, RealtimeServerEvent
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from relay.errors import UpstreamError
from relay.model import protocol
from relay.model.protocol import HistoryItem, MalformedEvent, UnknownEvent

__all__ = [
    "AUTH_FAILED",
    "QUOTA",
    "REJECTED",
    "RETRYING",
    "SESSION_EXPIRED",
    "UNAVAILABLE",
    "LinkStats",
    "LinkStatus",
    "ModelLink",
    "OutboundQueue",
    "RetryPolicy",
    "UpstreamFatal",
    "classify",
    "classify_error_event",
]

_T = TypeVar("_T")

LinkStatus = Literal["connecting", "ready", "retrying", "failed"]
"""What :class:`ModelLink` reports through ``on_status``."""

# Codes that go with a status (``on_status``) or a fatal error (``UpstreamFatal.code``).
RETRYING: Final = "upstream_retrying"
"""retrying: the connection dropped, a handshake failed or timed out; trying again."""
SESSION_EXPIRED: Final = "session_expired"
"""retrying: the upstream session hit its maximum duration; the conversation goes on in a fresh one."""
AUTH_FAILED: Final = "upstream_auth_failed"
"""failed: the API key was refused (handshake 401/403 or an auth error event)."""
QUOTA: Final = "upstream_quota"
"""failed: quota or billing exhausted (error event, or a handshake refused for it)."""
REJECTED: Final = "upstream_rejected"
"""failed: the upstream refused the connection for good (other 4xx, close 1008/4xxx, bad URL)."""
UNAVAILABLE: Final = "upstream_unavailable"
"""failed: every attempt of a reconnect cycle failed."""

_AUTH_ERROR_CODES: Final = frozenset({"invalid_api_key", "invalid_authentication", "account_deactivated"})
_QUOTA_ERROR_CODES: Final = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "quota_exceeded"}
)
_FATAL_CLOSE_CODES: Final = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
"""Protocol, data or policy violations: the same request would be refused again. 3000-4999 too."""
_EXPIRY_REASON: Final = "Your session hit the maximum duration"
_PCM_BYTES_PER_MS: Final = 48
"""pcm16 mono at 24 kHz."""


class UpstreamFatal(UpstreamError):
    """The upstream failed in a way retrying cannot fix; ``code`` says why (``upstream_*``)."""

    def __init__(self, detail: str, *, code: str) -> None:
        super().__init__(detail, retryable=False, code=code)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often :class:`ModelLink` reconnects; validated on construction."""

    max_attempts: int = 5
    """Consecutive failed connection attempts before giving up with ``upstream_unavailable``."""
    initial_delay_s: float = 0.5
    """Delay before the first retry; doubles for each further one."""
    max_delay_s: float = 8.0
    """Upper bound of one delay."""
    jitter: float = 0.25
    """Each delay is scaled by a random factor in ``[1 - jitter, 1]`` (0: no jitter)."""
    connect_timeout_s: float = 10.0
    """Handshake plus the first ``session.created``; a slower attempt fails and is retried."""
    stable_after_s: float = 10.0
    """A connection that stayed ready this long resets the attempt count when it drops, so an
    upstream that accepts and then drops every connection still runs out of attempts."""
    close_timeout_s: float = 2.0
    """How long closing one upstream socket may take before the link moves on."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_delay_s < 0 or self.max_delay_s < self.initial_delay_s:
            raise ValueError("need 0 <= initial_delay_s <= max_delay_s")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        for name in ("connect_timeout_s", "close_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.stable_after_s < 0:
            raise ValueError("stable_after_s must not be negative")

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based) of a reconnect cycle."""
        base = min(self.initial_delay_s * 2.0 ** (retry - 1), self.max_delay_s)
        return base * (1 - self.jitter * rng())


@dataclass(slots=True)
class LinkStats:
    """Counters of one :class:`ModelLink` (read them for metrics; they only grow)."""

    connect_attempts: int = 0
    sessions: int = 0
    """Upstream sessions that became ready."""
    reconnects: int = 0
    """Sessions that became ready after the first one."""
    audio_chunks_sent: int = 0
    """Chunks as pushed (``push_audio`` calls) that reached the upstream."""
    audio_appends_sent: int = 0
    """``input_audio_buffer.append`` events sent: each carries the chunks of up to ``append_ms``."""
    audio_dropped_overflow: int = 0
    """Oldest audio chunks dropped because the send queue was full."""
    audio_dropped_disconnected: int = 0
    """Audio pushed while no upstream session was ready (or queued when it was lost)."""
    control_events_sent: int = 0
    events_received: int = 0
    unknown_events: int = 0
    malformed_events: int = 0
    replayed_items: int = 0

    @property
    def dropped_audio_chunks(self) -> int:
        """Every audio chunk that never reached the upstream."""
        return self.audio_dropped_overflow + self.audio_dropped_disconnected


# ---------------------------------------------------------------------------------------- policy


def classify(exc: BaseException) -> UpstreamError | None:
    """What a connection failure means: retryable or fatal, with a code; ``None`` if it is not one.

    ``None`` means a bug or a cancellation, which the caller lets propagate.
    """
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, InvalidStatus):
        return _classify_status(exc.response.status_code, exc.response.body)
    if isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        if code in _FATAL_CLOSE_CODES or 3000 <= code <= 4999:
            return UpstreamError(
                f"upstream closed the connection with {code}", retryable=False, code=REJECTED
            )
        if code == 1001 and reason.startswith(_EXPIRY_REASON):
            return UpstreamError("upstream session expired", code=SESSION_EXPIRED)
        return UpstreamError(f"upstream connection closed with {code}", code=RETRYING)
    if isinstance(exc, InvalidURI):
        return UpstreamError("bad upstream URL", retryable=False, code=REJECTED)
    if isinstance(exc, (TimeoutError, OSError, InvalidHandshake, openai.WebSocketConnectionClosedError)):
        return UpstreamError(f"upstream connection failed ({type(exc).__name__})", code=RETRYING)
    return None


def _classify_status(status: int, body: bytes | bytearray | None) -> UpstreamError:
    if status in (401, 403):
        return UpstreamError(f"upstream refused the key (HTTP {status})", retryable=False, code=AUTH_FAILED)
    if _body_error_code(body) in _QUOTA_ERROR_CODES:
        return UpstreamError(f"upstream quota exhausted (HTTP {status})", retryable=False, code=QUOTA)
    if status in (408, 429) or status >= 500:
        return UpstreamError(f"upstream handshake failed (HTTP {status})", code=RETRYING)
    return UpstreamError(f"upstream refused the connection (HTTP {status})", retryable=False, code=REJECTED)


def _body_error_code(body: bytes | bytearray | None) -> str | None:
    try:
        code = json.loads(body or b"")["error"]["code"]
    except (ValueError, TypeError, KeyError):
        return None
    return code if isinstance(code, str) else None


def classify_error_event(code: str | None, kind: str | None = None) -> UpstreamError | None:
    """What an ``error`` event means for the connection; ``None``: harmless, the socket stays usable."""
    if code in _AUTH_ERROR_CODES or kind == "authentication_error":
        return UpstreamError("upstream refused the key", retryable=False, code=AUTH_FAILED)
    if code in _QUOTA_ERROR_CODES or kind == "insufficient_quota":
        return UpstreamError("upstream quota exhausted", retryable=False, code=QUOTA)
    if code == "session_expired":
        return UpstreamError("upstream session expired", code=SESSION_EXPIRED)
    return None


# ---------------------------------------------------------------------------------------- queue


class OutboundQueue:
    """Bounded FIFO of outgoing events, audio (``bytes``) and control events (``dict``) in one order.

    An audio entry may hold several chunks (``chunks``, as coalesced by the link); the bound counts
    chunks plus control events, so it stays a bound on queued audio time whatever the batching.
    When full, pushing audio drops the oldest *audio* entries until it fits (the new entry itself
    if only control events are queued); a control event also makes room by dropping the oldest
    audio entry, and is queued even past the bound when there is none, so control events are never
    dropped for audio. Counts returned are chunks. Not thread-safe: one event loop owns it.
    """

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._max = max_items
        self._items: deque[tuple[bytes | dict[str, Any], int]] = deque()  # (entry, audio chunks)
        self._audio = 0
        self._control = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def audio_chunks(self) -> int:
        return self._audio

    def push_audio(self, pcm: bytes, chunks: int = 1) -> int:
        """Queue one audio entry of ``chunks`` chunks; return how many chunks were dropped for it."""
        if chunks < 1:
            raise ValueError("an audio entry holds at least one chunk")
        dropped = 0
        while self._audio and self._audio + self._control + chunks > self._max:
            dropped += self._drop_oldest_audio()
        if self._items and self._audio + self._control + chunks > self._max:
            return dropped + chunks  # only control events queued: the new audio is the oldest
        self._items.append((pcm, chunks))
        self._audio += chunks
        return dropped

    def push_control(self, event: dict[str, Any], *, front: bool = False) -> int:
        """Queue a control event (at the front if ``front``); return audio chunks dropped for room."""
        dropped = 0
        if self._audio + self._control >= self._max and self._audio:
            dropped = self._drop_oldest_audio()
        if front:
            self._items.appendleft((event, 0))
        else:
            self._items.append((event, 0))
        self._control += 1
        return dropped

    def requeue(self, entry: bytes | dict[str, Any], chunks: int = 1) -> None:
        """Put back an entry that could not be sent, at the front (``chunks``: what it held)."""
        if isinstance(entry, bytes):
            self._items.appendleft((entry, chunks))
            self._audio += chunks
        else:
            self._items.appendleft((entry, 0))
            self._control += 1

    def pop(self) -> bytes | dict[str, Any] | None:
        """The oldest entry, or ``None`` when empty."""
        popped = self.pop_entry()
        return popped[0] if popped is not None else None

    def pop_entry(self) -> tuple[bytes | dict[str, Any], int] | None:
        """The oldest entry with the number of audio chunks it holds (0 for control), or ``None``."""
        if not self._items:
            return None
        entry, chunks = self._items.popleft()
        if isinstance(entry, bytes):
            self._audio -= chunks
        else:
            self._control -= 1
        return entry, chunks

    def drop_audio(self) -> int:
        """Drop every queued audio chunk (stale after a disconnect); return how many."""
        dropped = self._audio
        if dropped:
            self._items = deque(item for item in self._items if not isinstance(item[0], bytes))
            self._audio = 0
        return dropped

    def _drop_oldest_audio(self) -> int:
        for index, (entry, chunks) in enumerate(self._items):
            if isinstance(entry, bytes):
                del self._items[index]
                self._audio -= chunks
                return chunks
        return 0


# ---------------------------------------------------------------------------------------- link


@dataclass(slots=True)
class _Connection:
    """Per-connection state. A new one for every socket: after a reconnect the server has assigned
    new item and response ids, so nothing here may survive (livekit ``_reset_input_turn_state``)."""

    conn: AsyncRealtimeConnection
    session_id: str | None = None
    active_response_id: str | None = None
    configured: bool = False


class ModelLink:
    """One logical upstream conversation for one live session; survives upstream reconnects.

    The owner runs :meth:`run` in a named task and feeds it with :meth:`push_audio` and
    :meth:`send`, which are synchronous and never wait for the network. Every server event reaches
    ``on_event`` in order, after the link's own handling (``session.created``, ``error``); unknown
    event types are logged and skipped. ``on_status`` hears ``connecting`` once, then ``ready``
    whenever an upstream session is configured (and, after a reconnect, its history replayed),
    ``retrying`` with a code before every reconnect attempt, and ``failed`` with a code before
    :meth:`run` raises :class:`UpstreamFatal`.

    ``session_config()`` returns the ``session`` object for ``session.update`` (sent after every
    ``session.created``); ``history()`` returns the stored transcript, replayed as text items
    after a reconnect (and on the first connection too with ``replay_first``: a conversation that
    goes on from an earlier session). Secrets and payloads are never logged: only ids, types,
    codes and counts.

    ``append_ms`` is how much pushed audio one ``input_audio_buffer.append`` carries (0: one per
    push); ``max_send_queue`` bounds the send queue in pushed chunks plus control events.
    """

    def __init__(
        self,
        *,
        client: openai.AsyncOpenAI,
        model: str,
        session_config: Callable[[], Mapping[str, Any]],
        history: Callable[[], Awaitable[Sequence[HistoryItem]]],
        on_event: Callable[[RealtimeServerEvent], Awaitable[None] | None],
        on_status: Callable[[LinkStatus, str | None], None],
        max_send_queue: int = 200,
        append_ms: int = 40,
        on_audio_queued: Callable[[float], None] | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so one shared default is safe
        logger: logging.LoggerAdapter[logging.Logger] | None = None,
        name: str = "model-link",
        replay_first: bool = False,
    ) -> None:
        self._client = client
        self._replay_first = replay_first
        self._model = model
        self._session_config = session_config
        self._history = history
        self._on_event = on_event
        self._on_status = on_status
        self._retry = retry
        self._log = logger or logging.LoggerAdapter(logging.getLogger("relay.model.link"), {})
        self._name = name
        self._queue = OutboundQueue(max_send_queue)
        if append_ms < 0:
            raise ValueError("append_ms must not be negative")
        self._append_bytes = append_ms * _PCM_BYTES_PER_MS
        self._append_s = append_ms / 1000
        self._pending: list[bytes] = []  # pushed audio not yet queued, at most one append's worth
        self._pending_arrivals: list[float] = []  # monotonic arrival of each pending chunk's audio
        self._on_audio_queued = on_audio_queued
        self._pending_bytes = 0
        self._pending_since = 0.0  # loop time of the pending batch's first chunk
        self._flush_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._done = asyncio.Event()
        self._started = False
        self._current: _Connection | None = None
        self._ready = False
        self._ready_at: float | None = None
        self._handlers: dict[str, Callable[[Any, _Connection], UpstreamError | None]] = {
            "session.created": self._on_session_created,
            "error": self._on_error,
            "response.created": self._on_response_created,
            "response.done": self._on_response_done,
        }
        self.stats = LinkStats()
        """Counters for metrics: reconnects, dropped audio, events, ..."""

    # ------------------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while an upstream session is configured and audio goes out."""
        return self._ready

    @property
    def session_id(self) -> str | None:
        """The current upstream session's id (``sess_...``), or ``None`` between connections."""
        return self._current.session_id if self._current is not None else None

    @property
    def active_response_id(self) -> str | None:
        """The response the current upstream session is producing, if any (reset on reconnect)."""
        return self._current.active_response_id if self._current is not None else None

    def push_audio(self, pcm24k: bytes, *, arrived_at: float | None = None) -> None:
        """Queue pcm16 mono 24 kHz audio for the upstream. Never blocks, never awaits (call it from
        the event loop's thread).

        Chunks are coalesced: one ``input_audio_buffer.append`` carries ``append_ms`` of audio
        (two 20 ms chunks by default), since each send costs SDK, anyio and websockets framing on
        the loop. A partial batch goes out once its first chunk waited ``append_ms`` (a timer, or
        the next push if that comes first), and before any control event (:meth:`send`).

        Audio pushed while no upstream session is ready is dropped and counted: it is not held
        across a reconnect, since stale audio played into a new session late does more harm than
        a gap. When the queue is full the oldest queued audio is dropped and counted.

        ``arrived_at`` (monotonic) is when the audio reached the relay: when its batch is queued
        for the writer, ``on_audio_queued`` gets the seconds since then, batching wait included.
        """
        if not pcm24k:
            return
        if len(pcm24k) % 2:
            raise ValueError("pcm24k must hold 16-bit samples (an even number of bytes)")
        if not self._ready or self._closing.is_set():
            self.stats.audio_dropped_disconnected += 1
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._pending:
            self._pending_since = now
        self._pending.append(pcm24k)
        self._pending_bytes += len(pcm24k)
        if arrived_at is not None:
            self._pending_arrivals.append(arrived_at)
        if self._pending_bytes >= self._append_bytes or now - self._pending_since >= self._append_s:
            self._flush_audio()
        elif self._flush_timer is None:
            self._flush_timer = loop.call_at(self._pending_since + self._append_s, self._flush_due)

    def send(self, event: dict[str, Any]) -> None:
        """Queue a control event (``conversation.item.truncate``, ``response.cancel``, ...). Never blocks.

        Audio pushed before it is queued first (a commit or clear applies to all of it). Control
        events are never dropped to make room for audio. One queued while the upstream is away goes
        out once the next session is ready; ids from an older session then draw a harmless
        ``error`` event. After :meth:`aclose` it is ignored.
        """
        if not isinstance(event.get("type"), str):
            raise ValueError("a client event needs a string 'type'")
        if self._closing.is_set():
            self._debug("control_event_after_close", kind=event["type"])
            return
        self._flush_audio()
        self.stats.audio_dropped_overflow += self._queue.push_control(event)
        self._wake.set()

    async def run(self) -> None:
        """Connect, keep the upstream conversation alive, and return once :meth:`aclose` was called.

        Raises :class:`UpstreamFatal` (after ``on_status("failed", code)``) when the upstream fails
        for good. Cancelling it is safe: the socket is closed and no task is left behind. It can be
        called once.
        """
        if self._started:
            raise RuntimeError("ModelLink.run() can only be called once")
        self._started = True
        try:
            await self._main()
        finally:
            self._ready = False
            self._current = None
            self.stats.audio_dropped_disconnected += self._drop_pending()
            self._done.set()

    async def aclose(self) -> None:
        """Close the link: control events still queued go out, audio does not, the socket closes and
        :meth:`run` returns. Idempotent and safe to call concurrently or before :meth:`run`."""
        if not self._closing.is_set():
            self._closing.set()
            self.stats.audio_dropped_disconnected += self._queue.drop_audio() + self._drop_pending()
            self._wake.set()
        if self._started:
            await self._done.wait()

    # ------------------------------------------------------------------------------ reconnect loop

    async def _main(self) -> None:
        if self._closing.is_set():
            return
        failures = 0  # consecutive failed attempts in this reconnect cycle
        cause = RETRYING
        self._on_status("connecting", None)
        while not self._closing.is_set():
            if failures:
                if failures >= self._retry.max_attempts:
                    self._fail(UNAVAILABLE, "upstream_gave_up", count=failures)
                # An expiry is planned, not a sign of trouble: the first attempt goes at once.
                planned = cause == SESSION_EXPIRED and failures == 1
                delay = 0.0 if planned else self._retry.delay(failures)
                self._info(
                    "upstream_retrying", code=cause, attempt=failures + 1, delay_ms=round(delay * 1000)
                )
                self._on_status("retrying", cause)
                if await self._closed_within(delay):
                    return
            try:
                await self._connection()
                if self._closing.is_set():
                    return
                raise UpstreamError("upstream connection ended", code=RETRYING)
            except Exception as exc:
                failure = classify(exc)
                if failure is None:
                    raise
                if self._closing.is_set():
                    return
                if not failure.retryable:
                    self._fail(failure.code, "upstream_failed", error_type=type(exc).__name__)
                ready_at = self._ready_at
                if ready_at is not None and time.monotonic() - ready_at >= self._retry.stable_after_s:
                    failures = 0
                failures += 1
                cause = failure.code
                self._info("upstream_lost", code=cause, error_type=type(exc).__name__, attempt=failures)

    def _fail(self, code: str, event: str, **fields: Any) -> None:
        self._log_at(logging.WARNING, event, code=code, **fields)
        self._on_status("failed", code)
        raise UpstreamFatal(f"the model upstream failed ({code})", code=code)

    async def _closed_within(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the link was closed meanwhile."""
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------------------ one connection

    async def _connection(self) -> None:
        """Open, configure and serve one upstream socket; return when closing, raise when it fails."""
        self.stats.connect_attempts += 1
        self._ready_at = None
        current = await self._unless_closing(self._open(), f"{self._name}:open")
        if current is None:
            return
        self._current = current
        tasks: list[asyncio.Task[None]] = []
        try:
            self._became_ready()
            tasks.append(asyncio.create_task(self._recv_loop(current), name=f"{self._name}:recv"))
            tasks.append(asyncio.create_task(self._send_loop(current.conn), name=f"{self._name}:send"))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._ready = False
            await _cancel_and_wait(*tasks)
            dropped = self._queue.drop_audio() + self._drop_pending()
            self.stats.audio_dropped_disconnected += dropped
            self._current = None
            await self._close_socket(current.conn)
            self._info("upstream_closed", count=dropped)
        for task in tasks:  # receive first: it knows best why a connection ended
            error = task.exception() if task in done else None
            if error is not None:
                raise error

    async def _open(self) -> _Connection:
        """Connect, take ``session.created``, send ``session.update`` and (after a reconnect) replay."""
        # on_reconnecting is deliberately unset: see the module docstring.
        manager = self._client.realtime.connect(model=self._model)
        async with asyncio.timeout(self._retry.connect_timeout_s):
            conn = await manager.enter()
        try:
            current = _Connection(conn)
            async with asyncio.timeout(self._retry.connect_timeout_s):
                while current.session_id is None:
                    await self._receive_one(current)
            await self._configure(current)
            if self.stats.sessions > 0 or self._replay_first:
                await self._replay(current)
            return current
        except BaseException:
            await self._close_socket(conn)
            raise

    async def _configure(self, current: _Connection) -> None:
        await self._write(current.conn, protocol.session_update_event(self._session_config()))
        current.configured = True

    async def _replay(self, current: _Connection) -> None:
        try:
            history = await self._history()
        except Exception as exc:  # the conversation goes on without its context rather than not at all
            self._log_at(logging.WARNING, "history_unavailable", error_type=type(exc).__name__)
            return
        items = protocol.replay_items(history)
        for event in items:
            await self._write(current.conn, event)
        self.stats.replayed_items += len(items)
        self._info("history_replayed", count=len(items))

    def _became_ready(self) -> None:
        self.stats.sessions += 1
        if self.stats.sessions > 1:
            self.stats.reconnects += 1
        self._ready = True
        self._ready_at = time.monotonic()
        self._info("upstream_ready", count=self.stats.sessions)
        self._on_status("ready", None)

    async def _unless_closing(self, work: Coroutine[Any, Any, _T], name: str) -> _T | None:
        """Run ``work`` in a named task unless :meth:`aclose` comes first (then cancel it: ``None``)."""
        task = asyncio.create_task(work, name=name)
        closing = asyncio.create_task(self._closing.wait(), name=f"{self._name}:closing")
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_and_wait(closing)
            if not task.done():
                await _cancel_and_wait(task)
        if task.cancelled():
            return None
        return task.result()

    async def _close_socket(self, conn: AsyncRealtimeConnection) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._retry.close_timeout_s):
                await conn.close()

    # ------------------------------------------------------------------------------ audio batches

    def _flush_due(self) -> None:
        """The timer of a partial batch: its first chunk has waited ``append_ms``."""
        self._flush_timer = None
        self._flush_audio()

    def _flush_audio(self) -> None:
        """Queue the pending chunks as one append (dropped and counted if the upstream went away)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        chunks = len(self._pending)
        pcm = self._pending[0] if chunks == 1 else b"".join(self._pending)
        arrivals = self._pending_arrivals
        self._pending = []
        self._pending_arrivals = []
        self._pending_bytes = 0
        if not self._ready or self._closing.is_set():
            self.stats.audio_dropped_disconnected += chunks
            return
        self.stats.audio_dropped_overflow += self._queue.push_audio(pcm, chunks)
        self._wake.set()
        if self._on_audio_queued is not None and arrivals:
            now = time.monotonic()
            for arrived in arrivals:
                self._on_audio_queued(now - arrived)

    def _drop_pending(self) -> int:
        """Forget the pending batch (the connection is gone or closing); return its chunk count."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        chunks = len(self._pending)
        self._pending.clear()
        self._pending_arrivals.clear()
        self._pending_bytes = 0
        return chunks

    # ------------------------------------------------------------------------------ loops

    async def _recv_loop(self, current: _Connection) -> None:
        while True:
            await self._receive_one(current)
            # recv_bytes() returns at once while the socket has events buffered, and a whole
            # answer's audio arrives faster than real time: without a yield per event, one burst is
            # one loop callback of tens of ms that makes every session's 20 ms playout late.
            await asyncio.sleep(0)

    async def _receive_one(self, current: _Connection) -> None:
        raw = await current.conn.recv_bytes()
        try:
            event = protocol.decode(raw)
        except MalformedEvent:
            self.stats.malformed_events += 1
            self._log_at(logging.WARNING, "upstream_event_malformed", bytes=len(raw))
            return
        self.stats.events_received += 1
        if isinstance(event, UnknownEvent):
            self.stats.unknown_events += 1
            self._debug("upstream_event_unknown", kind=event.type)
            return
        handler = self._handlers.get(event.type)
        failure = handler(event, current) if handler is not None else None
        delivered = self._on_event(event)
        if inspect.isawaitable(delivered):
            await delivered
        if failure is not None:
            raise failure

    async def _send_loop(self, conn: AsyncRealtimeConnection) -> None:
        """The only writer of ``conn`` once it is configured; returns when closing and drained."""
        queue = self._queue
        while True:
            popped = queue.pop_entry()
            if popped is None:
                if self._closing.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            entry, chunks = popped
            event = protocol.audio_append(entry) if isinstance(entry, bytes) else entry
            try:
                await self._write(conn, event)
            except BaseException:
                queue.requeue(entry, chunks)
                raise
            if isinstance(entry, bytes):
                self.stats.audio_chunks_sent += chunks
                self.stats.audio_appends_sent += 1
            else:
                self.stats.control_events_sent += 1

    async def _write(self, conn: AsyncRealtimeConnection, event: Mapping[str, Any]) -> None:
        # send_raw with compact JSON: the SDK's typed send() transforms every dict (about 1 ms per
        # audio chunk); the encoders already produce the GA wire shapes (tests check them).
        await conn.send_raw(json.dumps(event, separators=(",", ":")))

    # ------------------------------------------------------------------------------ handlers

    def _on_session_created(self, event: Any, current: _Connection) -> UpstreamError | None:
        current.session_id = str(getattr(event.session, "id", None) or "unknown")
        self._info("upstream_session_created", upstream=current.session_id)
        if current.configured:  # a second session.created on one socket: configure it again, first
            self._queue.push_control(protocol.session_update_event(self._session_config()), front=True)
            self._wake.set()
        return None

    def _on_error(self, event: RealtimeErrorEvent, current: _Connection) -> UpstreamError | None:
        error = event.error
        failure = classify_error_event(error.code, error.type)
        self._info(
            "upstream_error_event", code=error.code, error_type=error.type, upstream=current.session_id
        )
        return failure

    def _on_response_created(self, event: Any, current: _Connection) -> UpstreamError | None:
        current.active_response_id = event.response.id
        return None

    def _on_response_done(self, event: Any, current: _Connection) -> UpstreamError | None:
        response = event.response
        if current.active_response_id == response.id:
            current.active_response_id = None
        # Quota and key failures may arrive as a failed response instead of an error event.
        error = getattr(response.status_details, "error", None) if response.status == "failed" else None
        if error is None:
            return None
        self._info(
            "upstream_response_failed", code=error.code, error_type=error.type, response_id=response.id
        )
        failure = classify_error_event(error.code, error.type)
        return failure if failure is not None and not failure.retryable else None

    # ------------------------------------------------------------------------------ logging

    def _log_at(self, level: int, event: str, **fields: Any) -> None:
        # LoggerAdapter (3.11) replaces a call's extra with its own; merge them so both survive.
        if self._log.isEnabledFor(level):
            self._log.logger.log(level, event, extra={**(self._log.extra or {}), **fields}, stacklevel=3)

    def _info(self, event: str, **fields: Any) -> None:
        self._log_at(logging.INFO, event, **fields)

    def _debug(self, event: str, **fields: Any) -> None:
        self._log_at(logging.DEBUG, event, **fields)


async def _cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they finished, without raising what they raise."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
