"""The upstream event log: JSON lines without audio in the spool, then in the object store, for audit."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pydantic
import pytest
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from sqlalchemy import select

from storage.db import Database
from storage.deletion import delete_session
from storage.eventlog import event_record
from storage.models import Session, SessionTombstone
from storage.objects import ObjectInfo, ObjectStore
from storage.recorder import SpoolRecorderFactory, recover_spool
from storage.spool import scan_event_logs
from tests.storage.crash import bury, kill
from tests.storage.test_recorder import new_session, spool_files
from tests.storage.test_spool import SwitchableStore, wait_for

SERVER_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RealtimeServerEvent)
AUDIO_BYTES = 4801  # not a multiple of 3: the base64 ends in "="
AUDIO = base64.b64encode(bytes(range(256)) * 18 + bytes(AUDIO_BYTES - 256 * 18)).decode()
SECRET_WORDS = "my neighbour Ottilie"  # planted in a transcript: must never reach a log record


def turn(n: int) -> list[dict[str, Any]]:
    """The server events of one turn, on the wire, audio everywhere the API can carry it."""
    item, resp = f"item_c{n}", f"resp_{n}"
    where = {"response_id": resp, "item_id": item, "output_index": 0, "content_index": 0}
    return [
        {"type": "input_audio_buffer.speech_started", "event_id": f"ev{n}a", "audio_start_ms": 100 * n,
         "item_id": f"item_l{n}"},
        {"type": "conversation.item.input_audio_transcription.completed", "event_id": f"ev{n}b",
         "item_id": f"item_l{n}", "content_index": 0, "transcript": f"turn {n}: {SECRET_WORDS}",
         "usage": {"type": "duration", "seconds": 1.5}},
        {"type": "response.output_audio.delta", "event_id": f"ev{n}c", **where, "delta": AUDIO},
        {"type": "response.audio.delta", "event_id": f"ev{n}d", **where, "delta": AUDIO},  # beta name, a dict
        {"type": "response.output_audio_transcript.delta", "event_id": f"ev{n}e", **where, "delta": "Sure"},
        {"type": "response.content_part.done", "event_id": f"ev{n}f", **where,
         "part": {"type": "audio", "audio": AUDIO, "transcript": "Sure"}},
        {"type": "conversation.item.retrieved", "event_id": f"ev{n}g",
         "item": {"type": "message", "role": "user", "id": f"item_l{n}",
                  "content": [{"type": "input_audio", "audio": AUDIO, "transcript": "hello"}]}},
        {"type": "response.done", "event_id": f"ev{n}h",
         "response": {"id": resp, "status": "completed",
                      "output": [{"type": "message", "role": "assistant", "id": item, "content": [
                          {"type": "output_audio", "audio": AUDIO, "transcript": "Sure"}]}]}},
    ]  # fmt: skip


def as_received(wire: dict[str, Any]) -> Any:
    """What the downlink hands over: an SDK model for a GA type, the dict for anything else."""
    if wire["type"] == "response.audio.delta":
        return wire
    return SERVER_EVENT.validate_python(wire)


def strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def assert_no_audio(record: dict[str, Any]) -> None:
    assert AUDIO not in strings(record) and max(map(len, strings(record))) < 2000
    blob = json.dumps(record)
    assert '"audio": "' not in blob
    if record["type"].endswith("audio.delta"):
        assert "delta" not in record and record["omitted_bytes"] == AUDIO_BYTES


async def event_objects(store: ObjectStore, session_id: str) -> list[ObjectInfo]:
    found = [info async for info in store.list(f"sessions/{session_id}/events/")]
    return sorted(found, key=lambda info: info.key)


async def stored_lines(store: ObjectStore, session_id: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for info in await event_objects(store, session_id):
        data = await store.read(info.key)
        assert data.endswith(b"\n")
        lines += [json.loads(line) for line in data.decode().splitlines()]
    return lines


def test_audio_payloads_are_replaced_by_their_size_wherever_the_sdk_types_carry_them() -> None:
    """Deltas lose ``delta``; content parts and item content (item events, response.done) lose ``audio``."""
    for wire in turn(1):
        record = event_record(as_received(wire), at_ms=42)
        assert list(record)[0] == "at_ms" and record["at_ms"] == 42 and record["type"] == wire["type"]
        assert_no_audio(record)
    part = event_record(as_received(turn(1)[5]), at_ms=0)["part"]
    assert part == {"type": "audio", "omitted_bytes": AUDIO_BYTES, "transcript": "Sure"}
    done = event_record(as_received(turn(1)[7]), at_ms=0)
    assert done["response"]["output"][0]["content"][0]["omitted_bytes"] == AUDIO_BYTES


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_events_round_trip_to_the_object_store_as_jsonl_in_order_without_audio(
    database: Database, object_store: ObjectStore, tmp_path: Path
) -> None:
    """Events become ordered JSONL objects under sessions/<id>/events/ (ndjson), counted in the spool."""
    sid = await new_session(database)
    spool = tmp_path / "spool"
    store = SwitchableStore(object_store)  # down at first: the logs wait in the spool
    # Small logs so that the stream spans several objects, and the order across them is checked too.
    factory = SpoolRecorderFactory(
        database, store, spool, events_segment_bytes=2000, drain_s=0.05, events_sync_s=0.1,  # type: ignore[arg-type]
        backoff_initial_s=0.05, backoff_max_s=0.2,
    )  # fmt: skip
    rec = factory.open(sid)
    wire = [e for n in range(12) for e in turn(n)]
    try:
        for at_ms, event in enumerate(wire):
            rec.upstream_event(as_received(event), at_ms=at_ms * 10)

        def on_disk() -> int:
            return sum(p.stat().st_size for p in spool_files(spool))

        # The budget sees the event logs: what the spool counts is what is on disk (once synced).
        await wait_for(lambda: any(spool.rglob("*.jsonl.part")) and factory.spool_bytes() == on_disk())
        assert factory.spool_bytes() > 10_000
        store.current = object_store
        await rec.aclose()
        objects = await event_objects(object_store, sid)
        assert len(objects) >= 3
        assert [o.key for o in objects] == [
            f"sessions/{sid}/events/{i:06d}.jsonl" for i in range(len(objects))
        ]
        info = await object_store.stat(objects[0].key)
        assert info is not None and info.content_type == "application/x-ndjson"
        lines = await stored_lines(object_store, sid)
        assert [line["event_id"] for line in lines] == [e["event_id"] for e in wire]
        assert [line["at_ms"] for line in lines] == [i * 10 for i in range(len(wire))]
        for line in lines:
            assert_no_audio(line)
        completed = [line for line in lines if line["type"].endswith("transcription.completed")]
        assert completed[3]["transcript"] == f"turn 3: {SECRET_WORDS}"
        assert spool_files(spool) == [] and factory.spool_bytes() == 0
    finally:
        await factory.aclose()
        await store.aclose()


class Exploding:
    """An event whose serialization fails (as a malformed lenient-decoded model might)."""

    type = "response.text.delta"

    def model_dump(self, **_: object) -> dict[str, Any]:
        raise ValueError(f"cannot serialize {SECRET_WORDS}")


class ThreadNoting:
    """An event that notes the thread it is serialized on."""

    type = "rate_limits.updated"
    threads: list[str] = []

    def model_dump(self, **_: object) -> dict[str, Any]:
        self.threads.append(threading.current_thread().name)
        return {"type": self.type, "event_id": "ev_thread"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_failing_event_loses_only_itself_logged_by_type_and_count_off_the_loop(
    database: Database, local_store: ObjectStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unserializable events stand as type-only lines; the others are kept; serializing runs in the pool."""
    sid = await new_session(database)
    factory = SpoolRecorderFactory(database, local_store, tmp_path / "spool")
    rec = factory.open(sid)
    caplog.set_level(logging.DEBUG, logger="storage")
    try:
        rec.upstream_event({"type": "session.updated", "event_id": "ev1"}, at_ms=1)
        rec.upstream_event(Exploding(), at_ms=2)
        rec.upstream_event({"type": "response.created", "event_id": "ev3", "raw": b"\x00"}, at_ms=3)
        rec.upstream_event(Exploding(), at_ms=4)
        rec.upstream_event(ThreadNoting(), at_ms=5)
        rec.upstream_event(as_received(turn(1)[1]), at_ms=6)
        await rec.aclose()
        lines = await stored_lines(local_store, sid)
        assert [(line["at_ms"], line["type"], line.get("unserializable", False)) for line in lines] == [
            (1, "session.updated", False),
            (2, "response.text.delta", True),
            (3, "response.created", True),
            (4, "response.text.delta", True),
            (5, "rate_limits.updated", False),
            (6, "conversation.item.input_audio_transcription.completed", False),
        ]
        assert ThreadNoting.threads and all(t.startswith("recorder-enc") for t in ThreadNoting.threads)
        failures = [r for r in caplog.records if r.getMessage() == "recorder.event_unserializable"]
        assert sorted((r.kind, r.count) for r in failures) == [  # type: ignore[attr-defined]
            ("response.created", 1),
            ("response.text.delta", 2),
        ]
        assert not any(SECRET_WORDS in (r.getMessage() + str(r.__dict__)) for r in caplog.records)
    finally:
        await factory.aclose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_jsonl_part_left_by_a_crash_is_recovered_up_to_its_last_complete_line(
    database: Database, local_store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Synced lines survive a kill; recovery cuts the torn last line, uploads the rest, marks interrupted."""
    sid = await new_session(database)
    spool = tmp_path / "spool"
    dead = SwitchableStore(local_store)  # nothing uploads before the "crash"
    factory = SpoolRecorderFactory(
        database, dead, spool, drain_s=0.05, events_sync_s=0.2, events_segment_bytes=4000,  # type: ignore[arg-type]
        backoff_initial_s=0.05, backoff_max_s=0.1,
    )  # fmt: skip
    rec = factory.open(sid)
    wire = [e for n in range(6) for e in turn(n)]
    for at_ms, event in enumerate(wire):
        rec.upstream_event(as_received(event), at_ms=at_ms)
    await wait_for(lambda: any(spool.rglob("*.jsonl")) and any(spool.rglob("*.jsonl.part")))
    await asyncio.sleep(0.5)  # past events_sync_s: the open log is on disk
    # the kill: no aclose, tasks stop where they are
    await kill(rec, factory)
    await dead.aclose()
    request.addfinalizer(lambda: bury(rec))
    (part,) = spool.rglob("*.jsonl.part")
    part.write_bytes(part.read_bytes() + b'{"at_ms":999,"type":"response.do')  # torn mid-line
    assert [log.part for log in scan_event_logs(spool)][-1] is True

    recovered = await recover_spool(database, local_store, spool)

    assert recovered == [sid]
    lines = await stored_lines(local_store, sid)
    assert [line["event_id"] for line in lines] == [e["event_id"] for e in wire]
    async with database.sessions() as s:
        status = (await s.execute(select(Session.status).where(Session.id == sid))).scalar_one()
    assert status == "interrupted"
    assert spool_files(spool) == []
    assert await recover_spool(database, local_store, spool) == []  # nothing left: idempotent


class FencingStore:
    """Records every put; with ``fence_during_put`` a delete fences the session while each put is in
    flight (the put lands, the session is tombstoned before the uploader looks again)."""

    def __init__(self, inner: ObjectStore, database: Database, fence_during_put: bool = False) -> None:
        self.kind = inner.kind
        self.inner = inner
        self.db = database
        self.fence_during_put = fence_during_put
        self.puts: list[str] = []

    async def put(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        info = await self.inner.put(key, data, content_type=content_type)
        self.puts.append(key)
        if self.fence_during_put:
            await tombstone(self.db, key.split("/")[1])
        return info

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


async def tombstone(db: Database, session_id: str) -> None:
    """The fence that delete_session commits first."""
    async with db.sessions.begin() as s:
        if await s.get(SessionTombstone, session_id) is None:
            s.add(SessionTombstone(session_id=session_id))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_deleted_sessions_event_log_is_not_uploaded(
    database: Database, local_store: ObjectStore, tmp_path: Path
) -> None:
    """Fenced before the put: nothing is put; fenced during it: the object is removed; by recovery:
    nothing is put. Each time the session's spool files are gone."""
    # 1. Fenced while its log waited in the spool (store down): once the store is back, nothing is put.
    sid = await new_session(database)
    spool = tmp_path / "spool1"
    recording = FencingStore(local_store, database)
    switch = SwitchableStore(recording)  # type: ignore[arg-type]
    factory = SpoolRecorderFactory(
        database, switch, spool, upload_wait_s=0.3, backoff_initial_s=0.05, backoff_max_s=0.1,  # type: ignore[arg-type]
    )  # fmt: skip
    rec = factory.open(sid)
    try:
        for at_ms, event in enumerate(turn(1)):
            rec.upstream_event(as_received(event), at_ms=at_ms)
        await rec.aclose()
        assert any(spool.rglob("*.jsonl"))  # waiting for the store
        await tombstone(database, sid)
        switch.current = recording  # type: ignore[assignment]
        await wait_for(lambda: spool_files(spool) == [])
        assert recording.puts == [] and await event_objects(local_store, sid) == []
    finally:
        await factory.aclose()
        await switch.aclose()

    # 2. Fenced during the put (the check after the put catches it): the object is removed.
    sid = await new_session(database)
    spool = tmp_path / "spool2"
    fencing = FencingStore(local_store, database, fence_during_put=True)
    factory = SpoolRecorderFactory(database, fencing, spool)  # type: ignore[arg-type]
    rec = factory.open(sid)
    try:
        for at_ms, event in enumerate(turn(2)):
            rec.upstream_event(as_received(event), at_ms=at_ms)
        await rec.aclose()
        assert fencing.puts == [f"sessions/{sid}/events/000000.jsonl"]  # it was put ...
        assert await event_objects(local_store, sid) == []  # ... and removed
        assert spool_files(spool) == []
    finally:
        await factory.aclose()

    # 3. Left in the spool by a crash, the session deleted (elsewhere) before the restart: recovery
    # puts nothing and removes the files.
    sid = await new_session(database)
    spool = tmp_path / "spool3"
    logs = spool / sid / "events"
    logs.mkdir(parents=True)
    (logs / "000000.jsonl").write_bytes(b'{"at_ms":1,"type":"session.created"}\n')
    (logs / "000001.jsonl.part").write_bytes(b'{"at_ms":2,"type":"response.done"}\n{"at_')
    report = await delete_session(database, local_store, tmp_path / "other-spool", sid, sweep_pause_s=0.05)
    assert report.complete
    recording = FencingStore(local_store, database)
    assert await recover_spool(database, recording, spool) == []  # type: ignore[arg-type]
    assert recording.puts == [] and spool_files(spool) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_past_the_spool_budget_events_are_dropped_and_declared_in_the_log(
    database: Database, local_store: ObjectStore, tmp_path: Path
) -> None:
    """A full spool drops events like audio; once there is room a relay.events_dropped line counts them."""
    sid = await new_session(database)
    spool = tmp_path / "spool"
    store = SwitchableStore(local_store)
    factory = SpoolRecorderFactory(
        database, store, spool, max_spool_bytes=3000, events_segment_bytes=1000, drain_s=0.05,  # type: ignore[arg-type]
        backoff_initial_s=0.05, backoff_max_s=0.1,
    )  # fmt: skip
    rec = factory.open(sid)
    try:
        kept = [e for n in range(4) for e in turn(n)]
        for at_ms, event in enumerate(kept):
            rec.upstream_event(as_received(event), at_ms=at_ms)
        await wait_for(lambda: not factory.accepting)
        for event in turn(4)[:5]:
            rec.upstream_event(as_received(event), at_ms=500)
        await wait_for(lambda: rec._events_dropped.get("spool_full") == 5)
        store.current = local_store
        await wait_for(lambda: factory.accepting and not any(spool.rglob("*.jsonl")))
        last = turn(5)[0]
        rec.upstream_event(as_received(last), at_ms=600)
        await rec.aclose()
        lines = await stored_lines(local_store, sid)
        assert [line.get("event_id") for line in lines] == [e["event_id"] for e in kept] + [
            None,
            last["event_id"],
        ]
        # Declared where the hole is: at the last lost event's time, whenever room came back.
        assert lines[-2] == {"at_ms": 500, "type": "relay.events_dropped", "reason": "spool_full", "count": 5}
    finally:
        await factory.aclose()
        await store.aclose()
