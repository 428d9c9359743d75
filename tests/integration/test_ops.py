"""Operations endpoints and error answers of the running app."""

from __future__ import annotations

import asyncio
import gc
import re
import subprocess
import sys
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from relay.app import build_app
from relay.config import Settings
from relay.keys import METRICS
from storage import migrate
from storage.db import Database
from tests.conftest import FAST_PASSWORDS
from tests.fixtures_s3 import _remove_bucket
from tests.services import POSTGRES_ADMIN_URL, fresh_postgres_database


async def test_healthz_answers_ok(client: TestClient) -> None:  # type: ignore[type-arg]
    """GET /healthz is 200 {"status": "ok"}."""
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_readyz_names_database_objects_and_upstream(client: TestClient) -> None:  # type: ignore[type-arg]
    """GET /readyz is 200 with database and objects ok, and the simulator as upstream by default."""
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"database": "ok", "objects": "ok", "upstream": "simulator"}


async def test_unknown_route_is_problem_json(client: TestClient) -> None:  # type: ignore[type-arg]
    """A missing route answers 404 as application/problem+json with a stable code."""
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["code"] == "not_found"
    assert body["status"] == 404
    assert set(body) >= {"type", "title", "status", "detail", "code"}


async def test_wrong_method_is_problem_json_with_allow(client: TestClient) -> None:  # type: ignore[type-arg]
    """A wrong method answers 405 problem+json and keeps the Allow header."""
    resp = await client.post("/healthz", data=b"{}")
    assert resp.status == 405
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["code"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]


async def test_metrics_count_requests_by_route_and_status(client: TestClient) -> None:  # type: ignore[type-arg]
    """/metrics exposes request counts and latency by route template and status, and process metrics."""
    for _ in range(3):
        await client.get("/healthz")
    await client.get("/v1/nothing-here")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'parley_http_requests_total{method="GET",route="/healthz",status="200"} 3.0' in text
    assert 'parley_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'parley_http_request_duration_seconds_count{method="GET",route="/healthz"} 3.0' in text
    assert "process_resident_memory_bytes" in text


async def _start(aiohttp_client: AiohttpClient, tmp_path: Path, **env: str) -> TestClient:  # type: ignore[type-arg]
    settings = Settings.from_env({"PARLEY_DATA_DIR": str(tmp_path / "data"), **env}, dotenv=None)
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db)
    finally:
        await db.aclose()
    return await aiohttp_client(build_app(settings))


async def test_production_backends_are_ready(
    aiohttp_client: AiohttpClient, tmp_path: Path, s3_store_url: str
) -> None:
    """On PostgreSQL and a real S3 server the app starts and /readyz is 200."""
    async with fresh_postgres_database() as db_url:
        client = await _start(
            aiohttp_client, tmp_path, PARLEY_DATABASE_URL=db_url, PARLEY_OBJECT_STORE_URL=s3_store_url
        )
        resp = await client.get("/readyz")
        assert resp.status == 200
        assert await resp.json() == {"database": "ok", "objects": "ok", "upstream": "simulator"}
        await client.close()


async def test_readyz_names_the_database_when_it_goes_away(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """When the PostgreSQL database disappears, /readyz is 503 naming `database`, and /healthz stays 200."""
    async with fresh_postgres_database() as db_url:
        client = await _start(aiohttp_client, tmp_path, PARLEY_DATABASE_URL=db_url)
        name = db_url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        resp = await client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert body["database"] == "unavailable" and body["objects"] == "ok"
        assert body["failing"] == ["database"]
        assert (await client.get("/healthz")).status == 200
        metrics = await (await client.get("/metrics")).text()
        assert 'parley_dependency_up{dependency="database"} 0.0' in metrics
        await client.close()


async def test_readyz_names_the_object_store_when_its_bucket_goes_away(
    aiohttp_client: AiohttpClient, tmp_path: Path, s3_store_url: str
) -> None:
    """When the S3 bucket is removed under a running app, /readyz is 503 naming `objects`."""
    client = await _start(aiohttp_client, tmp_path, PARLEY_OBJECT_STORE_URL=s3_store_url)
    assert (await client.get("/readyz")).status == 200
    await asyncio.to_thread(_remove_bucket, s3_store_url)
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["objects"] == "unavailable" and body["database"] == "ok"
    assert body["failing"] == ["objects"]


async def test_embedded_simulator_serves_the_sdk(client: TestClient) -> None:  # type: ignore[type-arg]
    """Without a key the app runs the simulator on loopback, and the official SDK gets a session from it."""
    from relay.keys import UPSTREAM

    upstream = client.app[UPSTREAM]
    assert upstream.kind == "simulator"
    assert upstream.websocket_base_url is not None and upstream.websocket_base_url.startswith(
        "ws://127.0.0.1:"
    )
    sdk = upstream.client()
    try:
        async with sdk.realtime.connect(model="gpt-realtime") as conn:
            first = await conn.recv()
            assert first.type == "session.created"
    finally:
        await sdk.close()


async def test_configured_upstream_is_reported_as_openai(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """With PARLEY_UPSTREAM_URL set, no simulator starts and /readyz names `openai`."""
    client = await _start(aiohttp_client, tmp_path, PARLEY_UPSTREAM_URL="ws://127.0.0.1:9/v1")
    body = await (await client.get("/readyz")).json()
    assert body["upstream"] == "openai"


async def test_started_app_freezes_start_up_objects_and_exports_gc_pauses(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    """After start-up the long-lived objects are frozen out of collections and GC pauses are exported."""
    metrics = client.app[METRICS]
    assert gc.get_freeze_count() > 10_000
    assert metrics.gc_pauses.hook in gc.callbacks
    gc.collect()
    text = await (await client.get("/metrics")).text()
    count = re.search(r'^parley_gc_pause_seconds_count\{generation="2"\} (\S+)$', text, re.M)
    assert count is not None and float(count.group(1)) >= 1


async def test_closed_apps_leave_gc_hooks_and_the_freeze_as_they_were(migrated_settings: Settings) -> None:
    """Starting and closing apps one after another leaves gc.callbacks and the shared freeze as they
    were (this process holds it for the session); an app built but never started hooks nothing."""
    callbacks = list(gc.callbacks)
    frozen = gc.get_freeze_count()
    build_app(migrated_settings, passwords=FAST_PASSWORDS)
    assert gc.callbacks == callbacks
    for _ in range(3):
        app = build_app(migrated_settings, passwords=FAST_PASSWORDS)
        async with TestClient(TestServer(app)) as started:
            assert (await started.get("/healthz")).status == 200
            assert len(gc.callbacks) == len(callbacks) + 1
        assert gc.callbacks == callbacks
        assert gc.get_freeze_count() == frozen


def test_the_first_holder_of_the_gc_freeze_freezes_and_the_last_unfreezes() -> None:
    """GcFreeze in a fresh process: one collection and freeze for any number of holders, an
    unfreeze when the last lets go, and a release too many does nothing."""
    script = """
import gc
from relay.app import GcFreeze
f = GcFreeze()
assert gc.get_freeze_count() == 0 and not f.held
assert f.hold() is True
frozen = gc.get_freeze_count()
assert frozen > 10_000 and f.held
assert f.hold() is False and gc.get_freeze_count() == frozen
f.release()
assert gc.get_freeze_count() == frozen and f.held
f.release()
assert gc.get_freeze_count() == 0 and not f.held
f.release()
with f.holding():
    assert gc.get_freeze_count() > 10_000
assert gc.get_freeze_count() == 0
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
