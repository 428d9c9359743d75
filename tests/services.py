"""Test services: a fresh PostgreSQL database per test, failing (never skipping) when unreachable."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import asyncpg  # type: ignore[import-untyped]
import pytest

POSTGRES_ADMIN_URL: Final = os.environ.get(
    "PARLEY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """Create an empty database for one test, yield its SQLAlchemy URL, drop it afterwards."""
    name = "parley_test_" + secrets.token_hex(6)
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at PARLEY_TEST_POSTGRES_URL ({type(exc).__name__}); "
            "run `make services` or point PARLEY_TEST_POSTGRES_URL at a server",
            pytrace=False,
        )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
