"""A local stand-in for OpenAI's Chat Completions endpoint that answers Parley's rating call.

:class:`RatingSimulator` is a small aiohttp server on a loopback port. ``POST /v1/chat/completions``
answers as OpenAI does: a ``chat.completion`` object whose message content is a rating in the schema
the request names (``response_format`` ``json_schema`` :data:`relay.worker.rubric.SCHEMA_NAME`,
strict). The rating is computed from the request alone (the speech metrics in the prompt and the
learner's lines), so the same request always gets the same answer and different transcripts get
different scores. Requests it cannot answer (no messages, another schema) get OpenAI's 400 error shape.

Faults for tests sit on :class:`RatingSimulatorOptions`; replace ``simulator.options`` at any time
(``dataclasses.replace(sim.options, fail_status=500)``): fail every call with an HTTP status (an
OpenAI-shaped error body), delay each answer, answer content that is not JSON, or JSON that breaks
the schema. ``simulator.calls`` counts the calls.

It logs no request content: prompts carry transcripts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from aiohttp import web

from relay.simulator.server import _REJECTIONS
from relay.worker.rubric import METRICS_HEADER, SCHEMA_NAME
from storage.ratings import DIMENSIONS

__all__ = ["COMPLETIONS_PATH", "RatingSimulator", "RatingSimulatorOptions", "simulated_rating"]

log = logging.getLogger("relay.simulator.rating")

COMPLETIONS_PATH: Final = "/v1/chat/completions"
#: How long closing waits for answers still in flight (a delayed one is cancelled after this).
SHUTDOWN_TIMEOUT_S: Final = 1.0
#: The ``message.content`` of the ``invalid_json`` fault.
NOT_JSON: Final = '{"scores": {"fluency": 7'
#: The ``message.content`` of the ``break_schema`` fault: valid JSON, wrong shape.
OFF_SCHEMA: Final = json.dumps({"scores": {"fluency": "good"}, "comment": "well done"})


@dataclass(frozen=True, slots=True)
class RatingSimulatorOptions:
    """How the rating simulator answers; every field off by default (a well-behaved model)."""

    fail_status: int | None = None
    """Answer every call with this HTTP status (400-599) and OpenAI's error body."""
    delay_s: float = 0.0
    """Wait this long before answering (longer than the client's timeout forces a timeout)."""
    invalid_json: bool = False
    """Answer with message content that is not valid JSON."""
    break_schema: bool = False
    """Answer with valid JSON that does not match the rating schema."""

    def __post_init__(self) -> None:
        if self.fail_status is not None and not 400 <= self.fail_status <= 599:
            raise ValueError("fail_status must be an HTTP error status (400-599)")
        if not 0 <= self.delay_s <= 3600:
            raise ValueError("delay_s must be between 0 and 3600")


def _error(status: int, message: str, kind: str, code: str | None, param: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status
    )


def _bad_request(message: str, code: str, param: str) -> web.Response:
    return _error(400, f"{message} (rating simulator)", "invalid_request_error", code, param)


def _text(content: object) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return "\n".join(str(part.get("text", "")) for part in parts)
    return ""


def _number(metrics: Mapping[str, Any], name: str) -> float:
    value = metrics.get(name, 0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _clamp(value: float) -> int:
    return max(0, min(100, round(value)))


def simulated_rating(prompt: str) -> dict[str, Any]:
    """The simulator's rating of a prompt (the user message of Parley's rating call): deterministic.

    Scores follow the speech metrics of the prompt (pace, fillers, pauses, variety, turns, words),
    nudged by -5..+5 per score from a hash of the learner's lines, so two transcripts with equal
    metrics still differ. The feedback quotes numbers only, never the learner's words.
    """
    lines = prompt.splitlines()
    metrics: dict[str, Any] = {}
    if METRICS_HEADER in lines:
        at = lines.index(METRICS_HEADER)
        try:
            found = json.loads(lines[at + 1]) if at + 1 < len(lines) else {}
        except json.JSONDecodeError:
            found = {}
        metrics = found if isinstance(found, dict) else {}
    learner = [line.removeprefix("Learner:").strip() for line in lines if line.startswith("Learner:")]
    digest = hashlib.sha256("\n".join(learner).encode()).digest()
    jitter = [digest[i] % 11 - 5 for i in range(len(DIMENSIONS))]

    words = _number(metrics, "learner_words") or sum(len(line.split()) for line in learner)
    turns = _number(metrics, "learner_turns") or len(learner)
    wpm = _number(metrics, "words_per_minute")
    base = {
        "fluency": 35 + min(wpm, 150) / 3 - _number(metrics, "filler_rate") * 150
        - _number(metrics, "long_pauses") * 4,
        "vocabulary": 25 + _number(metrics, "vocabulary_variety") * 50 + min(words, 200) / 10,
        "grammar": 45 + min(_number(metrics, "mean_utterance_words"), 15) * 2.5,
        "task": 25 + min(turns, 8) * 5 + min(words, 120) / 4,
    }  # fmt: skip
    scores = {name: _clamp(base[name] + jitter[i]) for i, name in enumerate(DIMENSIONS)}
    best = max(DIMENSIONS, key=lambda name: scores[name])
    weakest = min(DIMENSIONS, key=lambda name: scores[name])
    feedback = (
        f"Simulated rating. You said {int(words)} words in {int(turns)} turns"
        + (f" at about {round(wpm)} words per minute" if wpm else "")
        + f". Your strongest area was {best}; practise {weakest} next."
    )
    return {"scores": scores, "feedback": feedback}


class RatingSimulator:
    """A Chat Completions endpoint for the rating call on ``http://HOST:PORT/v1`` (see the module doc).

    Use it as an async context manager, or :meth:`start` then :meth:`aclose`; point the SDK at
    :attr:`base_url`.
    """

    def __init__(
        self, options: RatingSimulatorOptions | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.options = options or RatingSimulatorOptions()
        self.calls = 0
        """Calls of ``POST /v1/chat/completions`` so far, faulty ones included."""
        self.last_request: dict[str, Any] | None = None
        """The JSON body of the last call, for tests (held in memory only)."""
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    async def start(self) -> None:
        """Start listening; a second call does nothing."""
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_post(COMPLETIONS_PATH, self._completions)
        # handler_cancellation: a client that gave up (timed out) stops its delayed answer.
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S, handler_cancellation=True
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("rating_simulator.started", extra={"port": self._port})

    async def aclose(self) -> None:
        """Stop listening; answers in flight get :data:`SHUTDOWN_TIMEOUT_S` to finish. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> RatingSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def base_url(self) -> str:
        """The SDK's ``base_url``, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self._port is None:
            raise RuntimeError("the rating simulator is not started")
        return f"http://{self._host}:{self._port}/v1"

    async def _completions(self, request: web.Request) -> web.Response:
        self.calls += 1
        options = self.options
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _bad_request("We could not parse the JSON body of your request.", "invalid_json", "body")
        if not isinstance(body, dict):
            return _bad_request("The request body must be a JSON object.", "invalid_type", "body")
        self.last_request = body
        if options.delay_s:
            await asyncio.sleep(options.delay_s)
        if options.fail_status is not None:
            return self._failure(options.fail_status)
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not model:
            return _bad_request("Missing required parameter: 'model'.", "missing_required_parameter", "model")
        if not isinstance(messages, list) or not messages:
            return _bad_request(
                "Missing required parameter: 'messages'.", "missing_required_parameter", "messages"
            )
        fmt = body.get("response_format")
        schema = fmt.get("json_schema") if isinstance(fmt, dict) else None
        if not (
            isinstance(fmt, dict)
            and fmt.get("type") == "json_schema"
            and isinstance(schema, dict)
            and schema.get("name") == SCHEMA_NAME
            and schema.get("strict") is True
        ):
            return _bad_request(
                f"This simulator answers only response_format json_schema '{SCHEMA_NAME}' with strict: true.",
                "invalid_value",
                "response_format",
            )
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = _text(users[-1].get("content")) if users else ""
        if options.invalid_json:
            content = NOT_JSON
        elif options.break_schema:
            content = OFF_SCHEMA
        else:
            content = json.dumps(simulated_rating(prompt))
        return web.json_response(_completion(model, prompt, content))

    def _failure(self, status: int) -> web.Response:
        kind, code, message = _REJECTIONS.get(
            status,
            ("server_error", "server_error", "Simulated server error.")
            if status >= 500
            else ("invalid_request_error", None, "Simulated request error."),
        )
        return _error(status, message, kind, code)


def _completion(model: str, prompt: str, content: str) -> dict[str, Any]:
    """A ``chat.completion`` object as OpenAI returns it (``openai.types.chat.ChatCompletion``)."""
    digest = hashlib.sha256(f"{model}\n{prompt}\n{content}".encode()).hexdigest()
    prompt_tokens, completion_tokens = max(1, len(prompt) // 4), max(1, len(content) // 4)
    return {
        "id": f"chatcmpl-sim{digest[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "service_tier": "default",
        "system_fingerprint": "fp_parley_sim",
    }
