"""Retention: expired sessions are deleted like an owner's delete; the learner's choice wins.

Every test runs on SQLite + the local object store and on PostgreSQL + S3 (``both_client``).
Sessions are made "old" by moving ``ended_at``/``created_at`` back in the database.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select, update

from relay.keys import DATABASE, METRICS, OBJECTS, REGISTRY, RETENTION, SETTINGS
from relay.observability.metrics import Metrics
from relay.worker import retention as worker
from storage.models import AuditEvent, Session, SessionTombstone, utcnow
from storage.objects import ObjectStoreUnavailable
from tests.api import Learner, problem, signup
from tests.integration.recorded import finished_session, new_session, set_status
from tests.integration.test_deletion_api import objects_of, rows_of

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app_env() -> dict[str, str]:
    """A deployment that keeps sessions 30 days (tests of the default override this)."""
    return {"PARLEY_RETENTION_DAYS": "30"}


async def age(client: Client, session_id: str, days: float, *, started: bool = True) -> None:
    """Pretend the session was created (and, if ``started``, ended) ``days`` ago."""
    when = utcnow() - timedelta(days=days)
    async with client.app[DATABASE].sessions.begin() as s:
        await s.execute(
            update(Session)
            .where(Session.id == session_id)
            .values(created_at=when - timedelta(minutes=10), ended_at=when if started else None)
        )


async def patch(client: Client, learner: Learner, session_id: str, body: Any) -> Any:
    return await client.patch(f"/v1/sessions/{session_id}", json=body, headers=learner.auth)


async def exists(client: Client, session_id: str) -> bool:
    async with client.app[DATABASE].sessions() as s:
        return await s.get(Session, session_id) is not None


async def gone(client: Client, session_id: str) -> None:
    """Deleted as DELETE /v1/sessions/{id} deletes: no row, object or spool file; a tombstone."""
    assert set((await rows_of(client, session_id)).values()) == {0}
    assert await objects_of(client, session_id) == []
    assert not (client.app[SETTINGS].spool_dir / session_id).exists()
    async with client.app[DATABASE].sessions() as s:
        assert await s.get(SessionTombstone, session_id) is not None
        audit = (
            (await s.execute(select(AuditEvent).where(AuditEvent.session_id == session_id))).scalars().all()
        )
    assert [a.code for a in audit if a.event == "session.deleted"] == ["retention"]


def deleted_metric(client: Client, outcome: str = "deleted") -> float:
    value = client.app[METRICS].registry.get_sample_value(
        "parley_retention_deleted_sessions_total", {"outcome": outcome}
    )
    return value or 0.0


async def test_expired_sessions_are_deleted_and_the_others_kept(both_client: Client, tmp_path: Path) -> None:
    """Past the deployment's 30 days: deleted with rows, objects and spool; younger, retained,
    still going or another's own longer limit: kept."""
    learner = await signup(both_client)
    expired, _ = await finished_session(both_client, learner, tmp_path / "s1")
    young, _ = await finished_session(both_client, learner, tmp_path / "s2")
    retained, _ = await finished_session(both_client, learner, tmp_path / "s3")
    longer, _ = await finished_session(both_client, learner, tmp_path / "s4")
    never_started = await new_session(both_client, learner)
    going = await new_session(both_client, learner)
    spool = both_client.app[SETTINGS].spool_dir / expired / "learner"
    spool.mkdir(parents=True)
    (spool / "000099.ogg").write_bytes(b"OggS leftover")
    for sid in (expired, retained, longer):
        await age(both_client, sid, 31)
    await age(both_client, young, 29)
    await age(both_client, never_started, 31, started=False)
    await age(both_client, going, 400, started=False)
    await set_status(both_client, going, "reconnecting")
    assert (await patch(both_client, learner, retained, {"retain": True})).status == 200
    assert (await patch(both_client, learner, longer, {"retention_days": 60})).status == 200
    before = deleted_metric(both_client)

    assert await both_client.app[RETENTION].sweep() == 2

    await gone(both_client, expired)
    await gone(both_client, never_started)
    for sid in (young, retained, longer, going):
        assert await exists(both_client, sid), sid
    for sid in (young, retained, longer):
        assert await objects_of(both_client, sid), sid
    assert deleted_metric(both_client) == before + 2
    await problem(await both_client.get(f"/v1/sessions/{expired}", headers=learner.auth), 404, "not_found")
    assert await both_client.app[RETENTION].sweep() == 0  # nothing left to do, nothing else touched


async def test_a_sessions_own_days_override_the_deployment(both_client: Client, tmp_path: Path) -> None:
    """retention_days=2 deletes after 2 days although the deployment keeps 30; null goes back to 30."""
    learner = await signup(both_client)
    short, _ = await finished_session(both_client, learner, tmp_path / "s1")
    reset, _ = await finished_session(both_client, learner, tmp_path / "s2")
    for sid in (short, reset):
        assert (await patch(both_client, learner, sid, {"retention_days": 2})).status == 200
        await age(both_client, sid, 3)
    resp = await patch(both_client, learner, reset, {"retention_days": None})
    assert resp.status == 200
    assert (await resp.json())["retention"]["retention_days"] is None

    assert await both_client.app[RETENTION].sweep() == 1

    await gone(both_client, short)
    assert await exists(both_client, reset)


@pytest.mark.parametrize("app_env", [{}], ids=["default"])
async def test_retention_is_off_by_default(both_client: Client, tmp_path: Path) -> None:
    """Without PARLEY_RETENTION_DAYS nothing is deleted however old, unless a session set its own days."""
    assert both_client.app[SETTINGS].retention_days is None
    learner = await signup(both_client)
    old, _ = await finished_session(both_client, learner, tmp_path / "s1")
    chosen, _ = await finished_session(both_client, learner, tmp_path / "s2")
    never_started = await new_session(both_client, learner)
    await age(both_client, old, 3000)
    await age(both_client, never_started, 3000, started=False)
    assert (await patch(both_client, learner, chosen, {"retention_days": 1})).status == 200
    await age(both_client, chosen, 2)

    assert await both_client.app[RETENTION].sweep() == 1

    assert await exists(both_client, old) and await exists(both_client, never_started)
    assert await objects_of(both_client, old)
    await gone(both_client, chosen)
    view = await (await both_client.get(f"/v1/sessions/{old}", headers=learner.auth)).json()
    assert view["retention"] == {"retain": False, "retention_days": None, "expires_at": None}


async def test_a_live_session_is_skipped_until_it_ends(both_client: Client, tmp_path: Path) -> None:
    """A session this node runs is not deleted while it is in the registry, and is once it left."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "s1")
    await age(both_client, sid, 31)
    registry = both_client.app[REGISTRY]
    registry.add(SimpleNamespace(id=sid))  # type: ignore[arg-type]
    try:
        assert await both_client.app[RETENTION].sweep() == 0
        assert await exists(both_client, sid)
    finally:
        registry.discard(sid)
    assert await both_client.app[RETENTION].sweep() == 1
    await gone(both_client, sid)


async def test_patch_sets_the_retention_choice_and_the_view_shows_it(
    both_client: Client, tmp_path: Path
) -> None:
    """PATCH answers the Session with its retention (retain, retention_days, expires_at); GET agrees."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "s1")
    await age(both_client, sid, 1)
    view = await (await both_client.get(f"/v1/sessions/{sid}", headers=learner.auth)).json()
    ended = view["ended_at"]
    assert view["retention"]["retain"] is False and view["retention"]["retention_days"] is None
    assert view["retention"]["expires_at"] > ended  # 30 days after it ended (the deployment's)

    resp = await patch(both_client, learner, sid, {"retention_days": 7})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["id"] == sid and body["status"] == "ended" and "audio" in body
    assert body["retention"]["retention_days"] == 7
    days = (_parse(body["retention"]["expires_at"]) - _parse(ended)).total_seconds() / 86400
    assert days == pytest.approx(7)

    resp = await patch(both_client, learner, sid, {"retain": True, "retention_days": 3650})
    assert (await resp.json())["retention"] == {"retain": True, "retention_days": 3650, "expires_at": None}
    listed = await (await both_client.get("/v1/sessions", headers=learner.auth)).json()
    assert listed["sessions"][0]["retention"]["retain"] is True
    resp = await patch(both_client, learner, sid, {"retain": False})
    assert (await resp.json())["retention"]["retention_days"] == 3650  # untouched when not sent
    async with both_client.app[DATABASE].sessions() as s:
        codes = (
            await s.execute(
                select(AuditEvent.code)
                .where(AuditEvent.session_id == sid, AuditEvent.event == "session.retention")
                .order_by(AuditEvent.id)
            )
        ).scalars()
        assert list(codes) == ["days", "retain", "days"]


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"retain": "yes"},
        {"retain": 1},
        {"retain": None},
        {"retention_days": 0},
        {"retention_days": 3651},
        {"retention_days": -5},
        {"retention_days": 1.5},
        {"retention_days": 7.0},
        {"retention_days": "7"},
        {"retention_days": True},
        {"keep": True},
        {"retain": True, "visibility": "public"},
    ],
    ids=repr,
)
async def test_patch_refuses_bad_values_with_422(both_client: Client, body: dict[str, Any]) -> None:
    """Wrong types, out-of-range days, unknown fields and an empty change are 422 invalid_request."""
    learner = await signup(both_client)
    sid = await new_session(both_client, learner)
    await problem(await patch(both_client, learner, sid, body), 422, "invalid_request")
    view = await (await both_client.get(f"/v1/sessions/{sid}", headers=learner.auth)).json()
    assert (view["retention"]["retain"], view["retention"]["retention_days"]) == (False, None)
    assert view["visibility"] == "private"


async def test_patch_is_owner_only(both_client: Client) -> None:
    """Another user's session and an unknown one are the same 404; no credentials is 401; bad JSON 400."""
    owner, other = await signup(both_client), await signup(both_client)
    sid = await new_session(both_client, owner)
    await problem(await patch(both_client, other, sid, {"retain": True}), 404, "not_found")
    await problem(await patch(both_client, other, "ses_nope", {"retain": True}), 404, "not_found")
    resp = await both_client.patch(f"/v1/sessions/{sid}", json={"retain": True})
    await problem(resp, 401, "unauthorized")
    resp = await both_client.patch(f"/v1/sessions/{sid}", data=b"{nope", headers=owner.auth)
    await problem(resp, 400, "invalid_json")
    async with both_client.app[DATABASE].sessions() as s:
        assert (await s.get(Session, sid)).retain is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "app_env", [{"PARLEY_RETENTION_DAYS": "1", "PARLEY_RETENTION_SWEEP_SECONDS": "0.05"}], ids=["fast"]
)
async def test_the_app_sweeps_in_the_background_and_stops_cleanly(
    both_client: Client, tmp_path: Path
) -> None:
    """The app's own task deletes an expired session without being asked, and is gone after close."""
    named = [t for t in asyncio.all_tasks() if t.get_name() == "retention:sweeper"]
    assert len(named) == 1 and not named[0].done()
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "s1")
    await age(both_client, sid, 2)
    async with asyncio.timeout(20):
        while await exists(both_client, sid):
            await asyncio.sleep(0.05)
    async with asyncio.timeout(20):
        while await objects_of(both_client, sid) != []:
            await asyncio.sleep(0.05)
    assert both_client.app[METRICS].registry.get_sample_value(
        "parley_retention_sweeps_total", {"outcome": "ok"}
    )
    await both_client.close()
    assert named[0].done()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "retention:sweeper"]


async def test_a_failed_sweep_is_counted_and_the_sweeper_goes_on(
    both_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep that raises (database down) is logged and counted; the next one deletes as usual."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "s1")
    await age(both_client, sid, 31)
    real = worker.expired_sessions
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database unavailable")
        return await real(*args, **kwargs)

    monkeypatch.setattr(worker, "expired_sessions", flaky)
    app = both_client.app
    metrics = Metrics()
    sweeper = worker.RetentionSweeper(
        app[DATABASE], app[OBJECTS], app[SETTINGS].spool_dir, default_days=30, interval_s=0.02,
        is_live=lambda _: False, metrics=metrics,
    )  # fmt: skip
    sweeper.start()

    def count(name: str, outcome: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"outcome": outcome})

    try:
        async with asyncio.timeout(20):
            while not count("parley_retention_deleted_sessions_total", "deleted"):
                await asyncio.sleep(0.02)
    finally:
        await sweeper.aclose()
    await sweeper.aclose()  # idempotent
    assert count("parley_retention_sweeps_total", "failed") == 1
    assert count("parley_retention_deleted_sessions_total", "deleted") == 1
    assert not await exists(both_client, sid)


class FlakyStore:
    """The app's object store, except that ``delete_prefix`` fails while ``down`` is set."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.down = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def delete_prefix(self, prefix: str) -> int:
        if self.down:
            raise ObjectStoreUnavailable("object store down")
        return int(await self._store.delete_prefix(prefix))


async def test_an_incomplete_deletion_is_counted_and_finished_by_the_next_sweep(
    both_client: Client, tmp_path: Path
) -> None:
    """With the object store down the session stays fenced (row and objects kept, counted
    incomplete); the next sweep, with the store back, deletes it."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "s1")
    await age(both_client, sid, 31)
    app = both_client.app
    store, metrics = FlakyStore(app[OBJECTS]), Metrics()
    sweeper = worker.RetentionSweeper(
        app[DATABASE], store, app[SETTINGS].spool_dir, default_days=30, interval_s=3600,  # type: ignore[arg-type]
        is_live=lambda _: False, metrics=metrics,
    )  # fmt: skip
    assert await sweeper.sweep() == 0
    assert (
        metrics.registry.get_sample_value(
            "parley_retention_deleted_sessions_total", {"outcome": "incomplete"}
        )
        == 1
    )
    assert await exists(both_client, sid) and await objects_of(both_client, sid)
    async with app[DATABASE].sessions() as s:
        assert await s.get(SessionTombstone, sid) is not None  # fenced meanwhile
    store.down = False
    assert await sweeper.sweep() == 1
    await gone(both_client, sid)
