"""Shared fixtures: settings on a temporary data dir, both database engines, both object stores."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from relay.app import GC_FREEZE, build_app
from relay.config import Settings
from relay.security.passwords import PasswordHasher
from storage import migrate
from storage.db import Database
from tests.services import fresh_postgres_database

# tests.leakscan captures every log record of the run for tests/test_leak_scan.py (SC-004).
pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_oidc", "tests.leakscan"]

# scrypt at n=2**10 keeps API tests quick; tests/unit/test_passwords.py covers the real cost.
FAST_PASSWORDS = PasswordHasher(log2_n=10)


@pytest.fixture(scope="session", autouse=True)
def _one_gc_freeze_for_the_session() -> Iterator[None]:
    """Apps in one process share one gc freeze (relay.app.GcFreeze): held for the whole run, no app
    start-up collects the test process's objects again (0.2-0.4 s each, minutes over the suite)."""
    with GC_FREEZE.holding():
        yield


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database on each engine: a SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'parley.db'}"
    else:
        async with fresh_postgres_database() as url:
            yield url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A migrated database on each engine."""
    db = Database(database_url)
    await migrate.upgrade(db)
    yield db
    await db.aclose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded defaults on a temporary data dir (SQLite, local objects, simulator upstream)."""
    return Settings.from_env({"PARLEY_DATA_DIR": str(tmp_path / "data")}, dotenv=None)


@pytest.fixture
async def migrated_settings(settings: Settings) -> Settings:
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db)
    finally:
        await db.aclose()
    return settings


@pytest.fixture
async def client(migrated_settings: Settings, aiohttp_client: AiohttpClient) -> TestClient:  # type: ignore[type-arg]
    """The whole app on a real loopback socket, on embedded defaults."""
    return await aiohttp_client(build_app(migrated_settings, passwords=FAST_PASSWORDS))


@pytest.fixture
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves tasks running on its event loop after its fixtures closed."""
    yield
    current = asyncio.current_task()
    # Tasks cancelled during teardown need a few loop turns to unwind (aioice's consent check sits
    # in a wait_for that takes two); a task that is still running after a second has leaked.
    deadline = asyncio.get_running_loop().time() + 1.0
    while True:
        await asyncio.sleep(0.01)
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not leaked or asyncio.get_running_loop().time() >= deadline:
            break
    assert not leaked, f"leaked tasks: {sorted(_describe(t) for t in leaked)}"


def _describe(task: asyncio.Task[Any]) -> str:
    """A leaked task's name, coroutine and owner (for a socket: its ports and state): enough to find
    which connection it belongs to from a CI log alone."""
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    owner = frame.f_locals.get("self") if frame is not None else None
    parts = [task.get_name(), getattr(coro, "__qualname__", type(coro).__name__)]
    if owner is not None:
        parts.append(f"owner={type(owner).__module__}.{type(owner).__qualname__}")
        for attr in ("local_address", "remote_address", "state", "id"):
            with contextlib.suppress(Exception):
                value = getattr(owner, attr)
                if value is not None and not callable(value):
                    parts.append(f"{attr}={value}")
    return " ".join(parts)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # First in the list means set up first and torn down last, after every other fixture closed.
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.fixturenames.insert(0, "_no_leaked_tasks")
