"""The energy VAD on its own: exact frame timing, threshold mapping, chunking independence."""

from __future__ import annotations

from relay.simulator import formats, vad

from .audio import silence, speech, tone


def run(pcm: bytes, config: vad.VadConfig, chunk_ms: int = 20) -> list[vad.VadEvent]:
    detector = vad.EnergyVad(config)
    events: list[vad.VadEvent] = []
    step = chunk_ms * 48
    for i in range(0, len(pcm), step):
        events += detector.feed(formats.decode(formats.AudioFormat(), pcm[i : i + step]))
    return events


def test_tone_onset_and_offset_are_exact() -> None:
    """Onset is the first voiced frame; the stop lands silence_duration_ms after the last voiced frame."""
    events = run(silence(1000) + tone(500, -20) + silence(500), vad.VadConfig(silence_duration_ms=300))
    assert events == [vad.SpeechStarted(1000), vad.SpeechStopped(1800)]


def test_a_click_is_not_speech() -> None:
    """Voiced audio shorter than MIN_SPEECH_MS does not start speech."""
    assert run(silence(200) + tone(vad.MIN_SPEECH_MS - 10, -10) + silence(500), vad.VadConfig()) == []


def test_threshold_maps_to_dbfs() -> None:
    """threshold 0, 0.5 and 1 stand for -65, -40 and -15 dBFS."""
    assert [vad.threshold_dbfs(t) for t in (0.0, 0.5, 1.0)] == [-65.0, -40.0, -15.0]
    assert run(tone(300, -38) + silence(300), vad.VadConfig(threshold=0.5))
    assert not run(tone(300, -42) + silence(300), vad.VadConfig(threshold=0.5))


def test_events_do_not_depend_on_chunk_size() -> None:
    """Feeding the same audio in 7 ms or 100 ms chunks gives the same transitions."""
    pcm = silence(300) + speech(4) + silence(600)
    assert run(pcm, vad.VadConfig(), chunk_ms=7) == run(pcm, vad.VadConfig(), chunk_ms=100)


def test_g711_audio_is_analysed_at_8_khz() -> None:
    """μ-law input is decoded and framed at 8 kHz with the same timing."""
    pcm = silence(1000) + tone(500, -20) + silence(500)
    ulaw = formats.encode_from_pcm24k(formats.AudioFormat("audio/pcmu"), pcm)
    detector = vad.EnergyVad(vad.VadConfig(), sample_rate=8000)
    events = detector.feed(formats.decode(formats.AudioFormat("audio/pcmu"), ulaw))
    assert events == [vad.SpeechStarted(1000), vad.SpeechStopped(1700)]
