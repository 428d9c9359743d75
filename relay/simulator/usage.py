"""Token accounting behind ``usage`` and ``rate_limits.updated`` (no I/O).

The numbers are modelled, not measured: text costs a token per 4 characters, the learner's audio
10 tokens a second and the coach's audio 20 a second. What matters is that they are consistent:
totals are sums of their details, cached tokens are a part of input tokens, and the rate-limit
window subtracts what responses used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from relay.simulator.items import Item

USER_AUDIO_TOKENS_PER_S = 10
MODEL_AUDIO_TOKENS_PER_S = 20
CHARS_PER_TEXT_TOKEN = 4
RATE_LIMIT_TOKENS = 40000
RATE_WINDOW_S = 60.0


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TEXT_TOKEN)


def model_audio_tokens(audio_ms: float) -> int:
    return math.ceil(audio_ms * MODEL_AUDIO_TOKENS_PER_S / 1000)


def context_tokens(instructions: str, items: Iterable[Item]) -> tuple[int, int]:
    """(text, audio) input tokens of a response that reads ``instructions`` and ``items``."""
    text = text_tokens(instructions)
    audio = 0
    for item in items:
        for part in item.data.get("content") or []:
            if part.get("type") != "output_audio":
                text += text_tokens(str(part.get("text") or ""))
        for key in ("arguments", "output"):
            text += text_tokens(str(item.data.get(key) or ""))
        if item.data.get("role") == "assistant":
            audio += model_audio_tokens(item.audio_ms)
        else:
            audio += math.ceil(item.audio_ms * USER_AUDIO_TOKENS_PER_S / 1000)
    return text, audio


def words_within(word_ends_ms: list[float], words: list[str], max_tokens: int | str, audio: bool) -> int:
    """How many leading words fit in ``max_output_tokens`` (text plus audio tokens; at least one)."""
    if max_tokens == "inf":
        return len(words)
    for count in range(len(words), 1, -1):
        audio_ms = word_ends_ms[count - 1] if audio else 0.0
        if text_tokens(" ".join(words[:count])) + model_audio_tokens(audio_ms) <= int(max_tokens):
            return count
    return 1


def response_usage(
    input_tokens: tuple[int, int], cached: tuple[int, int], text: str, audio_ms: float
) -> dict[str, Any]:
    """The ``usage`` of ``response.done``: (text, audio) input, the cached part of it, and the output."""
    text_in, audio_in = input_tokens
    cached_text, cached_audio = min(text_in, cached[0]), min(audio_in, cached[1])
    text_out, audio_out = text_tokens(text), model_audio_tokens(audio_ms)
    total_in, total_out = text_in + audio_in, text_out + audio_out
    return {
        "total_tokens": total_in + total_out,
        "input_tokens": total_in,
        "output_tokens": total_out,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens": cached_text + cached_audio,
            "cached_tokens_details": {
                "text_tokens": cached_text,
                "audio_tokens": cached_audio,
                "image_tokens": 0,
            },
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


def transcription_usage(model: str | None, duration_ms: int, transcript: str) -> dict[str, Any]:
    """``whisper-1`` bills by duration; the other transcription models by tokens."""
    if model == "whisper-1":
        return {"type": "duration", "seconds": round(duration_ms / 1000, 3)}
    audio = math.ceil(duration_ms * USER_AUDIO_TOKENS_PER_S / 1000)
    text = text_tokens(transcript)
    return {
        "type": "tokens",
        "input_tokens": audio,
        "output_tokens": text,
        "total_tokens": audio + text,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
    }


class RateLimitWindow:
    """Tokens used in the last minute, reported as the one ``tokens`` entry of ``rate_limits.updated``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._used: list[tuple[float, int]] = []

    def record(self, tokens: int) -> dict[str, Any]:
        now = self._clock()
        self._used = [(t, n) for t, n in self._used if now - t < RATE_WINDOW_S]
        self._used.append((now, tokens))
        used = sum(n for _, n in self._used)
        return {
            "name": "tokens",
            "limit": RATE_LIMIT_TOKENS,
            "remaining": max(0, RATE_LIMIT_TOKENS - used),
            "reset_seconds": round(RATE_WINDOW_S - (now - self._used[0][0]), 3),
        }
