"""GET /v1/sessions/{id}/audio/{track}: the owner's assembled Ogg Opus track, with byte ranges."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient

from relay.keys import DATABASE, OBJECTS
from storage.assembly import assembled_track
from storage.oggopus import parse_pages
from storage.ports import Speaker
from storage.recorder import SpoolRecorderFactory
from tests.api import Learner, problem, signup
from tests.storage.test_recorder import feed


async def new_session(client: TestClient, learner: Learner) -> str:  # type: ignore[type-arg]
    resp = await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    assert resp.status == 201, await resp.text()
    session_id: str = (await resp.json())["session"]["id"]
    return session_id


async def record_learner(client: TestClient, session_id: str, spool: Path) -> None:  # type: ignore[type-arg]
    """3 s of learner audio, a 1 s hole, 2 s more, stored through the real recorder on the app's stores."""
    factory = SpoolRecorderFactory(client.app[DATABASE], client.app[OBJECTS], spool, segment_ms=2000)
    factory.max_buffer_ms = 60_000
    rec = factory.open(session_id)
    try:
        feed(rec, Speaker.LEARNER, 0, 3000)
        feed(rec, Speaker.LEARNER, 4000, 6000)
        await rec.aclose()
    finally:
        await factory.aclose()


async def expected_stream(client: TestClient, session_id: str) -> bytes:  # type: ignore[type-arg]
    track = await assembled_track(client.app[DATABASE], client.app[OBJECTS], session_id, "learner")
    assert track is not None
    return b"".join([chunk async for chunk in track.read(0)])


async def test_owner_gets_the_whole_track_and_byte_ranges(client: TestClient, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """200 with the whole stream, 206 for a-b, a- and -n ranges, 416 past the end."""
    learner = await signup(client)
    sid = await new_session(client, learner)
    await record_learner(client, sid, tmp_path / "spool")
    whole = await expected_stream(client, sid)
    n = len(whole)
    url = f"/v1/sessions/{sid}/audio/learner"

    resp = await client.get(url, headers=learner.auth)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/ogg"
    assert resp.headers["Accept-Ranges"] == "bytes" and int(resp.headers["Content-Length"]) == n
    body = await resp.read()
    assert body == whole and len(parse_pages(body)) > 3

    for header, start, end in (
        ("bytes=0-0", 0, 0),
        ("bytes=10-4000", 10, 4000),
        (f"bytes={n - 100}-", n - 100, n - 1),
        ("bytes=-500", n - 500, n - 1),
        (f"bytes=100-{n + 999}", 100, n - 1),
        (f"bytes=-{n + 10}", 0, n - 1),
    ):
        resp = await client.get(url, headers={**learner.auth, "Range": header})
        assert resp.status == 206, header
        assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{n}"
        assert int(resp.headers["Content-Length"]) == end - start + 1
        assert await resp.read() == whole[start : end + 1], header

    for header in (f"bytes={n}-", f"bytes={n + 5}-{n + 10}", "bytes=-0"):
        resp = await client.get(url, headers={**learner.auth, "Range": header})
        await problem(resp, 416, "range_not_satisfiable")
        assert resp.headers["Content-Range"] == f"bytes */{n}"

    resp = await client.head(url, headers=learner.auth)
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == n and await resp.read() == b""

    resp = await client.get(url, headers={**learner.auth, "Range": "bytes=5-1"})
    assert resp.status == 200 and await resp.read() == whole  # an invalid range is ignored


async def test_audio_is_private_and_404s_are_indistinguishable(client: TestClient, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """Another user, an unknown track and an unknown session all get 404 not_found; no auth is 401."""
    owner, other = await signup(client), await signup(client)
    sid = await new_session(client, owner)
    await record_learner(client, sid, tmp_path / "spool")
    other_body = await problem(
        await client.get(f"/v1/sessions/{sid}/audio/learner", headers=other.auth), 404, "not_found"
    )
    missing_body = await problem(
        await client.get("/v1/sessions/ses_nope/audio/learner", headers=other.auth), 404, "not_found"
    )
    assert other_body == missing_body
    await problem(await client.get(f"/v1/sessions/{sid}/audio/teacher", headers=owner.auth), 404, "not_found")
    await problem(await client.get(f"/v1/sessions/{sid}/audio/learner"), 401, "unauthorized")


async def test_a_session_without_audio_is_audio_not_found(client: TestClient, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """A fresh session, and a recorded session's silent track, answer 404 audio_not_found."""
    learner = await signup(client)
    sid = await new_session(client, learner)
    for track in ("learner", "coach"):
        await problem(
            await client.get(f"/v1/sessions/{sid}/audio/{track}", headers=learner.auth),
            404,
            "audio_not_found",
        )
    await record_learner(client, sid, tmp_path / "spool")
    await problem(
        await client.get(f"/v1/sessions/{sid}/audio/coach", headers=learner.auth), 404, "audio_not_found"
    )
