"""The ``assembly`` step of ``finalize``: one verified, playable Ogg Opus file per track.

For each track with segments and no usable file yet (a recording still ``recording`` is left
alone; an ``interrupted`` one is assembled like a ``complete`` one):

1. **Build** the track's stream from exactly its listed segments (:func:`storage.assembly.segment_track`:
   each read once and checked against its manifest digest) and **put** it, streamed, under
   :func:`storage.assembly.final_object_key`, next to the segments.
2. **Fence.** Check right after the put that the session is not being deleted: a delete that swept
   the prefix before the put landed would otherwise find the file back. A session being deleted
   gets its file removed, as the uploader does with a segment (:mod:`storage.uploader`).
3. **Verify.** Read the file back (its bytes must hash as they were put), decode all of it with
   PyAV in a thread (no decode error), and compare its decoded length with the track's timeline
   (the end of its last segment) within :data:`TOLERANCE_MS`.
4. **Record** ``final_object_key`` in the job's fenced transaction, if the manifest still lists the
   segments the file was built from (the file's name counts them, so one listed later, an upload
   that waited for the store, makes it stale and playback goes back to the segments).

Failures: the store failing is retryable (``assembly_store_unavailable``), and so is a segment
listed while the file was made (``assembly_manifest_changed``, its file removed); a file that fails
verification, or a segment that cannot go into one, is removed and fatal (``assembly_unverified``).
Either way the segments are never touched: they stay the source of truth and the audio stays
playable from them (DESIGN.md). Idempotent: a track whose file is recorded and present is skipped,
and a run that stopped between the put and the record (a crash, a lost lease) is simply done again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import IO, Final

import av
from sqlalchemy import func, select, update

from relay.errors import JobError
from relay.observability.logging import log_failure
from relay.worker.finalize import Step
from relay.worker.jobs import JobContext
from storage.assembly import SegmentRef, SegmentUnusable, final_object_key, segment_track, track_recording
from storage.db import Database
from storage.deletion import fenced
from storage.jobs import SessionFenced
from storage.models import AudioChunk, AudioRecording
from storage.objects import ObjectStore, ObjectStoreError
from storage.uploader import RETRYABLE, delete_with_retries

__all__ = ["STEP", "TOLERANCE_MS", "UNAVAILABLE", "UNVERIFIED", "assembly_step"]

log = logging.getLogger("relay.worker.assembly")

STEP: Final = "assembly"
TRACKS: Final = ("learner", "coach")
#: The store failed (put, read back, a segment): a later try may succeed.
UNAVAILABLE: Final = "assembly_store_unavailable"
#: The file does not decode, or not to the timeline's length, or a segment cannot go into it.
UNVERIFIED: Final = "assembly_unverified"
#: The manifest listed another segment while the file was being made: made again on the next try.
MANIFEST_CHANGED: Final = "assembly_manifest_changed"
#: How far the decoded length may be from the timeline: two 20 ms frames.
TOLERANCE_MS: Final = 40
#: Tries at removing a file that must not stay (about 20 s in all), as the uploader does.
REMOVE_ATTEMPTS: Final = 8
#: How long a stopping run may spend finding out whether its file must go.
STOPPING_CHECK_S: Final = 2.0


class _Unverified(Exception):
    """The file put is not a faithful, playable copy of the segments."""


@dataclass(frozen=True, slots=True)
class _Source:
    """One track as the manifest lists it."""

    session_id: str
    track: str
    recording_id: str
    status: str
    final_key: str | None
    segments: tuple[SegmentRef, ...]
    #: The end of the last segment on the session timeline: the decoded file's length.
    timeline_ms: int


def assembly_step() -> Step:
    """The ``assembly`` step, for :func:`relay.worker.finalize.finalize_kind` (before rating)."""
    return Step(STEP, _run)


async def _run(ctx: JobContext) -> None:
    for track in TRACKS:
        source = await _source(ctx.db, ctx.session_id, track)
        if source is not None and await _needs_file(ctx.store, source):
            await _assemble(ctx, source)


async def _source(db: Database, session_id: str, track: str) -> _Source | None:
    async with db.sessions() as s:
        rec = await track_recording(s, session_id, track)
        if rec is None:
            return None
        rows = (
            await s.execute(
                select(AudioChunk.start_ms, AudioChunk.duration_ms, AudioChunk.object_key, AudioChunk.sha256)
                .where(AudioChunk.recording_id == rec.id)
                .order_by(AudioChunk.seq)
            )
        ).all()
    if not rows:
        return None
    return _Source(
        session_id=session_id,
        track=track,
        recording_id=rec.id,
        status=rec.status,
        final_key=rec.final_object_key,
        segments=tuple(SegmentRef(key, int(start), sha) for start, _, key, sha in rows),
        timeline_ms=max(int(start) + int(duration) for start, duration, _, _ in rows),
    )


async def _needs_file(store: ObjectStore, src: _Source) -> bool:
    if src.status == "recording":  # still being written: its segments are not all there yet
        _skipped(src, "recording")
        return False
    if src.final_key != final_object_key(src.session_id, src.track, len(src.segments)):
        return True  # none yet, or made from fewer segments than are listed now
    try:
        present = await store.exists(src.final_key)
    except ObjectStoreError as exc:
        raise _unavailable(exc, src) from None
    if present:
        _skipped(src, "done")
    return not present


def _skipped(src: _Source, reason: str) -> None:
    log.info("assembly.skipped", extra={"session_id": src.session_id, "track": src.track, "reason": reason})


async def _assemble(ctx: JobContext, src: _Source) -> None:
    store = ctx.store
    key = final_object_key(src.session_id, src.track, len(src.segments))
    async with ctx.transaction():
        pass  # still this run's job, and the session is not being deleted: worth the work
    try:
        stream = await segment_track(store, src.session_id, src.track, src.segments)
    except SegmentUnusable as exc:
        await _remove(store, key, src)  # what an earlier run may have left there
        raise JobError(str(exc), retryable=False, code=UNVERIFIED) from None
    except ObjectStoreError as exc:
        raise _unavailable(exc, src) from None
    digest = hashlib.sha256()
    async with _kept_if_recorded(ctx, key, src):
        await store.put(key, _hashed(stream.stream(), digest), content_type="audio/ogg")
        async with ctx.transaction():
            pass  # the fence, after the put (see the module docstring)
        decoded_ms = await _verify(store, key, digest.hexdigest(), stream.length, src.timeline_ms)
        async with ctx.transaction() as s:
            listed = (
                await s.execute(
                    select(func.count())
                    .select_from(AudioChunk)
                    .where(AudioChunk.recording_id == src.recording_id)
                )
            ).scalar_one()
            if listed != len(src.segments):
                raise _ManifestChanged
            await s.execute(
                update(AudioRecording)
                .where(AudioRecording.id == src.recording_id)
                .values(final_object_key=key)
            )
    if src.final_key is not None and src.final_key != key:
        await _remove(store, src.final_key, src, attempts=1)  # the stale file it replaces; unused now
    log.info(
        "assembly.done",
        extra={"session_id": src.session_id, "track": src.track, "bytes": stream.length,
               "count": len(src.segments), "duration_ms": round(decoded_ms)},
    )  # fmt: skip


class _ManifestChanged(Exception):
    pass


@asynccontextmanager
async def _kept_if_recorded(ctx: JobContext, key: str, src: _Source) -> AsyncIterator[None]:
    """The file the block puts stays only if the block records it, or leaves it for the next try."""
    try:
        yield
    except _Unverified as exc:
        await _remove(ctx.store, key, src)
        raise JobError(
            f"the assembled file failed verification: {exc}", retryable=False, code=UNVERIFIED
        ) from None
    except SessionFenced:
        await _remove(ctx.store, key, src)
        raise
    except _ManifestChanged:
        await _remove(ctx.store, key, src)
        raise JobError("a segment was listed meanwhile", retryable=True, code=MANIFEST_CHANGED) from None
    except ObjectStoreError as exc:  # the put or the read-back failed: the next try puts it again
        await _remove_if_fenced(ctx.db, ctx.store, key, src)
        raise _unavailable(exc, src) from None
    except BaseException:
        # Stopped for another reason: cancelled, the database failed, or the claim is gone (another
        # run owns the job and this key now, or the session's delete took the job row with it). The
        # file goes only if the session is being deleted, which a delete that swept the prefix
        # before the put landed relies on.
        await _remove_if_fenced(ctx.db, ctx.store, key, src)
        raise


async def _hashed(chunks: AsyncIterable[bytes], digest: hashlib._Hash) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        await asyncio.to_thread(digest.update, chunk)
        yield chunk


async def _verify(store: ObjectStore, key: str, sha256: str, size: int, timeline_ms: int) -> float:
    """Read the file back and decode it; its decoded length in ms, or :class:`_Unverified`."""
    fd, path = await asyncio.to_thread(tempfile.mkstemp, prefix="parley-assembly-", suffix=".ogg")
    try:
        digest = hashlib.sha256()
        read = 0
        fh = os.fdopen(fd, "wb")
        try:
            async for chunk in store.get(key):
                await asyncio.to_thread(_append, fh, digest, chunk)
                read += len(chunk)
        finally:
            await asyncio.to_thread(fh.close)
        if read != size or digest.hexdigest() != sha256:
            raise _Unverified("its bytes differ from those put")
        decoded_ms = await asyncio.to_thread(_decoded_ms, path)
    finally:
        await asyncio.to_thread(_unlink, path)
    if abs(decoded_ms - timeline_ms) > TOLERANCE_MS:
        raise _Unverified(f"it decodes to {decoded_ms:.0f} ms, the timeline is {timeline_ms} ms")
    return decoded_ms


def _append(fh: IO[bytes], digest: hashlib._Hash, chunk: bytes) -> None:
    digest.update(chunk)
    fh.write(chunk)


def _unlink(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def _decoded_ms(path: str) -> float:
    """Decode the whole file (blocking: run it in a thread); its length in ms."""
    try:
        with av.open(path, format="ogg") as container:
            if not container.streams.audio:
                raise _Unverified("it holds no audio stream")
            stream = container.streams.audio[0]
            if stream.codec_context.name != "opus":
                raise _Unverified("its audio is not Opus")
            rate = stream.codec_context.sample_rate or 48000
            samples = 0
            for frame in container.decode(stream):
                samples += frame.samples
    except av.FFmpegError as exc:
        raise _Unverified(f"decoding failed ({type(exc).__name__})") from None
    return samples * 1000 / rate


async def _remove_if_fenced(db: Database, store: ObjectStore, key: str, src: _Source) -> None:
    try:
        async with asyncio.timeout(STOPPING_CHECK_S), db.sessions() as s:
            gone = await fenced(s, src.session_id)
    except Exception as exc:  # unknown: the delete's own sweep rounds are the remaining guard
        log_failure(log, "assembly.fence_check_failed", exc, expected=(*RETRYABLE, TimeoutError),
                    extra={"session_id": src.session_id})  # fmt: skip
        return
    if gone:
        await _remove(store, key, src, attempts=1)


async def _remove(store: ObjectStore, key: str, src: _Source, *, attempts: int = REMOVE_ATTEMPTS) -> None:
    """Delete a file that must not stay, retrying a while when the store fails (as the uploader does)."""
    if not await delete_with_retries(store, key, attempts=attempts):
        log.error("assembly.remove_failed", extra={"session_id": src.session_id, "track": src.track})


def _unavailable(exc: ObjectStoreError, src: _Source) -> JobError:
    log.warning(
        "assembly.store_failed",
        extra={"session_id": src.session_id, "track": src.track, "error_type": type(exc).__name__},
    )
    return JobError("the object store failed during assembly", retryable=True, code=UNAVAILABLE)
