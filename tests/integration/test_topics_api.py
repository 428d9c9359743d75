"""The topic catalogue: the seeded topics, reads, and administrators' changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from relay.app import build_app
from relay.config import Settings
from storage import migrate
from storage.db import Database
from tests.api import Learner, problem, signup
from tests.conftest import FAST_PASSWORDS

ADMIN = "coach-admin@example.org"


@pytest.fixture
async def admin_client(aiohttp_client: AiohttpClient, tmp_path: Path) -> TestClient:  # type: ignore[type-arg]
    settings = Settings.from_env(
        {
            "PARLEY_DATA_DIR": str(tmp_path / "data"),
            "PARLEY_ADMIN_EMAILS": f"other@example.org, {ADMIN.upper()}",
        },
        dotenv=None,
    )
    db = Database(settings.database_url)
    await migrate.upgrade(db)
    await db.aclose()
    return await aiohttp_client(build_app(settings, passwords=FAST_PASSWORDS))


NEW_TOPIC = {
    "id": "market-haggling",
    "title": "Haggling at a market",
    "difficulty": "intermediate",
    "prompts": ["How much is this?", "Can you do a better price?"],
    "hints": ["That's too expensive", "I'll take two"],
    "instructions": "You are a market trader. Bargain with the learner.",
    "turn_detection": {"type": "server_vad", "silence_duration_ms": 700},
}


async def test_seeded_catalogue_covers_three_difficulties(client: TestClient) -> None:  # type: ignore[type-arg]
    """A fresh install lists at least eight topics across beginner, intermediate and advanced."""
    learner = await signup(client)
    resp = await client.get("/v1/topics", headers=learner.auth)
    assert resp.status == 200
    topics = (await resp.json())["topics"]
    assert len(topics) >= 8
    assert {t["difficulty"] for t in topics} == {"beginner", "intermediate", "advanced"}
    for t in topics:
        assert set(t) == {"id", "title", "prompts", "difficulty", "hints"}
        assert len(t["prompts"]) >= 2 and t["hints"] and t["title"]


async def test_topic_by_id_and_unknown_topic(client: TestClient) -> None:  # type: ignore[type-arg]
    """GET /v1/topics/{id} answers the topic; an unknown id answers 404."""
    learner = await signup(client)
    resp = await client.get("/v1/topics/cafe-order", headers=learner.auth)
    assert resp.status == 200
    assert (await resp.json())["title"] == "Ordering at a café"
    await problem(await client.get("/v1/topics/no-such-topic", headers=learner.auth), 404, "topic_not_found")


async def test_topics_need_authentication(client: TestClient) -> None:  # type: ignore[type-arg]
    """The catalogue answers 401 without credentials."""
    await problem(await client.get("/v1/topics"), 401, "unauthorized")


async def test_learners_cannot_change_topics(client: TestClient) -> None:  # type: ignore[type-arg]
    """Creating, editing or retiring a topic as a learner answers 403 forbidden."""
    learner = await signup(client)
    await problem(await client.post("/v1/topics", json=NEW_TOPIC, headers=learner.auth), 403, "forbidden")
    await problem(
        await client.patch("/v1/topics/cafe-order", json={"title": "x"}, headers=learner.auth),
        403,
        "forbidden",
    )
    await problem(await client.delete("/v1/topics/cafe-order", headers=learner.auth), 403, "forbidden")


async def test_admin_creates_edits_and_retires_a_topic(admin_client: TestClient) -> None:  # type: ignore[type-arg]
    """An admin's new topic is listed with its instructions; edits show; retiring hides it from learners."""
    admin = await signup(admin_client, ADMIN)
    learner = await signup(admin_client)
    resp = await admin_client.post("/v1/topics", json=NEW_TOPIC, headers=admin.auth)
    assert resp.status == 201
    created = await resp.json()
    assert created["instructions"] == NEW_TOPIC["instructions"]
    assert created["turn_detection"]["silence_duration_ms"] == 700
    assert created["turn_detection"]["prefix_padding_ms"] == 300  # defaults filled in
    await problem(
        await admin_client.post("/v1/topics", json=NEW_TOPIC, headers=admin.auth), 409, "topic_exists"
    )

    resp = await admin_client.patch(
        "/v1/topics/market-haggling", json={"title": "Haggling", "difficulty": "advanced"}, headers=admin.auth
    )
    assert resp.status == 200
    seen = await (await admin_client.get("/v1/topics/market-haggling", headers=learner.auth)).json()
    assert (seen["title"], seen["difficulty"]) == ("Haggling", "advanced")
    assert "instructions" not in seen  # learners see the catalogue, not the coach's script

    assert (await admin_client.delete("/v1/topics/market-haggling", headers=admin.auth)).status == 204
    listed = await (await admin_client.get("/v1/topics", headers=learner.auth)).json()
    assert "market-haggling" not in {t["id"] for t in listed["topics"]}
    await problem(
        await admin_client.get("/v1/topics/market-haggling", headers=learner.auth), 404, "topic_not_found"
    )
    resp = await admin_client.post("/v1/sessions", json={"topic_id": "market-haggling"}, headers=learner.auth)
    await problem(resp, 422, "invalid_request")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"difficulty": "expert"}, "difficulty"),
        ({"prompts": ["only one"]}, "prompts"),
        ({"turn_detection": {"silence_duration_ms": 10}}, "turn_detection.silence_duration_ms"),
        ({"turn_detection": {"type": "semantic_vad"}}, "turn_detection.type"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_invalid_topic_changes_are_422(
    admin_client: TestClient,  # type: ignore[type-arg]
    change: dict[str, object],
    field: str,
) -> None:
    """Invalid topic fields answer 422 naming the field."""
    admin: Learner = await signup(admin_client, ADMIN)
    resp = await admin_client.patch("/v1/topics/cafe-order", json=change, headers=admin.auth)
    body = await problem(resp, 422, "invalid_request")
    assert body["field"] == field
