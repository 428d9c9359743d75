"""Fixtures for API tests that must hold on both database engines and both object stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from relay.app import build_app
from relay.config import Settings
from storage import migrate
from storage.db import Database
from tests.conftest import FAST_PASSWORDS


@pytest.fixture
def app_env() -> dict[str, str]:
    """More settings for ``both_client`` (e.g. ``PARLEY_RETENTION_DAYS``); override it in a test module."""
    return {}


@pytest.fixture
async def both_client(
    request: pytest.FixtureRequest,
    database_url: str,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    app_env: dict[str, str],
) -> TestClient:  # type: ignore[type-arg]
    """The whole app on SQLite with the local object store, and on PostgreSQL with S3 (moto)."""
    if database_url.startswith("sqlite"):
        objects = (tmp_path / "objects").as_uri()
    else:
        objects = request.getfixturevalue("s3_store_url")
    settings = Settings.from_env(
        {
            "PARLEY_DATA_DIR": str(tmp_path / "data"),
            "PARLEY_DATABASE_URL": database_url,
            "PARLEY_OBJECT_STORE_URL": objects,
            **app_env,
        },
        dotenv=None,
    )
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db)
    finally:
        await db.aclose()
    return await aiohttp_client(build_app(settings, passwords=FAST_PASSWORDS))
