"""The topic catalogue: public reads for signed-in learners, changes for administrators."""

from __future__ import annotations

import logging
from typing import Any, Literal

from aiohttp import web
from pydantic import Field, field_validator

from relay.api.body import Schema, read_json
from relay.api.deps import current_principal, require_admin
from relay.api.views import topic_view
from relay.errors import Conflict, NotFound
from relay.keys import DATABASE
from storage import topics

__all__ = ["routes"]

log = logging.getLogger("relay.api.topics")
routes = web.RouteTableDef()

Difficulty = Literal["beginner", "intermediate", "advanced"]


class TurnDetection(Schema):
    """What the live session sends upstream as ``audio.input.turn_detection`` (GA server VAD)."""

    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=2000)
    silence_duration_ms: int = Field(600, ge=100, le=5000)
    create_response: bool = True
    interrupt_response: bool = True


Text = Field(min_length=1, max_length=500)


class TopicFields(Schema):
    title: str = Field(min_length=1, max_length=200)
    difficulty: Difficulty
    prompts: list[str] = Field(min_length=2, max_length=20)
    hints: list[str] = Field(default_factory=list, max_length=20)
    instructions: str = Field(min_length=1, max_length=8000)
    turn_detection: TurnDetection = Field(default_factory=lambda: TurnDetection.model_validate({}))

    @field_validator("prompts", "hints")
    @classmethod
    def _non_blank(cls, values: list[str]) -> list[str]:
        if any(not v.strip() or len(v) > 500 for v in values):
            raise ValueError("each entry must be 1-500 characters and not blank")
        return values


class NewTopic(TopicFields):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}[a-z0-9]$")


class TopicChanges(Schema):
    title: str | None = Field(None, min_length=1, max_length=200)
    difficulty: Difficulty | None = None
    prompts: list[str] | None = Field(None, min_length=2, max_length=20)
    hints: list[str] | None = Field(None, max_length=20)
    instructions: str | None = Field(None, min_length=1, max_length=8000)
    turn_detection: TurnDetection | None = None


def _fields(body: Schema) -> dict[str, Any]:
    data = body.model_dump(exclude_unset=True)
    if isinstance(data.get("turn_detection"), dict):
        data["turn_detection"] = TurnDetection.model_validate(data["turn_detection"]).model_dump()
    return data


@routes.get("/v1/topics")
async def list_topics(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    async with request.app[DATABASE].sessions() as s:
        rows = await topics.list_topics(s, include_retired=principal.is_admin and "all" in request.query)
    return web.json_response({"topics": [topic_view(t, admin=principal.is_admin) for t in rows]})


@routes.get("/v1/topics/{topic_id}")
async def get_topic(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    async with request.app[DATABASE].sessions() as s:
        topic = await topics.get_topic(s, request.match_info["topic_id"], include_retired=principal.is_admin)
    if topic is None:
        raise NotFound("No such topic.", code="topic_not_found")
    return web.json_response(topic_view(topic, admin=principal.is_admin))


@routes.post("/v1/topics")
async def create_topic(request: web.Request) -> web.Response:
    await require_admin(request)
    body = await read_json(request, NewTopic)
    try:
        async with request.app[DATABASE].sessions.begin() as s:
            topic = await topics.create_topic(s, **_fields(body))
    except topics.TopicExists:
        raise Conflict("A topic with this id exists already.", code="topic_exists") from None
    log.info("topic.created", extra={"topic_id": topic.id})
    return web.json_response(topic_view(topic, admin=True), status=201)


@routes.patch("/v1/topics/{topic_id}")
async def update_topic(request: web.Request) -> web.Response:
    await require_admin(request)
    body = await read_json(request, TopicChanges)
    async with request.app[DATABASE].sessions.begin() as s:
        topic = await topics.get_topic(s, request.match_info["topic_id"], include_retired=True)
        if topic is None:
            raise NotFound("No such topic.", code="topic_not_found")
        await topics.update_topic(s, topic, **_fields(body))
    log.info("topic.updated", extra={"topic_id": topic.id})
    return web.json_response(topic_view(topic, admin=True))


@routes.delete("/v1/topics/{topic_id}")
async def retire_topic(request: web.Request) -> web.Response:
    """Retire a topic: gone from the catalogue, still referenced by the sessions that used it."""
    await require_admin(request)
    async with request.app[DATABASE].sessions.begin() as s:
        topic = await topics.get_topic(s, request.match_info["topic_id"], include_retired=True)
        if topic is None:
            raise NotFound("No such topic.", code="topic_not_found")
        await topics.retire_topic(s, topic)
    log.info("topic.retired", extra={"topic_id": topic.id})
    return web.Response(status=204)
