"""The crash-safe recorder: Ogg Opus segments in a local spool, uploaded in the background.

Implements :class:`storage.ports.SessionRecorder`. Per track (learner, coach):

* the sync audio calls only append to a bounded in-memory inbox (full inbox: the frame is dropped and
  declared as lost, never blocking the caller);
* a pump task per recorder drains the inbox every ``drain_s`` in a small shared thread pool, where
  Opus packets are muxed as they are and PCM is encoded with libopus (PyAV), into ~``segment_ms``
  segments, each written page by page (flushed and fsynced so that no more than ``page_ms`` is
  ever unsynced) to ``<spool>/<session>/<track>/<seq>.ogg.part``, renamed to ``.ogg`` when closed
  and handed to the :class:`~storage.uploader.Uploader`;
* a jump of the caller's ``at_ms`` by more than ``DISCONTINUITY_MS`` starts a new segment at the new
  offset; ``gap()`` stretches are recorded as :class:`AudioGap` rows, never filled;
* past ``max_spool_bytes`` the audio is dropped, declared in ``AudioRecording.lost_ms`` and as a
  ``spool_full`` gap, and :attr:`SpoolRecorderFactory.accepting` turns False.

The upstream event stream (audit) goes the same way: ``upstream_event`` only appends to an inbox;
the pump serializes the events in the worker pool (:mod:`storage.eventlog`: JSON lines, audio
payloads removed) into ``<spool>/<session>/events/<seq>.jsonl.part``, synced so that no more than
``events_sync_s`` is ever unsynced, closed at ``events_segment_bytes`` or ``events_segment_s`` or
when the recorder closes, and uploaded to ``sessions/<session>/events/<seq:06d>.jsonl``. Events that
could not be kept are declared in the log itself (a ``relay.events_dropped`` line).

:func:`recover_spool` finishes what a killed process left in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Final

import av
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from storage import sessions
from storage.db import Database
from storage.deletion import fenced
from storage.eventlog import dropped_line, event_kind, event_line, unserializable_line
from storage.models import AudioGap, AudioRecording, Session, SessionStatus, TranscriptSegment, utcnow
from storage.objects import ObjectStore
from storage.oggopus import OPUS_RATES, OggOpusWriter, opus_packet_samples48, truncate_to_last_page
from storage.ports import Speaker, TranscriptEvent
from storage.spool import CLOSED_MARKER, Spool, read_gaps, scan, scan_event_logs, truncate_to_last_line
from storage.uploader import (
    RETRYABLE,
    SessionGone,
    Uploader,
    get_or_create_recording,
    recompute_duration,
    upload_event_log,
    upload_segment,
)

__all__ = ["SpoolRecorder", "SpoolRecorderFactory", "recover_spool"]

log = logging.getLogger("storage.recorder")

DISCONTINUITY_MS: Final = 60
DEFAULT_MAX_SPOOL_BYTES: Final = 512 * 1024 * 1024
DB_BACKOFF_MAX_S: Final = 5.0
DEFAULT_EVENTS_SEGMENT_BYTES: Final = 1024 * 1024


# --------------------------------------------------------------------------------------------------
# encoding (runs in the worker pool only)


@dataclass(slots=True)
class _Segment:
    seq: int
    start_ms: int
    part: Path
    fh: BinaryIO
    writer: OggOpusWriter
    codec: Any  # None for a track of Opus packets, which are muxed as they come
    frame_bytes: int
    trailing_pad: int = 0  # padding at the end of the last packet muxed, trimmed if the segment ends there
    fifo: bytearray = field(default_factory=bytearray)
    in_samples: int = 0
    enc_samples: int = 0
    last_page: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Interval:
    id: int
    start_ms: int
    end_ms: int
    reason: str
    lost: bool
    logged: bool = False


@dataclass(slots=True)
class _Track:
    speaker: Speaker
    rate: int = 0  # the rate ``in_samples`` and the inbox count in: 48 kHz for Opus packets
    opus: bool | None = None  # packets or PCM: fixed by the first call
    input_rate: int = 0  # the original audio's rate, for the Ogg header and the manifest
    # payload, at_ms, samples, and the samples of padding at the payload's end (Opus only)
    inbox: deque[tuple[bytes, int, int, int]] = field(default_factory=deque)
    inbox_samples: int = 0
    seg: _Segment | None = None
    next_seq: int = 0
    cont_ms: float | None = None
    resampler: Any = None
    enc_rate: int = 0
    intervals: list[_Interval] = field(default_factory=list)
    lost_ms: float = 0.0
    had_audio: bool = False


@dataclass(slots=True)
class _EventLog:
    """The upstream event log being written (worker pool only)."""

    seq: int
    part: Path
    fh: BinaryIO
    opened: float = field(default_factory=time.monotonic)
    size: int = 0
    unsynced_since: float | None = None


class SpoolRecorder:
    """Records one session. Construct through :meth:`SpoolRecorderFactory.open`."""

    def __init__(self, factory: SpoolRecorderFactory, session_id: str) -> None:
        self._f = factory
        self._db = factory.db
        self.session_id = session_id
        self._tracks = {s: _Track(s) for s in Speaker}
        self._lock = threading.Lock()
        self._interval_ids = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self._transcript_lock = asyncio.Lock()
        # Upstream events: appended on the loop, drained (popleft) by the pump's worker; a deque's
        # append and popleft are atomic, so no lock on the way in.
        self._events: deque[tuple[object, int]] = deque()
        self._events_dropped: dict[str, int] = {}  # reason -> count not yet declared (under _lock)
        self._event_log: _EventLog | None = None
        self._event_seq = 0
        self._last_event_ms = 0
        self._dropped_at_ms = 0  # the time of the last event dropped (under _lock), for its declaration
        self._pump_task = asyncio.create_task(self._pump(), name=f"recorder:{session_id}:pump")

    # -- audio (sync, on the media path) ----------------------------------------------------------
    def learner_audio(self, pcm: bytes, *, sample_rate: int, at_ms: int) -> None:
        self._take(self._tracks[Speaker.LEARNER], pcm, at_ms, False, sample_rate, len(pcm) // 2, sample_rate)

    def coach_audio(self, pcm: bytes, *, sample_rate: int, at_ms: int) -> None:
        self._take(self._tracks[Speaker.COACH], pcm, at_ms, False, sample_rate, len(pcm) // 2, sample_rate)

    def learner_opus(
        self, packet: bytes, *, at_ms: int, input_rate: int = 48000, samples48: int | None = None
    ) -> None:
        self._opus(self._tracks[Speaker.LEARNER], packet, at_ms, input_rate, samples48)

    def coach_opus(
        self, packet: bytes, *, at_ms: int, input_rate: int = 24000, samples48: int | None = None
    ) -> None:
        self._opus(self._tracks[Speaker.COACH], packet, at_ms, input_rate, samples48)

    def _opus(self, t: _Track, packet: bytes, at_ms: int, input_rate: int, samples48: int | None) -> None:
        samples = opus_packet_samples48(packet)
        pad = 0 if samples48 is None else max(0, samples - samples48)
        self._take(t, packet, at_ms, True, 48000, samples, input_rate, pad)

    def _take(
        self,
        t: _Track,
        payload: bytes,
        at_ms: int,
        opus: bool,
        rate: int,
        samples: int,
        input_rate: int,
        pad: int = 0,
    ) -> None:
        if self._closing or samples <= 0 or rate <= 0:
            return
        with self._lock:
            if t.opus is None:
                t.opus, t.rate, t.input_rate = opus, rate, input_rate
            dur_ms = samples * 1000 / rate
            # A track's shape and rate are fixed: declare the odd frame rather than mis-time it.
            if opus != t.opus:
                self._lost(t, at_ms, dur_ms, "format_change")
                return
            if rate != t.rate or input_rate != t.input_rate:
                self._lost(t, at_ms, dur_ms, "rate_change")
                return
            if t.inbox_samples + samples > self._f.max_buffer_ms * t.rate // 1000:
                self._lost(t, at_ms, dur_ms, "overflow")
                return
            t.inbox.append((payload, at_ms, samples, pad))
            t.inbox_samples += samples

    def gap(self, speaker: Speaker, start_ms: int, end_ms: int, reason: str) -> None:
        if end_ms <= start_ms:
            return
        with self._lock:
            self._interval_ids += 1
            self._tracks[speaker].intervals.append(
                _Interval(self._interval_ids, start_ms, end_ms, reason[:32], lost=False)
            )

    def _lost(self, t: _Track, at_ms: int, dur_ms: float, reason: str) -> None:
        """Declare audio we could not keep (caller holds ``_lock``)."""
        t.lost_ms += dur_ms
        end = at_ms + round(dur_ms)
        last = t.intervals[-1] if t.intervals else None
        if last and last.lost and last.reason == reason and at_ms - last.end_ms <= DISCONTINUITY_MS:
            last.end_ms = max(last.end_ms, end)
            last.logged = False
            return
        self._interval_ids += 1
        t.intervals.append(_Interval(self._interval_ids, at_ms, end, reason, lost=True))

    def audio_ms(self, speaker: Speaker) -> int:
        """Audio of one track received so far (encoded or waiting), in ms."""
        t = self._tracks[speaker]
        with self._lock:
            done = t.seg.in_samples if t.seg else 0
            return int((done + t.inbox_samples) * 1000 / t.rate) if t.rate else 0

    # -- upstream events (sync, on the event loop) --------------------------------------------------
    def upstream_event(self, event: object, *, at_ms: int) -> None:
        """Keep one upstream server event for the audit log; only appends (serialized off the loop)."""
        if self._closing:
            return
        if len(self._events) >= self._f.max_buffer_events:
            with self._lock:
                self._events_dropped["overflow"] = self._events_dropped.get("overflow", 0) + 1
                self._dropped_at_ms = at_ms
            return
        self._events.append((event, at_ms))

    # -- the pump: drains the inbox in the worker pool ----------------------------------------------
    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            final = self._closing
            if not final:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._f.drain_s)
                final = self._closing
            try:
                closed = await loop.run_in_executor(self._f.pool, self._drain, final)
            except Exception:
                log.exception("recorder.drain_failed", extra={"session_id": self.session_id})
                closed = []
            for path in closed:
                self._f.uploader.submit(path)
            if final:
                return

    def _drain(self, final: bool) -> list[Path]:
        closed: list[Path] = []
        for t in self._tracks.values():
            with self._lock:
                items = list(t.inbox)
                t.inbox.clear()
                t.inbox_samples = 0
            try:
                for payload, at_ms, samples, pad in items:
                    self._feed(t, payload, at_ms, samples, pad, closed)
                seg = t.seg
                if seg is not None:
                    pending = seg.writer.pending_samples48
                    due = time.monotonic() - seg.last_page >= self._f.page_ms / 1000
                    # Sync now if waiting for the next drain could leave more than page_ms unsynced:
                    # a crash loses at most what is not on disk.
                    ahead = round(self._f.drain_s * 48000) + 960
                    if pending + ahead >= self._f.page_ms * 48 or (pending and due):
                        self._f.spool.add(seg.writer.flush_page())
                        seg.last_page = time.monotonic()
                if final and t.seg is not None:
                    closed.append(self._close_segment(t))
            except Exception:
                log.exception("recorder.track_failed", extra={"session_id": self.session_id})
                if t.seg is not None:
                    with contextlib.suppress(Exception):
                        closed.append(self._close_segment(t))
        self._log_intervals()
        try:
            self._drain_events(final, closed)
        except Exception as exc:  # the file system: never the events' content
            log.error(
                "recorder.events_failed",
                extra={"session_id": self.session_id, "error_type": type(exc).__name__},
            )
            if self._event_log is not None:
                with contextlib.suppress(Exception):
                    closed.append(self._close_event_log())
        return closed

    def _drain_events(self, final: bool, closed: list[Path]) -> None:
        """Serialize the events waiting in the inbox and append them to the event log (worker pool)."""
        lines: list[bytes] = []
        failed: dict[str, int] = {}
        inbox = self._events
        for _ in range(len(inbox)):  # only what is there now: the loop keeps appending on the right
            event, at_ms = inbox.popleft()
            self._last_event_ms = at_ms
            try:
                lines.append(event_line(event, at_ms))
            except Exception:  # one bad event loses itself only; its type stands in for it
                kind = event_kind(event)
                failed[kind] = failed.get(kind, 0) + 1
                lines.append(unserializable_line(kind, at_ms))
        for kind, count in failed.items():
            log.warning(
                "recorder.event_unserializable",
                extra={"session_id": self.session_id, "kind": kind, "count": count},
            )
        with self._lock:
            dropped, self._events_dropped = self._events_dropped, {}
            dropped_at = self._dropped_at_ms
        if self._f.spool.used() >= self._f.max_spool_bytes:
            # Past the budget nothing is written (as for audio); the count is declared in the log
            # once there is room again, and the open log is closed so that it can upload.
            if lines:
                dropped["spool_full"] = dropped.get("spool_full", 0) + len(lines)
            with self._lock:
                for reason, count in dropped.items():
                    self._events_dropped[reason] = self._events_dropped.get(reason, 0) + count
                if lines:
                    self._dropped_at_ms = self._last_event_ms
            if final and dropped:
                self._log_dropped(dropped)
            if self._event_log is not None:
                closed.append(self._close_event_log())
            return
        if dropped:
            # Stamped with the last lost event's time, where the hole in the log is.
            lines[:0] = [dropped_line(reason, count, dropped_at) for reason, count in dropped.items()]
            self._log_dropped(dropped)
        written = 0
        try:
            for line in lines:
                current = self._event_log or self._open_event_log()
                current.fh.write(line)
                written += 1
                current.size += len(line)
                self._f.spool.add(len(line))
                if current.unsynced_since is None:
                    current.unsynced_since = time.monotonic()
                if current.size >= self._f.events_segment_bytes:
                    closed.append(self._close_event_log())
        except Exception:
            with self._lock:  # declared in the next log written
                lost = len(lines) - written
                self._events_dropped["write_failed"] = self._events_dropped.get("write_failed", 0) + lost
            raise
        last = self._event_log
        if last is None:
            return
        now = time.monotonic()
        if final or now - last.opened >= self._f.events_segment_s:
            closed.append(self._close_event_log())
        elif last.unsynced_since is not None and (
            # Sync now if waiting for the next drain could leave more than events_sync_s unsynced.
            now - last.unsynced_since + self._f.drain_s >= self._f.events_sync_s
        ):
            last.fh.flush()
            os.fsync(last.fh.fileno())
            last.unsynced_since = None

    def _log_dropped(self, dropped: dict[str, int]) -> None:
        for reason, count in dropped.items():
            log.warning(
                "recorder.events_dropped",
                extra={"session_id": self.session_id, "reason": reason, "count": count},
            )

    def _open_event_log(self) -> _EventLog:
        seq = self._event_seq
        self._event_seq += 1
        part = self._f.spool.event_log_path(self.session_id, seq, part=True)
        part.parent.mkdir(parents=True, exist_ok=True)
        self._event_log = _EventLog(seq, part, part.open("wb"))
        return self._event_log

    def _close_event_log(self) -> Path:
        current = self._event_log
        assert current is not None
        self._event_log = None
        try:
            current.fh.flush()
            os.fsync(current.fh.fileno())
        finally:
            current.fh.close()
        done = current.part.with_name(current.part.name.removesuffix(".part"))
        os.replace(current.part, done)
        _fsync_dir(done.parent)
        return done

    def _log_intervals(self) -> None:
        with self._lock:
            todo = [
                {"id": i.id, "track": t.speaker.value, "start_ms": i.start_ms, "end_ms": i.end_ms,
                 "reason": i.reason, "lost": i.lost, "lost_ms": round(t.lost_ms)}
                for t in self._tracks.values() for i in t.intervals if not i.logged
            ]  # fmt: skip
            for t in self._tracks.values():
                for i in t.intervals:
                    i.logged = True
        for record in todo:
            self._f.spool.append_gap(self.session_id, record)

    def _feed(
        self, t: _Track, payload: bytes, at_ms: int, samples: int, pad: int, closed: list[Path]
    ) -> None:
        dur_ms = samples * 1000 / t.rate
        if self._f.spool.used() >= self._f.max_spool_bytes:
            if t.seg is not None:
                closed.append(self._close_segment(t))
            t.cont_ms = None
            with self._lock:
                self._lost(t, at_ms, dur_ms, "spool_full")
            return
        seg = t.seg
        if (
            seg is not None
            and abs(at_ms - (seg.start_ms + seg.in_samples * 1000 / t.rate)) > DISCONTINUITY_MS
        ):
            closed.append(self._close_segment(t))
            t.cont_ms = None
            seg = None
        if seg is None:
            cont = t.cont_ms
            start = round(cont) if cont is not None and abs(at_ms - cont) <= DISCONTINUITY_MS else at_ms
            seg = self._open_segment(t, start)
        if seg.codec is None:
            seg.in_samples += samples
            seg.trailing_pad = pad
            seg.writer.add_packet(payload)
        else:
            self._encode(t, seg, payload)
        t.had_audio = True
        if seg.in_samples * 1000 >= self._f.segment_ms * t.rate:
            t.cont_ms = seg.start_ms + seg.in_samples * 1000 / t.rate
            closed.append(self._close_segment(t))

    def _open_segment(self, t: _Track, start_ms: int) -> _Segment:
        if t.opus:
            return self._open_passthrough(t, start_ms)
        if not t.enc_rate:
            t.enc_rate = t.rate if t.rate in OPUS_RATES else 48000
            if t.enc_rate != t.rate:  # one resampler per track, kept across segments
                t.resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        codec: Any = av.CodecContext.create("libopus", "w")
        codec.sample_rate = t.enc_rate
        codec.layout = "mono"
        codec.format = "s16"
        codec.bit_rate = self._f.bit_rate
        codec.time_base = Fraction(1, t.enc_rate)
        codec.open()
        extradata = bytes(codec.extradata or b"")
        pre_skip = struct.unpack_from("<H", extradata, 10)[0] if len(extradata) >= 12 else 312
        frame_bytes = 2 * int(codec.frame_size or t.enc_rate // 50)
        return self._start_segment(t, start_ms, pre_skip, codec, frame_bytes)

    def _open_passthrough(self, t: _Track, start_ms: int) -> _Segment:
        # No pre-skip: the packets come from an encoder that was already running, so the decoder's
        # output is on the timeline from the first sample (an encoder's own lookahead, at most
        # 6.5 ms, stays a constant offset rather than being cut from every segment).
        return self._start_segment(t, start_ms, 0, None, 0)

    def _start_segment(
        self, t: _Track, start_ms: int, pre_skip: int, codec: Any, frame_bytes: int
    ) -> _Segment:
        seq = t.next_seq
        t.next_seq += 1
        part = self._f.spool.segment_path(self.session_id, t.speaker.value, seq, part=True)
        part.parent.mkdir(parents=True, exist_ok=True)
        fh = part.open("wb")
        writer = OggOpusWriter(
            fh, serial=secrets.randbits(32), pre_skip=pre_skip, input_sample_rate=t.input_rate,
            comments={"PARLEY_SESSION": self.session_id, "PARLEY_TRACK": t.speaker.value,
                      "PARLEY_SEQ": str(seq), "PARLEY_START_MS": str(start_ms)},
        )  # fmt: skip
        self._f.spool.add(writer.bytes_written)
        t.seg = _Segment(seq, start_ms, part, fh, writer, codec, frame_bytes)
        return t.seg

    def _encode(self, t: _Track, seg: _Segment, pcm: bytes) -> None:
        seg.in_samples += len(pcm) // 2
        if t.resampler is not None:
            frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
            frame.planes[0].update(pcm[: 2 * (len(pcm) // 2)])
            frame.sample_rate = t.rate
            for out in t.resampler.resample(frame):
                seg.fifo += bytes(out.planes[0])[: 2 * out.samples]
        else:
            seg.fifo += pcm[: 2 * (len(pcm) // 2)]
        while len(seg.fifo) >= seg.frame_bytes:
            self._encode_frame(seg, bytes(seg.fifo[: seg.frame_bytes]), t.enc_rate)
            del seg.fifo[: seg.frame_bytes]

    @staticmethod
    def _encode_frame(seg: _Segment, data: bytes | None, rate: int) -> None:
        if data is None:
            packets = seg.codec.encode(None)
        else:
            frame = av.AudioFrame(format="s16", layout="mono", samples=len(data) // 2)
            frame.planes[0].update(data)
            frame.sample_rate = rate
            frame.pts = seg.enc_samples
            frame.time_base = Fraction(1, rate)
            seg.enc_samples += len(data) // 2
            packets = seg.codec.encode(frame)
        for packet in packets:
            seg.writer.add_packet(bytes(packet))

    def _close_segment(self, t: _Track) -> Path:
        seg = t.seg
        assert seg is not None
        t.seg = None
        try:
            if seg.codec is None:
                # The last packet may carry padding (a coach answer's final frame is filled up with
                # silence): the end granule trims it so the track is as long as what was sent.
                self._f.spool.add(seg.writer.close(seg.in_samples - seg.trailing_pad))
            else:
                if seg.fifo:
                    self._encode_frame(seg, bytes(seg.fifo), t.enc_rate)
                    seg.fifo.clear()
                self._encode_frame(seg, None, t.enc_rate)
                self._f.spool.add(seg.writer.close(seg.enc_samples * 48000 // t.enc_rate))
        finally:
            seg.fh.close()
        done = seg.part.with_name(seg.part.name.removesuffix(".part"))
        os.replace(seg.part, done)
        _fsync_dir(done.parent)
        return done

    # -- transcript -------------------------------------------------------------------------------
    async def transcript(self, event: TranscriptEvent) -> str:
        """Insert-or-update the segment; writes go in call order and retry while the DB is down."""
        async with self._transcript_lock:
            attempt = 0
            deadline = time.monotonic() + self._f.transcript_retry_s
            while True:
                attempt += 1
                try:
                    return await self._write_transcript(event)
                except SessionGone:
                    log.info("recorder.transcript_fenced", extra={"session_id": self.session_id})
                    return ""  # the session is being deleted: nothing of it may be written
                except IntegrityError:
                    if attempt > 5:
                        raise
                    continue  # a concurrent write of the same item landed first: update it next time
                except RETRYABLE:
                    if time.monotonic() >= deadline:
                        raise
                    log.warning(
                        "recorder.transcript_retry", extra={"session_id": self.session_id, "attempt": attempt}
                    )
                    await asyncio.sleep(min(DB_BACKOFF_MAX_S, 0.1 * 2**attempt))

    async def _write_transcript(self, event: TranscriptEvent) -> str:
        row = dict(
            session_id=self.session_id, seq=event.seq, speaker=event.speaker.value, text=event.text,
            start_ms=event.start_ms, end_ms=event.end_ms, final=True, truncated=event.truncated,
            item_id=event.item_id, previous_item_id=event.previous_item_id,
        )  # fmt: skip
        async with self._db.sessions.begin() as s:
            if await fenced(s, self.session_id):
                raise SessionGone(self.session_id)
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

    async def history(self) -> Sequence[tuple[Speaker, str]]:
        async with self._transcript_lock, self._db.sessions() as s:
            return await sessions.final_transcript(s, self.session_id)

    # -- lifecycle --------------------------------------------------------------------------------
    async def aclose(self, *, status: str = "complete") -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        try:
            self._closing = True
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
            uploaded = await self._f.uploader.wait_session(self.session_id, self._f.upload_wait_s)
            await self._finalize_with_retries(status)
            if uploaded:
                await asyncio.to_thread(self._f.spool.prune_session, self.session_id)
            else:  # leftovers upload later (or on recovery); the recording is already finalized
                await asyncio.to_thread(self._f.spool.mark_closed, self.session_id, status)
        finally:
            self._closed.set_result(None)

    async def _finalize_with_retries(self, status: str) -> None:
        deadline = time.monotonic() + self._f.transcript_retry_s
        attempt = 0
        while True:
            attempt += 1
            try:
                await _finalize(
                    self._db,
                    self.session_id,
                    status,
                    {
                        t.speaker.value: (
                            t.input_rate or 24000,
                            round(t.lost_ms),
                            [(i.start_ms, i.end_ms, i.reason) for i in t.intervals],
                        )
                        for t in self._tracks.values()
                        if t.had_audio or t.intervals
                    },
                )
                log.info("recorder.finalized", extra={"session_id": self.session_id, "status": status})
                return
            except SessionGone:
                return
            except RETRYABLE:
                if time.monotonic() >= deadline:
                    log.error("recorder.finalize_failed", extra={"session_id": self.session_id})
                    return
                await asyncio.sleep(min(DB_BACKOFF_MAX_S, 0.1 * 2**attempt))


async def _finalize(
    db: Database, session_id: str, status: str, tracks: dict[str, tuple[int, int, list[tuple[int, int, str]]]]
) -> None:
    """Write/complete the AudioRecording rows (and their gaps) of a session in one transaction."""
    async with db.sessions.begin() as s:
        for track, (rate, lost_ms, gaps) in tracks.items():
            rec_id = await get_or_create_recording(s, session_id, track, rate)
            await recompute_duration(s, rec_id)
            await s.execute(
                update(AudioRecording)
                .where(AudioRecording.id == rec_id)
                .values(status=status, lost_ms=lost_ms, completed_at=utcnow())
            )
            s.add_all(AudioGap(recording_id=rec_id, start_ms=a, end_ms=b, reason=r) for a, b, r in gaps)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------


class SpoolRecorderFactory:
    """Opens :class:`SpoolRecorder` s; owns the spool, the encoder pool and the uploader."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        spool_root: Path,
        *,
        segment_ms: int = 5000,
        max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
        page_ms: int = 500,
        drain_s: float = 0.2,
        bit_rate: int = 32000,
        max_buffer_ms: int = 10_000,
        max_buffer_events: int = 20_000,
        events_segment_bytes: int = DEFAULT_EVENTS_SEGMENT_BYTES,
        events_segment_s: float = 60.0,
        events_sync_s: float = 1.0,
        upload_wait_s: float = 10.0,
        transcript_retry_s: float = 120.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 4.0,
        workers: int = 2,
        on_uploaded: Callable[[float], None] | None = None,
        on_upload_error: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.spool = Spool(spool_root)
        self.segment_ms = segment_ms
        self.max_spool_bytes = max_spool_bytes
        self.page_ms = page_ms
        self.drain_s = drain_s
        self.bit_rate = bit_rate
        self.max_buffer_ms = max_buffer_ms
        self.max_buffer_events = max_buffer_events
        self.events_segment_bytes = events_segment_bytes
        self.events_segment_s = events_segment_s
        self.events_sync_s = events_sync_s
        self.upload_wait_s = upload_wait_s
        self.transcript_retry_s = transcript_retry_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recorder-enc")
        self.uploader = Uploader(
            db, store, self.spool, backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s,
            on_uploaded=on_uploaded, on_error=on_upload_error,
        )  # fmt: skip

    def open(self, session_id: str) -> SpoolRecorder:
        return SpoolRecorder(self, session_id)

    def spool_bytes(self) -> int:
        """Bytes in the spool now (segments written and waiting), for metrics."""
        return self.spool.used()

    @property
    def accepting(self) -> bool:
        """False while the spool is at its budget: the relay should refuse new sessions."""
        return self.spool.used() < self.max_spool_bytes

    async def aclose(self) -> None:
        """Stop the uploader and the encoder pool (close the recorders first)."""
        await self.uploader.aclose()
        await asyncio.to_thread(self.pool.shutdown, True)


# --------------------------------------------------------------------------------------------------


async def recover_spool(
    db: Database,
    store: ObjectStore,
    spool_root: Path,
    *,
    deadline_s: float = 60.0,
    backoff_initial_s: float = 0.2,
    backoff_max_s: float = 4.0,
    spool: Spool | None = None,
) -> list[str]:
    """Upload what a killed process left in the spool; returns the sessions marked ``interrupted``.

    ``.part`` files are cut after their last complete Ogg page, event logs (``.jsonl.part``) after
    their last complete line. Sessions whose recorder had finalized (a ``closed`` marker) only get
    their leftover segments uploaded. Segments that still cannot be uploaded by ``deadline_s`` stay
    in the spool for the next start. Pass the running factory's ``spool`` so that what recovery
    removes is taken off the byte count that metrics and admission read.
    """
    spool = spool if spool is not None else Spool(spool_root)
    deadline = time.monotonic() + deadline_s
    segments = await asyncio.to_thread(scan, spool_root)
    session_ids = await asyncio.to_thread(_session_dirs, spool_root)
    complete: set[str] = set()
    for seg in segments:
        path = seg.path
        if not await asyncio.to_thread(path.exists):
            continue  # its session turned out deleted and its directory went with it
        if seg.part:
            info = await asyncio.to_thread(truncate_to_last_page, path)
            if info is None:
                await asyncio.to_thread(spool.remove, path)
                continue
            path = path.with_name(path.name.removesuffix(".part"))
            await asyncio.to_thread(os.replace, seg.path, path)
        attempt = 0
        while True:
            try:
                await upload_segment(db, store, spool, path)
                break
            except RETRYABLE as exc:
                attempt += 1
                if time.monotonic() >= deadline:
                    log.warning("recover.upload_deferred", extra={"segment": str(path), "error": repr(exc)})
                    break
                await asyncio.sleep(min(backoff_max_s, backoff_initial_s * 2**attempt))
            except ValueError:
                log.warning("recover.unreadable_segment", extra={"segment": str(path)})
                break
    for logfile in await asyncio.to_thread(scan_event_logs, spool_root):
        path = logfile.path
        if not path.exists():  # removed with its session (deleted) while the ones before uploaded
            continue
        if logfile.part:
            before = (await asyncio.to_thread(path.stat)).st_size
            kept = await asyncio.to_thread(truncate_to_last_line, path)
            spool.add(kept - before)
            if kept == 0:
                await asyncio.to_thread(spool.remove, path)
                continue
            path = path.with_name(path.name.removesuffix(".part"))
            await asyncio.to_thread(os.replace, logfile.path, path)
        attempt = 0
        while True:
            try:
                if path.exists():
                    await upload_event_log(db, store, spool, path)
                break
            except RETRYABLE as exc:
                attempt += 1
                if time.monotonic() >= deadline:
                    log.warning(
                        "recover.upload_deferred",
                        extra={"session_id": logfile.session_id, "seq": logfile.seq,
                               "error_type": type(exc).__name__},
                    )  # fmt: skip
                    break
                await asyncio.sleep(min(backoff_max_s, backoff_initial_s * 2**attempt))
    interrupted: list[str] = []
    for sid in session_ids:
        base = spool_root / sid
        marker = base / CLOSED_MARKER
        if not marker.exists():
            try:
                await _mark_interrupted(db, spool_root, sid)
                interrupted.append(sid)
            except SessionGone:
                await asyncio.to_thread(spool.remove_session, sid)
                continue
            except RETRYABLE:
                log.warning("recover.finalize_deferred", extra={"session_id": sid})
                continue
        if await asyncio.to_thread(spool.prune_session, sid):
            complete.add(sid)
    log.info("recover.done", extra={"interrupted": len(interrupted), "pruned": len(complete)})
    return interrupted


def _session_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


async def _mark_interrupted(db: Database, spool_root: Path, session_id: str) -> None:
    latest: dict[tuple[str, int], dict[str, object]] = {}
    for record in await asyncio.to_thread(read_gaps, spool_root, session_id):
        latest[(str(record.get("track")), int(str(record.get("id", 0))))] = record
    tracks: dict[str, tuple[int, int, list[tuple[int, int, str]]]] = {}
    async with db.sessions() as s:
        if (await s.execute(select(Session.id).where(Session.id == session_id))).scalar_one_or_none() is None:
            raise SessionGone(session_id)
        existing = (
            await s.execute(
                select(AudioRecording.track, AudioRecording.sample_rate).where(
                    AudioRecording.session_id == session_id
                )
            )
        ).all()
    for track, rate in existing:
        tracks[track] = (rate, 0, [])
    for (track, _id), rec in sorted(latest.items(), key=lambda kv: kv[0]):
        rate, lost, gaps = tracks.get(track, (24000, 0, []))
        lost = max(lost, int(str(rec.get("lost_ms", 0))))
        gaps.append((int(str(rec["start_ms"])), int(str(rec["end_ms"])), str(rec["reason"])))
        tracks[track] = (rate, lost, gaps)
    await _finalize(db, session_id, "interrupted", tracks)
    async with db.sessions.begin() as s:
        await s.execute(
            update(Session)
            .where(
                Session.id == session_id,
                Session.status.in_(
                    (SessionStatus.CREATED, SessionStatus.CONNECTING, SessionStatus.LIVE,
                     SessionStatus.RECONNECTING, SessionStatus.ENDING, SessionStatus.ENDED)
                ),
            )
            .values(status=SessionStatus.INTERRUPTED)
        )  # fmt: skip
        await s.execute(
            update(Session)
            .where(Session.id == session_id, Session.ended_at.is_(None))
            .values(ended_at=utcnow())
        )
