"""A zip archive written straight into an HTTP response, never held whole in memory.

The standard library's :mod:`zipfile` writes to an unseekable sink in streaming mode (sizes and CRC
in a data descriptor after each member). The sink here only collects what zipfile wrote during one
call; :class:`ZipStream` sends it on (``await response.write``) right after, so at most one input
chunk (64 KiB from the object store) plus a header is buffered, and a slow client slows the export
down through aiohttp's flow control instead of making it pile up. zipfile's own work per chunk is a
CRC32 (audio is stored: Opus does not compress) or a small deflate (JSON/VTT), cheap enough to do on
the event loop, so no thread is needed.

Every member's SHA-256 and size are computed on the way through and returned, for ``session.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

__all__ = ["Digest", "ZipStream"]


@dataclass(frozen=True, slots=True)
class Digest:
    sha256: str
    size: int


class _Sink:
    """What zipfile writes to: keeps the bytes of the current call until :meth:`take`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class ZipStream:
    """Members are written one at a time; :meth:`finish` writes the central directory.

    Not safe for concurrent use. If writing fails (the client went away, the store failed) the
    response is left unfinished: the client sees a truncated archive, never a well-formed but
    incomplete one.
    """

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._sink = _Sink()
        self._zip = zipfile.ZipFile(self._sink, "w", allowZip64=True)
        now = time.gmtime()
        self._when = (now.tm_year, now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min, now.tm_sec)
        self.bytes_sent = 0

    async def _send(self) -> None:
        data = self._sink.take()
        if data:
            self.bytes_sent += len(data)
            await self._response.write(data)

    def _info(self, name: str, *, size: int, compress: bool) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=self._when)
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        # zipfile chooses ZIP64 headers from the size announced before the member is written.
        info.file_size = size
        info.external_attr = 0o644 << 16
        return info

    async def add_bytes(self, name: str, data: bytes, *, compress: bool = True) -> Digest:
        """Add a small member held in memory (JSON, VTT)."""
        with self._zip.open(self._info(name, size=len(data), compress=compress), "w") as member:
            member.write(data)
        await self._send()
        return Digest(hashlib.sha256(data).hexdigest(), len(data))

    async def add_stream(self, name: str, chunks: AsyncIterator[bytes], *, size: int) -> Digest:
        """Add a member from an async stream of chunks, stored uncompressed; ``size`` is expected."""
        sha = hashlib.sha256()
        written = 0
        info = self._info(name, size=size, compress=False)
        with self._zip.open(info, "w") as member:
            await self._send()
            async for chunk in chunks:
                member.write(chunk)
                sha.update(chunk)
                written += len(chunk)
                await self._send()
        await self._send()
        return Digest(sha.hexdigest(), written)

    async def finish(self) -> None:
        """Write the central directory and end the response."""
        self._zip.close()
        await self._send()
        await self._response.write_eof()

    def discard(self) -> None:
        """Drop the archive after a failure; nothing more is sent."""
        with contextlib.suppress(ValueError):  # a member was still open: nothing to finish
            self._zip.close()
        self._sink.take()
