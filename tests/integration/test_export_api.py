"""Export: a streamed zip with every committed segment and transcript row, checksums, and ``partial``.

Every test runs on SQLite + the local object store and on PostgreSQL + S3 (``both_client``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import pytest
from aiohttp import ClientPayloadError, web
from aiohttp.test_utils import TestClient

from relay.keys import DATABASE, OBJECTS
from storage.models import Rating
from storage.objects import ObjectStoreUnavailable
from tests.api import Learner, problem, signup
from tests.integration.recorded import PLANTED, finished_session, manifest, new_session, set_status

Client = TestClient[web.Request, web.Application]
SESSION_FILES = {"session.json", "transcript.json", "transcript.vtt", "audio/learner.ogg", "audio/coach.ogg"}


async def export(client: Client, learner: Learner, sid: str) -> tuple[Any, zipfile.ZipFile]:
    resp = await client.get(f"/v1/sessions/{sid}/export", headers=learner.auth)
    assert resp.status == 200, await resp.text()
    return resp, zipfile.ZipFile(io.BytesIO(await resp.read()))


def session_json(zf: zipfile.ZipFile, prefix: str = "") -> dict[str, Any]:
    body: dict[str, Any] = json.loads(zf.read(f"{prefix}session.json"))
    return body


def check_checksums(zf: zipfile.ZipFile, prefix: str = "") -> dict[str, Any]:
    """Every file listed in session.json is in the zip with that SHA-256 and size, and vice versa."""
    meta = session_json(zf, prefix)
    names = {n.removeprefix(prefix) for n in zf.namelist() if n.startswith(prefix)}
    assert set(meta["files"]) == names - {"session.json"}
    for name, digest in meta["files"].items():
        data = zf.read(prefix + name)
        assert hashlib.sha256(data).hexdigest() == digest["sha256"], name
        assert len(data) == digest["size"], name
    assert zf.testzip() is None
    return meta


def decoded_seconds(data: bytes) -> float:
    container: Any = av.open(io.BytesIO(data))
    with container:
        samples = sum(int(frame.samples) for frame in container.decode(audio=0))
    return samples / 48000


async def test_export_holds_every_segment_and_transcript_row_with_matching_checksums(
    both_client: Client, tmp_path: Path
) -> None:
    """The zip has API.md's files, every manifest segment byte for byte, all transcript rows, checksums."""
    learner = await signup(both_client)
    sid, row_ids = await finished_session(both_client, learner, tmp_path / "spool")
    async with both_client.app[DATABASE].sessions.begin() as s:
        s.add(
            Rating(
                session_id=sid, status="done", scores={"fluency": 70}, metrics={}, feedback="ok", model="m"
            )
        )
    resp, zf = await export(both_client, learner, sid)
    assert resp.content_type == "application/zip"
    assert "Content-Length" not in resp.headers and resp.headers["Transfer-Encoding"] == "chunked"
    assert f"parley-session-{sid}.zip" in resp.headers["Content-Disposition"]
    names = set(zf.namelist())
    assert SESSION_FILES | {"rating.json"} <= names
    meta = check_checksums(zf)
    assert meta["partial"] is False and meta["partial_reasons"] == []
    assert meta["session"]["id"] == sid and meta["session"]["rating"]["scores"] == {"fluency": 70}
    assert json.loads(zf.read("rating.json"))["feedback"] == "ok"

    # Every committed segment, byte for byte, with the checksum the recorder stored at upload.
    committed = await manifest(both_client, sid)
    assert set(committed) == {"learner", "coach"} and len(committed["learner"]) >= 3
    listed = {r["track"]: r["segments"] for r in meta["recordings"]}
    for track, chunks in committed.items():
        assert [e["seq"] for e in listed[track]] == [c.seq for c in chunks]
        for chunk, entry in zip(chunks, listed[track], strict=True):
            data = zf.read(entry["path"])
            assert data == await both_client.app[OBJECTS].read(chunk.object_key)
            assert (
                hashlib.sha256(data).hexdigest()
                == chunk.sha256
                == entry["sha256"]
                == entry["manifest_sha256"]
            )

    # Every transcript row (the non-final one too), in conversation order; the VTT has them as cues.
    segments = json.loads(zf.read("transcript.json"))["segments"]
    assert [s["id"] for s in segments] == row_ids
    assert segments[1]["text"] == PLANTED and segments[2]["final"] is False
    vtt = zf.read("transcript.vtt").decode()
    assert vtt.startswith("WEBVTT") and all(row_id in vtt for row_id in row_ids)

    # Both tracks are the owner's playable streams, and they decode to about the recorded length.
    for track, seconds in (("learner", 3.0), ("coach", 2.0)):
        audio = zf.read(f"audio/{track}.ogg")
        owner = await (
            await both_client.get(f"/v1/sessions/{sid}/audio/{track}", headers=learner.auth)
        ).read()
        assert audio == owner
        assert decoded_seconds(audio) >= seconds - 0.1


@pytest.mark.parametrize(
    ("status", "recording_status", "reasons"),
    [
        ("live", "recording", ["live", "recording"]),
        ("reconnecting", None, ["live"]),
        ("interrupted", "interrupted", ["interrupted"]),
        ("ended", "recording", ["recording"]),
    ],
)
async def test_export_of_a_live_or_interrupted_session_is_partial(
    both_client: Client, tmp_path: Path, status: str, recording_status: str | None, reasons: list[str]
) -> None:
    """A live or interrupted session (or a track still recording) exports what is committed, as partial."""
    learner = await signup(both_client)
    sid, row_ids = await finished_session(both_client, learner, tmp_path / "spool")
    await set_status(both_client, sid, status, recording_status=recording_status)
    _, zf = await export(both_client, learner, sid)
    meta = check_checksums(zf)
    assert meta["partial"] is True and meta["partial_reasons"] == reasons
    assert meta["session"]["status"] == status
    assert [s["id"] for s in json.loads(zf.read("transcript.json"))["segments"]] == row_ids
    committed = await manifest(both_client, sid)
    assert sum(len(r["segments"]) for r in meta["recordings"]) == sum(len(c) for c in committed.values())


async def test_export_of_a_session_without_audio(both_client: Client) -> None:
    """A session that recorded nothing yet exports its session.json and an empty transcript, partial."""
    learner = await signup(both_client)
    sid = await new_session(both_client, learner)
    _, zf = await export(both_client, learner, sid)
    assert set(zf.namelist()) == {"session.json", "transcript.json", "transcript.vtt"}
    meta = check_checksums(zf)
    assert meta["partial"] is True and meta["recordings"] == []


async def test_export_is_owner_only(both_client: Client, tmp_path: Path) -> None:
    """Another user's session answers the same 404 as a missing one; no credentials answer 401."""
    owner, other = await signup(both_client), await signup(both_client)
    sid, _ = await finished_session(both_client, owner, tmp_path / "spool", coach_ms=0)
    theirs = await problem(
        await both_client.get(f"/v1/sessions/{sid}/export", headers=other.auth), 404, "not_found"
    )
    missing = await problem(
        await both_client.get("/v1/sessions/ses_nope/export", headers=other.auth), 404, "not_found"
    )
    assert theirs == missing
    await problem(await both_client.get(f"/v1/sessions/{sid}/export"), 401, "unauthorized")
    await problem(await both_client.get("/v1/me/export"), 401, "unauthorized")


async def test_account_export_holds_every_session_of_the_user_only(
    both_client: Client, tmp_path: Path
) -> None:
    """/v1/me/export lays each of the caller's sessions out under sessions/<id>/, with account.json."""
    learner, other = await signup(both_client), await signup(both_client)
    first, _ = await finished_session(both_client, learner, tmp_path / "s1", coach_ms=0)
    second = await new_session(both_client, learner)
    theirs, _ = await finished_session(both_client, other, tmp_path / "s2", coach_ms=0)
    resp = await both_client.get("/v1/me/export", headers=learner.auth)
    assert resp.status == 200 and resp.content_type == "application/zip"
    assert "Content-Length" not in resp.headers
    zf = zipfile.ZipFile(io.BytesIO(await resp.read()))
    account = json.loads(zf.read("account.json"))
    assert account["user"] == {
        "id": learner.id,
        "email": learner.email,
        "created_at": account["user"]["created_at"],
    }
    assert {s["id"]: s["partial"] for s in account["sessions"]} == {first: False, second: True}
    assert not any(theirs in name for name in zf.namelist())
    meta = check_checksums(zf, f"sessions/{first}/")
    assert meta["session"]["id"] == first and f"sessions/{first}/audio/learner.ogg" in zf.namelist()
    assert check_checksums(zf, f"sessions/{second}/")["session"]["id"] == second


async def test_export_with_a_lost_segment_object_says_so(both_client: Client, tmp_path: Path) -> None:
    """A manifest segment whose object is gone is listed as missing and the export is partial, not a 500."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool", coach_ms=0)
    lost = (await manifest(both_client, sid))["learner"][1]
    await both_client.app[OBJECTS].delete(lost.object_key)
    _, zf = await export(both_client, learner, sid)
    meta = check_checksums(zf)
    assert meta["partial"] is True and "segments_missing" in meta["partial_reasons"]
    entry = next(e for e in meta["recordings"][0]["segments"] if e["seq"] == lost.seq)
    assert entry["missing"] is True and "path" not in entry


class Gate:
    """Wraps the app's object store ``get``: lets ``allowed`` reads through, then holds the rest."""

    def __init__(self, client: Client, allowed: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = client.app[OBJECTS]
        self.real_get = self.store.get
        self.allowed = allowed
        self.calls = 0
        self.blocked = asyncio.Event()
        self.opened = asyncio.Event()
        monkeypatch.setattr(self.store, "get", self.get)

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        self.calls += 1
        number = self.calls
        real = self.real_get(key, start=start, end=end)

        async def held() -> AsyncIterator[bytes]:
            if number > self.allowed and not self.opened.is_set():
                self.blocked.set()
                await self.opened.wait()
            async for chunk in real:
                yield chunk

        return held()


async def test_export_is_streamed_not_buffered(
    both_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With many segments, the first bytes of the zip arrive while most objects have not been read yet."""
    learner = await signup(both_client)
    sid, _ = await finished_session(
        both_client, learner, tmp_path / "spool", learner_ms=12_000, coach_ms=8_000, segment_ms=250
    )
    committed = await manifest(both_client, sid)
    segments = sum(len(c) for c in committed.values())
    assert segments >= 70
    # Playing each track once plans its assembly (one read of every segment, kept as page metadata
    # only), so what the gate counts below is the export's own streaming.
    for track in committed:
        resp = await both_client.get(f"/v1/sessions/{sid}/audio/{track}", headers=learner.auth)
        assert resp.status == 200 and await resp.read()
    gate = Gate(both_client, allowed=8, monkeypatch=monkeypatch)

    resp = await asyncio.wait_for(both_client.get(f"/v1/sessions/{sid}/export", headers=learner.auth), 20)
    assert resp.status == 200
    assert "Content-Length" not in resp.headers and resp.headers["Transfer-Encoding"] == "chunked"
    await asyncio.wait_for(gate.blocked.wait(), 10)
    received = b""
    while True:  # everything the server managed to send before it had to wait for the store
        try:
            received += await asyncio.wait_for(resp.content.readany(), 0.5)
        except TimeoutError:
            break
    assert received.startswith(b"PK\x03\x04") and b"transcript.json" in received
    assert b"session.json" not in received and b"PK\x05\x06" not in received  # far from the end
    # The server asked the store for only a handful of objects out of the 2 x segments it will read.
    assert gate.calls <= gate.allowed + 1 < 2 * segments

    gate.opened.set()
    rest = await resp.read()
    zf = zipfile.ZipFile(io.BytesIO(received + rest))
    meta = check_checksums(zf)
    assert sum(len(r["segments"]) for r in meta["recordings"]) == segments
    assert gate.calls >= 2 * segments


async def test_a_store_failure_before_or_during_the_export(
    both_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store down before the first byte: 503; after the headers: a broken transfer, never a short zip."""
    learner = await signup(both_client)
    sid, _ = await finished_session(both_client, learner, tmp_path / "spool", coach_ms=0)
    store = both_client.app[OBJECTS]
    real_get = store.get
    calls = 0
    healthy = 0  # how many reads succeed before the store "goes away"

    def failing_get(key: str, *, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        nonlocal calls
        calls += 1
        if calls <= healthy:
            return real_get(key, start=start, end=end)

        async def broken() -> AsyncIterator[bytes]:
            nothing: tuple[bytes, ...] = ()
            for chunk in nothing:  # an async generator that fails on its first step
                yield chunk
            raise ObjectStoreUnavailable("the store went away")

        return broken()

    monkeypatch.setattr(store, "get", failing_get)
    resp = await both_client.get(f"/v1/sessions/{sid}/export", headers=learner.auth)
    await problem(resp, 503, "storage_unavailable")

    monkeypatch.setattr(store, "get", real_get)
    assert (await both_client.get(f"/v1/sessions/{sid}/audio/learner", headers=learner.auth)).status == 200
    calls, healthy = 0, 2
    monkeypatch.setattr(store, "get", failing_get)
    resp = await both_client.get(f"/v1/sessions/{sid}/export", headers=learner.auth)
    assert resp.status == 200
    with pytest.raises(ClientPayloadError):
        await resp.read()
