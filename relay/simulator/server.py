"""The simulator's I/O layer: a ``websockets`` server that drives one :class:`RealtimeSession` per socket.

Per connection, named tasks share one event loop: a reader (client frames into the session), a
single writer (the outbox of serialized server events), one streaming task per response (pacing of
audio chunks), delayed transcriptions, and the fault timers (expiry, scheduled close, TCP drop,
injected error, read pause). The connection handler owns them all and cancels and awaits them when
the socket closes, so closing the server (1001 to every client) leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import http
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from relay.simulator import voice
from relay.simulator.options import KnobError, SimulatorOptions
from relay.simulator.state import Action, RealtimeSession, StreamResponse, TranscribeLater

log = logging.getLogger("relay.simulator")
_ws_log = logging.getLogger("relay.simulator.websockets")
_ws_log.setLevel(logging.INFO)  # websockets logs frame excerpts (transcripts) at DEBUG: never enable that

REALTIME_PATH = "/v1/realtime"
DEFAULT_MODEL = "gpt-realtime"
MAX_FRAME_BYTES = 32 * 1024 * 1024
"""Large enough for a 15 MiB ``input_audio_buffer.append`` once base64-encoded."""
_OUTBOX_HIGH = 64
"""Serialized events queued for the writer before a response stream waits for the client to read."""

_REJECTIONS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", "invalid_request", "The request was rejected (simulated)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (simulated rejection)."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Forbidden (simulated rejection).",
    ),
    404: ("invalid_request_error", "model_not_found", "The model does not exist (simulated rejection)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests (simulated rejection)."),
    500: (
        "server_error",
        "server_error",
        "The server had an error while processing your request (simulated).",
    ),
    503: ("server_error", "service_unavailable", "The server is overloaded or not ready yet (simulated)."),
}


def _json_response(status: int, error: dict[str, Any]) -> Response:
    body = json.dumps({"error": error}).encode()
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/json"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def _error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": kind, "param": param, "code": code}


class SimulatorServer:
    """A local stand-in for the OpenAI Realtime API (GA protocol) on ``ws://HOST:PORT/v1/realtime``.

    Use it as an async context manager, or call :meth:`start` and :meth:`aclose`. Point the SDK at
    it with ``AsyncOpenAI(api_key=..., websocket_base_url=server.ws_base_url)``.
    """

    def __init__(
        self, options: SimulatorOptions | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.options = options or SimulatorOptions()
        self._host = host
        self._requested_port = port
        self._server: Server | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._accepted: weakref.WeakKeyDictionary[ServerConnection, tuple[SimulatorOptions, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._connections: set[_Connection] = set()
        self.failures: list[BaseException] = []
        """Unexpected exceptions of connection tasks (strict-mode drift lands here); tests assert it empty."""

    async def start(self) -> None:
        """Build the voice and start listening; a second call does nothing."""
        if self._server is not None:
            return
        if self._close_task is not None:
            raise RuntimeError("a closed SimulatorServer cannot be restarted")
        await asyncio.to_thread(voice.warm_up)
        self._server = await serve(
            self._handle,
            self._host,
            self._requested_port,
            process_request=self._process_request,
            compression=None,
            max_size=MAX_FRAME_BYTES,
            logger=_ws_log,
        )
        log.info("simulator listening on %s", self.ws_base_url)

    async def aclose(self) -> None:
        """Close every connection with 1001, wait for their tasks to end, stop listening. Idempotent."""
        if self._server is None:
            return
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(self._server), name="simulator:close")
        await asyncio.shield(self._close_task)

    async def _close(self, server: Server) -> None:
        server.close(close_connections=True)
        await server.wait_closed()
        log.info("simulator stopped")

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def ws_base_url(self) -> str:
        """The ``websocket_base_url`` for the SDK, e.g. ``ws://127.0.0.1:PORT/v1``."""
        return f"ws://{self._host}:{self.port}/v1"

    @property
    def active_connections(self) -> int:
        """Sessions currently open."""
        return len(self._connections)

    # ------------------------------------------------------------------ handshake

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path.rstrip("/") != REALTIME_PATH:
            error = _error_body(f"Invalid URL (GET {url.path})", "invalid_request_error", None)
            return _json_response(404, error)
        if self.options.api_key is not None:
            rejection = self._check_key(request.headers.get("Authorization"))
            if rejection is not None:
                return rejection
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        call_id = query.get("call_id")
        if call_id:
            error = _error_body(
                f"No call found with id '{call_id[:64]}'. The simulator has no WebRTC or SIP calls.",
                "invalid_request_error",
                "call_id_not_found",
                "call_id",
            )
            return _json_response(404, error)
        model = query.get("model")
        if not model:
            error = _error_body(
                "Missing required parameter: 'model'.",
                "invalid_request_error",
                "missing_required_parameter",
                "model",
            )
            return _json_response(400, error)
        try:
            options = self.options.with_knobs(query)
        except KnobError as exc:
            return _json_response(
                400, _error_body(str(exc), "invalid_request_error", "invalid_value", exc.param)
            )
        if options.reject_status is not None:
            kind, code, message = _REJECTIONS[options.reject_status]
            return _json_response(options.reject_status, _error_body(message, kind, code))
        self._accepted[connection] = (options, model)
        return None

    def _check_key(self, authorization: str | None) -> Response | None:
        if not authorization or not authorization.startswith("Bearer "):
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            return _json_response(401, _error_body(message, "invalid_request_error", None))
        token = authorization.removeprefix("Bearer ").strip()
        assert self.options.api_key is not None
        if not hmac.compare_digest(token.encode(), self.options.api_key.encode()):
            message = "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
            return _json_response(401, _error_body(message, "invalid_request_error", "invalid_api_key"))
        return None

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        options, model = self._accepted.pop(ws, (self.options, DEFAULT_MODEL))
        connection = _Connection(ws, options, model, self)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)


class _Connection:
    """One client socket: the session state, its outbox and every task working for it."""

    def __init__(
        self, ws: ServerConnection, options: SimulatorOptions, model: str, server: SimulatorServer
    ) -> None:
        self.ws = ws
        self.options = options
        self.server = server
        self.session = RealtimeSession(
            model=model,
            seed=options.seed,
            chunk_ms=options.chunk_ms,
            expires_at=int(time.time() + options.max_session_s),
            strict=options.strict,
        )
        self.name = f"simulator:{self.session.id}"
        self._outbox: deque[str] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._read_gate = asyncio.Event()
        self._read_gate.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer_task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._frames_in = 0
        self._events_out = 0

    def _spawn(self, role: str, work: Callable[..., Awaitable[None]], *args: Any) -> asyncio.Task[None]:
        """Start ``work(*args)`` as a named task of this connection (created inside the task, so a
        task cancelled before it runs leaves no un-awaited coroutine behind)."""
        task = asyncio.create_task(self._guard(work, *args), name=f"{self.name}:{role}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _stop_producing(self) -> None:
        """Cancel every task but the writer and the caller: nothing is sent after a closing error."""
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current and task is not self._writer_task:
                task.cancel()

    async def _guard(self, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run connection work; an unexpected exception is recorded and closes the socket with 1011."""
        try:
            await work(*args)
        except ConnectionClosed:
            return
        except Exception as exc:
            log.exception("simulator session %s failed", self.session.id)
            self.server.failures.append(exc)
            await self.ws.close(1011, "simulator error")

    async def run(self) -> None:
        """Serve the socket until it closes, then cancel and await every task of this connection."""
        log.info("simulator session %s opened", self.session.id)
        options = self.options
        try:
            self._writer_task = self._spawn("writer", self._writer)
            await self._guard(self._open)
            self._spawn("max-session", self._expire_after, options.max_session_s)
            if options.close_after_s is not None:
                self._spawn("close-after", self._close_after, options.close_after_s, options.close_code)
            if options.drop_after_s is not None:
                self._spawn("drop-after", self._drop_after, options.drop_after_s)
            if options.error_after_s is not None:
                self._spawn("error-after", self._error_after, options.error_after_s, options.error_code)
            if options.read_pause_after_s is not None:
                self._spawn(
                    "read-pause", self._pause_reading, options.read_pause_after_s, options.read_pause_s
                )
            await self._guard(self._reader)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info(
                "simulator session %s closed code=%s frames_in=%d events_out=%d",
                self.session.id,
                self.ws.close_code,
                self._frames_in,
                self._events_out,
            )

    # ------------------------------------------------------------------ reading and writing

    async def _open(self) -> None:
        self.session.start()
        self._flush()

    async def _reader(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await self.ws.recv()
                await self._read_gate.wait()
                self._frames_in += 1
                self.session.receive(frame)
                self._flush()

    def _flush(self) -> None:
        """Queue what the session produced and start the tasks its actions ask for."""
        events, actions = self.session.drain()
        if events:
            self._outbox.extend(json.dumps(e, separators=(",", ":")) for e in events)
            self._events_out += len(events)
            self._drained.clear()
            if len(self._outbox) >= _OUTBOX_HIGH:
                self._room.clear()
            self._wake.set()
        for action in actions:
            self._start(action)

    def _start(self, action: Action) -> None:
        if isinstance(action, StreamResponse):
            self._spawn(f"response:{action.response_id}", self._stream, action.response_id, self._loop.time())
        elif isinstance(action, TranscribeLater):
            self._spawn(f"transcription:{action.item_id}", self._transcribe_later, action.item_id)

    async def _writer(self) -> None:
        outbox = self._outbox
        with contextlib.suppress(ConnectionClosed):
            while True:
                while outbox:
                    await self.ws.send(outbox.popleft())
                    if len(outbox) < _OUTBOX_HIGH // 2:
                        self._room.set()
                self._room.set()
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()

    # ------------------------------------------------------------------ timed work

    async def _sleep_until(self, deadline: float) -> None:
        delay = deadline - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _stream(self, response_id: str, created_at: float) -> None:
        """Deliver a response: first chunk after ``first_audio_ms``, then paced (or flat out)."""
        options = self.options
        first_at = created_at + options.first_audio_ms / 1000
        await self._sleep_until(first_at)
        chunk_s = options.chunk_ms / 1000
        index = 0
        while True:
            await self._room.wait()
            finished = self.session.advance_response(response_id)
            self._flush()
            if finished:
                return
            index += 1
            if options.realtime_pacing:
                await self._sleep_until(first_at + index * chunk_s)
            else:
                await asyncio.sleep(0)

    async def _transcribe_later(self, item_id: str) -> None:
        await asyncio.sleep(self.options.transcription_delay_ms / 1000)
        self.session.transcribe(item_id)
        self._flush()

    async def _close(self, code: int, reason: str) -> None:
        """Let the writer send what is queued (bounded wait), then close the socket."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self._drained.wait()
        await self.ws.close(code, reason)

    async def _expire_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        log.info("simulator session %s expired", self.session.id)
        self._stop_producing()
        reason = self.session.expire(seconds)
        self._flush()
        await self._close(1001, reason)

    async def _close_after(self, seconds: float, code: int) -> None:
        await asyncio.sleep(seconds)
        log.info("simulator session %s: scheduled close with %d", self.session.id, code)
        self._stop_producing()
        await self._close(code, "simulated close (sim_close_after_s)")

    async def _drop_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        log.info("simulator session %s: dropping the TCP connection", self.session.id)
        self.ws.transport.abort()

    async def _error_after(self, seconds: float, code: str) -> None:
        await asyncio.sleep(seconds)
        self.session.inject_error(code)
        self._flush()

    async def _pause_reading(self, after_s: float, pause_s: float) -> None:
        await asyncio.sleep(after_s)
        self._read_gate.clear()
        try:
            await asyncio.sleep(pause_s)
        finally:
            self._read_gate.set()


async def serve_forever(host: str, port: int, options: SimulatorOptions) -> None:
    """Run a simulator on ``host:port`` until cancelled (the ``parley simulator`` command)."""
    async with SimulatorServer(options, host=host, port=port):
        await asyncio.Event().wait()
