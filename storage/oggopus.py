"""A tiny Ogg Opus muxer/reader (RFC 3533 pages, RFC 7845 Opus mapping), page by page.

Why our own: the recorder must flush and fsync every page as it is written, so that a killed process
leaves a file that decodes up to its last complete page. Each page carries a granule position (in
48 kHz samples, pre-skip included), a CRC32 and whole packets only (no packet spans two pages).

Segments are self-describing: the OpusTags header holds ``PARLEY_*`` comments (session, track, seq,
start on the session timeline), and the last complete page's granule gives the duration.
"""

from __future__ import annotations

import binascii
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

__all__ = [
    "OPUS_RATES",
    "OggOpusWriter",
    "OggPage",
    "SegmentInfo",
    "crc32_ogg",
    "opus_head",
    "opus_packet_samples48",
    "parse_pages",
    "read_segment_info",
    "truncate_to_last_page",
]

CAPTURE: Final = b"OggS"
HEADER_LEN: Final = 27
FLAG_CONTINUED: Final = 0x01
FLAG_BOS: Final = 0x02
FLAG_EOS: Final = 0x04
#: Input rates libopus encodes natively; others are resampled to 48 kHz.
OPUS_RATES: Final = (8000, 12000, 16000, 24000, 48000)
VENDOR: Final = "parley"


_BITREV: Final = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def crc32_ogg(data: bytes | bytearray) -> int:
    """Ogg's CRC32 (RFC 3533: polynomial 0x04C11DB7 unreflected, init 0, no final xor).

    Computed by zlib's reflected CRC32 on bit-reversed input, then bit-reversed: the same value as
    the textbook table loop, at C speed (the muxer and the playback assembler run it per page).
    """
    reflected = binascii.crc32(bytes(data).translate(_BITREV), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def build_page(*, flags: int, granule: int, serial: int, seqno: int, packets: list[bytes]) -> bytes:
    """One Ogg page holding whole ``packets`` (at most 255 lacing values)."""
    lacing = bytearray()
    for packet in packets:
        n = len(packet)
        lacing += b"\xff" * (n // 255) + bytes((n % 255,))
    if len(lacing) > 255:
        raise ValueError("too many packets for one Ogg page")
    header = struct.pack("<4sBBqIIIB", CAPTURE, 0, flags, granule, serial, seqno, 0, len(lacing))
    page = bytearray(header + bytes(lacing) + b"".join(packets))
    struct.pack_into("<I", page, 22, crc32_ogg(bytes(page)))
    return bytes(page)


def _lacing_len(packet: bytes) -> int:
    return len(packet) // 255 + 1


@dataclass(frozen=True, slots=True)
class OggPage:
    offset: int
    length: int
    flags: int
    granule: int
    serial: int
    seqno: int
    packets: list[bytes]


def parse_pages(data: bytes) -> list[OggPage]:
    """The complete, CRC-valid pages at the start of ``data``; stops at the first bad or cut page."""
    pages: list[OggPage] = []
    pos = 0
    while pos + HEADER_LEN <= len(data):
        capture, version, flags, granule, serial, seqno, crc, nseg = struct.unpack_from(
            "<4sBBqIIIB", data, pos
        )
        if capture != CAPTURE or version != 0 or pos + HEADER_LEN + nseg > len(data):
            break
        lacing = data[pos + HEADER_LEN : pos + HEADER_LEN + nseg]
        body_len = sum(lacing)
        end = pos + HEADER_LEN + nseg + body_len
        if end > len(data):
            break
        page = bytearray(data[pos:end])
        struct.pack_into("<I", page, 22, 0)
        if crc32_ogg(bytes(page)) != crc:
            break
        packets: list[bytes] = []
        body = pos + HEADER_LEN + nseg
        current = 0
        for value in lacing:
            current += value
            if value < 255:
                packets.append(data[body : body + current])
                body += current
                current = 0
        pages.append(OggPage(pos, end - pos, flags, granule, serial, seqno, packets))
        pos = end
    return pages


def opus_packet_samples48(packet: bytes) -> int:
    """Samples (at 48 kHz) one Opus packet decodes to, from its TOC byte (RFC 6716 section 3.1)."""
    if not packet:
        return 0
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        frame = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        frame = (480, 960)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        frame = (120, 240, 480, 960)[config & 3]
    code = toc & 3
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    else:
        count = packet[1] & 0x3F if len(packet) > 1 else 0
    return frame * count


def opus_head(*, pre_skip: int, input_sample_rate: int, channels: int = 1) -> bytes:
    """The RFC 7845 identification header (channel mapping family 0)."""
    return struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, pre_skip, input_sample_rate, 0, 0)


def opus_tags(comments: Mapping[str, str]) -> bytes:
    vendor = VENDOR.encode()
    out = bytearray(b"OpusTags" + struct.pack("<I", len(vendor)) + vendor)
    out += struct.pack("<I", len(comments))
    for key, value in comments.items():
        item = f"{key}={value}".encode()
        out += struct.pack("<I", len(item)) + item
    return bytes(out)


def parse_opus_tags(packet: bytes) -> dict[str, str]:
    if not packet.startswith(b"OpusTags"):
        raise ValueError("not an OpusTags packet")
    pos = 8
    (vlen,) = struct.unpack_from("<I", packet, pos)
    pos += 4 + vlen
    (count,) = struct.unpack_from("<I", packet, pos)
    pos += 4
    out: dict[str, str] = {}
    for _ in range(count):
        (n,) = struct.unpack_from("<I", packet, pos)
        pos += 4
        key, _, value = packet[pos : pos + n].decode("utf-8", "replace").partition("=")
        out[key.upper()] = value
        pos += n
    return out


class OggOpusWriter:
    """Writes one mono Ogg Opus stream to ``fh`` page by page; ``flush_page`` makes it durable.

    The newest packet is always held back until the next page or :meth:`close`, so the final page
    (EOS, with the granule trimmed to the exact input length) is never empty.
    """

    def __init__(
        self,
        fh: BinaryIO,
        *,
        serial: int,
        pre_skip: int,
        input_sample_rate: int,
        comments: Mapping[str, str],
        fsync: bool = True,
    ) -> None:
        self._fh = fh
        self._serial = serial
        self._seqno = 0
        self._fsync = fsync
        self.pre_skip = pre_skip
        self._pending: list[bytes] = []
        self._pending_lacing = 0
        self._granule_written = pre_skip  # granule of the packets already on disk
        self._pending_samples = 0
        self._held: tuple[bytes, int] | None = None
        self.bytes_written = 0
        self.closed = False
        self._write(FLAG_BOS, 0, [opus_head(pre_skip=pre_skip, input_sample_rate=input_sample_rate)])
        self._write(0, 0, [opus_tags(comments)])
        self._sync()

    @property
    def pending_samples48(self) -> int:
        """Audio encoded but not yet on disk (in 48 kHz samples)."""
        return self._pending_samples + (self._held[1] if self._held else 0)

    def _write(self, flags: int, granule: int, packets: list[bytes]) -> None:
        page = build_page(
            flags=flags, granule=granule, serial=self._serial, seqno=self._seqno, packets=packets
        )
        self._seqno += 1
        self._fh.write(page)
        self.bytes_written += len(page)

    def _sync(self) -> None:
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def _emit_pending(self, flags: int = 0, granule: int | None = None) -> None:
        if not self._pending:
            return
        self._granule_written += self._pending_samples
        self._write(flags, self._granule_written if granule is None else granule, self._pending)
        self._pending, self._pending_lacing, self._pending_samples = [], 0, 0

    def _push(self, packet: bytes, samples48: int) -> None:
        if self._pending_lacing + _lacing_len(packet) > 255:
            self._emit_pending()
        self._pending.append(packet)
        self._pending_lacing += _lacing_len(packet)
        self._pending_samples += samples48

    def add_packet(self, packet: bytes) -> None:
        """Queue one Opus packet (its duration is read from its TOC byte)."""
        if self._held is not None:
            self._push(*self._held)
        self._held = (packet, opus_packet_samples48(packet))

    def flush_page(self) -> int:
        """Write the queued packets (but the newest) as page(s), flush and fsync; returns bytes written."""
        before = self.bytes_written
        self._emit_pending()
        if self.bytes_written != before:
            self._sync()
        return self.bytes_written - before

    def close(self, total_samples48: int | None = None) -> int:
        """Write the last page (EOS); its granule is trimmed to ``total_samples48`` of real audio."""
        if self.closed:
            return 0
        self.closed = True
        before = self.bytes_written
        if self._held is not None:
            self._push(*self._held)
            self._held = None
        if self._pending:
            end = self._granule_written + self._pending_samples
            if total_samples48 is not None:
                end = max(self._granule_written, min(end, self.pre_skip + total_samples48))
            self._emit_pending(FLAG_EOS, end)
        self._sync()
        return self.bytes_written - before


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """What a (possibly truncated) spool segment holds."""

    valid_bytes: int
    sample_rate: int
    pre_skip: int
    samples48: int
    audio_pages: int
    tags: dict[str, str]

    @property
    def duration_ms(self) -> int:
        return round(self.samples48 / 48)


def read_segment_info(data: bytes) -> SegmentInfo:
    """Parse a segment's headers and complete pages; ``ValueError`` if its headers are incomplete."""
    pages = parse_pages(data)
    if len(pages) < 2 or not pages[0].packets or not pages[0].packets[0].startswith(b"OpusHead"):
        raise ValueError("no complete Ogg Opus headers")
    head = pages[0].packets[0]
    _magic, _version, _channels, pre_skip, rate, _gain, _mapping = struct.unpack_from("<8sBBHIhB", head)
    tags = parse_opus_tags(pages[1].packets[0])
    audio = pages[2:]
    samples = max(0, audio[-1].granule - pre_skip) if audio else 0
    last = pages[-1]
    return SegmentInfo(last.offset + last.length, rate, pre_skip, samples, len(audio), tags)


def truncate_to_last_page(path: Path) -> SegmentInfo | None:
    """Cut a file left by a crash after its last complete page; ``None`` if it holds no audio page."""
    data = path.read_bytes()
    try:
        info = read_segment_info(data)
    except ValueError:
        return None
    if info.audio_pages == 0:
        return None
    if info.valid_bytes < len(data):
        with path.open("r+b") as fh:
            fh.truncate(info.valid_bytes)
            fh.flush()
            os.fsync(fh.fileno())
    return info
