"""Several relay nodes on one machine: real ``parley serve`` processes sharing PostgreSQL and S3.

Sessions go live on a node through Parley's Realtime socket (the ``openai`` SDK as the client):
signalling sent to another node reaches the owner; a SIGKILLed node goes stale, is no longer
forwarded to, and a sibling recovers its spool; ``--workers 2`` runs two nodes on one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from openai import AsyncOpenAI
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from sqlalchemy import func, select
from websockets.exceptions import ConnectionClosed

from relay.api.realtime import SESSION_HEADER
from relay.cluster.routing import NODE_HEADER
from storage import jobs, migrate, nodes
from storage.db import Database
from storage.models import AudioChunk, AudioRecording, Job, Session
from storage.objects import open_object_store
from tests.api import ENDED_OR_LATER, PASSWORD, Learner, ended_sessions
from tests.fakes.relay_process import ROOT, RelayProcess, relay_env
from tests.fakes.rtc_client import RtcClient, loopback_ice, speech_like  # noqa: F401 (fixture)
from tests.fixtures_s3 import free_loopback_port
from tests.services import fresh_postgres_database
from tests.simulator.audio import speech
from tests.simulator.flow import send_audio, until

pytestmark = pytest.mark.integration

TOPIC: Final = "cafe-order"
HEARTBEAT_S: Final = 0.5
STALE_S: Final = 3 * HEARTBEAT_S  # relay/cluster/presence.py STALE_BEATS
JOBS_FOR_NODES: Final = 24


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    """A fresh, migrated PostgreSQL database."""
    async with fresh_postgres_database() as url:
        database = Database(url)
        await migrate.upgrade(database)
        try:
            yield database
        finally:
            await database.aclose()


def node_env(tmp_path: Path, db: Database, store_url: str) -> dict[str, str]:
    """One node's environment; nodes share the data dir, the database and the object store."""
    return relay_env(
        PARLEY_DATA_DIR=str(tmp_path / "data"),
        PARLEY_PORT=str(free_loopback_port()),
        PARLEY_SECRET_KEY="k" * 48,
        PARLEY_DATABASE_URL=db.engine.url.render_as_string(hide_password=False),
        PARLEY_OBJECT_STORE_URL=store_url,
        PARLEY_NODE_HEARTBEAT_SECONDS=str(HEARTBEAT_S),
        PARLEY_RTC_HOST_ADDRESSES="127.0.0.1",
        PARLEY_RTC_REMOTE_ALLOW="127.0.0.0/8",
        PARLEY_DRAIN_TIMEOUT="1",
        PARLEY_MAX_LOOP_LAG_MS="2000",
    )


@pytest.fixture
async def two_nodes(tmp_path: Path, db: Database, s3_store_url: str) -> AsyncIterator[list[RelayProcess]]:
    """Nodes A and B: two `parley serve` processes on their own ports."""
    relays = [
        RelayProcess(node_env(tmp_path, db, s3_store_url), tmp_path / f"relay-{name}.log") for name in "ab"
    ]
    try:
        await asyncio.gather(*(r.start() for r in relays))
        yield relays
    finally:
        await asyncio.gather(*(r.stop() for r in relays))


async def registry(db: Database) -> dict[str, bool]:
    """Registered nodes: id -> alive."""
    listed = await nodes.list_nodes(db, stale_after=timedelta(seconds=STALE_S))
    return {node.id: alive for node, alive in listed}


async def node_id_of(http: aiohttp.ClientSession, relay: RelayProcess) -> str:
    async with http.get(f"{relay.base_url}/healthz") as resp:
        return resp.headers[NODE_HEADER]


async def signup(http: aiohttp.ClientSession, relay: RelayProcess) -> Learner:
    body = {"email": f"learner-{secrets.token_hex(4)}@example.org", "password": PASSWORD}
    async with http.post(f"{relay.base_url}/v1/auth/signup", json=body) as resp:
        assert resp.status == 201, await resp.text()
        got = await resp.json()
    return Learner(got["user"]["id"], got["user"]["email"], got["access_token"])


async def api_key(http: aiohttp.ClientSession, relay: RelayProcess, learner: Learner) -> str:
    async with http.post(
        f"{relay.base_url}/v1/api-keys", json={"name": "agent"}, headers=learner.auth
    ) as resp:
        assert resp.status == 201, await resp.text()
        key: str = (await resp.json())["key"]
        return key


@asynccontextmanager
async def realtime(relay: RelayProcess, key: str) -> AsyncIterator[tuple[AsyncRealtimeConnection, str]]:
    """An SDK connection to the node's Realtime socket (a session live on that node) and its id."""
    client = AsyncOpenAI(api_key=key, websocket_base_url=f"ws://127.0.0.1:{relay.port}/v1", max_retries=0)
    try:
        async with client.realtime.connect(model="gpt-realtime", extra_query={"topic_id": TOPIC}) as conn:
            session_id = conn._connection.response.headers[SESSION_HEADER]  # type: ignore[union-attr]
            await until(conn, "session.created")
            yield conn, session_id
    finally:
        await client.close()


async def closed_with(conn: AsyncRealtimeConnection) -> int | None:
    """Read until the socket closes; its close code."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(15):
            while True:
                await conn.recv_bytes()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def status_of(db: Database, session_id: str) -> str | None:
    async with db.sessions() as s:
        return (await s.execute(select(Session.status).where(Session.id == session_id))).scalar_one_or_none()


async def wait_status(db: Database, session_id: str, wanted: tuple[str, ...], timeout: float = 20) -> str:
    async with asyncio.timeout(timeout):
        while (status := await status_of(db, session_id)) not in wanted:
            await asyncio.sleep(0.1)
    assert status is not None
    return status


async def recordings(db: Database, session_id: str) -> dict[str, tuple[str, int, int]]:
    """Per track: status, duration and number of stored chunks."""
    async with db.sessions() as s:
        rows = (
            await s.execute(
                select(
                    AudioRecording.track,
                    AudioRecording.status,
                    AudioRecording.duration_ms,
                    func.count(AudioChunk.id),
                )
                .outerjoin(AudioChunk, AudioChunk.recording_id == AudioRecording.id)
                .where(AudioRecording.session_id == session_id)
                .group_by(AudioRecording.id)
            )
        ).all()
    return {track: (status, duration, chunks) for track, status, duration, chunks in rows}


async def test_end_and_delete_sent_to_another_node_reach_the_owner(
    two_nodes: list[RelayProcess], db: Database, s3_store_url: str
) -> None:
    """End and DELETE of sessions live on A, sent to B, are answered by A: sockets close, the
    recording is finalized, the deleted session is gone from the database and the object store."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        a_id, b_id = await node_id_of(http, a), await node_id_of(http, b)
        assert a_id != b_id
        assert await registry(db) == {a_id: True, b_id: True}
        learner = await signup(http, b)
        key = await api_key(http, a, learner)

        async with realtime(a, key) as (conn, ended_id):
            async with db.sessions() as s:
                assert (await s.get(Session, ended_id)).node_id == a_id  # type: ignore[union-attr]
            await send_audio(conn, speech(3))
            async with http.post(f"{b.base_url}/v1/sessions/{ended_id}/end", headers=learner.auth) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers[NODE_HEADER] == a_id  # answered by the owner
                assert (await resp.json())["status"] in ENDED_OR_LATER
            assert await closed_with(conn) == 1000
        tracks = await recordings(db, ended_id)
        status, duration, chunks = tracks["learner"]
        assert status == "complete" and duration > 0 and chunks > 0

        async with realtime(a, key) as (conn, deleted_id):
            await send_audio(conn, speech(3))
            async with http.delete(f"{b.base_url}/v1/sessions/{deleted_id}", headers=learner.auth) as resp:
                assert resp.status == 204, await resp.text()
                assert resp.headers[NODE_HEADER] == a_id
            await closed_with(conn)  # ended on A by the delete
        assert await status_of(db, deleted_id) is None
        store = open_object_store(s3_store_url)
        try:
            assert [o async for o in store.list(f"sessions/{deleted_id}/")] == []
        finally:
            await store.aclose()
        # Not live anywhere and owned by a live node: still answered by the owner.
        async with http.delete(f"{b.base_url}/v1/sessions/{ended_id}", headers=learner.auth) as resp:
            assert resp.status == 204 and resp.headers[NODE_HEADER] == a_id
        assert await status_of(db, ended_id) is None


async def test_deleting_the_account_on_another_node_deletes_the_sessions_its_owner_holds(
    two_nodes: list[RelayProcess], db: Database, s3_store_url: str
) -> None:
    """DELETE /v1/me sent to B while A holds one live and one ended session of the learner: A ends
    and deletes both (call closed, rows and objects gone), then B deletes the account."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        learner = await signup(http, b)
        key = await api_key(http, a, learner)
        async with realtime(a, key) as (conn, ended_id):
            await send_audio(conn, speech(2))
        await wait_status(db, ended_id, ENDED_OR_LATER)
        async with realtime(a, key) as (conn, live_id):
            await send_audio(conn, speech(3))
            async with http.delete(f"{b.base_url}/v1/me", headers=learner.auth) as resp:
                assert resp.status == 204, await resp.text()
            await closed_with(conn)  # the live call ended on A
        for session_id in (ended_id, live_id):
            assert await status_of(db, session_id) is None
        async with db.sessions() as s:
            assert (await s.execute(select(func.count()).select_from(Session))).scalar() == 0
        store = open_object_store(s3_store_url)
        try:
            for session_id in (ended_id, live_id):
                assert [o async for o in store.list(f"sessions/{session_id}/")] == []
        finally:
            await store.aclose()
        async with http.get(f"{a.base_url}/v1/me", headers=learner.auth) as resp:
            assert resp.status == 401  # the account is gone on every node


async def create_session(
    http: aiohttp.ClientSession, relay: RelayProcess, learner: Learner
) -> dict[str, Any]:
    """``POST /v1/sessions`` on ``relay``: the new session and its client secret."""
    async with http.post(
        f"{relay.base_url}/v1/sessions", json={"topic_id": TOPIC}, headers=learner.auth
    ) as resp:
        assert resp.status == 201, await resp.text()
        created: dict[str, Any] = await resp.json()
        return created


async def send_offer(
    http: aiohttp.ClientSession,
    relay: RelayProcess,
    session_id: str,
    secret: str,
    rtc: RtcClient,
    *,
    retry_unreachable: bool = False,
) -> aiohttp.ClientResponse:
    """Offer ``rtc`` for the session and connect it; with ``retry_unreachable``, offer again while the
    answer is 503 ``node_unreachable`` (a freshly dead owner still counts as alive until its
    heartbeat is stale), as the web client does."""
    sdp = await rtc.offer()
    async with asyncio.timeout(20):
        while True:
            resp = await http.post(
                f"{relay.base_url}/v1/sessions/{session_id}/webrtc",
                data=sdp,
                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/sdp"},
            )
            if not (retry_unreachable and resp.status == 503):
                break
            assert (await resp.json())["code"] == "node_unreachable"
            await asyncio.sleep(0.3)
    assert resp.status == 201, await resp.text()
    await rtc.accept(await resp.text())
    async with asyncio.timeout(20):
        await rtc.connected()
    return resp


async def test_a_webrtc_reconnect_and_hang_up_sent_to_another_node_reach_the_owner(
    two_nodes: list[RelayProcess], db: Database, loopback_ice: None
) -> None:
    """A call live on A: a reconnect offer sent to B is answered by A (the new peer connects to A),
    and hanging up that peer through B closes it on A."""
    a, b = two_nodes
    first, second = RtcClient(), RtcClient()
    try:
        async with aiohttp.ClientSession() as http:
            a_id = await node_id_of(http, a)
            learner = await signup(http, a)
            created = await create_session(http, a, learner)
            session_id = created["session"]["id"]
            await send_offer(http, a, session_id, created["client_secret"]["value"], first)
            await wait_status(db, session_id, ("live",))

            async with http.post(
                f"{b.base_url}/v1/sessions/{session_id}/client-secret", headers=learner.auth
            ) as resp:
                assert resp.status == 201, await resp.text()
                fresh = (await resp.json())["value"]
            reconnected = await send_offer(http, b, session_id, fresh, second)
            assert reconnected.headers[NODE_HEADER] == a_id  # answered by the owner
            peer = reconnected.headers["Location"]
            async with db.sessions() as s:
                assert (await s.get(Session, session_id)).node_id == a_id  # type: ignore[union-attr]

            async with http.delete(f"{b.base_url}{peer}", headers=learner.auth) as resp:
                assert resp.status == 204, await resp.text()
                assert resp.headers[NODE_HEADER] == a_id
            async with asyncio.timeout(10):
                while second.pc.connectionState not in ("closed", "failed", "disconnected"):
                    await asyncio.sleep(0.1)
            async with http.post(f"{b.base_url}/v1/sessions/{session_id}/end", headers=learner.auth) as resp:
                assert resp.status == 200 and resp.headers[NODE_HEADER] == a_id
            await wait_status(db, session_id, ENDED_OR_LATER)
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_killed_node_goes_stale_and_a_sibling_recovers_its_sessions(
    two_nodes: list[RelayProcess], db: Database
) -> None:
    """SIGKILL A mid-session: A goes stale, B stops forwarding to it (answers itself), and B recovers
    A's spool: the session is `interrupted` with the audio A had spooled stored."""
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        a_id, b_id = await node_id_of(http, a), await node_id_of(http, b)
        learner = await signup(http, b)
        key = await api_key(http, a, learner)
        async with realtime(a, key) as (conn, session_id):
            await send_audio(conn, speech(4))
            await asyncio.sleep(1.5)  # the spool syncs a page every 500 ms
            await a.kill()
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await closed_with(conn)
        async with asyncio.timeout(10):
            while (await registry(db))[a_id]:
                await asyncio.sleep(0.2)
        async with http.post(f"{b.base_url}/v1/sessions/{session_id}/end", headers=learner.auth) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers[NODE_HEADER] == b_id  # the dead owner is not forwarded to
            assert (await resp.json())["status"] == "interrupted"
        await wait_status(db, session_id, ("interrupted",))
        async with asyncio.timeout(20):  # B's reaper takes A's spool within a few heartbeats
            while (tracks := await recordings(db, session_id)).get("learner", ("", 0, 0))[0] != "interrupted":
                await asyncio.sleep(0.2)
        status, duration, chunks = tracks["learner"]
        assert duration > 0 and chunks > 0, tracks


async def test_a_reconnect_after_the_owner_died_continues_in_a_new_session_on_another_node(
    two_nodes: list[RelayProcess], db: Database, loopback_ice: None
) -> None:
    """A WebRTC call live on A; A is SIGKILLed. The learner's reconnect offer to B opens a fresh
    session on B linked to the old one (Location names it), the old one is `interrupted` with its
    audio kept, and it cannot be continued twice."""
    a, b = two_nodes
    first, second, third = RtcClient(), RtcClient(), RtcClient()
    try:
        async with aiohttp.ClientSession() as http:
            b_id = await node_id_of(http, b)
            learner = await signup(http, a)
            created = await create_session(http, a, learner)
            old_id = created["session"]["id"]
            await send_offer(http, a, old_id, created["client_secret"]["value"], first)
            await wait_status(db, old_id, ("live",))
            first.send_pcm(speech_like(3.0))
            await asyncio.sleep(4.0)  # spoken, and synced to A's spool (a page every 500 ms)
            await a.kill()

            async with http.post(
                f"{b.base_url}/v1/sessions/{old_id}/client-secret", headers=learner.auth
            ) as resp:
                assert resp.status == 201, await resp.text()
                secret = (await resp.json())["value"]
            answer = await send_offer(http, b, old_id, secret, second, retry_unreachable=True)
            new_id = answer.headers[SESSION_HEADER]
            assert new_id != old_id
            assert answer.headers["Location"].startswith(f"/v1/sessions/{new_id}/webrtc/")
            assert answer.headers[NODE_HEADER] == b_id
            await wait_status(db, new_id, ("live",))
            async with http.get(f"{b.base_url}/v1/sessions/{new_id}", headers=learner.auth) as resp:
                view = await resp.json()
            assert (view["continued_from"], view["topic_id"], view["visibility"]) == (
                old_id,
                TOPIC,
                "private",
            )
            async with db.sessions() as s:
                assert (await s.get(Session, new_id)).node_id == b_id  # type: ignore[union-attr]

            # The old session: interrupted, its audio recovered from A's spool by B.
            assert await wait_status(db, old_id, ("interrupted",)) == "interrupted"
            async with asyncio.timeout(20):
                while (tracks := await recordings(db, old_id)).get("learner", ("", 0, 0))[0] != "interrupted":
                    await asyncio.sleep(0.2)
            _, duration, chunks = tracks["learner"]
            assert duration >= 2500 and chunks > 0, tracks

            # A second continuation of the same session is refused; the secret stays unspent.
            async with http.post(
                f"{b.base_url}/v1/sessions/{old_id}/client-secret", headers=learner.auth
            ) as resp:
                again = (await resp.json())["value"]
            async with http.post(
                f"{b.base_url}/v1/sessions/{old_id}/webrtc", data=await third.offer(),
                headers={"Authorization": f"Bearer {again}", "Content-Type": "application/sdp"},
            ) as resp:  # fmt: skip
                assert resp.status == 409 and (await resp.json())["code"] == "session_ended"

            second.send_pcm(speech_like(2.0))
            await asyncio.sleep(2.5)
            async with http.post(f"{b.base_url}/v1/sessions/{new_id}/end", headers=learner.auth) as resp:
                assert resp.status == 200, await resp.text()
            await wait_status(db, new_id, ENDED_OR_LATER)
            new_tracks = await recordings(db, new_id)
            assert new_tracks["learner"][1] > 0, new_tracks
    finally:
        for rtc in (first, second, third):
            await rtc.aclose()


async def test_finalize_jobs_are_shared_by_the_nodes_workers_each_run_once(
    two_nodes: list[RelayProcess], db: Database
) -> None:
    """Sessions ended while both nodes run: the nodes' in-process workers claim the finalize jobs
    from the shared PostgreSQL queue between them, each job done once by one node."""
    a, b = two_nodes
    assert a.proc is not None and b.proc is not None
    sids = await ended_sessions(db, JOBS_FOR_NODES)

    async def all_done() -> bool:
        async with db.sessions() as s:
            left = await s.execute(select(func.count()).select_from(Job).where(Job.status != "done"))
            return left.scalar() == 0

    async with asyncio.timeout(90):
        while not await all_done():
            await asyncio.sleep(0.1)
    rows = [r for r in await jobs.list_jobs(db, limit=1000) if r.session_id in set(sids)]
    assert len(rows) == JOBS_FOR_NODES
    assert {(r.status, r.attempts, r.runs) for r in rows} == {("done", 1, 1)}
    by_pid: dict[int, int] = {}
    for r in rows:
        assert r.locked_by is not None
        pid = int(r.locked_by.split("#", 1)[0].rsplit(":", 1)[1])
        by_pid[pid] = by_pid.get(pid, 0) + 1
    assert set(by_pid) == {a.proc.pid, b.proc.pid}, by_pid  # both nodes took part
    async with db.sessions() as s:
        statuses = (await s.execute(select(Session.status).where(Session.id.in_(sids)))).scalars().all()
    assert set(statuses) == {"processed"}


async def test_serve_workers_2_answers_from_two_nodes_on_one_port_and_stops_on_sigterm(
    tmp_path: Path, db: Database, s3_store_url: str
) -> None:
    """`parley serve --workers 2`: connections to the one port reach two nodes; SIGTERM stops both
    (exit 0, both node rows removed, both processes gone)."""
    relay = RelayProcess(node_env(tmp_path, db, s3_store_url), tmp_path / "relay.log", workers=2)
    await relay.start()
    try:
        seen: set[str] = set()
        async with asyncio.timeout(20):
            while len(seen) < 2:
                # A new connection each time: the kernel spreads connections, not requests.
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                    seen.add(await node_id_of(http, relay))
        assert await registry(db) == dict.fromkeys(seen, True)
    finally:
        code = await relay.stop()
    assert code == 0, relay.log_tail()
    assert await registry(db) == {}
    for node_id in seen:
        pid = int(node_id.rsplit("-", 2)[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_killing_the_parent_of_workers_kills_them_too(
    tmp_path: Path, db: Database, s3_store_url: str
) -> None:
    """SIGKILL to the `--workers 2` parent leaves no worker behind on the port."""
    relay = RelayProcess(node_env(tmp_path, db, s3_store_url), tmp_path / "relay.log", workers=2)
    await relay.start()
    try:
        pids: set[int] = set()
        async with asyncio.timeout(20):
            while len(pids) < 2:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                    pids.add(int((await node_id_of(http, relay)).rsplit("-", 2)[1]))
    finally:
        await relay.kill()
    async with asyncio.timeout(10):
        for pid in pids:
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                await asyncio.sleep(0.1)


async def test_a_worker_that_cannot_start_fails_the_start(
    tmp_path: Path, db: Database, s3_store_url: str
) -> None:
    """A port another program holds: the workers cannot listen, and `parley serve --workers 2` exits 2
    with the reason named."""
    env = node_env(tmp_path, db, s3_store_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["PARLEY_PORT"])))
        taken.listen()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--workers", "2", cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            _, stderr = await proc.communicate()
    assert proc.returncode == 2
    assert "parley: PARLEY_PORT: cannot listen" in stderr.decode()
