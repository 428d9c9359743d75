"""The rating model: one Chat Completions call through the official ``openai`` SDK, checked strictly.

Where it points (:func:`open_rating_model`): OpenAI when ``OPENAI_API_KEY`` is set, or any
OpenAI-compatible API at ``PARLEY_RATING_URL``; with neither, Parley's own rating simulator
(:class:`relay.simulator.rating.RatingSimulator`) on a loopback port, living exactly as long as the
model. The model is ``PARLEY_RATING_MODEL``, and a call gets ``PARLEY_RATING_TIMEOUT`` seconds.

A failure becomes a :class:`~relay.errors.JobError` whose ``retryable`` tells the job queue what to
do (the SDK itself never retries: ``max_retries=0``, the queue's backoff does):

- no answer within the timeout: ``rating_model_timeout``, retried;
- no connection, or HTTP 5xx, 408 or 409: ``rating_model_unavailable``, retried;
- HTTP 429: ``rating_model_rate_limited``, retried;
- an answer that is not a valid rating (:func:`relay.worker.rubric.parse_answer`):
  ``rating_invalid_answer``, retried, since models vary between calls;
- any other HTTP 4xx (400, 401, 403, 404...): ``rating_model_refused``, not retried: the same call
  would fail the same way (a wrong key, model or URL), so the job goes dead at once.

Neither the prompt nor the answer is logged: both carry what the learner said.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Final

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionSystemMessageParam, ChatCompletionUserMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

from relay.config import MAX_RATING_MODEL_LEN, Secret, Settings
from relay.errors import JobError
from relay.simulator.rating import RatingSimulator
from relay.upstream import LOCAL_KEY
from relay.worker.rubric import ANSWER_SCHEMA, SCHEMA_NAME, InvalidAnswer, build_prompt, parse_answer
from relay.worker.speech import SegmentLike

__all__ = ["OPENAI_BASE_URL", "ModelRating", "RatingModel", "job_error", "open_rating_model"]

log = logging.getLogger("relay.worker.rating_model")

#: Where OpenAI's API is; passed explicitly so no environment variable redirects the key elsewhere.
OPENAI_BASE_URL: Final = "https://api.openai.com/v1"
#: Statuses besides 5xx worth another try later (the SDK's own retry rule; the queue does the retrying).
RETRY_STATUSES: Final = frozenset({408, 409, 429})

RESPONSE_FORMAT: Final = ResponseFormatJSONSchema(
    type="json_schema", json_schema={"name": SCHEMA_NAME, "strict": True, "schema": ANSWER_SCHEMA}
)


@dataclass(frozen=True, slots=True)
class ModelRating:
    """What the model said, validated: four scores (0-100), feedback, and which model said it."""

    scores: dict[str, int]
    feedback: str
    model: str


def job_error(exc: BaseException) -> JobError:
    """The :class:`JobError` of a failed rating call (see the module's table); content never included."""
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return JobError(
            "no answer in time from the rating model", retryable=True, code="rating_model_timeout"
        )
    if isinstance(exc, openai.APIConnectionError):
        return JobError("cannot reach the rating model", retryable=True, code="rating_model_unavailable")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            return JobError("rating model rate limited", retryable=True, code="rating_model_rate_limited")
        if status >= 500 or status in RETRY_STATUSES:
            return JobError(
                f"the rating model failed (HTTP {status})", retryable=True, code="rating_model_unavailable"
            )
        return JobError(
            f"the rating model refused the call (HTTP {status})", retryable=False, code="rating_model_refused"
        )
    if isinstance(exc, InvalidAnswer | openai.APIResponseValidationError):
        kind = exc.kind if isinstance(exc, InvalidAnswer) else "invalid_response"
        return JobError(
            f"the rating model's answer is not a valid rating ({kind})",
            retryable=True,
            code="rating_invalid_answer",
        )
    return JobError("the rating call failed", retryable=True, code="rating_model_unavailable")


class RatingModel:
    """Rates sessions with a text model through the ``openai`` SDK's Chat Completions API.

    Chat Completions rather than Responses: every OpenAI-compatible server (vLLM, Ollama, LiteLLM,
    llama.cpp, Azure...) speaks Chat Completions, so ``PARLEY_RATING_URL`` can point at any of them.
    The answer is constrained by ``response_format`` ``json_schema`` with ``strict: true``
    (:data:`relay.worker.rubric.ANSWER_SCHEMA`) and checked again here, since not every server
    enforces the schema. One instance per process (it holds the HTTP connection pool); close it with
    :meth:`aclose`.
    """

    def __init__(
        self, *, base_url: str, api_key: Secret, model: str, timeout_s: float, kind: str = "openai"
    ) -> None:
        self.kind = kind
        self.model = model
        self.base_url = base_url
        self._timeout_s = timeout_s
        self._client = AsyncOpenAI(
            api_key=api_key.reveal(), base_url=base_url, timeout=timeout_s, max_retries=0
        )

    def __repr__(self) -> str:
        return f"RatingModel(kind={self.kind!r}, model={self.model!r})"

    async def rate(
        self,
        *,
        topic_title: str,
        difficulty: str,
        metrics: Mapping[str, int | float],
        segments: Sequence[SegmentLike],
    ) -> ModelRating:
        """Rate one session; raises :class:`JobError` (see the module's table) when no valid rating came."""
        prompt = build_prompt(
            topic_title=topic_title, difficulty=difficulty, metrics=metrics, segments=segments
        )
        started = time.monotonic()
        try:
            # The SDK's timeout applies per phase (connect, each read); this one bounds the whole call.
            async with asyncio.timeout(self._timeout_s):
                completion = await self._client.chat.completions.create(
                    model=self.model,
                    messages=[
                        ChatCompletionSystemMessageParam(role="system", content=prompt.system),
                        ChatCompletionUserMessageParam(role="user", content=prompt.user),
                    ],
                    response_format=RESPONSE_FORMAT,
                )
            choice = completion.choices[0] if completion.choices else None
            if choice is None:
                raise InvalidAnswer("schema_mismatch", "the completion has no choices")
            if choice.message.refusal:
                raise InvalidAnswer("schema_mismatch", "the model refused to answer")
            answer = parse_answer(choice.message.content)
        except (openai.OpenAIError, TimeoutError, InvalidAnswer) as exc:
            error = job_error(exc)
            status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
            log.warning(
                "rating.model_failed",
                extra={"code": error.code, "http_status": status, "kind": self.kind},
            )
            raise error from None
        log.info(
            "rating.model_answered",
            extra={"kind": self.kind, "duration_ms": round((time.monotonic() - started) * 1000)},
        )
        name = (completion.model or self.model)[:MAX_RATING_MODEL_LEN]
        return ModelRating(answer.scores, answer.feedback, name)

    async def aclose(self) -> None:
        """Close the HTTP connections. Idempotent."""
        await self._client.close()


@asynccontextmanager
async def open_rating_model(settings: Settings) -> AsyncIterator[RatingModel]:
    """The rating model of these settings; an embedded rating simulator lives exactly as long.

    OpenAI (or ``PARLEY_RATING_URL``) when ``OPENAI_API_KEY`` or that URL is set, else the simulator.
    ``OPENAI_API_KEY`` goes to ``PARLEY_RATING_URL`` when both are set; a URL alone gets a placeholder
    key (local OpenAI-compatible servers ignore it).
    """
    async with AsyncExitStack() as stack:
        if settings.rating_kind == "openai":
            base_url = settings.rating_url or OPENAI_BASE_URL
            key = settings.openai_api_key or Secret(LOCAL_KEY)
        else:
            sim = await stack.enter_async_context(RatingSimulator())
            base_url, key = sim.base_url, Secret(LOCAL_KEY)
        model = RatingModel(
            base_url=base_url,
            api_key=key,
            model=settings.rating_model,
            timeout_s=settings.rating_timeout_s,
            kind=settings.rating_kind,
        )
        stack.push_async_callback(model.aclose)
        yield model
