"""The object store on both backends: local disk, and S3 through minio against a real moto server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
import time
import traceback
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from storage.objects import (
    CHUNK_SIZE,
    PART_SIZE,
    InvalidRange,
    LocalObjectStore,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    S3ObjectStore,
    ensure_ready,
    open_object_store,
    parse_s3_url,
)
from storage.objects import s3 as s3_module
from storage.objects.local import XATTR_CONTENT_TYPE, guess_content_type
from storage.objects.s3 import UPLOAD_QUEUE_BYTES
from tests.fixtures_s3 import free_loopback_port, with_bucket

T = TypeVar("T")
MiB = 1024 * 1024
SECRET = "hunter2xyz"


@asynccontextmanager
async def opened(stream: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an async generator even when the consumer stops early (like contextlib.aclosing)."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    async with opened(stream) as chunks:
        return [chunk async for chunk in chunks]


async def keys(store: ObjectStore, prefix: str) -> list[str]:
    return [info.key async for info in store.list(prefix)]


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def temp_files(root: Path) -> list[Path]:
    return list(root.rglob(".tmp-*"))


def entries(directory: Path) -> list[str]:
    """Names in ``directory`` (which must exist)."""
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------------ basics


async def test_store_satisfies_protocol(object_store: ObjectStore) -> None:
    """Both implementations are ObjectStores and report their kind."""
    assert isinstance(object_store, ObjectStore)
    assert object_store.kind in ("file", "s3")
    await object_store.check()


async def test_put_then_get_round_trips_bytes(object_store: ObjectStore) -> None:
    """Bytes put under a key come back identical from get and read."""
    data = payload(1000)
    await object_store.put("rec/1/chunk-0001.bin", data)
    assert b"".join(await collect(object_store.get("rec/1/chunk-0001.bin"))) == data
    assert await object_store.read("rec/1/chunk-0001.bin") == data


async def test_put_returns_info_consistent_with_stat(object_store: ObjectStore) -> None:
    """put returns the size, an etag and the content type; stat reports the same with a UTC timestamp."""
    before = datetime.now(UTC) - timedelta(seconds=5)
    info = await object_store.put("media/clip.ogg", b"OggS" * 100, content_type="audio/ogg")
    assert (info.key, info.size, info.content_type) == ("media/clip.ogg", 400, "audio/ogg")
    assert info.etag
    stat = await object_store.stat("media/clip.ogg")
    assert stat is not None
    assert (stat.key, stat.size, stat.etag, stat.content_type) == (
        "media/clip.ogg",
        400,
        info.etag,
        "audio/ogg",
    )
    assert stat.last_modified is not None and stat.last_modified.tzinfo is not None
    assert stat.last_modified.utcoffset() == timedelta(0)
    assert before <= stat.last_modified <= datetime.now(UTC) + timedelta(seconds=5)


async def test_overwrite_replaces_content_and_etag(object_store: ObjectStore) -> None:
    """Putting an existing key replaces the object and changes its etag."""
    first = await object_store.put("a/obj", b"first version")
    second = await object_store.put("a/obj", b"second, longer version")
    assert await object_store.read("a/obj") == b"second, longer version"
    assert first.etag != second.etag
    assert await keys(object_store, "a/") == ["a/obj"]


async def test_empty_object(object_store: ObjectStore) -> None:
    """A zero-byte object exists, reads as b"", and any explicit range of it is InvalidRange."""
    info = await object_store.put("empty/obj", b"")
    assert info.size == 0
    assert await object_store.exists("empty/obj")
    assert await object_store.read("empty/obj") == b""
    with pytest.raises(InvalidRange):
        await collect(object_store.get("empty/obj", start=0, end=0))


async def test_streaming_put_accepts_any_chunk_sizes(object_store: ObjectStore) -> None:
    """A streamed put of uneven and empty chunks stores exactly their concatenation."""
    pieces = [b"", b"x", payload(70_000, 2), b"", payload(3, 3), payload(200_001, 4)]

    async def source() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    info = await object_store.put("stream/uneven", source())
    assert info.size == sum(map(len, pieces))
    assert await object_store.read("stream/uneven") == b"".join(pieces)


async def test_get_streams_in_64_kib_chunks(object_store: ObjectStore) -> None:
    """get yields CHUNK_SIZE (64 KiB) chunks, only the last one shorter."""
    data = payload(300_000)
    await object_store.put("chunks/obj", data)
    chunks = await collect(object_store.get("chunks/obj"))
    assert CHUNK_SIZE == 64 * 1024
    assert len(chunks) == 5
    assert all(len(c) == CHUNK_SIZE for c in chunks[:-1])
    assert b"".join(chunks) == data


# ------------------------------------------------------------------------- big and streaming


def _memory_bound(kind: str) -> int:
    """Highest acceptable traced peak while streaming 20 MiB through a store (1 MiB source chunks).

    Allowance for the test's own side: the chunk being generated (randbytes briefly holds it twice)
    and the chunk the store is consuming, with 1 MiB to spare.
    """
    source_side = 4 * MiB
    if kind == "file":
        return source_side
    # S3: the one part being assembled/sent, what the event loop may queue ahead of it, and the
    # chunk ``feed`` waits to queue.
    return PART_SIZE + UPLOAD_QUEUE_BYTES + source_side + MiB


async def test_20_mb_streams_in_and_out_with_bounded_memory(object_store: ObjectStore) -> None:
    """A 20 MiB object streamed from 1 MiB chunks and back keeps its sha256; traced peaks stay bounded."""
    size = 20 * MiB
    sent = hashlib.sha256()

    async def source() -> AsyncIterator[bytes]:
        rng = random.Random(20)
        for _ in range(size // MiB):
            chunk = rng.randbytes(MiB)
            sent.update(chunk)
            yield chunk
            del chunk  # hold at most one chunk on the test's side

    bound = _memory_bound(object_store.kind)
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        info = await object_store.put("big/recording.bin", source())
        put_peak = tracemalloc.get_traced_memory()[1] - base

        received, total = hashlib.sha256(), 0
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        async with opened(object_store.get("big/recording.bin")) as chunks:
            async for chunk in chunks:
                received.update(chunk)
                total += len(chunk)
        get_peak = tracemalloc.get_traced_memory()[1] - base

        # The meter itself: reading the whole object at once (in the store's threads) must show up.
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        whole = await object_store.read("big/recording.bin")
        whole_peak = tracemalloc.get_traced_memory()[1] - base
        del whole
    finally:
        if started_here:
            tracemalloc.stop()

    assert info.size == size and total == size
    assert received.hexdigest() == sent.hexdigest()
    assert whole_peak >= size, "the memory meter does not see the store's allocations"
    assert put_peak < bound, f"streaming put peaked at {put_peak / MiB:.1f} MiB (bound {bound / MiB:.0f})"
    assert get_peak < bound, f"streaming get peaked at {get_peak / MiB:.1f} MiB (bound {bound / MiB:.0f})"


# ------------------------------------------------------------------------------------ ranges

RANGE_DATA = payload(150_000, 9)
N = len(RANGE_DATA)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (0, None, RANGE_DATA),
        (10, None, RANGE_DATA[10:]),
        (10, 19, RANGE_DATA[10:20]),
        (0, 0, RANGE_DATA[:1]),
        (N - 1, None, RANGE_DATA[-1:]),
        (N - 1, N - 1, RANGE_DATA[-1:]),
        (CHUNK_SIZE - 5, CHUNK_SIZE + 5, RANGE_DATA[CHUNK_SIZE - 5 : CHUNK_SIZE + 6]),
        (N - 10, N + 1000, RANGE_DATA[-10:]),
    ],
    ids=[
        "whole",
        "start-only",
        "start-end",
        "first-byte",
        "last-byte-open",
        "last-byte",
        "across-chunk",
        "clamped",
    ],
)
async def test_ranged_get(object_store: ObjectStore, start: int, end: int | None, expected: bytes) -> None:
    """get(start, end) returns the inclusive byte range; an end past the object is clamped."""
    await object_store.put("range/obj", RANGE_DATA)
    assert b"".join(await collect(object_store.get("range/obj", start=start, end=end))) == expected


@pytest.mark.parametrize(("start", "end"), [(N, None), (N, N + 10), (N + 500, None)])
async def test_range_starting_past_the_end_is_invalid(
    object_store: ObjectStore, start: int, end: int | None
) -> None:
    """A range starting at or past the end raises InvalidRange (HTTP 416 semantics)."""
    await object_store.put("range/obj", RANGE_DATA)
    with pytest.raises(InvalidRange) as excinfo:
        await collect(object_store.get("range/obj", start=start, end=end))
    assert isinstance(excinfo.value, ObjectStoreError) and isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(("start", "end"), [(-1, None), (10, 9), (5, -1)])
async def test_bad_range_arguments_fail_at_call_time(
    object_store: ObjectStore, start: int, end: int | None
) -> None:
    """A negative start or an end before start raises ValueError when get is called, before any I/O."""
    with pytest.raises(ValueError, match="start"):
        object_store.get("range/obj", start=start, end=end)


# ---------------------------------------------------------------------- stat, exists, missing


async def test_stat_and_exists_for_present_and_missing_keys(object_store: ObjectStore) -> None:
    """stat/exists see a present object and report None/False for a missing key or a mere prefix."""
    await object_store.put("s/present/obj", b"123")
    stat = await object_store.stat("s/present/obj")
    assert isinstance(stat, ObjectInfo) and stat.size == 3
    assert await object_store.exists("s/present/obj")
    for missing in ("s/absent", "s/present", "s/present/obj/deeper"):
        assert await object_store.stat(missing) is None
        assert not await object_store.exists(missing)


async def test_get_of_missing_key_raises_object_not_found(object_store: ObjectStore) -> None:
    """get/read of a missing key (or of a prefix) raise ObjectNotFound, which is also a KeyError."""
    await object_store.put("dir/obj", b"x")
    for missing in ("nothing/here", "dir"):
        with pytest.raises(ObjectNotFound) as excinfo:
            await collect(object_store.get(missing))
        assert isinstance(excinfo.value, KeyError)
        assert missing in str(excinfo.value)
        with pytest.raises(KeyError):
            await object_store.read(missing)


# -------------------------------------------------------------------------------------- list


async def test_list_is_sorted_and_isolated_by_prefix(object_store: ObjectStore) -> None:
    """list(prefix) yields exactly the keys starting with prefix, sorted by key, with sizes."""
    stored = ["a/b/2", "a/bc/1", "a/b/1", "a/b-x", "a/b/sub/3", "a/b/é", "b/1", "a0", "a/b/Z"]
    for i, key in enumerate(stored):
        await object_store.put(key, b"x" * (i + 1))
    assert await keys(object_store, "a/b/") == ["a/b/1", "a/b/2", "a/b/Z", "a/b/sub/3", "a/b/é"]
    assert await keys(object_store, "a/b") == [
        "a/b-x",
        "a/b/1",
        "a/b/2",
        "a/b/Z",
        "a/b/sub/3",
        "a/b/é",
        "a/bc/1",
    ]
    assert await keys(object_store, "") == sorted(stored)
    assert await keys(object_store, "a/b/s") == ["a/b/sub/3"]
    assert await keys(object_store, "zzz/") == []
    assert await keys(object_store, "a/b/1/") == []
    sizes = {info.key: info.size async for info in object_store.list("a/")}
    assert sizes["a/b-x"] == stored.index("a/b-x") + 1


async def test_list_and_delete_prefix_handle_more_than_1000_keys(object_store: ObjectStore) -> None:
    """Listing pages past 1,000 keys in order, and delete_prefix removes them all in bulk."""
    count = 1005
    limit = asyncio.Semaphore(16)

    async def put(i: int) -> None:
        async with limit:
            await object_store.put(f"many/{i:05d}", b"%d" % i)

    await asyncio.gather(*(put(i) for i in range(count)))
    await object_store.put("many-other/keep", b"k")
    listed = await keys(object_store, "many/")
    assert listed == [f"many/{i:05d}" for i in range(count)]
    assert await object_store.delete_prefix("many/") == count
    assert await keys(object_store, "many") == ["many-other/keep"]


async def test_list_rejects_invalid_prefixes(object_store: ObjectStore) -> None:
    """list refuses prefixes with '..' segments, a leading '/', backslashes or NUL."""
    for prefix in ("../", "a/../b", "/a", "a\\b", "a\x00"):
        with pytest.raises(ValueError):
            object_store.list(prefix)


# ------------------------------------------------------------------------------------ delete


async def test_delete_is_idempotent(object_store: ObjectStore) -> None:
    """delete removes an object; deleting it again, or a key that never existed, is not an error."""
    await object_store.put("d/obj", b"x")
    await object_store.delete("d/obj")
    assert not await object_store.exists("d/obj")
    await object_store.delete("d/obj")
    await object_store.delete("never/existed")
    assert await keys(object_store, "") == []


async def test_delete_prefix_counts_and_leaves_siblings(object_store: ObjectStore) -> None:
    """delete_prefix("a/b/") deletes only a/b/..., returns the count, and leaves a/bc/ and a/b-1 alone."""
    for key in ("a/b/1", "a/b/2", "a/b/c/3", "a/bc/1", "a/b-1", "b/1"):
        await object_store.put(key, b"x")
    assert await object_store.delete_prefix("a/b/") == 3
    assert await keys(object_store, "") == ["a/b-1", "a/bc/1", "b/1"]
    assert await object_store.delete_prefix("a/b/") == 0


@pytest.mark.parametrize("prefix", ["", "a", "a/b", "/", "/a/", "a//", "../", "a/../", "a\\b/"])
async def test_delete_prefix_refuses_unsafe_prefixes(object_store: ObjectStore, prefix: str) -> None:
    """delete_prefix refuses an empty, invalid or not '/'-terminated prefix and deletes nothing."""
    await object_store.put("a/b/1", b"x")
    with pytest.raises(ValueError):
        await object_store.delete_prefix(prefix)
    assert await keys(object_store, "") == ["a/b/1"]


# ------------------------------------------------------------------------------- atomicity


async def test_readers_never_see_a_partial_object(object_store: ObjectStore) -> None:
    """During a slow multipart streaming put, readers see nothing or the old object, never a part."""
    old = b"old version " * 100
    await object_store.put("atomic/replaced", old)
    chunks = [payload(MiB, seed) for seed in range(6)]  # > 5 MiB: S3 goes multipart
    new = b"".join(chunks)

    def slow_source() -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk
                await asyncio.sleep(0.05)

        return gen()

    seen: dict[str, set[str]] = {"atomic/fresh": set(), "atomic/replaced": set()}

    async def observe(key: str, previous: bytes | None, writer: asyncio.Task[ObjectInfo]) -> None:
        sizes = {len(new)} | ({len(previous)} if previous is not None else set())
        while not writer.done():
            info = await object_store.stat(key)
            assert info is None or info.size in sizes, f"{key}: stat saw {info.size} bytes"
            try:
                data: bytes | None = await object_store.read(key)
            except ObjectNotFound:
                data = None
            if data is None:
                assert previous is None, f"{key}: the previous object vanished during the put"
                seen[key].add("absent")
            else:
                assert data in (previous, new), f"{key}: saw {len(data)} bytes, a partial object"
                seen[key].add("old" if data == previous else "new")
            await asyncio.sleep(0.01)

    for key, previous in (("atomic/fresh", None), ("atomic/replaced", old)):
        writer = asyncio.create_task(object_store.put(key, slow_source()))
        await observe(key, previous, writer)
        await writer
        assert await object_store.read(key) == new
    assert "absent" in seen["atomic/fresh"] and "old" in seen["atomic/replaced"]


async def test_failed_streaming_put_creates_nothing(object_store: ObjectStore) -> None:
    """If the source raises mid-stream (after > 5 MiB), put re-raises and the previous object is intact."""
    await object_store.put("fail/replaced", b"previous")

    async def broken() -> AsyncIterator[bytes]:
        for seed in range(6):
            yield payload(MiB, seed)
        raise RuntimeError("microphone unplugged")

    for key in ("fail/new", "fail/replaced"):
        with pytest.raises(RuntimeError, match="microphone unplugged"):
            await object_store.put(key, broken())
    assert await object_store.stat("fail/new") is None
    assert await object_store.read("fail/replaced") == b"previous"
    assert await keys(object_store, "fail/") == ["fail/replaced"]


async def test_cancelled_streaming_put_creates_nothing(object_store: ObjectStore) -> None:
    """Cancelling a streaming put leaves no object, and the store keeps working afterwards."""
    fed = asyncio.Event()
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        for seed in range(6):
            yield payload(MiB, seed)
        fed.set()
        await never.wait()
        yield b"never reached"

    task = asyncio.create_task(object_store.put("cancel/obj", stalled()))
    await asyncio.wait_for(fed.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await object_store.stat("cancel/obj") is None

    async def fine() -> AsyncIterator[bytes]:
        yield b"after"

    await object_store.put("cancel/after", fine())
    assert await keys(object_store, "cancel/") == ["cancel/after"]


# ------------------------------------------------------------------------------------- keys

BAD_KEYS = [
    "",
    "   ",
    "/abs",
    "..",
    ".",
    "a/../b",
    "../escape",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "a\x00b",
    "a\nb",
    ".tmp-1234",
    "a/.tmp-x/b",
    "k" * 1025,
    "é" * 513,  # 1026 UTF-8 bytes
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=[repr(k)[:20] for k in BAD_KEYS])
async def test_invalid_keys_raise_value_error(object_store: ObjectStore, key: str) -> None:
    """Every operation refuses an invalid key with ValueError before touching storage."""
    with pytest.raises(ValueError):
        await object_store.put(key, b"x")
    with pytest.raises(ValueError):
        object_store.get(key)
    for op in (object_store.read, object_store.stat, object_store.exists, object_store.delete):
        with pytest.raises(ValueError):
            await op(key)
    assert await keys(object_store, "") == []


async def test_longest_valid_key_round_trips(object_store: ObjectStore) -> None:
    """A 1024-byte key (in segments of at most 255 bytes) works; a non-str key is a TypeError."""
    key = "/".join(["y" * 200] * 4 + ["z" * 220])
    assert len(key.encode()) == 1024
    await object_store.put(key, b"long")
    assert await object_store.read(key) == b"long"
    assert await keys(object_store, "y") == [key]
    with pytest.raises(TypeError):
        await object_store.stat(b"bytes-key")  # type: ignore[arg-type]


# --------------------------------------------------------------------- lifecycle and health


async def test_aclose_is_idempotent_and_closed_store_refuses_work(object_store: ObjectStore) -> None:
    """aclose can be called twice; afterwards operations raise ObjectStoreError and check() is unavailable."""
    await object_store.put("x/obj", b"x")
    await object_store.aclose()
    await object_store.aclose()
    with pytest.raises(ObjectStoreError, match="closed"):
        await object_store.put("x/other", b"y")
    with pytest.raises(ObjectStoreError, match="closed"):
        await object_store.stat("x/obj")
    with pytest.raises(ObjectStoreUnavailable):
        await object_store.check()


async def test_setup_is_idempotent(object_store: ObjectStore) -> None:
    """setup() on an already set-up store changes nothing and check() passes."""
    await object_store.put("keep/obj", b"x")
    await object_store.setup()
    await ensure_ready(object_store)
    assert await object_store.read("keep/obj") == b"x"


async def test_check_against_a_closed_port_fails_fast() -> None:
    """check() on an S3 endpoint nobody listens on raises ObjectStoreUnavailable within a few seconds."""
    port = free_loopback_port()
    store = open_object_store(f"s3://ak:{SECRET}@127.0.0.1:{port}/audio?secure=false")
    try:
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable) as excinfo:
            await store.check()
        assert time.monotonic() - started < 5
        assert f"127.0.0.1:{port}" in str(excinfo.value) and SECRET not in str(excinfo.value)
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            await store.put("k", b"x")
        with pytest.raises(ObjectStoreUnavailable):
            await store.setup()
        assert time.monotonic() - started < 10
    finally:
        await store.aclose()


async def test_check_reports_missing_bucket_and_ensure_ready_creates_it(s3_store_url: str) -> None:
    """check() fails while the bucket is missing; ensure_ready creates it and check() then passes."""
    store = open_object_store(s3_store_url)
    try:
        with pytest.raises(ObjectStoreUnavailable, match="does not exist"):
            await store.check()
        await ensure_ready(store)
        await store.check()
        await store.put("k", b"v")
        assert await store.read("k") == b"v"
    finally:
        await store.aclose()


async def test_local_check_reports_missing_directory(tmp_path: Path) -> None:
    """A local store whose directory is missing is unavailable until setup() creates it."""
    store = open_object_store((tmp_path / "not" / "yet").as_uri())
    try:
        with pytest.raises(ObjectStoreUnavailable, match="does not exist"):
            await store.check()
        await ensure_ready(store)
        assert (tmp_path / "not" / "yet").is_dir()
    finally:
        await store.aclose()


# ---------------------------------------------------------------------------------------- URLs

BAD_URLS = [
    ("ftp://host/x", "unsupported object store URL scheme 'ftp'"),
    ("just-a-name", "no scheme"),
    ("file://relative/path", "three slashes"),
    ("file:///srv/objects?mode=x", "no query"),
    ("s3://127.0.0.1:9000/bucket", "needs credentials"),
    ("s3://AKIA:@127.0.0.1:9000/bucket", "both ACCESS_KEY and SECRET_KEY"),
    (f"s3://AKIA:{SECRET}@:9000/bucket", "no host"),
    (f"s3://AKIA:{SECRET}@ho_st:9000/bucket", "not a valid host"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:port/bucket", "port 'port'"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:70000/bucket", "1-65535"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000", "no bucket"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000/", "no bucket"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000/Bad_Bucket", "invalid S3 bucket name"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000/bucket/prefix", "just /BUCKET"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000/bucket?secure=maybe", "secure='maybe'"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000/bucket?secur=false", "unknown S3 object store URL option 'secur'"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000/bucket?region=Bad%20Region", "not a region name"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000/bucket?secure=false&secure=true", "given twice"),
    (f"s3://AKIA:{SECRET}@127.0.0.1:9000/bucket#frag", "fragment"),
    (f"s3://AKIA:{SECRET}@[::1/bucket", "could not parse"),
    ("s3://AKIA:hunter/2xyz@127.0.0.1:9000/bucket", "percent-encode"),  # unencoded '/' in the secret
]


def _exception_texts(exc: BaseException) -> str:
    texts = []
    current: BaseException | None = exc
    while current is not None:
        texts.append("".join(traceback.format_exception_only(current)) + repr(current))
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


@pytest.mark.parametrize(("url", "message"), BAD_URLS, ids=[m for _, m in BAD_URLS])
def test_bad_urls_raise_value_error_without_the_secret(url: str, message: str) -> None:
    """A malformed store URL raises ValueError naming the problem; no message in it shows the secret."""
    with pytest.raises(ValueError) as excinfo:
        open_object_store(url)
    assert message in str(excinfo.value)
    text = _exception_texts(excinfo.value)
    for fragment in (SECRET, "hunter/", "2xyz"):
        assert fragment not in text


async def test_s3_url_is_percent_decoded_and_secret_never_shown() -> None:
    """Key and secret are percent-decoded; secure/region are read; reprs show endpoint and bucket only."""
    url = "s3://AK%2FID:se%2Fcr%40et%3A%2B@127.0.0.1:9000/my-bucket?secure=false&region=eu-west-1"
    config = parse_s3_url(url)
    assert (config.access_key, config.secret_key) == ("AK/ID", "se/cr@et:+")
    assert (config.host, config.port, config.bucket, config.secure, config.region) == (
        "127.0.0.1",
        9000,
        "my-bucket",
        False,
        "eu-west-1",
    )
    assert "se/cr@et" not in repr(config)
    store = open_object_store(url)
    try:
        assert store.kind == "s3"
        assert repr(store) == "S3ObjectStore(endpoint='http://127.0.0.1:9000', bucket='my-bucket')"
        assert "se/cr@et" not in repr(vars(store) if hasattr(store, "__dict__") else store)
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("url", "endpoint", "secure"),
    [
        ("s3://a:b@minio.example:9000/bk1", "minio.example:9000", True),
        ("s3://a:b@MinIO.Example/bk1?secure=TRUE", "minio.example", True),
        ("s3://a:b@[::1]:9000/bk1?secure=0", "[::1]:9000", False),
    ],
)
def test_s3_url_hosts_and_tls_default(url: str, endpoint: str, secure: bool) -> None:
    """TLS is on unless secure=false; hosts may be names or bracketed IPv6, ports optional."""
    config = parse_s3_url(url)
    assert (config.endpoint, config.secure) == (endpoint, secure)


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("file:///srv/objects", "/srv/objects"),
        ("file://localhost/srv/objects/", "/srv/objects"),
        ("file:///srv/my%20objects", "/srv/my objects"),
        ("file:///srv/a/../objects", "/srv/objects"),
    ],
)
async def test_file_urls(url: str, root: str) -> None:
    """file:///ABS/PATH (or file://localhost/...) opens a local store on the decoded, normalised path."""
    store = open_object_store(url)
    try:
        assert isinstance(store, LocalObjectStore) and store.kind == "file"
        assert store.root == root
    finally:
        await store.aclose()


# ------------------------------------------------------------------------ local-disk specifics


async def test_local_keys_never_escape_the_root(tmp_path: Path) -> None:
    """Keys that would resolve outside the local root are refused and nothing is written outside it."""
    store = LocalObjectStore(tmp_path / "objects")
    await store.setup()
    try:
        for key in ("../escape", "a/../../escape", "/etc/escape", "a/b/../../../escape"):
            with pytest.raises(ValueError):
                await store.put(key, b"x")
        for prefix in ("../", "a/../../"):
            with pytest.raises(ValueError):
                await store.delete_prefix(prefix)
        assert entries(tmp_path) == ["objects"]
        assert entries(tmp_path / "objects") == []
    finally:
        await store.aclose()


async def test_local_store_does_not_follow_symlinks_out_of_the_root(tmp_path: Path) -> None:
    """A symbolic link planted in the root that leads outside makes operations through it fail."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not yours")
    store = LocalObjectStore(tmp_path / "objects")
    await store.setup()
    try:
        (tmp_path / "objects" / "link").symlink_to(outside, target_is_directory=True)
        with pytest.raises(ObjectStoreError, match="symbolic link"):
            await store.read("link/secret.txt")
        with pytest.raises(ObjectStoreError, match="symbolic link"):
            await store.stat("link/secret.txt")
        with pytest.raises(ObjectStoreError, match="symbolic link"):
            await store.put("link/new/planted.txt", b"x")
        with pytest.raises(ObjectStoreError, match="symbolic link"):
            await store.delete("link/secret.txt")
        assert await store.delete_prefix("link/") == 0
        assert await keys(store, "") == []
        assert entries(outside) == ["secret.txt"]
    finally:
        await store.aclose()


async def test_local_put_is_temp_file_then_rename(local_store: LocalObjectStore) -> None:
    """While a local streaming put runs only a .tmp- file exists, which list ignores; none is left after."""
    root = Path(local_store.root)
    release = asyncio.Event()
    written = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield b"part one, "
        written.set()
        await release.wait()
        yield b"part two"

    task = asyncio.create_task(local_store.put("rec/7/full.bin", source()))
    await asyncio.wait_for(written.wait(), 5)
    await asyncio.sleep(0.05)
    assert len(temp_files(root)) == 1
    assert not (root / "rec/7/full.bin").exists()
    assert await keys(local_store, "") == []
    release.set()
    await task
    assert temp_files(root) == []
    assert (root / "rec/7/full.bin").read_bytes() == b"part one, part two"


async def test_local_failed_and_cancelled_puts_leave_no_temp_files(local_store: LocalObjectStore) -> None:
    """A failing or cancelled local put removes its temp file."""
    root = Path(local_store.root)

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await local_store.put("t/obj", broken())
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"y" * 1000
        started.set()
        await asyncio.Event().wait()
        yield b""

    task = asyncio.create_task(local_store.put("t/obj2", stalled()))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert temp_files(root) == []
    assert await keys(local_store, "") == []


async def test_local_delete_removes_emptied_directories(local_store: LocalObjectStore) -> None:
    """delete and delete_prefix remove the directories they empty, and keep non-empty ones."""
    root = Path(local_store.root)
    for key in ("r/1/a/x", "r/1/a/y", "r/1/b/z", "r/2/w", "solo/deep/obj"):
        await local_store.put(key, b"x")
    await local_store.delete("solo/deep/obj")
    assert not (root / "solo").exists()
    assert await local_store.delete_prefix("r/1/") == 3
    assert not (root / "r/1").exists()
    assert (root / "r/2/w").is_file()
    assert await local_store.delete_prefix("r/2/") == 1
    assert entries(root) == []


async def test_local_key_cannot_also_be_a_prefix(local_store: LocalObjectStore) -> None:
    """On local disk a key cannot be both an object and a prefix of others: ObjectStoreError, data intact."""
    await local_store.put("clash/a", b"object")
    with pytest.raises(ObjectStoreError, match="conflicts"):
        await local_store.put("clash/a/b", b"under an object")
    await local_store.put("clash2/a/b", b"nested")
    with pytest.raises(ObjectStoreError, match="conflicts"):
        await local_store.put("clash2/a", b"over a prefix")
    assert await keys(local_store, "clash") == ["clash/a", "clash2/a/b"]
    assert temp_files(Path(local_store.root)) == []


async def test_local_content_type_uses_xattr_or_extension(local_store: LocalObjectStore) -> None:
    """The local store keeps content_type in an xattr where supported, else guesses it from the extension."""
    await local_store.put("ct/blob", b"x", content_type="application/x-parley")
    await local_store.put("ct/clip.ogg", b"x", content_type="audio/ogg")
    path = Path(local_store.root) / "ct" / "blob"
    try:
        os.getxattr(path, XATTR_CONTENT_TYPE)
        has_xattr = True
    except (OSError, AttributeError):
        has_xattr = False
    blob = await local_store.stat("ct/blob")
    clip = await local_store.stat("ct/clip.ogg")
    assert blob is not None and clip is not None
    assert blob.content_type == ("application/x-parley" if has_xattr else None)
    assert clip.content_type == "audio/ogg"
    assert guess_content_type("x.ogg") == "audio/ogg" and guess_content_type("x.unknownext") is None


async def test_local_get_early_stop_closes_the_file(local_store: LocalObjectStore) -> None:
    """A consumer that stops reading early does not leak the file descriptor."""
    await local_store.put("fd/obj", payload(500_000))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        async with opened(local_store.get("fd/obj")) as chunks:
            async for _chunk in chunks:
                break
    assert len(os.listdir("/proc/self/fd")) <= before


# ---------------------------------------------------------------------------------- S3 specifics


async def test_s3_get_early_stop_closes_and_releases_the_response(s3_store: S3ObjectStore) -> None:
    """A consumer that stops an S3 get early gets the HTTP response closed and its connection released."""
    await s3_store.put("early/obj", payload(500_000))
    responses: list[Any] = []
    client = s3_store._client
    original = client.get_object

    def spy(*args: Any, **kwargs: Any) -> Any:
        response = original(*args, **kwargs)
        responses.append(response)
        return response

    client.get_object = spy  # type: ignore[method-assign]
    try:
        async with opened(s3_store.get("early/obj")) as chunks:
            async for _chunk in chunks:
                break
        assert len(responses) == 1 and responses[0].closed
        assert await s3_store.read("early/obj") == payload(500_000)
    finally:
        client.get_object = original  # type: ignore[method-assign]


async def test_s3_calls_never_run_on_the_event_loop_thread(s3_store: S3ObjectStore) -> None:
    """Every HTTP request minio makes runs in the store's threads, never on the event-loop thread."""
    threads: set[int] = set()
    client = s3_store._client
    original: Callable[..., Any] = client._url_open

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.add(threading.get_ident())
        return original(*args, **kwargs)

    client._url_open = spy  # type: ignore[method-assign]

    async def source() -> AsyncIterator[bytes]:
        for seed in range(6):
            yield payload(MiB, seed)

    try:
        await s3_store.put("t/small", b"x")
        await s3_store.put("t/big", source())
        await s3_store.read("t/small")
        await s3_store.stat("t/big")
        await keys(s3_store, "t/")
        await s3_store.delete("t/small")
        await s3_store.delete_prefix("t/")
        await s3_store.check()
    finally:
        client._url_open = original  # type: ignore[method-assign]
    assert threads and threading.get_ident() not in threads


async def test_s3_missing_bucket_is_unavailable_not_not_found(s3_server: str) -> None:
    """Operations on a bucket that does not exist raise ObjectStoreUnavailable naming the bucket."""
    store = open_object_store(with_bucket(s3_server, "no-such-bucket-here"))
    try:
        with pytest.raises(ObjectStoreUnavailable, match="no-such-bucket-here"):
            await collect(store.get("k"))
        with pytest.raises(ObjectStoreUnavailable):
            await store.put("k", b"x")
    finally:
        await store.aclose()


def test_minio_offers_the_part_api_for_low_memory_uploads() -> None:
    """The installed minio has the part-level calls the one-part-at-a-time streaming upload relies on."""
    assert s3_module._PART_API, "minio dropped its multipart internals: streaming puts now use more memory"


async def test_s3_failed_stream_aborts_its_multipart_upload(s3_store: S3ObjectStore) -> None:
    """A streaming put that fails after the first part aborts its multipart upload on the server."""

    async def broken() -> AsyncIterator[bytes]:
        for seed in range(7):
            yield payload(MiB, seed)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        await s3_store.put("aborted/obj", broken())
    client: Any = s3_store._client
    pending = await asyncio.to_thread(client._list_multipart_uploads, s3_store.bucket)
    assert pending.uploads == []
    assert await s3_store.stat("aborted/obj") is None


@pytest.mark.parametrize("size", [3 * MiB, 7 * MiB + 3])
async def test_s3_streaming_falls_back_to_minio_put_object(
    s3_store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Without minio's part-level calls, streaming puts go through put_object(length=-1) and stay correct."""
    monkeypatch.setattr(s3_module, "_PART_API", False)
    data = payload(size, 5)

    async def source() -> AsyncIterator[bytes]:
        for offset in range(0, size, 700_000):
            yield data[offset : offset + 700_000]

    info = await s3_store.put("fallback/obj", source())
    assert info.size == size
    assert hashlib.sha256(await s3_store.read("fallback/obj")).digest() == hashlib.sha256(data).digest()
