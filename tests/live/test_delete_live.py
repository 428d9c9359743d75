"""Deleting a live session ends it first, then nothing of it is left anywhere."""

from __future__ import annotations

from sqlalchemy import func, select

from relay.keys import DATABASE, OBJECTS, REGISTRY, SETTINGS
from storage.deletion import session_prefix
from storage.models import Session, TranscriptSegment
from tests.live.conftest import Relay, start_call
from tests.live.test_resilience import say


async def test_deleting_a_live_session_ends_it_and_leaves_nothing(relay: Relay) -> None:
    """DELETE mid-conversation: the call ends, then rows, objects and spool files are all gone."""
    call = await start_call(relay)
    say(call)
    await call.wait_count("coach.done", 1, timeout=30)
    app = relay.client.app
    async with app[DATABASE].sessions() as s:
        stored = (
            await s.execute(select(func.count()).where(TranscriptSegment.session_id == call.session_id))
        ).scalar_one()
    assert stored >= 1  # something was recorded, so there is something to delete
    resp = await relay.client.delete(f"/v1/sessions/{call.session_id}", headers=call.learner.auth)
    assert resp.status == 204, await resp.text()
    assert app[REGISTRY].get(call.session_id) is None
    assert [o async for o in app[OBJECTS].list(session_prefix(call.session_id))] == []
    assert not (app[SETTINGS].spool_dir / call.session_id).exists()
    async with app[DATABASE].sessions() as s:
        assert await s.get(Session, call.session_id) is None
        left = (
            await s.execute(select(func.count()).where(TranscriptSegment.session_id == call.session_id))
        ).scalar_one()
    assert left == 0
