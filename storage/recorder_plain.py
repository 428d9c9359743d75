"""A plain recorder: transcript rows to the database, audio as raw PCM files in the data dir.

It is the simple implementation of :class:`storage.ports.SessionRecorder` that the live session
plugs into; the crash-safe Ogg/Opus spool-and-upload recorder replaces it behind the same port.
Audio calls only append to an in-memory list; one writer task per session moves it to disk in a
thread, so the media path never waits for the file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from storage.db import Database
from storage.models import AudioGap, AudioRecording, TranscriptSegment, utcnow
from storage.ports import Speaker, TranscriptEvent

__all__ = ["PlainRecorder", "PlainRecorderFactory"]

log = logging.getLogger("storage.recorder")

FLUSH_EVERY_S: Final = 0.25
DB_RETRIES: Final = 5


@dataclass(slots=True)
class _Track:
    path: Path
    sample_rate: int = 0
    bytes_written: int = 0
    pending: list[bytes] = field(default_factory=list)
    first_ms: int | None = None
    gaps: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def duration_ms(self) -> int:
        return self.bytes_written * 1000 // (2 * self.sample_rate) if self.sample_rate else 0


class PlainRecorder:
    """Records one session. Construct through :class:`PlainRecorderFactory`."""

    def __init__(self, db: Database, spool_dir: Path, session_id: str) -> None:
        self._db = db
        self.session_id = session_id
        base = spool_dir / session_id
        self._tracks = {s: _Track(base / f"{s.value}.pcm") for s in Speaker}
        self._wake = asyncio.Event()
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self._writer = asyncio.create_task(self._write_loop(base), name=f"recorder:{session_id}:writer")

    # -- audio (sync, on the media path) ----------------------------------------------------------
    def _audio(self, speaker: Speaker, pcm: bytes, sample_rate: int, at_ms: int) -> None:
        if self._closing:
            return
        track = self._tracks[speaker]
        track.sample_rate = track.sample_rate or sample_rate
        if track.first_ms is None:
            track.first_ms = at_ms
        track.pending.append(pcm)

    def learner_audio(self, pcm: bytes, *, sample_rate: int, at_ms: int) -> None:
        self._audio(Speaker.LEARNER, pcm, sample_rate, at_ms)

    def coach_audio(self, pcm: bytes, *, sample_rate: int, at_ms: int) -> None:
        self._audio(Speaker.COACH, pcm, sample_rate, at_ms)

    def gap(self, speaker: Speaker, start_ms: int, end_ms: int, reason: str) -> None:
        if end_ms > start_ms:
            self._tracks[speaker].gaps.append((start_ms, end_ms, reason))

    def audio_ms(self, speaker: Speaker) -> int:
        """Audio of one track received so far (written or pending), in ms."""
        track = self._tracks[speaker]
        pending = sum(len(p) for p in track.pending)
        rate = track.sample_rate
        return (track.bytes_written + pending) * 1000 // (2 * rate) if rate else 0

    async def _write_loop(self, base: Path) -> None:
        await asyncio.to_thread(base.mkdir, parents=True, exist_ok=True)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY_S)
            await self._flush()
            if self._closing:
                return

    async def _flush(self) -> None:
        for track in self._tracks.values():
            if not track.pending:
                continue
            chunk, track.pending = b"".join(track.pending), []
            await asyncio.to_thread(_append, track.path, chunk)
            track.bytes_written += len(chunk)

    # -- transcript -------------------------------------------------------------------------------
    async def transcript(self, event: TranscriptEvent) -> str:
        row = dict(
            session_id=self.session_id, seq=event.seq, speaker=event.speaker.value, text=event.text,
            start_ms=event.start_ms, end_ms=event.end_ms, final=True, truncated=event.truncated,
            item_id=event.item_id, previous_item_id=event.previous_item_id,
        )  # fmt: skip
        for attempt in range(1, DB_RETRIES + 1):
            try:
                async with self._db.sessions.begin() as s:
                    existing = (
                        await s.execute(
                            select(TranscriptSegment).where(
                                TranscriptSegment.session_id == self.session_id,
                                TranscriptSegment.item_id == event.item_id,
                                TranscriptSegment.speaker == event.speaker.value,
                            )
                        )
                    ).scalar_one_or_none()
                    if existing is None:
                        existing = TranscriptSegment(**row)
                        s.add(existing)
                        await s.flush()
                    else:  # a truncation re-states what was heard of an item already stored
                        existing.text = event.text
                        existing.end_ms = event.end_ms
                        existing.truncated = event.truncated
                    return existing.id
            except IntegrityError:
                continue  # a concurrent write of the same item landed first: the next attempt updates it
            except OperationalError:
                if attempt == DB_RETRIES:
                    raise
                log.warning(
                    "recorder.transcript_retry", extra={"session_id": self.session_id, "attempt": attempt}
                )
                await asyncio.sleep(0.2 * 2**attempt)
        raise RuntimeError("unreachable: the last attempt returns or raises")

    async def history(self) -> Sequence[tuple[Speaker, str]]:
        async with self._db.sessions() as s:
            rows = (
                await s.execute(
                    select(TranscriptSegment.speaker, TranscriptSegment.text)
                    .where(TranscriptSegment.session_id == self.session_id, TranscriptSegment.final.is_(True))
                    .order_by(TranscriptSegment.seq, TranscriptSegment.start_ms)
                )
            ).all()
        return [(Speaker(speaker), text) for speaker, text in rows]

    # -- lifecycle --------------------------------------------------------------------------------
    async def aclose(self, *, status: str = "complete") -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        try:
            self._closing = True
            self._wake.set()
            await self._writer
            await self._finalize(status)
        finally:
            self._closed.set_result(None)

    async def _finalize(self, status: str) -> None:
        async with self._db.sessions.begin() as s:
            for speaker, track in self._tracks.items():
                if not track.sample_rate and not track.gaps:
                    continue
                rec = AudioRecording(
                    session_id=self.session_id, track=speaker.value, format="pcm_s16le",
                    sample_rate=track.sample_rate or 24000, channels=1, status=status,
                    duration_ms=track.duration_ms, final_object_key=None, completed_at=utcnow(),
                )  # fmt: skip
                s.add(rec)
                await s.flush()
                s.add_all(
                    AudioGap(recording_id=rec.id, start_ms=a, end_ms=b, reason=r) for a, b, r in track.gaps
                )
        log.info("recorder.finalized", extra={"session_id": self.session_id, "status": status})


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


class PlainRecorderFactory:
    def __init__(self, db: Database, spool_dir: Path) -> None:
        self._db = db
        self._spool = spool_dir

    def open(self, session_id: str) -> PlainRecorder:
        return PlainRecorder(self._db, self._spool, session_id)
