"""One continuous Ogg Opus stream per track, assembled on the fly from the stored segments.

A track is stored as independent ~5 s Ogg Opus segments (each its own logical stream with its own
OpusHead/OpusTags). For playback they are presented as ONE logical stream: the first segment's
OpusHead, a single OpusTags, then every segment's audio pages rewritten with one serial number,
continuous page sequence numbers and granule positions that continue across segments (CRC
recomputed). Holes in the session timeline (a segment starting after the previous one ended) are
filled with pre-encoded 20 ms Opus silence packets, and the small overhang each segment carries
(encoder priming and end padding) is taken back by dropping leading packets of the next contiguous
segment, so the decoded audio stays within half a frame of the session timeline (transcript sync).
Only the playback stream is affected: the stored segments are never touched.

The plan (every output page's size and origin) is built by reading each segment once and cached per
``(session, track, number of chunks)``, so the stream's length is known before any byte is sent and
any byte range is served by reading only the segments it covers.

Post-processing (``relay.worker.assembly``) writes the same stream as one file,
:func:`final_object_key`, from :func:`segment_track` (which refuses a segment that is missing,
unreadable or altered since its upload instead of leaving it out), and sets ``final_object_key``
once the file is verified. From then on :func:`assembled_track` serves that file, byte for byte the
stream the segments give; when it cannot be read (gone, or the store fails on it) the stream is
served from the segments again, even mid-response, since both are the same bytes.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import Database
from storage.models import AudioChunk, AudioRecording
from storage.objects import CHUNK_SIZE, ObjectNotFound, ObjectStore, ObjectStoreError
from storage.oggopus import OggPage, crc32_ogg, opus_packet_samples48, opus_tags, parse_pages

__all__ = [
    "track_recording",
    "SILENCE_PACKET",
    "AssembledTrack",
    "SegmentRef",
    "SegmentUnusable",
    "assembled_track",
    "final_object_key",
    "segment_track",
]

log = logging.getLogger("storage.assembly")

HEADER_LEN: Final = 27
FLAG_BOS: Final = 0x02
FLAG_EOS: Final = 0x04
#: A 20 ms mono CELT frame that decodes to digital silence (TOC 0xF8: config 31, one frame).
SILENCE_PACKET: Final = b"\xf8\xff\xfe"
SILENCE_SAMPLES48: Final = 960
#: Silence packets per page (one lacing value each): 4 s of silence per page.
SILENCE_PER_PAGE: Final = 200
#: The serial number of every assembled stream (one logical stream per file).
SERIAL: Final = 0x50524C59
PLAN_CACHE_SIZE: Final = 32
#: Segments read at once while planning.
PARALLEL_READS: Final = 8


def _lacing(packets: Sequence[bytes]) -> bytes:
    out = bytearray()
    for packet in packets:
        out += b"\xff" * (len(packet) // 255) + bytes((len(packet) % 255,))
    return bytes(out)


def _build_page(*, flags: int, granule: int, seqno: int, packets: Sequence[bytes]) -> bytes:
    lacing = _lacing(packets)
    if len(lacing) > 255:
        raise ValueError("too many packets for one Ogg page")
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, SERIAL, seqno, 0, len(lacing))
    page = bytearray(header + lacing + b"".join(packets))
    struct.pack_into("<I", page, 22, crc32_ogg(page))
    return bytes(page)


def _page_len(packets: Sequence[bytes]) -> int:
    return HEADER_LEN + sum(len(p) // 255 + 1 for p in packets) + sum(len(p) for p in packets)


@dataclass(frozen=True, slots=True)
class _OutPage:
    """One page of the virtual stream: a header, a run of silence, or a rewritten segment page."""

    offset: int  # in the virtual stream
    length: int
    flags: int
    granule: int
    seqno: int
    kind: str  # "head", "tags", "silence", "segment"
    count: int = 0  # silence: number of packets
    segment: int = -1  # segment: index into the plan's keys
    src_offset: int = 0
    src_length: int = 0
    drop: int = 0  # segment: leading packets left out


@dataclass(frozen=True, slots=True)
class _Segment:
    key: str
    start_ms: int
    head: bytes
    pre_skip: int
    pages: list[OggPage]


@dataclass(frozen=True, slots=True)
class _Plan:
    head: bytes
    tags: bytes
    keys: tuple[str, ...]
    pages: tuple[_OutPage, ...]
    starts: tuple[int, ...]
    length: int


def _parse_segment(key: str, start_ms: int, data: bytes) -> _Segment | None:
    pages = parse_pages(data)
    if len(pages) < 3 or not pages[0].packets or not pages[0].packets[0].startswith(b"OpusHead"):
        return None
    head = pages[0].packets[0]
    pre_skip = struct.unpack_from("<H", head, 10)[0]
    audio = [p for p in pages[2:] if p.packets]
    if not audio:
        return None
    return _Segment(key, start_ms, head, pre_skip, audio)


def _make_plan(session_id: str, track: str, segments: list[_Segment]) -> _Plan:
    head = segments[0].head
    pre_skip0 = segments[0].pre_skip
    tags = opus_tags({"PARLEY_SESSION": session_id, "PARLEY_TRACK": track})
    pages: list[_OutPage] = []
    offset = 0

    def add(page: _OutPage) -> None:
        nonlocal offset
        pages.append(page)
        offset += page.length

    add(_OutPage(0, _page_len([head]), FLAG_BOS, 0, 0, "head"))
    add(_OutPage(offset, _page_len([tags]), 0, 0, 1, "tags"))
    granule = 0  # packet samples (48 kHz) emitted so far, pre-skip included
    for index, seg in enumerate(segments):
        # Where this segment's first real sample would land on the decoded timeline, minus its target.
        error = granule + seg.pre_skip - pre_skip0 - seg.start_ms * 48
        if error < 0:
            frames = round(-error / SILENCE_SAMPLES48)
            while frames > 0:
                count = min(frames, SILENCE_PER_PAGE)
                frames -= count
                granule += count * SILENCE_SAMPLES48
                length = _page_len([SILENCE_PACKET] * count)
                add(_OutPage(offset, length, 0, granule, len(pages), "silence", count=count))
            error = granule + seg.pre_skip - pre_skip0 - seg.start_ms * 48
        packet_samples = [opus_packet_samples48(p) for page in seg.pages for p in page.packets]
        drop = 0
        while drop < len(packet_samples) - 1 and error > packet_samples[drop] / 2:
            error -= packet_samples[drop]
            drop += 1
        local = 0  # packet samples of this segment so far
        skipped = 0
        for src in seg.pages:
            n = len(src.packets)
            page_drop = min(n, drop - skipped)
            skipped += page_drop
            samples = [opus_packet_samples48(p) for p in src.packets]
            local += sum(samples)
            if page_drop == n:
                continue
            granule += sum(samples[page_drop:])
            kept = src.packets[page_drop:]
            length = src.length if page_drop == 0 else _page_len(kept)
            add(
                _OutPage(
                    offset, length, 0, granule, len(pages), "segment", segment=index,
                    src_offset=src.offset, src_length=src.length, drop=page_drop,
                )
            )  # fmt: skip
    last = pages[-1]
    end_granule = last.granule
    if last.kind == "segment":  # the stream ends with the last segment: keep its end trimming
        seg = segments[last.segment]
        src = seg.pages[-1]
        total = sum(opus_packet_samples48(p) for page in seg.pages for p in page.packets)
        trim = max(0, total - src.granule)
        page_samples = sum(opus_packet_samples48(p) for p in src.packets[last.drop :])
        end_granule = last.granule - min(trim, max(0, page_samples - 1))
    pages[-1] = _OutPage(
        last.offset, last.length, last.flags | FLAG_EOS, end_granule, last.seqno, last.kind,
        last.count, last.segment, last.src_offset, last.src_length, last.drop,
    )  # fmt: skip
    return _Plan(
        head=head,
        tags=tags,
        keys=tuple(s.key for s in segments),
        pages=tuple(pages),
        starts=tuple(p.offset for p in pages),
        length=offset,
    )


def _rewrite(page: _OutPage, src: bytes) -> bytes:
    """A segment's page with the stream's serial, sequence number, granule, flags and CRC."""
    if page.drop:
        nseg = src[26]
        lacing = src[HEADER_LEN : HEADER_LEN + nseg]
        packets: list[bytes] = []
        body = HEADER_LEN + nseg
        current = 0
        for value in lacing:
            current += value
            if value < 255:
                packets.append(src[body : body + current])
                body += current
                current = 0
        return _build_page(
            flags=page.flags, granule=page.granule, seqno=page.seqno, packets=packets[page.drop :]
        )
    out = bytearray(src)
    struct.pack_into("<BqIII", out, 5, page.flags, page.granule, SERIAL, page.seqno, 0)
    struct.pack_into("<I", out, 22, crc32_ogg(out))
    return bytes(out)


#: Builds the track's plan from its segments again, for a final file that cannot be read.
_Fallback = Callable[[], Awaitable["_Plan | None"]]


class AssembledTrack:
    """The Ogg Opus stream of one track: its ``length`` and byte-range :meth:`read`.

    Either planned from the segments, or the track's verified file (``final_key``), which falls back
    to the segments when it cannot be read.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        length: int,
        plan: _Plan | None,
        final_key: str | None,
        fallback: _Fallback | None = None,
        session_id: str = "",
        track: str = "",
    ) -> None:
        self._store = store
        self.length = length
        self._plan = plan
        self._final_key = final_key
        self._fallback = fallback
        self._session_id = session_id
        self._track = track

    @property
    def content_type(self) -> str:
        return "audio/ogg"

    @property
    def final_key(self) -> str | None:
        """The verified file this stream is read from, ``None`` when it is read from the segments."""
        return self._final_key

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Exactly the bytes ``start..end`` (inclusive; ``end`` clamped to the last byte)."""
        last = self.length - 1 if end is None else min(end, self.length - 1)
        if start < 0 or start > last:
            return
        plan = self._plan
        if plan is None:
            assert self._final_key is not None
            pos = start
            try:
                async for chunk in self._store.get(self._final_key, start=start, end=last):
                    pos += len(chunk)
                    yield chunk
                if pos > last:
                    return
                raise ObjectStoreError("the assembled file is shorter than it was")
            except ObjectStoreError as exc:
                # The same bytes come from the segments: go on from where the file stopped.
                plan = await self._failover(exc)
            start = pos
        async for page in self._pages(plan, start, last):
            chunk = page.data[max(0, start - page.offset) : last - page.offset + 1]
            if chunk:
                yield chunk

    async def stream(self, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The whole stream in chunks of ``chunk_size`` bytes (the last one shorter), for an upload."""
        buffer = bytearray()
        async for piece in self.read(0):
            buffer += piece
            while len(buffer) >= chunk_size:
                yield bytes(buffer[:chunk_size])
                del buffer[:chunk_size]
        if buffer:
            yield bytes(buffer)

    async def _failover(self, failure: ObjectStoreError) -> _Plan:
        """The segments' plan, if it gives the file's bytes; else ``failure`` is raised again."""
        if self._fallback is None:
            raise failure
        try:
            plan = await self._fallback()
        except ObjectStoreError:
            raise failure from None
        if plan is None or plan.length != self.length:
            raise failure
        log.warning(
            "assembly.final_unreadable",
            extra={
                "session_id": self._session_id,
                "track": self._track,
                "error_type": type(failure).__name__,
            },
        )
        return plan

    async def _pages(self, plan: _Plan, start: int, last: int) -> AsyncIterator[_Bytes]:
        i = bisect.bisect_right(plan.starts, start) - 1
        pages = plan.pages
        while i < len(pages) and pages[i].offset <= last:
            page = pages[i]
            if page.kind != "segment":
                yield _Bytes(page.offset, self._literal(plan, page))
                i += 1
                continue
            # A run of consecutive pages of the same segment: one ranged read of the object.
            j = i
            while (
                j + 1 < len(pages)
                and pages[j + 1].offset <= last
                and pages[j + 1].kind == "segment"
                and pages[j + 1].segment == page.segment
            ):
                j += 1
            run = pages[i : j + 1]
            src_start = run[0].src_offset
            src_end = run[-1].src_offset + run[-1].src_length - 1
            buffer = bytearray()
            pos = src_start
            k = 0
            async for chunk in self._store.get(plan.keys[page.segment], start=src_start, end=src_end):
                buffer += chunk
                while k < len(run) and run[k].src_offset + run[k].src_length <= pos + len(buffer):
                    rel = run[k].src_offset - pos
                    src = bytes(buffer[rel : rel + run[k].src_length])
                    yield _Bytes(run[k].offset, _rewrite(run[k], src))
                    del buffer[: rel + run[k].src_length]
                    pos = run[k].src_offset + run[k].src_length
                    k += 1
            if k < len(run):
                raise RuntimeError(f"segment {plan.keys[page.segment]} is shorter than planned")
            i = j + 1

    @staticmethod
    def _literal(plan: _Plan, page: _OutPage) -> bytes:
        if page.kind == "head":
            packets = [plan.head]
        elif page.kind == "tags":
            packets = [plan.tags]
        else:
            packets = [SILENCE_PACKET] * page.count
        return _build_page(flags=page.flags, granule=page.granule, seqno=page.seqno, packets=packets)


@dataclass(frozen=True, slots=True)
class _Bytes:
    offset: int
    data: bytes


_plans: OrderedDict[tuple[str, str, int], _Plan] = OrderedDict()


def final_object_key(session_id: str, track: str, segments: int) -> str:
    """Where the verified file of a track built from its first ``segments`` segments lives.

    Beside the segments, under the session's prefix, so deletion and export sweep it with them.
    Named after the segment count, because a segment can still be listed after the file was made
    (its upload waited for the store to return): a file named for fewer segments than the manifest
    lists is stale, and the segments are served instead.
    """
    return f"sessions/{session_id}/audio/{track}.{segments}.ogg"


def _stale(key: str, track: str, segments: int) -> bool:
    """Whether ``key`` names a file built from another number of segments than the manifest lists."""
    name = key.rsplit("/", 1)[-1]
    count = name.removeprefix(f"{track}.").removesuffix(".ogg")
    return name != count and count.isdigit() and int(count) != segments


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One manifest entry as assembly needs it: the object, its start on the timeline, its digest."""

    key: str
    start_ms: int
    #: The SHA-256 the uploader recorded; checked by :func:`segment_track`.
    sha256: str | None = None


class SegmentUnusable(Exception):
    """A listed segment cannot go into a verified file: missing, altered since its upload, or unreadable."""


def _checked_segment(ref: SegmentRef, data: bytes, *, strict: bool) -> _Segment | None:
    if strict and ref.sha256 is not None and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise SegmentUnusable("a segment differs from its manifest digest")
    seg = _parse_segment(ref.key, ref.start_ms, data)
    if seg is None and strict:
        raise SegmentUnusable("a segment holds no readable Ogg Opus audio")
    return seg


async def _segment_plan(
    store: ObjectStore, session_id: str, track: str, refs: Sequence[SegmentRef], *, strict: bool
) -> _Plan | None:
    """The plan of ``refs``, from the cache or by reading each segment once.

    Lenient (playback): an unreadable segment is left out (logged) and a missing one raises
    :class:`ObjectNotFound`. Strict: either raises :class:`SegmentUnusable`, as does a digest that
    differs from the manifest's; the plan is built afresh and then cached (the same plan when every
    segment is sound).
    """
    cache_key = (session_id, track, len(refs))
    plan = None if strict else _plans.get(cache_key)
    if plan is not None:
        _plans.move_to_end(cache_key)
        return plan
    limit = asyncio.Semaphore(PARALLEL_READS)

    async def parse(ref: SegmentRef) -> _Segment | None:
        async with limit:
            try:
                data = await store.read(ref.key)
            except ObjectNotFound:
                if strict:
                    raise SegmentUnusable("a listed segment is missing") from None
                raise
        seg = await asyncio.to_thread(_checked_segment, ref, data, strict=strict)
        if seg is None:
            log.warning("assembly.segment_unreadable", extra={"session_id": session_id, "track": track})
        return seg

    parsed = await asyncio.gather(*(parse(ref) for ref in refs))
    segments = [seg for seg in parsed if seg is not None]
    if not segments:
        return None
    plan = await asyncio.to_thread(_make_plan, session_id, track, segments)
    _plans[cache_key] = plan
    while len(_plans) > PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


async def segment_track(
    store: ObjectStore, session_id: str, track: str, segments: Sequence[SegmentRef]
) -> AssembledTrack:
    """The stream of exactly ``segments`` (the whole manifest, in order), each checked against its digest.

    Raises :class:`SegmentUnusable` rather than leave a segment out, and :class:`ObjectStoreError`
    when the store fails. ``segments`` must not be empty.
    """
    if not segments:
        raise ValueError("a track without segments has no stream")
    plan = await _segment_plan(store, session_id, track, segments, strict=True)
    assert plan is not None  # strict: every segment is in it
    return AssembledTrack(
        store, length=plan.length, plan=plan, final_key=None, session_id=session_id, track=track
    )


async def assembled_track(
    db: Database, store: ObjectStore, session_id: str, track: str
) -> AssembledTrack | None:
    """The track's playback stream, or ``None`` when it has no audio (yet).

    The verified file when the track has one, else (or when that file is gone, stale or its stat
    fails) the stream planned from the segments.
    """
    async with db.sessions() as s:
        rec = await track_recording(s, session_id, track)
        if rec is None:
            return None
        final_key = rec.final_object_key
        chunks = (
            await s.execute(
                select(AudioChunk.start_ms, AudioChunk.object_key)
                .where(AudioChunk.recording_id == rec.id)
                .order_by(AudioChunk.seq)
            )
        ).all()
    refs = [SegmentRef(key, int(start_ms)) for start_ms, key in chunks]

    async def from_segments() -> _Plan | None:
        return await _segment_plan(store, session_id, track, refs, strict=False) if refs else None

    if final_key and _stale(final_key, track, len(refs)):
        log.warning("assembly.final_stale", extra={"session_id": session_id, "track": track})
    elif final_key:
        try:
            info = await store.stat(final_key)
        except ObjectStoreError as exc:
            info = None
            log.warning(
                "assembly.final_unreadable",
                extra={"session_id": session_id, "track": track, "error_type": type(exc).__name__},
            )
        else:
            if info is None:
                log.warning("assembly.final_missing", extra={"session_id": session_id, "track": track})
        if info is not None and info.size > 0:
            return AssembledTrack(
                store, length=info.size, plan=None, final_key=final_key, fallback=from_segments,
                session_id=session_id, track=track,
            )  # fmt: skip
    plan = await from_segments()
    if plan is None:
        return None
    return AssembledTrack(
        store, length=plan.length, plan=plan, final_key=None, session_id=session_id, track=track
    )


async def track_recording(s: AsyncSession, session_id: str, track: str) -> AudioRecording | None:
    """The recording row of one track of a session, if it has one."""
    of_track = (AudioRecording.session_id == session_id, AudioRecording.track == track)
    query = select(AudioRecording).where(*of_track)
    return (await s.execute(query)).scalar_one_or_none()
