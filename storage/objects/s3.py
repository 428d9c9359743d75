"""Object store on MinIO / S3 through the (blocking) ``minio`` client.

URL: ``s3://ACCESS_KEY:SECRET_KEY@HOST[:PORT]/BUCKET[?secure=false][&region=REGION]``. The key and
secret are percent-decoded (encode ``/`` as ``%2F``, ``@`` as ``%40``, ``:`` as ``%3A``); ``secure``
(TLS) defaults to true. The secret key is never logged, put in an exception message or shown in a repr.

Threads: every minio call runs in a pool owned by the store (``max_workers``, default 8). Streaming
uploads hold a thread for their whole duration, so they get their own pool (``upload_workers``,
default 4): an upload whose source reads from this same store cannot starve it into a deadlock.

Memory: a streaming ``put`` never holds the object. The event loop fills a queue bounded to
``UPLOAD_QUEUE_BYTES`` (it waits while the queue is full); the upload thread reads it as a file.
Up to 5 MiB becomes one PUT; more becomes a multipart upload of 5 MiB parts sent one at a time, so
the peak is one part plus the queue (about 7 MiB with 1 MiB chunks) whatever the object's size.
minio's own ``put_object(length=-1)`` loop would keep about three parts alive (measured: 22 MiB
traced for a 20 MiB object), so the part loop is driven here with minio's multipart calls, and
``put_object(length=-1)`` is only the fallback should a minio release drop them. A failed or
cancelled streaming put aborts its multipart upload. ``get`` reads the response in 64 KiB chunks
and always closes it and releases its connection, also when the consumer stops early.

Errors: ``NoSuchKey`` -> :class:`ObjectNotFound`; ``InvalidRange`` -> :class:`InvalidRange`; a
missing bucket, refused credentials, 5xx answers and connection failures ->
:class:`ObjectStoreUnavailable`; other S3 errors -> :class:`ObjectStoreError`. Connections time out
after ``connect_timeout`` seconds (default 2) with one retry, so an unreachable server fails fast.

``put`` returns the size, the ETag and the content type sent; ``last_modified`` only when the server
answers with it (MinIO and moto do, AWS does not). Listings carry no content type (``None``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import itertools
import os
import queue
import re
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import unquote, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.time import from_http_header

from .base import (
    CHUNK_SIZE,
    InvalidRange,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    ObjectStoreUnavailable,
    ThreadRunner,
    as_chunk,
    validate_content_type,
    validate_delete_prefix,
    validate_key,
    validate_list_prefix,
    validate_range,
)

__all__ = ["PART_SIZE", "UPLOAD_QUEUE_BYTES", "S3Config", "S3ObjectStore", "parse_s3_url"]

_T = TypeVar("_T")

#: Multipart part size of streaming uploads (the S3 minimum).
PART_SIZE = 5 * 1024 * 1024
#: How long a cancelled streaming put waits for its upload thread to abort the multipart upload.
ABORT_GRACE_S = 5.0
#: S3's limit on parts: streamed objects can reach MAX_PARTS * PART_SIZE (about 48 GiB).
MAX_PARTS = 10_000
#: Bytes the event loop may queue ahead of a streaming upload thread (always at least one chunk).
UPLOAD_QUEUE_BYTES = 1024 * 1024
#: minio's internal multipart calls, used to upload a stream one part at a time (see _upload_stream_sync).
_PART_API = all(
    callable(getattr(Minio, name, None))
    for name in (
        "_create_multipart_upload",
        "_upload_part",
        "_complete_multipart_upload",
        "_abort_multipart_upload",
    )
)
_LIST_PAGE = 1000
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "ResourceNotFound"})
_REFUSED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
    }
)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_URL_SHAPE = "s3://ACCESS_KEY:SECRET_KEY@HOST[:PORT]/BUCKET[?secure=false&region=REGION]"


# ------------------------------------------------------------------------------------------ URL


@dataclass(frozen=True, slots=True)
class S3Config:
    """A parsed ``s3://`` URL. The secret is kept out of the repr."""

    host: str
    port: int | None
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    secure: bool = True
    region: str | None = None

    @property
    def endpoint(self) -> str:
        """``host[:port]`` as minio wants it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"


def parse_s3_url(url: str) -> S3Config:
    """Parse an ``s3://`` URL; ``ValueError`` names the problem and never contains the secret."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"invalid S3 object store URL (could not parse it); expected {_URL_SHAPE}") from None
    if parts.scheme.lower() != "s3":
        raise ValueError(f"an S3 object store URL must start with s3://; expected {_URL_SHAPE}")
    if parts.fragment:
        raise ValueError("S3 object store URL must not have a #fragment")
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        raise ValueError(
            f"S3 object store URL needs credentials: {_URL_SHAPE} "
            "(percent-encode '/', '?', '#' and '@' in the key and secret)"
        )
    access_raw, colon, secret_raw = userinfo.partition(":")
    if not colon or not access_raw or not secret_raw:
        raise ValueError(f"S3 object store URL needs both ACCESS_KEY and SECRET_KEY: {_URL_SHAPE}")
    access_key, secret_key = unquote(access_raw), unquote(secret_raw)

    host, port = _parse_hostport(hostport)
    bucket = _parse_bucket(parts.path)
    secure, region = True, None
    seen: set[str] = set()
    for item in filter(None, parts.query.split("&")):
        name, _, raw_value = item.partition("=")
        name, value = unquote(name), unquote(raw_value)
        if name in seen:
            raise ValueError(f"S3 object store URL option {name!r} is given twice")
        seen.add(name)
        if name == "secure":
            if value.lower() in _TRUE:
                secure = True
            elif value.lower() in _FALSE:
                secure = False
            else:
                raise ValueError(f"S3 object store URL option secure={value!r} must be true or false")
        elif name == "region":
            if not _REGION_RE.match(value):
                raise ValueError(f"S3 object store URL option region={value!r} is not a region name")
            region = value
        else:
            raise ValueError(f"unknown S3 object store URL option {name!r} (known: secure, region)")
    return S3Config(
        host=host,
        port=port,
        bucket=bucket,
        access_key=access_key,
        secret_key=secret_key,
        secure=secure,
        region=region,
    )


def _parse_hostport(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError("S3 object store URL has a malformed IPv6 host")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_raw = hostport.partition(":")
        port_text = port_text_raw if colon else None
        if not host:
            raise ValueError(f"S3 object store URL has no host: {_URL_SHAPE}")
        if not _HOST_RE.match(host):
            raise ValueError(f"S3 object store URL host {host!r} is not a valid host name or address")
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"S3 object store URL port {port_text!r} is not a number in 1-65535")
        port = int(port_text)
    return host.lower(), port


def _parse_bucket(path: str) -> str:
    bucket = unquote(path.strip("/"))
    if not bucket:
        raise ValueError(f"S3 object store URL has no bucket: {_URL_SHAPE}")
    if "/" in bucket:
        raise ValueError("S3 object store URL path must be just /BUCKET (key prefixes are not supported)")
    if not _BUCKET_RE.match(bucket) or ".." in bucket or re.fullmatch(r"[0-9.]+", bucket):
        raise ValueError(
            f"invalid S3 bucket name {bucket!r}: 3-63 characters of a-z, 0-9, '.', '-', "
            "starting and ending with a letter or digit"
        )
    return bucket


# ------------------------------------------------------------------------------ upload bridge


class _UploadAborted(Exception):
    """Raised inside minio's read loop when the event-loop side gave up (error or cancellation)."""


class _UploadPipe:
    """A file-like object the upload thread reads while the event loop fills its queue.

    The loop may queue at most ``max_bytes`` (but always one chunk) ahead of the reader; ``feed``
    waits while that much is queued. The byte count is kept on the loop thread only: the reader
    reports each chunk it takes with ``call_soon_threadsafe``. ``b""`` in the queue means end of
    data, ``None`` means abort.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_bytes: int) -> None:
        self._loop = loop
        self._max_bytes = max_bytes
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued_bytes = 0  # loop thread only
        self._space = asyncio.Event()
        self._reader_gone = False
        self._chunk = b""
        self._pos = 0
        self._eof = False
        self.bytes_fed = 0
        self.started = threading.Event()  # set by the upload thread when it begins

    # event-loop side -------------------------------------------------------------------------

    async def feed(self, chunk: bytes) -> bool:
        """Queue ``chunk`` (``b""`` = end), waiting while the queue is full; False if the reader left."""
        while not self._reader_gone:
            if self._queued_bytes == 0 or self._queued_bytes + len(chunk) <= self._max_bytes:
                self._queue.put(chunk)
                self._queued_bytes += len(chunk)
                self.bytes_fed += len(chunk)
                return True
            self._space.clear()
            await self._space.wait()
        return False

    def _taken(self, size: int) -> None:
        self._queued_bytes -= size
        self._space.set()

    def reader_finished(self) -> None:
        self._reader_gone = True
        self._space.set()

    def abort(self) -> None:
        """Make the reader's next read raise. Never blocks."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queued_bytes = 0
        self._queue.put(None)

    # upload-thread side ----------------------------------------------------------------------

    def _next(self) -> bytes | None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._loop.is_closed():
                    return None
                continue
            if item is None:
                return None
            try:
                self._loop.call_soon_threadsafe(self._taken, len(item))
            except RuntimeError:  # loop closed
                return None
            return item

    def has_more(self) -> bool:
        """Whether any data follows (blocks until a chunk or the end arrives); consumes nothing."""
        while self._pos >= len(self._chunk):
            self._chunk, self._pos = b"", 0
            if self._eof:
                return False
            item = self._next()
            if item is None:
                raise _UploadAborted("the upload's data source failed or was cancelled")
            if not item:
                self._eof = True
                return False
            self._chunk = item
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes, blocking until that many arrived or the data ended.

        Chunks are copied into one growing buffer and dropped at once, so assembling a 5 MiB part
        costs the part plus one chunk, not the part twice. A single whole chunk is returned as is.
        """
        want = size if size >= 0 else 1 << 62
        first: bytes | None = None
        buffer: io.BytesIO | None = None
        got = 0
        while got < want:
            if self._pos >= len(self._chunk):
                self._chunk, self._pos = b"", 0
                if self._eof:
                    break
                item = self._next()
                if item is None:
                    raise _UploadAborted("the upload's data source failed or was cancelled")
                if not item:
                    self._eof = True
                    break
                self._chunk = item
            take = min(want - got, len(self._chunk) - self._pos)
            if got == 0 and self._pos == 0 and take == len(self._chunk):
                first = self._chunk  # a whole chunk: no copy unless more follows
            else:
                if buffer is None:
                    buffer = io.BytesIO()
                    if first is not None:
                        buffer.write(first)
                        first = None
                buffer.write(memoryview(self._chunk)[self._pos : self._pos + take])
            self._pos += take
            got += take
        if buffer is not None:
            return buffer.getvalue()
        return first if first is not None else b""


class _Masked:
    """Holds a secret; its repr never shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"


class _Prefixed:
    """``head`` followed by the rest of a pipe, for minio's ``put_object(length=-1)`` fallback."""

    def __init__(self, head: bytes, rest: _UploadPipe) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(size)
        if size < 0 or size >= len(self._head):
            out, self._head = self._head, b""
        else:
            out, self._head = self._head[:size], self._head[size:]
        return out


def _take(iterator: Iterator[Any], count: int) -> builtins.list[Any]:
    return builtins.list(itertools.islice(iterator, count))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


# ------------------------------------------------------------------------------------ the store


class S3ObjectStore:
    """The :class:`~storage.objects.ObjectStore` on an S3-compatible server (MinIO in production)."""

    kind = "s3"

    def __init__(
        self,
        config: S3Config,
        *,
        max_workers: int = 8,
        upload_workers: int = 4,
        connect_timeout: float = 2.0,
        read_timeout: float = 60.0,
        retries: int = 1,
        check_timeout: float = 10.0,
    ) -> None:
        self._bucket = config.bucket
        self._endpoint_url = config.endpoint_url
        self._region = config.region
        self._check_timeout = check_timeout
        # Only used to scrub messages from third-party exceptions; masked in reprs and vars().
        self._secret = _Masked(config.secret_key)
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=max_workers + upload_workers,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(
                total=retries,
                connect=retries,
                read=retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
            ),
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        try:
            self._client = Minio(
                config.endpoint,
                access_key=config.access_key,
                secret_key=config.secret_key,
                secure=config.secure,
                region=config.region,
                http_client=self._http,
            )
        except ValueError as exc:
            raise ValueError(f"invalid S3 endpoint {config.endpoint!r}: {self._scrub(str(exc))}") from None
        self._runner = ThreadRunner(max_workers, "parley-objects-s3")
        self._uploads = ThreadRunner(upload_workers, "parley-objects-s3-upload")

    @classmethod
    def from_url(cls, url: str) -> S3ObjectStore:
        return cls(parse_s3_url(url))

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def endpoint_url(self) -> str:
        return self._endpoint_url

    def __repr__(self) -> str:
        return f"S3ObjectStore(endpoint={self._endpoint_url!r}, bucket={self._bucket!r})"

    # ------------------------------------------------------------------------------- errors

    def _scrub(self, text: str) -> str:
        secret = self._secret.reveal()
        return text.replace(secret, "***") if secret else text

    def _translate(self, exc: BaseException, key: str | None = None) -> BaseException:
        """Map a minio/urllib3 failure to the store's exception types (messages without secrets)."""
        what = f"{key!r} in bucket {self._bucket!r}" if key is not None else f"bucket {self._bucket!r}"
        if isinstance(exc, ObjectStoreError | ValueError | TypeError):
            return exc
        if isinstance(exc, S3Error):
            code = exc.code or "unknown"
            if code in _NOT_FOUND_CODES:
                return ObjectNotFound(f"object {what} not found")
            if code == "InvalidRange":
                return InvalidRange(f"requested range of {what} starts past its end")
            if code == "NoSuchBucket":
                return ObjectStoreUnavailable(
                    f"bucket {self._bucket!r} does not exist at {self._endpoint_url}"
                )
            if code in _REFUSED_CODES:
                return ObjectStoreUnavailable(f"S3 at {self._endpoint_url} refused access ({code}) to {what}")
            return ObjectStoreError(f"S3 error {code} for {what}: {self._scrub(exc.message or '')}")
        if isinstance(exc, ServerError):
            return ObjectStoreUnavailable(
                f"S3 at {self._endpoint_url} answered HTTP {exc.status_code} for {what}"
            )
        if isinstance(exc, InvalidResponseError | MinioException):
            return ObjectStoreError(
                f"unexpected answer from S3 at {self._endpoint_url}: {self._scrub(str(exc))}"
            )
        if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
            reason = getattr(exc, "reason", None) or exc
            return ObjectStoreUnavailable(
                f"S3 at {self._endpoint_url} is unreachable: {self._scrub(str(reason))[:300]}"
            )
        return exc

    async def _call(self, key: str | None, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        try:
            return await self._runner.run(fn, *args, **kwargs)
        except Exception as exc:
            mapped = self._translate(exc, key)
            if mapped is exc:
                raise
            raise mapped from exc

    # ---------------------------------------------------------------------------- lifecycle

    async def setup(self) -> None:
        await self._call(None, self._setup_sync)

    def _setup_sync(self) -> None:
        if self._client.bucket_exists(self._bucket):
            return
        try:
            if self._region:
                self._client.make_bucket(self._bucket, location=self._region)
            else:
                self._client.make_bucket(self._bucket)
        except S3Error as exc:
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    async def check(self) -> None:
        if self._runner.closed:
            raise ObjectStoreUnavailable("the object store is closed")
        try:
            exists = await asyncio.wait_for(
                self._call(None, self._client.bucket_exists, self._bucket), self._check_timeout
            )
        except TimeoutError:
            raise ObjectStoreUnavailable(
                f"S3 at {self._endpoint_url} did not answer within {self._check_timeout:g} s"
            ) from None
        except ObjectStoreUnavailable:
            raise
        except ObjectStoreError as exc:
            raise ObjectStoreUnavailable(str(exc)) from exc
        if not exists:
            raise ObjectStoreUnavailable(f"bucket {self._bucket!r} does not exist at {self._endpoint_url}")

    async def aclose(self) -> None:
        if self._runner.closed:
            return
        self._runner.shutdown()
        self._uploads.shutdown()
        self._http.clear()

    # -------------------------------------------------------------------------------- write

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterable[bytes],
        *,
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        validate_key(key)
        validate_content_type(content_type)
        if isinstance(data, bytes | bytearray | memoryview):
            payload = data if isinstance(data, bytes) else bytes(data)
            result = await self._call(
                key, self._put_sync, key, io.BytesIO(payload), len(payload), content_type
            )
            return self._written(key, len(payload), content_type, result)
        return await self._put_stream(key, data, content_type)

    def _put_sync(self, key: str, stream: BinaryIO, length: int, content_type: str) -> Any:
        return self._client.put_object(
            self._bucket,
            key,
            stream,
            length,
            content_type=content_type,
            part_size=PART_SIZE,
            num_parallel_uploads=1,
        )

    def _upload_stream_sync(self, key: str, pipe: _UploadPipe, content_type: str) -> Any:
        """Upload what ``pipe`` delivers, in the upload thread. Returns minio's write result.

        Up to one part (5 MiB): a single PUT. More: a multipart upload driven here one part at a
        time, so only the part being sent is in memory (minio's own ``put_object(length=-1)`` loop
        keeps about three parts alive: the previous one, the one read and a copy with its look-ahead
        byte). Should a future minio drop the internal methods this needs, ``put_object(length=-1)``
        takes over (correct, but with that higher peak).
        """
        pipe.started.set()
        part = pipe.read(PART_SIZE)
        if not pipe.has_more():
            return self._put_sync(key, io.BytesIO(part), len(part), content_type)
        if not _PART_API:
            return self._put_sync(key, cast(BinaryIO, _Prefixed(part, pipe)), -1, content_type)
        client: Any = self._client
        upload_id: str = client._create_multipart_upload(self._bucket, key, {"Content-Type": content_type})
        try:
            parts: builtins.list[Part] = []
            while True:
                if len(parts) >= MAX_PARTS:
                    raise ObjectStoreError(
                        f"streamed object {key!r} exceeds {MAX_PARTS} parts of {PART_SIZE} bytes"
                    )
                number = len(parts) + 1
                etag = client._upload_part(self._bucket, key, part, None, upload_id, number)
                parts.append(Part(number, etag))
                part = b""  # drop the sent part before reading the next one
                if not pipe.has_more():
                    break
                part = pipe.read(PART_SIZE)
            return client._complete_multipart_upload(self._bucket, key, upload_id, parts)
        except BaseException:
            with contextlib.suppress(Exception):
                client._abort_multipart_upload(self._bucket, key, upload_id)
            raise

    async def _put_stream(self, key: str, source: AsyncIterable[bytes], content_type: str) -> ObjectInfo:
        loop = asyncio.get_running_loop()
        pipe = _UploadPipe(loop, UPLOAD_QUEUE_BYTES)
        # A plain future, not a task: if the caller is cancelled nothing is left running on the loop.
        upload = self._uploads.submit(self._upload_stream_sync, key, pipe, content_type)
        upload.add_done_callback(lambda _: pipe.reader_finished())
        try:
            async for chunk in source:
                piece = as_chunk(chunk)
                if piece and not await pipe.feed(piece):
                    break  # the upload thread failed; its error is raised by `await upload`
            else:
                await pipe.feed(b"")
            result = await upload
        except BaseException as exc:
            # Source failed, caller cancelled, or upload failed: make the upload thread's next read
            # raise so it aborts the multipart upload and ends; no object is created.
            pipe.abort()
            upload.add_done_callback(_ignore_result)
            if pipe.started.is_set() and not upload.done():
                # Let it finish aborting, so nothing is left behind when put() raises; a cancelled
                # caller waits only briefly (the thread still finishes the abort on its own).
                grace = ABORT_GRACE_S if isinstance(exc, asyncio.CancelledError) else None
                await asyncio.wait({upload}, timeout=grace)
            if isinstance(exc, Exception):
                mapped = self._translate(exc, key)
                if mapped is not exc:
                    raise mapped from exc
            raise
        return self._written(key, pipe.bytes_fed, content_type, result)

    @staticmethod
    def _written(key: str, size: int, content_type: str, result: Any) -> ObjectInfo:
        last_modified = getattr(result, "last_modified", None)
        if last_modified is None:
            header = result.http_headers.get("last-modified") if result.http_headers else None
            if header:
                try:
                    last_modified = from_http_header(header)
                except ValueError:
                    last_modified = None
        return ObjectInfo(
            key=key,
            size=size,
            etag=_strip_etag(result.etag),
            last_modified=_utc(last_modified),
            content_type=content_type,
        )

    # --------------------------------------------------------------------------------- read

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        validate_key(key)
        validate_range(start, end)
        return self._get(key, start, end)

    async def _get(self, key: str, start: int, end: int | None) -> AsyncIterator[bytes]:
        # minio sends "Range: bytes=start-" (length 0) or "bytes=start-(start+length-1)".
        length = 0 if end is None else end - start + 1
        response = await self._call(
            key, self._client.get_object, self._bucket, key, offset=start, length=length
        )
        try:
            while True:
                chunk = await self._call(key, response.read, CHUNK_SIZE, decode_content=False)
                if not chunk:
                    break
                yield chunk
        finally:
            response.close()
            response.release_conn()

    async def read(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.get(key)])

    async def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        try:
            obj = await self._call(key, self._client.stat_object, self._bucket, key)
        except ObjectNotFound:
            return None
        return ObjectInfo(
            key=key,
            size=int(obj.size or 0),
            etag=_strip_etag(obj.etag),
            last_modified=_utc(obj.last_modified),
            content_type=obj.content_type,
        )

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        validate_list_prefix(prefix)
        return self._list(prefix)

    async def _list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        # minio pages through ListObjectsV2 (1000 keys a request) lazily; each page is fetched in
        # the pool. S3 returns keys in UTF-8 byte order, which is Python's str order.
        objects: Iterator[Any] = iter(
            self._client.list_objects(self._bucket, prefix=prefix or None, recursive=True)
        )
        while True:
            page = await self._call(None, _take, objects, _LIST_PAGE)
            for obj in page:
                if obj.is_dir:
                    continue
                yield ObjectInfo(
                    key=obj.object_name,
                    size=int(obj.size or 0),
                    etag=_strip_etag(obj.etag),
                    last_modified=_utc(obj.last_modified),
                    content_type=None,
                )
            if len(page) < _LIST_PAGE:
                return

    # ------------------------------------------------------------------------------- delete

    async def delete(self, key: str) -> None:
        validate_key(key)
        try:
            await self._call(key, self._client.remove_object, self._bucket, key)
        except ObjectNotFound:
            return

    async def delete_prefix(self, prefix: str) -> int:
        validate_delete_prefix(prefix)
        return await self._call(None, self._delete_prefix_sync, prefix)

    def _delete_prefix_sync(self, prefix: str) -> int:
        keys = [
            obj.object_name
            for obj in self._client.list_objects(self._bucket, prefix=prefix, recursive=True)
            if not obj.is_dir
        ]
        if not keys:
            return 0
        errors = builtins.list(self._client.remove_objects(self._bucket, (DeleteObject(k) for k in keys)))
        if errors:
            first = errors[0]
            raise ObjectStoreError(
                f"could not delete {len(errors)} of {len(keys)} objects under {prefix!r} "
                f"(first: {first.name!r}: {first.code})"
            )
        return len(keys)


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
