"""The Ogg Opus muxer: valid pages, decodable by FFmpeg, and decodable after truncation."""

from __future__ import annotations

import array
import io
import math
from fractions import Fraction
from pathlib import Path

import av

from storage.oggopus import (
    FLAG_BOS,
    FLAG_EOS,
    OggOpusWriter,
    crc32_ogg,
    parse_pages,
    read_segment_info,
    truncate_to_last_page,
)

RATE = 24000


def _tone(seconds: float, rate: int = RATE) -> bytes:
    n = int(seconds * rate)
    return array.array("h", (int(6000 * math.sin(2 * math.pi * 330 * i / rate)) for i in range(n))).tobytes()


def _encode(path: Path, pcm: bytes, *, page_every: int = 25) -> None:
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = RATE
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = 32000
    codec.time_base = Fraction(1, RATE)
    codec.open()
    frame_bytes = 2 * codec.frame_size
    with path.open("wb") as fh:
        writer = OggOpusWriter(
            fh, serial=7, pre_skip=312, input_sample_rate=RATE, comments={"PARLEY_START_MS": "0"}
        )
        for n, i in enumerate(range(0, len(pcm), frame_bytes)):
            chunk = pcm[i : i + frame_bytes]
            frame = av.AudioFrame(format="s16", layout="mono", samples=len(chunk) // 2)
            frame.planes[0].update(chunk)
            frame.sample_rate = RATE
            frame.pts = i // 2
            for packet in codec.encode(frame):
                writer.add_packet(bytes(packet))
            if n % page_every == page_every - 1:
                writer.flush_page()
        for packet in codec.encode(None):
            writer.add_packet(bytes(packet))
        writer.close(len(pcm) // 2 * 48000 // RATE)


def _decoded_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
        rate = container.streams.audio[0].codec_context.sample_rate
    return float(samples) / rate


def test_crc_matches_a_known_ogg_value() -> None:
    """The Ogg CRC32 (poly 0x04C11DB7, unreflected) gives the reference value for a known input."""
    assert crc32_ogg(b"") == 0
    assert crc32_ogg(b"123456789") == 0x89A1897F


def test_pages_parse_back_with_valid_crcs_and_granules(tmp_path: Path) -> None:
    """Every page re-parses with a valid CRC; BOS/EOS flags and increasing granules are set."""
    path = tmp_path / "a.ogg"
    _encode(path, _tone(3.0))
    data = path.read_bytes()
    pages = parse_pages(data)
    assert sum(p.length for p in pages) == len(data)
    assert pages[0].flags & FLAG_BOS and pages[-1].flags & FLAG_EOS
    granules = [p.granule for p in pages[2:]]
    assert granules == sorted(granules) and len(granules) >= 3
    info = read_segment_info(data)
    assert info.duration_ms == 3000 and info.tags["PARLEY_START_MS"] == "0"


def test_ffmpeg_decodes_the_segment_with_the_fed_duration(tmp_path: Path) -> None:
    """av.open decodes the segment and its duration matches the PCM fed within one 20 ms frame."""
    path = tmp_path / "b.ogg"
    _encode(path, _tone(2.5))
    assert abs(_decoded_seconds(path) - 2.5) <= 0.02


def test_a_file_cut_mid_page_still_decodes_up_to_its_last_complete_page(tmp_path: Path) -> None:
    """Truncated inside a page, the file decodes (as-is and after repair) up to the last whole page."""
    path = tmp_path / "c.ogg"
    _encode(path, _tone(4.0))
    data = path.read_bytes()
    pages = parse_pages(data)
    cut_page = pages[-2]
    path.write_bytes(data[: cut_page.offset + cut_page.length // 2])
    expected_s = (pages[-3].granule - 312) / 48000
    assert abs(_decoded_seconds(path) - expected_s) <= 0.04
    info = truncate_to_last_page(path)
    assert info is not None and info.valid_bytes == cut_page.offset
    assert len(path.read_bytes()) == cut_page.offset
    assert abs(_decoded_seconds(path) - expected_s) <= 0.02
    # headers only: nothing to keep
    path.write_bytes(data[: pages[2].offset + 5])
    assert truncate_to_last_page(path) is None
    assert read_segment_info(io.BytesIO(data).getvalue()).audio_pages == len(pages) - 2
