"""Audio format helpers: pcm16 pass-through and G.711 companding."""

from __future__ import annotations

from array import array

from relay.simulator.formats import AudioFormat, decode, encode_from_pcm24k

from .audio import tone


def test_pcm_is_24_khz_two_bytes_a_sample() -> None:
    """audio/pcm: 48 bytes a millisecond, echoed with its rate, passed through unchanged."""
    pcm = AudioFormat()
    assert (pcm.rate, pcm.bytes_per_ms, pcm.as_json()) == (24000, 48, {"type": "audio/pcm", "rate": 24000})
    audio = tone(20, -20)
    assert encode_from_pcm24k(pcm, audio) == audio


def test_g711_round_trip_stays_close() -> None:
    """μ-law and A-law encode 24 kHz audio to 8 kHz bytes that decode back within companding error."""
    audio = tone(30, -10)
    source = array("h")
    source.frombytes(audio)
    for kind in ("audio/pcmu", "audio/pcma"):
        fmt = AudioFormat(kind)
        encoded = encode_from_pcm24k(fmt, audio)
        assert len(encoded) == 30 * fmt.bytes_per_ms and fmt.as_json() == {"type": kind}
        decoded = decode(fmt, encoded)
        averaged = [(source[3 * i] + source[3 * i + 1] + source[3 * i + 2]) // 3 for i in range(len(decoded))]
        assert max(abs(a - b) for a, b in zip(averaged, decoded, strict=True)) < 600
