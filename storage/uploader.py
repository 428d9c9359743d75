"""Moves closed spool segments to the object store, then lists them in the manifest.

Order per segment: read it, ``put`` it under ``sessions/<sid>/audio/<track>/<seq:06d>.ogg``, insert
its :class:`AudioChunk` row if absent (unique ``(recording_id, seq)``: a retry never duplicates),
then delete the spool file. A failure anywhere retries the whole step with exponential backoff,
never more than :data:`MAX_RETRY_INTERVAL_S` apart; the file stays in the spool until its row
exists. A segment of a deleted session is deleted, not kept.

Upstream event logs (``<sid>/events/<seq>.jsonl``) take the same path without a row: the object
listing under ``sessions/<sid>/events/`` is their manifest, and a retry puts the same bytes under the
same key. :func:`upload_file` picks the step by the file's type.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import Database, DatabaseUnavailable
from storage.deletion import fenced
from storage.models import AudioChunk, AudioRecording
from storage.objects import ObjectStore, ObjectStoreError
from storage.oggopus import read_segment_info
from storage.spool import CLOSED_MARKER, EVENTS_DONE_SUFFIX, Spool, event_log_key, object_key

__all__ = [
    "MAX_RETRY_INTERVAL_S",
    "RETRYABLE",
    "SessionGone",
    "Uploader",
    "delete_with_retries",
    "get_or_create_recording",
    "upload_event_log",
    "upload_file",
    "upload_segment",
]

log = logging.getLogger("storage.uploader")

#: Errors that mean "try again later" (store or database unreachable, file system hiccup).
RETRYABLE: Final = (ObjectStoreError, OperationalError, InterfaceError, DatabaseUnavailable, OSError)
#: The longest time from one attempt's start to the next, whatever ``backoff_max_s`` asks for.
#: DESIGN.md promises that uploads resume within 5 s of the object store's return; an attempt is one
#: small PUT (a few seconds of Opus) and one row, so waiting longer between attempts saves nothing
#: worth breaking that promise (a 10 s cap let a returned store wait up to 10 s).
MAX_RETRY_INTERVAL_S: Final = 4.0
#: Tries at deleting an object put for a session that was fenced meanwhile (about 20 s in all).
ORPHAN_DELETE_ATTEMPTS: Final = 8


class SessionGone(Exception):
    """The session row no longer exists: its audio must not be kept."""


async def get_or_create_recording(s: AsyncSession, session_id: str, track: str, sample_rate: int) -> str:
    """The recording id of one track, creating the row (status ``recording``) if needed."""
    for _ in range(2):
        rec_id = (
            await s.execute(
                select(AudioRecording.id).where(
                    AudioRecording.session_id == session_id, AudioRecording.track == track
                )
            )
        ).scalar_one_or_none()
        if rec_id is not None:
            return rec_id
        if await fenced(s, session_id):
            raise SessionGone(session_id)
        rec = AudioRecording(
            session_id=session_id, track=track, format="ogg/opus", sample_rate=sample_rate, channels=1,
            status="recording",
        )  # fmt: skip
        try:
            async with s.begin_nested():
                s.add(rec)
                await s.flush()
            return rec.id
        except IntegrityError:
            continue  # created concurrently: read it
    raise RuntimeError("could not create the audio recording row")


async def recompute_duration(s: AsyncSession, recording_id: str) -> int:
    total = (
        await s.execute(
            select(func.coalesce(func.sum(AudioChunk.duration_ms), 0)).where(
                AudioChunk.recording_id == recording_id
            )
        )
    ).scalar_one()
    await s.execute(update(AudioRecording).where(AudioRecording.id == recording_id).values(duration_ms=total))
    return int(total)


async def upload_segment(db: Database, store: ObjectStore, spool: Spool, path: Path) -> None:
    """Upload one closed segment and list it; idempotent. Raises a RETRYABLE error to be retried."""
    data = await asyncio.to_thread(path.read_bytes)
    info = read_segment_info(data)
    session_id, track, seq = (
        info.tags["PARLEY_SESSION"],
        info.tags["PARLEY_TRACK"],
        int(info.tags["PARLEY_SEQ"]),
    )
    start_ms = int(info.tags["PARLEY_START_MS"])
    data = data[: info.valid_bytes]
    key = object_key(session_id, track, seq)
    put_done = False
    try:
        async with db.sessions() as s:
            if await fenced(s, session_id):
                raise SessionGone(session_id)
        await store.put(key, data, content_type="audio/ogg")
        put_done = True
        async with db.sessions.begin() as s:
            # Checked again after the put: a delete that fenced the session meanwhile must not get
            # this object (removed below) nor its row.
            if await fenced(s, session_id):
                raise SessionGone(session_id)
            rec_id = await get_or_create_recording(s, session_id, track, info.sample_rate)
            exists = (
                await s.execute(
                    select(AudioChunk.id).where(AudioChunk.recording_id == rec_id, AudioChunk.seq == seq)
                )
            ).scalar_one_or_none()
            if exists is None:
                s.add(
                    AudioChunk(
                        recording_id=rec_id, seq=seq, start_ms=start_ms, duration_ms=info.duration_ms,
                        object_key=key, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    )
                )  # fmt: skip
                await s.flush()
                await recompute_duration(s, rec_id)
    except SessionGone:
        await _fenced_out(store, spool, path, key, session_id, put_done=put_done)
        return
    except IntegrityError:
        # The row landed concurrently (or the session vanished mid-way): the next attempt settles it.
        raise OSError("manifest write conflicted; retrying") from None
    await asyncio.to_thread(spool.remove, path)


async def upload_event_log(db: Database, store: ObjectStore, spool: Spool, path: Path) -> None:
    """Upload one closed event log (``<root>/<sid>/events/<seq>.jsonl``); idempotent, no manifest row.

    Fenced like a segment: checked before the put and again after it, and a deleted session's log
    is removed (object and spool), never kept. Raises a RETRYABLE error to be retried.
    """
    session_id = path.parent.parent.name
    stem = path.name.removesuffix(EVENTS_DONE_SUFFIX)
    if not stem.isdigit():
        raise ValueError(f"not an event log: {path.name}")
    key = event_log_key(session_id, int(stem))
    data = await asyncio.to_thread(path.read_bytes)
    data = data[: data.rfind(b"\n") + 1]  # whole lines only (a closed log always ends with one)
    put_done = False
    try:
        async with db.sessions() as s:
            if await fenced(s, session_id):
                raise SessionGone(session_id)
        if data:
            await store.put(key, data, content_type="application/x-ndjson")
            put_done = True
        async with db.sessions() as s:
            # Checked again after the put: a delete that fenced the session meanwhile may have
            # swept the prefix before this object landed; it is removed below.
            if await fenced(s, session_id):
                raise SessionGone(session_id)
    except SessionGone:
        await _fenced_out(store, spool, path, key, session_id, put_done=put_done)
        return
    await asyncio.to_thread(spool.remove, path)


async def _fenced_out(
    store: ObjectStore, spool: Spool, path: Path, key: str, session_id: str, *, put_done: bool
) -> None:
    """A file of a session being deleted: drop it, and make sure no object of it stays behind.

    Only this file leaves the spool (the recorder may still be closing others; the delete removes
    the directory). An object this attempt put must go, so that delete is retried for a while; one
    an earlier attempt may have put (its answer lost) gets one best-effort delete, without holding
    up the queue for everyone else while the store is down: the delete's own sweep covers it.
    """
    log.info("uploader.session_gone", extra={"session_id": session_id})
    await asyncio.to_thread(spool.remove, path)
    deleted = await delete_with_retries(store, key, attempts=ORPHAN_DELETE_ATTEMPTS if put_done else 1)
    if put_done and not deleted:
        log.error("uploader.orphan_delete_failed", extra={"session_id": session_id})


async def delete_with_retries(
    store: ObjectStore, key: str, *, attempts: int = ORPHAN_DELETE_ATTEMPTS
) -> bool:
    """Delete an object that must not stay, retrying store failures ``attempts`` times with the
    uploader's backoff (0.25 s doubling, at most :data:`MAX_RETRY_INTERVAL_S` apart, about 20 s for
    8 attempts); whether it is gone. The caller logs a failure in its own terms."""
    for attempt in range(attempts):
        try:
            await store.delete(key)
            return True
        except ObjectStoreError:
            if attempt + 1 < attempts:
                await asyncio.sleep(min(MAX_RETRY_INTERVAL_S, 0.25 * 2**attempt))
    return False


async def upload_file(db: Database, store: ObjectStore, spool: Spool, path: Path) -> None:
    """Upload one closed spool file: an Ogg segment (listed in the manifest) or an event log."""
    if path.name.endswith(EVENTS_DONE_SUFFIX):
        await upload_event_log(db, store, spool, path)
    else:
        await upload_segment(db, store, spool, path)


def _failed_part(exc: BaseException) -> str:
    if isinstance(exc, ObjectStoreError):
        return "store"
    if isinstance(exc, OSError):
        return "file"
    return "database"


@dataclass(slots=True)
class _Backoff:
    initial: float
    maximum: float
    attempt: int = 0

    def next(self) -> float:
        delay: float = min(self.maximum, self.initial * 2.0**self.attempt)
        self.attempt += 1
        return delay


class Uploader:
    """One background task per process: uploads queued segments in order, retrying with backoff.

    ``backoff_max_s`` is capped at :data:`MAX_RETRY_INTERVAL_S`, and the wait is counted from the
    start of the failed attempt (an attempt that timed out already waited), so uploads resume at
    most that long after the store (or the database) is back.
    """

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        spool: Spool,
        *,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        on_uploaded: Callable[[float], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._db = db
        # Hooks for metrics (storage never imports them): the lag of each segment from submit to
        # listed, and each failed attempt by what failed ("store", "database" or "file").
        self._on_uploaded = on_uploaded
        self._on_error = on_error
        self._submitted: dict[Path, float] = {}
        self._store = store
        self._spool = spool
        self._backoff = (backoff_initial_s, min(backoff_max_s, MAX_RETRY_INTERVAL_S))
        self._queue: deque[Path] = deque()
        self._queued: set[Path] = set()
        self._pending: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def submit(self, path: Path) -> None:
        """Queue a closed file: a segment ``<root>/<session>/<track>/<seq>.ogg`` or an event log
        ``<root>/<session>/events/<seq>.jsonl``."""
        if path in self._queued:
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="storage:uploader")
        self._queued.add(path)
        self._queue.append(path)
        self._submitted[path] = time.monotonic()
        sid = path.parent.parent.name
        self._pending[sid] = self._pending.get(sid, 0) + 1
        asyncio.get_running_loop().create_task(self._notify())

    def pending(self, session_id: str) -> int:
        return self._pending.get(session_id, 0)

    def oldest_pending_s(self) -> float:
        """How long the oldest segment still waiting has waited (0 when none): the upload lag."""
        if not self._queue:
            return 0.0
        return max(0.0, time.monotonic() - self._submitted.get(self._queue[0], time.monotonic()))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_session(self, session_id: str, wait_s: float) -> bool:
        """Wait until every queued segment of the session is uploaded; False on timeout."""
        try:
            async with asyncio.timeout(wait_s), self._changed:
                await self._changed.wait_for(lambda: self._pending.get(session_id, 0) == 0)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._queue) or self._closed)
            if not self._queue:
                return
            path = self._queue[0]
            backoff = _Backoff(*self._backoff)
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                try:
                    if path.exists():
                        await upload_file(self._db, self._store, self._spool, path)
                        if self._on_uploaded is not None:
                            self._on_uploaded(time.monotonic() - self._submitted.get(path, time.monotonic()))
                    break
                except RETRYABLE as exc:
                    if self._on_error is not None:
                        self._on_error(_failed_part(exc))
                    delay = backoff.next()
                    log.warning(
                        "uploader.retry",
                        extra={"segment": str(path), "attempt": backoff.attempt, "error": type(exc).__name__},
                    )
                    await asyncio.sleep(max(0.0, started + delay - loop.time()))
                except Exception:
                    log.exception("uploader.failed", extra={"segment": str(path)})
                    break  # unreadable segment: leave it in the spool for an operator / recovery
            self._queue.popleft()
            self._queued.discard(path)
            self._submitted.pop(path, None)
            sid = path.parent.parent.name
            self._pending[sid] = self._pending.get(sid, 1) - 1
            if self._pending[sid] <= 0:
                del self._pending[sid]
                if (self._spool.root / sid / CLOSED_MARKER).exists():  # finalized earlier: tidy up
                    await asyncio.to_thread(self._spool.prune_session, sid)
            async with self._changed:
                self._changed.notify_all()

    async def aclose(self) -> None:
        """Stop; segments not yet uploaded stay in the spool for :func:`recover_spool`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
