"""The object store interface shared by the local-disk and S3 implementations.

Key rules (checked identically by both stores, so code written against one works on the other):

* a key is a non-blank ``str`` of at most 1024 UTF-8 bytes;
* it does not start with ``/`` and has no empty segment (no ``//``, no trailing ``/``);
* no segment is ``.`` or ``..`` and none starts with ``.tmp-`` (the local store's temp-file names);
* it holds no backslash and no ASCII control character (NUL included).

Ranges follow HTTP ``Range`` semantics: ``end`` is inclusive, an ``end`` past the last byte is clamped
to it, and a ``start`` at or past the end of the object raises :class:`InvalidRange` whenever a range
was asked for (``start > 0`` or ``end`` given), as S3 answers 416.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import ParamSpec, Protocol, TypeVar, runtime_checkable

_P = ParamSpec("_P")
_T = TypeVar("_T")

MAX_KEY_BYTES = 1024
#: Size of the chunks ``get`` yields (the last one may be shorter).
CHUNK_SIZE = 64 * 1024
#: Prefix of the local store's in-flight temp files; no key segment may start with it.
TEMP_PREFIX = ".tmp-"


class ObjectStoreError(Exception):
    """Base class of every error the object store raises (besides ValueError/TypeError for bad input)."""


class ObjectNotFound(ObjectStoreError, KeyError):
    """The key does not exist. Also a ``KeyError``, so ``except KeyError`` works."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else "object not found"


class InvalidRange(ObjectStoreError, ValueError):
    """The requested range starts at or after the end of the object (HTTP 416)."""


class ObjectStoreUnavailable(ObjectStoreError):
    """The backend cannot be reached, refuses us, or its bucket/directory is missing."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store knows about one object.

    ``etag`` is the S3 ETag (quotes stripped) or, on local disk, a weak ``<mtime_ns>-<size>`` hex tag
    that changes whenever the object is rewritten. ``last_modified`` is UTC-aware when known.
    ``content_type`` is the type given to ``put`` on S3 (``None`` in S3 listings, which do not carry
    it); the local store guesses it from the key's extension (``None`` when unknown).
    """

    key: str
    size: int
    etag: str | None
    last_modified: datetime | None
    content_type: str | None


@runtime_checkable
class ObjectStore(Protocol):
    """An object store: flat keys with ``/``-separated prefixes, whole-object atomic writes."""

    kind: str
    """``"file"`` or ``"s3"``."""

    async def setup(self) -> None:
        """Create what the store needs (local: the root directory; S3: the bucket). Idempotent."""
        ...

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterable[bytes],
        *,
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        """Store ``data`` under ``key``, replacing any previous object atomically.

        An async iterable is streamed: it is never held in memory as a whole. If it raises (or the
        call is cancelled) no object is created and a previous one is left untouched.
        """
        ...

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream the object (or the inclusive byte range ``start..end``) in chunks of ``CHUNK_SIZE``.

        Invalid keys/ranges raise ``ValueError`` at call time; :class:`ObjectNotFound` and
        :class:`InvalidRange` are raised on the first iteration.
        """
        ...

    async def read(self, key: str) -> bytes:
        """The whole object; for small objects only."""
        ...

    async def stat(self, key: str) -> ObjectInfo | None:
        """The object's info, or ``None`` if it does not exist."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether the object exists."""
        ...

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (``""`` for all), sorted by key, streamed in pages."""
        ...

    async def delete(self, key: str) -> None:
        """Delete the object; a missing object is not an error."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` and return how many were deleted.

        ``prefix`` must be non-empty and end with ``/`` (``ValueError`` otherwise), so that a bug
        cannot wipe the whole store or the siblings of a key (``a/b`` would also match ``a/bc``).
        """
        ...

    async def check(self) -> None:
        """Readiness probe: raise :class:`ObjectStoreUnavailable` if the store cannot be used."""
        ...

    async def aclose(self) -> None:
        """Release threads and connections. Idempotent; the store refuses work afterwards."""
        ...


async def ensure_ready(store: ObjectStore) -> None:
    """Create the store's bucket/directory if missing, then check that it is usable."""
    await store.setup()
    await store.check()


# --------------------------------------------------------------------------------------------------
# validation helpers shared by the implementations


def _check_chars(value: str, what: str) -> None:
    if "\\" in value:
        raise ValueError(f"{what} must not contain a backslash")
    for ch in value:
        if ch < " " or ch == "\x7f":
            raise ValueError(f"{what} must not contain control characters (found {ch!r})")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not encodable as UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise ValueError(f"{what} is {len(encoded)} bytes long; the limit is {MAX_KEY_BYTES}")
    if value.startswith("/"):
        raise ValueError(f"{what} must not start with '/'")


def _check_segment(segment: str, what: str) -> None:
    if segment == "":
        raise ValueError(f"{what} must not contain an empty segment ('//' or a trailing '/')")
    if segment in (".", ".."):
        raise ValueError(f"{what} must not contain a '{segment}' segment")
    if segment.startswith(TEMP_PREFIX):
        raise ValueError(f"{what} segments must not start with {TEMP_PREFIX!r} (reserved)")


def validate_key(key: str) -> str:
    """Return ``key`` if it follows the key rules, else raise ``ValueError`` (``TypeError`` if not str)."""
    if not isinstance(key, str):
        raise TypeError(f"object key must be str, not {type(key).__name__}")
    if not key.strip():
        raise ValueError("object key must not be empty or blank")
    _check_chars(key, "object key")
    for segment in key.split("/"):
        _check_segment(segment, "object key")
    return key


def validate_list_prefix(prefix: str) -> str:
    """Validate a ``list`` prefix: ``""`` or a partial key (its last segment may be incomplete)."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
    if prefix == "":
        return prefix
    _check_chars(prefix, "prefix")
    for segment in prefix.split("/")[:-1]:
        _check_segment(segment, "prefix")
    return prefix


def validate_delete_prefix(prefix: str) -> str:
    """Validate a ``delete_prefix`` prefix: a valid key followed by ``/``."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
    if prefix == "" or not prefix.endswith("/"):
        raise ValueError(
            f"delete_prefix needs a non-empty prefix ending with '/' (got {prefix!r}); "
            "this guards against deleting the whole store or sibling keys by accident"
        )
    try:
        validate_key(prefix[:-1])
    except ValueError as exc:
        raise ValueError(f"invalid prefix {prefix!r}: {exc}") from None
    return prefix


def validate_range(start: int, end: int | None) -> None:
    """Check ``start``/``end`` arguments (the object's size is checked later by the store)."""
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError("start must be an int")
    if end is not None and (isinstance(end, bool) or not isinstance(end, int)):
        raise TypeError("end must be an int or None")
    if start < 0:
        raise ValueError(f"start must be >= 0 (got {start})")
    if end is not None and end < start:
        raise ValueError(f"end ({end}) must be >= start ({start}); end is inclusive")


def range_requested(start: int, end: int | None) -> bool:
    """Whether the caller asked for a byte range rather than the whole object."""
    return start > 0 or end is not None


def validate_content_type(content_type: str) -> str:
    """A content type must be short printable ASCII (it becomes an HTTP header on S3)."""
    if not isinstance(content_type, str):
        raise TypeError("content_type must be str")
    if not content_type or len(content_type) > 255 or not all(" " <= ch <= "~" for ch in content_type):
        raise ValueError("content_type must be 1-255 printable ASCII characters")
    return content_type


def as_chunk(chunk: object) -> bytes:
    """Normalise a chunk from a streaming ``put`` source to ``bytes``."""
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    raise TypeError(f"put() data chunks must be bytes, not {type(chunk).__name__}")


class ThreadRunner:
    """A small dedicated thread pool for blocking calls, owned by one store and shut down with it."""

    def __init__(self, max_workers: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> asyncio.Future[_T]:
        """Start ``fn(*args, **kwargs)`` in the pool; the returned future is not a task."""
        if self._closed:
            raise ObjectStoreError("the object store is closed")
        loop = asyncio.get_running_loop()
        try:
            return loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        except RuntimeError:  # the pool was shut down under us
            raise ObjectStoreError("the object store is closed") from None

    async def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn(*args, **kwargs)`` in the pool and await its result."""
        return await self.submit(fn, *args, **kwargs)

    def shutdown(self) -> None:
        """Refuse new work; work already submitted still finishes (and its awaiters get its result)."""
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=False)
