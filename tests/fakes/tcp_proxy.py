"""A TCP forwarder on 127.0.0.1 that a test can cut and restore: a service "down" without killing it.

moto keeps its objects in memory and the PostgreSQL server is shared, so a test must not stop
either. Put a :class:`TcpProxy` between the relay and the service instead: :meth:`cut` stops
listening (new connections are refused, as from a dead host's port) and resets every open
connection (the client's pooled connections break mid-use); :meth:`restore` listens again on the
same port. :meth:`throttle` makes it slow instead (a congested link: every connection, each way,
at most so many bytes per second) until ``throttle(None)``. The proxy runs its own event loop on
a daemon thread, so it keeps forwarding while the test's loop is busy, and its methods are plain
calls usable from sync and async code alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["TcpProxy"]

_T = TypeVar("_T")
_CALL_TIMEOUT_S = 10.0
_READ_BYTES = 64 * 1024
_THROTTLED_READ_BYTES = 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer or a dropped network does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _copy(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, rate: Callable[[], float | None] = lambda: None
) -> None:
    try:
        while True:
            limit = rate()
            data = await src.read(_THROTTLED_READ_BYTES if limit else _READ_BYTES)
            if not data:
                break
            dst.write(data)
            await dst.drain()
            if limit:
                await asyncio.sleep(len(data) / limit)
        if dst.can_write_eof():
            dst.write_eof()  # pass a half-close on: the other direction may still be talking
    except (ConnectionError, OSError):
        pass


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` until :meth:`cut`.

    Counters: ``accepted`` (connections forwarded), ``resets`` (open connections reset by cuts).
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.accepted = 0
        self.resets = 0
        self._rate: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- control (any thread) --------------------------------------------------------------------
    def start(self) -> TcpProxy:
        """Start the proxy's thread and listen; ``port`` is set afterwards."""
        if self._loop is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    @property
    def up(self) -> bool:
        return self._server is not None

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        self._call(self._cut())

    def restore(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen())

    def throttle(self, bytes_per_s: float | None) -> None:
        """Forward at most ``bytes_per_s`` per connection and direction (``None``: full speed again).

        Applies to open connections too, from their next read on.
        """
        self._rate = bytes_per_s if bytes_per_s and bytes_per_s > 0 else None

    def close(self) -> None:
        """Cut and stop the thread; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CALL_TIMEOUT_S)
        loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT_S)

    # -- the proxy's own loop --------------------------------------------------------------------
    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket goes at once: new connections are refused
        for pair in list(self._open):
            self.resets += 1
            for writer in pair:
                _reset(writer)
        self._open.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        await self._cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                _reset(writer)
                return
            pair = (writer, up_writer)
            self._open.add(pair)
            self.accepted += 1
            try:
                rate = lambda: self._rate  # noqa: E731 (read on every chunk: throttle() applies at once)
                await asyncio.gather(_copy(reader, up_writer, rate), _copy(up_reader, writer, rate))
            finally:
                if pair in self._open:
                    self._open.discard(pair)
                    for w in pair:
                        w.close()
        finally:
            self._tasks.discard(task)
