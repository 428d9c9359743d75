"""The rating simulator (relay.simulator.rating): OpenAI's Chat Completions shape, determinism, faults."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from relay.config import Secret
from relay.errors import JobError
from relay.simulator.rating import RatingSimulator, RatingSimulatorOptions, simulated_rating
from relay.worker.rating_model import RESPONSE_FORMAT, RatingModel
from relay.worker.rubric import InvalidAnswer, build_prompt, parse_answer
from relay.worker.speech import speech_metrics

MODEL = "gpt-4.1-mini"


@dataclass
class Row:
    speaker: str
    text: str
    start_ms: int
    end_ms: int


CAFE = [
    Row("coach", "Hello! What would you like?", 0, 2000),
    Row("learner", "Um, I would like a coffee and a croissant, please.", 2600, 6000),
    Row("coach", "Anything else?", 6300, 7500),
    Row("learner", "No, thank you. How much is it?", 8000, 10000),
]
SHORT = [
    Row("coach", "Hello! What would you like?", 0, 2000),
    Row("learner", "Tea.", 6600, 7000),
]


def request_body(rows: list[Row], **changes: Any) -> dict[str, Any]:
    prompt = build_prompt(
        topic_title="Ordering at a café",
        difficulty="beginner",
        metrics=speech_metrics(rows).as_dict(),
        segments=rows,
    )
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}],
        "response_format": RESPONSE_FORMAT,
    }
    body.update(changes)
    return body


@pytest.fixture
async def sim() -> AsyncIterator[RatingSimulator]:
    async with RatingSimulator() as server:
        yield server


@pytest.fixture
async def sdk(sim: RatingSimulator) -> AsyncIterator[AsyncOpenAI]:
    """The SDK as Parley uses it, validating every answer strictly against its own types."""
    client = AsyncOpenAI(
        api_key="sk-test", base_url=sim.base_url, max_retries=0, timeout=5, _strict_response_validation=True
    )
    yield client
    await client.close()


async def create(client: AsyncOpenAI, body: dict[str, Any]) -> ChatCompletion:
    return await client.chat.completions.create(**body)


async def test_the_answer_is_a_chat_completion_the_sdk_accepts(
    sim: RatingSimulator, sdk: AsyncOpenAI
) -> None:
    """Raw JSON parses into openai.types.chat.ChatCompletion, the SDK client accepts it in strict mode,
    and its content is a valid rating with the requested model."""
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{sim.base_url}/chat/completions", json=request_body(CAFE))
        assert resp.status == 200 and resp.content_type == "application/json"
        raw = await resp.json()
    parsed = ChatCompletion.model_validate(raw)
    assert parsed.object == "chat.completion" and parsed.model == MODEL
    assert parsed.choices[0].finish_reason == "stop" and parsed.choices[0].message.role == "assistant"
    assert parsed.usage is not None and parsed.usage.total_tokens > 0

    completion = await create(sdk, request_body(CAFE))
    assert isinstance(completion, ChatCompletion)
    rating = parse_answer(completion.choices[0].message.content)
    assert set(rating.scores) == {"fluency", "vocabulary", "grammar", "task"}
    assert rating.feedback.startswith("Simulated rating.")
    assert "croissant" not in rating.feedback  # numbers only, never the learner's words
    assert sim.calls == 2
    assert (
        sim.last_request is not None and sim.last_request["response_format"]["json_schema"]["strict"] is True
    )


async def test_the_same_request_gets_the_same_rating_and_another_transcript_another(
    sim: RatingSimulator, sdk: AsyncOpenAI
) -> None:
    """Deterministic: the same request twice gives the same content; a different transcript, other scores."""
    first = (await create(sdk, request_body(CAFE))).choices[0].message.content
    again = (await create(sdk, request_body(CAFE))).choices[0].message.content
    other = (await create(sdk, request_body(SHORT))).choices[0].message.content
    assert first == again
    assert parse_answer(first).scores != parse_answer(other).scores
    # Equal metrics, other words: the hash of the learner's lines still tells them apart.
    twin = [dataclasses.replace(r, text=r.text.replace("coffee", "tea")) for r in CAFE]
    assert speech_metrics(twin) == speech_metrics(CAFE)
    assert simulated_rating(request_body(twin)["messages"][1]["content"]) != simulated_rating(
        request_body(CAFE)["messages"][1]["content"]
    )


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (500, openai.InternalServerError, "server_error"),
        (503, openai.InternalServerError, "server_error"),
        (429, openai.RateLimitError, "requests"),
        (401, openai.AuthenticationError, "invalid_request_error"),
        (404, openai.NotFoundError, "invalid_request_error"),
    ],
)
async def test_failing_every_call_with_a_status(
    sim: RatingSimulator, sdk: AsyncOpenAI, status: int, error: type[openai.APIStatusError], kind: str
) -> None:
    """fail_status answers every call with that status and OpenAI's error body, until it is unset."""
    sim.options = RatingSimulatorOptions(fail_status=status)
    for _ in range(2):
        with pytest.raises(error) as caught:
            await create(sdk, request_body(CAFE))
        assert caught.value.status_code == status and caught.value.type == kind
        assert isinstance(caught.value.body, dict) and caught.value.body["message"]
    sim.options = RatingSimulatorOptions()
    await create(sdk, request_body(CAFE))
    assert sim.calls == 3


async def test_a_delay_longer_than_the_timeout_times_the_client_out(sim: RatingSimulator) -> None:
    """delay_s holds each answer back; a client with a shorter timeout gets APITimeoutError."""
    sim.options = RatingSimulatorOptions(delay_s=2.0)
    async with AsyncOpenAI(api_key="sk-test", base_url=sim.base_url, max_retries=0, timeout=0.2) as client:
        with pytest.raises(openai.APITimeoutError):
            await create(client, request_body(CAFE))
    assert sim.calls == 1


async def test_content_that_is_not_json_or_breaks_the_schema(sim: RatingSimulator, sdk: AsyncOpenAI) -> None:
    """invalid_json and break_schema answer a well-formed completion whose content is refused."""
    sim.options = RatingSimulatorOptions(invalid_json=True)
    completion = await create(sdk, request_body(CAFE))
    with pytest.raises(InvalidAnswer) as caught:
        parse_answer(completion.choices[0].message.content)
    assert caught.value.kind == "invalid_json"

    sim.options = dataclasses.replace(sim.options, invalid_json=False, break_schema=True)
    content = (await create(sdk, request_body(CAFE))).choices[0].message.content
    assert content is not None
    json.loads(content)  # valid JSON ...
    with pytest.raises(InvalidAnswer) as caught:
        parse_answer(content)
    assert caught.value.kind == "schema_mismatch"  # ... of the wrong shape
    assert sim.calls == 2


async def test_the_rating_model_maps_each_fault_to_its_job_error(sim: RatingSimulator) -> None:
    """Through RatingModel: 5xx, 429, timeouts and invalid answers are retryable; 4xx refusals are not."""
    model = RatingModel(base_url=sim.base_url, api_key=Secret("sk-test"), model=MODEL, timeout_s=0.3)
    try:
        rated = await model.rate(
            topic_title="Café", difficulty="beginner", metrics=speech_metrics(CAFE).as_dict(), segments=CAFE
        )
        assert rated.model == MODEL and all(0 <= v <= 100 for v in rated.scores.values())
        for options, code, retryable in (
            (RatingSimulatorOptions(fail_status=500), "rating_model_unavailable", True),
            (RatingSimulatorOptions(fail_status=429), "rating_model_rate_limited", True),
            (RatingSimulatorOptions(delay_s=1.0), "rating_model_timeout", True),
            (RatingSimulatorOptions(invalid_json=True), "rating_invalid_answer", True),
            (RatingSimulatorOptions(break_schema=True), "rating_invalid_answer", True),
            (RatingSimulatorOptions(fail_status=400), "rating_model_refused", False),
            (RatingSimulatorOptions(fail_status=401), "rating_model_refused", False),
            (RatingSimulatorOptions(fail_status=403), "rating_model_refused", False),
            (RatingSimulatorOptions(fail_status=404), "rating_model_refused", False),
        ):
            sim.options = options
            with pytest.raises(JobError) as caught:
                await model.rate(topic_title="Café", difficulty="beginner", metrics={}, segments=CAFE)
            assert (caught.value.code, caught.value.retryable) == (code, retryable), options
    finally:
        await model.aclose()
    async with RatingSimulator() as gone:
        url = gone.base_url
    model = RatingModel(base_url=url, api_key=Secret("sk-test"), model=MODEL, timeout_s=1)
    try:
        with pytest.raises(JobError) as caught:
            await model.rate(topic_title="Café", difficulty="beginner", metrics={}, segments=CAFE)
        assert (caught.value.code, caught.value.retryable) == ("rating_model_unavailable", True)
    finally:
        await model.aclose()


async def test_requests_it_cannot_answer_get_openais_400(sim: RatingSimulator, sdk: AsyncOpenAI) -> None:
    """Another schema, no strict flag, or no messages: 400 invalid_request_error naming the parameter."""
    other = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": {}}}
    loose = {"type": "json_schema", "json_schema": {**RESPONSE_FORMAT["json_schema"], "strict": False}}
    for body, param in (
        (request_body(CAFE, response_format=other), "response_format"),
        (request_body(CAFE, response_format=loose), "response_format"),
        (request_body(CAFE, response_format={"type": "text"}), "response_format"),
        (request_body(CAFE, messages=[]), "messages"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await create(sdk, body)
        assert caught.value.param == param


def test_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="fail_status"):
        RatingSimulatorOptions(fail_status=200)
    with pytest.raises(ValueError, match="delay_s"):
        RatingSimulatorOptions(delay_s=-1)
