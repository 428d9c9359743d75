"""Recording under faults on the real relay (issue #6, "Done when"): nothing said is lost.

Each test runs a real aiortc "browser" against a real relay (the in-process aiohttp app, or a
``parley serve`` process for the kill), the strict simulator upstream, PostgreSQL, and moto's S3
server through the minio backend. A service is made unavailable by cutting a :class:`TcpProxy` in
front of it (refused and reset connections), never by stopping it: moto keeps its objects in memory
and the PostgreSQL server is shared.

"What was sent" is measured at the edges: the browser's RTP packets (20 ms each) for the learner,
and the simulator's audio deltas and final transcripts (a tap on its socket) for the coach. The
measured numbers are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import av
import pytest
from sqlalchemy import func, select, update

from relay.config import Secret
from relay.keys import DATABASE, METRICS, OBJECTS
from relay.observability.metrics import Metrics
from relay.simulator import SimulatorOptions
from relay.simulator.rating import RatingSimulator, RatingSimulatorOptions
from relay.worker.jobs import Worker
from relay.worker.kinds import default_kinds
from relay.worker.rating_model import RatingModel
from storage import migrate
from storage.db import Database
from storage.models import AudioChunk, AudioGap, AudioRecording, Job, Session, TranscriptSegment
from storage.objects import open_object_store
from tests.api import ENDED_OR_LATER, Learner, signup
from tests.fakes.relay_process import RelayProcess, relay_env
from tests.fakes.rtc_client import RtcClient, speech_like
from tests.fakes.sim_tap import SimFinal, TappedSimulator, coach_audio_ms, finals_in_order
from tests.fakes.tcp_proxy import TcpProxy
from tests.fixtures_s3 import free_loopback_port
from tests.live.conftest import TIMEOUT_S, Call, Relay, start_call
from tests.services import fresh_postgres_database

FRAME_MS: Final = 20  # one RTP packet of the browser, one Opus frame
SPEECH_S: Final = 1.5
SILENCE: Final = bytes(int(1.2 * 48000) * 2)  # longer than the topic's 900 ms end-of-turn silence
# The acceptance bounds of issue #6.
MATCH_MS: Final = 100  # a stored track vs what was sent
RESUME_WITHIN_S: Final = 5.0  # uploads after the object store returns
KILL_LOSS_MS: Final = 1000  # per track, before a SIGKILL
# The 30 s (the test takes ~45 s in all). It outlasts the uploader's whole backoff ramp, so
# the store's return meets the longest retry interval, which is what "resume within 5 s" is about.
STORE_OUTAGE_S: Final = 30.0
DB_OUTAGE_S: Final = 10.0
GRACE_S: Final = 2
LONG_SESSION_S: Final = 120.0
CONTIGUOUS_MS: Final = 60  # the recorder's own discontinuity threshold
# The SIGKILL lands this far into one of the coach's answers (the 3rd to the 5th) if nothing of the
# answer is durable yet: the promise's worst moment. If none comes, LATEST_KILL_S into the 5th.
UNSYNCED_KILL_S: Final = 1.05
LATEST_KILL_S: Final = 1.6
KILL_TRIES: Final = 3

RelayFactory = Callable[..., Awaitable[Relay]]


def report(name: str, **numbers: object) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database (127.0.0.1:5432), dropped afterwards."""
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def proxies() -> Iterator[Callable[[str], TcpProxy]]:
    """``make(url)``: a started proxy to the URL's port. Request it before ``relay_factory`` so the
    proxies outlive the relay's shutdown (which finalizes recordings through them)."""
    made: list[TcpProxy] = []

    def make(url: str) -> TcpProxy:
        port = urlsplit(url).port
        assert port is not None
        proxy = TcpProxy(port).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def tapped_sim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The live fixture's simulator keeps a log of what it sent (``relay.sim.sent``)."""
    monkeypatch.setattr("tests.live.conftest.SimulatorServer", TappedSimulator)


def via(url: str, port: int) -> str:
    """``url`` with its port replaced (to go through a proxy)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


def sim_log(relay: Relay) -> list[dict[str, Any]]:
    return cast(TappedSimulator, relay.sim).sent


# -- the conversation -------------------------------------------------------------------------------


async def turn(call: Call, n: int) -> None:
    """The learner says one sentence; wait until the coach's n-th answer has been played."""
    call.rtc.send_pcm(speech_like(SPEECH_S) + SILENCE)
    await call.wait_count("coach.done", n, timeout=30)


async def converse(call: Call, stop: asyncio.Event, first: int = 1) -> int:
    """Turn after turn until ``stop`` is set (the turn under way is finished); returns turns taken."""
    n = first
    while not stop.is_set():
        await turn(call, n)
        n += 1
    return n - first


async def converse_for(call: Call, seconds: float, first: int = 1) -> int:
    """Turns until ``seconds`` have passed (the last turn is finished); returns the next turn number."""
    deadline = time.monotonic() + seconds
    n = first
    while time.monotonic() < deadline:
        await turn(call, n)
        n += 1
    return n


def sent_ms(rtc: RtcClient) -> int:
    return rtc.sent_rtp * FRAME_MS


async def hang_up(relay: Relay, call: Call) -> int:
    """Stop the browser's audio, let its last packets land, end the session; returns ms it sent."""
    call.rtc.freeze()
    sent = sent_ms(call.rtc)
    await asyncio.sleep(0.5)
    resp = await relay.client.post(f"/v1/sessions/{call.session_id}/end", headers=call.learner.auth)
    assert resp.status == 200, await resp.text()
    return sent


def finals_received(call: Call) -> int:
    return len(call.events("transcript.final"))


async def wait_finals(call: Call, count: int, timeout: float = TIMEOUT_S) -> None:
    """Wait until the relay confirmed ``count`` final transcripts stored (``transcript.final``)."""
    await call.wait_event(
        lambda m: m["type"] == "transcript.final" and finals_received(call) >= count, timeout
    )


def same_finals(rows: list[TranscriptSegment], expected: list[SimFinal]) -> None:
    """The stored rows, in conversation order, are exactly the simulator's finals."""
    assert [(r.speaker, r.item_id, r.text) for r in rows] == [
        (f.speaker, f.item_id, f.text) for f in expected
    ]
    assert len({(r.speaker, r.item_id) for r in rows}) == len(rows), "a segment is stored twice"
    assert all(r.final for r in rows)


# -- what was stored --------------------------------------------------------------------------------


@dataclass
class StoredTrack:
    recording: AudioRecording
    chunks: list[AudioChunk]
    gaps: list[AudioGap]

    @property
    def end_ms(self) -> int:
        return max((c.start_ms + c.duration_ms for c in self.chunks), default=0)


async def stored_tracks(db: Database, session_id: str) -> dict[str, StoredTrack]:
    async with db.sessions() as s:
        recordings = (
            (await s.execute(select(AudioRecording).where(AudioRecording.session_id == session_id)))
            .scalars()
            .all()
        )
        out: dict[str, StoredTrack] = {}
        for rec in recordings:
            chunks = (
                await s.execute(
                    select(AudioChunk).where(AudioChunk.recording_id == rec.id).order_by(AudioChunk.seq)
                )
            ).scalars()
            gaps = (
                await s.execute(
                    select(AudioGap).where(AudioGap.recording_id == rec.id).order_by(AudioGap.start_ms)
                )
            ).scalars()
            out[rec.track] = StoredTrack(rec, list(chunks), list(gaps))
    return out


async def chunk_count(db: Database, session_id: str) -> int:
    async with db.sessions() as s:
        return int(
            (
                await s.execute(
                    select(func.count(AudioChunk.id))
                    .join(AudioRecording, AudioRecording.id == AudioChunk.recording_id)
                    .where(AudioRecording.session_id == session_id)
                )
            ).scalar_one()
        )


async def transcript_rows(db: Database, session_id: str) -> list[TranscriptSegment]:
    async with db.sessions() as s:
        rows = await s.execute(
            select(TranscriptSegment)
            .where(TranscriptSegment.session_id == session_id)
            .order_by(TranscriptSegment.seq, TranscriptSegment.start_ms)
        )
        return list(rows.scalars())


def check_manifest(track: StoredTrack, *, continuous: bool) -> None:
    """Every segment listed exactly once (seq 0..n-1), durations adding up, no hole if continuous."""
    name = track.recording.track
    seqs = [c.seq for c in track.chunks]
    assert seqs == list(range(len(seqs))), f"{name}: chunk seqs {seqs} are not 0..n-1, each once"
    keys = [c.object_key for c in track.chunks]
    assert len(set(keys)) == len(keys), f"{name}: an object is listed twice"
    assert track.recording.duration_ms == sum(c.duration_ms for c in track.chunks)
    if continuous:
        holes = [
            (a.seq, b.start_ms - (a.start_ms + a.duration_ms))
            for a, b in itertools.pairwise(track.chunks)
            if abs(b.start_ms - (a.start_ms + a.duration_ms)) > CONTIGUOUS_MS
        ]
        assert not holes, f"{name}: holes (seq, ms) in a continuous track: {holes}"


async def check_objects(store_url: str, session_id: str, tracks: dict[str, StoredTrack]) -> None:
    """The bucket holds exactly the listed segments of each track, at the listed sizes."""
    store = open_object_store(store_url)
    try:
        for name, track in tracks.items():
            listed = {o.key: o.size async for o in store.list(f"sessions/{session_id}/audio/{name}/")}
            assert listed == {c.object_key: c.size_bytes for c in track.chunks}, name
    finally:
        await store.aclose()


def check_complete(
    tracks: dict[str, StoredTrack], *, learner_ms: int, coach_ms: float, status: str = "complete"
) -> None:
    """Both tracks finalized with nothing lost, each matching what was sent within MATCH_MS."""
    assert set(tracks) == {"learner", "coach"}, set(tracks)
    learner, coach = tracks["learner"], tracks["coach"]
    for track in (learner, coach):
        rec = track.recording
        assert rec.status == status, (rec.track, rec.status)
        assert rec.lost_ms == 0, f"{rec.track}: {rec.lost_ms} ms declared lost"
    assert abs(learner.recording.duration_ms - learner_ms) <= MATCH_MS, (
        f"learner track {learner.recording.duration_ms} ms, the browser sent {learner_ms} ms"
    )
    assert abs(coach.recording.duration_ms - coach_ms) <= MATCH_MS, (
        f"coach track {coach.recording.duration_ms} ms, the simulator sent {coach_ms:.0f} ms"
    )
    check_manifest(learner, continuous=True)
    check_manifest(coach, continuous=False)


def decoded_duration_ms(ogg: bytes) -> int:
    """What an Ogg Opus stream decodes to, in ms."""
    with av.open(io.BytesIO(ogg), "r") as container:
        samples: int = sum(frame.samples for frame in container.decode(audio=0))
    return samples * 1000 // 48000


def metric(relay: Relay, sample: str) -> float:
    """The value of one sample (name with its labels, as rendered) of the relay's /metrics."""
    for line in relay.client.app[METRICS].render().decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {sample} sample")


def spool_bytes(relay: Relay) -> float:
    return metric(relay, "parley_spool_bytes")


# -- 1. object store down ---------------------------------------------------------------------------


async def test_object_store_outage_loses_no_audio_and_uploads_resume_within_5s(
    pg_url: str,
    proxies: Callable[[str], TcpProxy],
    s3_store_url: str,
    tapped_sim: None,
    relay_factory: RelayFactory,
) -> None:
    """Object store down 30 s mid-session: 0 ms lost, uploads resume within 5 s, each segment listed once."""
    store = proxies(s3_store_url)
    relay = await relay_factory(
        PARLEY_DATABASE_URL=pg_url, PARLEY_OBJECT_STORE_URL=via(s3_store_url, store.port)
    )
    db = relay.client.app[DATABASE]
    call = await start_call(relay)
    stop = asyncio.Event()
    talk = asyncio.create_task(converse(call, stop))
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(TIMEOUT_S):  # the first segment went up: uploads work, then cut
            while (before := await chunk_count(db, call.session_id)) < 1:
                await asyncio.sleep(0.05)
        store.cut()
        await asyncio.sleep(STORE_OUTAGE_S)
        during = await chunk_count(db, call.session_id)
        waiting = spool_bytes(relay)
        lag_during = metric(relay, "parley_upload_oldest_pending_seconds")
        store_errors = metric(relay, 'parley_upload_errors_total{part="store"}')
        store.restore()
        restored = loop.time()
        async with asyncio.timeout(30):
            while (now := await chunk_count(db, call.session_id)) == during:
                await asyncio.sleep(0.05)
        resumed_s = loop.time() - restored
        async with asyncio.timeout(30):
            while spool_bytes(relay) > 64 * 1024:  # the backlog (30 s per track) went out
                await asyncio.sleep(0.1)
        drained_s = loop.time() - restored
        stop.set()  # the turn under way finishes: the session goes on after the store's return
        await talk
    finally:
        store.restore()
        stop.set()
        if not talk.done():
            talk.cancel()
        await asyncio.gather(talk, return_exceptions=True)
    sent = await hang_up(relay, call)
    report(
        "store outage",
        outage_s=STORE_OUTAGE_S,
        chunks_before=before,
        chunks_during=during,
        first_after=now,
        spool_bytes_at_return=int(waiting),
        upload_resumed_s=round(resumed_s, 2),
        backlog_drained_s=round(drained_s, 2),
        proxy_resets=store.resets,
    )
    assert during <= before + 1, "segments were uploaded while the object store was down"
    assert waiting > 100_000, "the outage's audio should be waiting in the spool"
    # What an operator sees: upload lag growing, failed attempts counted, lag back to 0 after.
    assert lag_during > STORE_OUTAGE_S / 2 and store_errors >= 3, (lag_during, store_errors)
    assert metric(relay, "parley_upload_oldest_pending_seconds") < RESUME_WITHIN_S
    tracks = await stored_tracks(db, call.session_id)
    report(
        "store outage",
        learner_sent_ms=sent,
        learner_stored_ms=tracks["learner"].recording.duration_ms,
        coach_sent_ms=round(coach_audio_ms(sim_log(relay))),
        coach_stored_ms=tracks["coach"].recording.duration_ms,
        lost_ms=[t.recording.lost_ms for t in tracks.values()],
        chunks={k: len(t.chunks) for k, t in tracks.items()},
    )
    check_complete(tracks, learner_ms=sent, coach_ms=coach_audio_ms(sim_log(relay)))
    assert all(not t.gaps for t in tracks.values()), {k: t.gaps for k, t in tracks.items()}
    await check_objects(s3_store_url, call.session_id, tracks)
    assert resumed_s <= RESUME_WITHIN_S, f"uploads resumed {resumed_s:.1f} s after the store came back"


# -- 2. database down -------------------------------------------------------------------------------


async def test_database_outage_stores_every_transcript_segment_in_order(
    pg_url: str,
    proxies: Callable[[str], TcpProxy],
    s3_store_url: str,
    tapped_sim: None,
    relay_factory: RelayFactory,
) -> None:
    """Database down 10 s mid-session: every final transcript stored afterwards, in order, none twice."""
    pg = proxies(pg_url)
    relay = await relay_factory(
        PARLEY_DATABASE_URL=via(pg_url, pg.port), PARLEY_OBJECT_STORE_URL=s3_store_url
    )
    db = relay.client.app[DATABASE]
    call = await start_call(relay)
    await turn(call, 1)
    await wait_finals(call, 2)
    stop = asyncio.Event()
    talk = asyncio.create_task(converse(call, stop, 2))
    loop = asyncio.get_running_loop()
    try:
        pg.cut()
        stored_before = finals_received(call)
        sim_before = len(finals_in_order(sim_log(relay)))
        await asyncio.sleep(DB_OUTAGE_S)
        stored_during = finals_received(call) - stored_before
        made_during = len(finals_in_order(sim_log(relay))) - sim_before
        pg.restore()
        restored = loop.time()
        async with asyncio.timeout(30):
            while finals_received(call) == stored_before + stored_during:
                await asyncio.sleep(0.05)
        resumed_s = loop.time() - restored
        await asyncio.sleep(3.0)
        stop.set()
        await talk
    finally:
        pg.restore()
        stop.set()
        if not talk.done():
            talk.cancel()
        await asyncio.gather(talk, return_exceptions=True)
    expected = finals_in_order(sim_log(relay))
    await wait_finals(call, len(expected))  # every final the simulator sent was confirmed stored
    sent = await hang_up(relay, call)
    rows = await transcript_rows(db, call.session_id)
    report(
        "db outage",
        outage_s=DB_OUTAGE_S,
        finals_made_during=made_during,
        finals_stored_during=stored_during,
        writes_resumed_s=round(resumed_s, 2),
        finals_total=len(expected),
        rows=len(rows),
        proxy_resets=pg.resets,
    )
    assert made_during >= 2, "the simulator should have sent finals while the database was down"
    assert stored_during == 0, "transcripts were confirmed stored while the database was down"
    same_finals(rows, expected)
    tracks = await stored_tracks(db, call.session_id)
    check_complete(tracks, learner_ms=sent, coach_ms=coach_audio_ms(sim_log(relay)))


# -- 3. SIGKILL ---------------------------------------------------------------------------------------


async def _connect(http: aiohttp.ClientSession, learner: Learner, rtc: RtcClient) -> Call:
    resp = await http.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    session_id = body["session"]["id"]
    answer = await http.post(
        f"/v1/sessions/{session_id}/webrtc",
        data=await rtc.offer(),
        headers={
            "Authorization": f"Bearer {body['client_secret']['value']}",
            "Content-Type": "application/sdp",
        },
    )
    assert answer.status == 201, await answer.text()
    await rtc.accept(await answer.text())
    async with asyncio.timeout(TIMEOUT_S):
        await rtc.connected()
        await rtc.wait_channel("events")
    return Call(session_id, rtc, answer.headers["Location"], learner)


async def _continue_after_restart(http: aiohttp.ClientSession, call: Call, sim: TappedSimulator) -> str:
    """Reconnect an interrupted call: the answer names a new session, and its upstream is replayed
    the interrupted session's final transcript, in order, before anything else. Its id."""
    resp = await http.post(f"/v1/sessions/{call.session_id}/client-secret", headers=call.learner.auth)
    assert resp.status == 201, await resp.text()
    secret = (await resp.json())["value"]
    resp = await http.get(f"/v1/sessions/{call.session_id}/transcript", headers=call.learner.auth)
    stored = [seg["text"] for seg in (await resp.json())["segments"] if seg["final"]]
    assert stored, "nothing to replay"
    already = len(sim.sent)
    async with RtcClient() as rtc:
        answer = await http.post(
            f"/v1/sessions/{call.session_id}/webrtc",
            data=await rtc.offer(),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/sdp"},
        )
        assert answer.status == 201, await answer.text()
        continued_id = answer.headers["x-parley-session-id"]
        assert continued_id != call.session_id
        assert answer.headers["Location"].startswith(f"/v1/sessions/{continued_id}/webrtc/")
        await rtc.accept(await answer.text())
        async with asyncio.timeout(TIMEOUT_S):
            await rtc.connected()
            while True:
                replayed = [
                    e["item"]["content"][0]["text"]
                    for e in sim.sent[already:]
                    if e["type"] == "conversation.item.added" and e["item"]["id"].startswith("replay_")
                ]
                if len(replayed) >= len(stored):
                    break
                await asyncio.sleep(0.05)
        assert replayed == stored
        resp = await http.post(f"/v1/sessions/{continued_id}/end", headers=call.learner.auth)
        assert resp.status == 200, await resp.text()
    return continued_id


def _segments_in_progress(track_spool: Path) -> dict[str, int]:
    """Name -> bytes of the track's segment(s) being written (``.ogg.part``)."""
    sizes = {}
    for part in track_spool.glob("*.ogg.part"):
        with contextlib.suppress(FileNotFoundError):
            sizes[part.name] = part.stat().st_size
    return sizes


async def worst_kill_moment(coach_spool: Path, speaking_at: float, *, last_try: bool) -> bool:
    """Wait for the moment to kill: over 1 s into the coach's answer with none of it synced yet.

    The answer starts a new segment in the spool (``<seq>.ogg.part``, its headers written at once);
    while that file has not grown, nothing of the answer would survive a kill. Returns True when
    such a moment came (the promise's worst case). Otherwise returns False as soon as the answer was
    synced, or, on the ``last_try``, LATEST_KILL_S into the answer (kill anyway).
    """
    before = set(_segments_in_progress(coach_spool))  # the previous answer's segment, still open
    first_size: int | None = None
    async with asyncio.timeout(10):
        while True:
            heard_s = time.monotonic() - speaking_at
            new = {k: v for k, v in _segments_in_progress(coach_spool).items() if k not in before}
            size = max(new.items())[1] if new else None
            if first_size is None:
                first_size = size
            synced = first_size is not None and size != first_size
            if heard_s >= UNSYNCED_KILL_S and first_size is not None and not synced:
                return True
            if heard_s >= LATEST_KILL_S or (synced and not last_try):
                return False
            await asyncio.sleep(0.005)


async def test_sigkill_mid_session_loses_at_most_1s_per_track_and_a_reconnect_continues_it(
    pg_url: str, s3_store_url: str, tmp_path: Path, loopback_ice: None
) -> None:
    """Relay SIGKILLed mid-answer, then restarted: the session is `interrupted`, each track misses <= 1 s;
    the learner's reconnect opens a continuation session whose model is replayed the stored transcript."""
    db = Database(pg_url)
    await migrate.upgrade(db)
    sim = TappedSimulator(SimulatorOptions(strict=True, first_audio_ms=150, realtime_pacing=False))
    await sim.start()
    env = relay_env(
        PARLEY_DATA_DIR=str(tmp_path / "data"),
        PARLEY_PORT=str(free_loopback_port()),
        PARLEY_SECRET_KEY="k" * 48,
        PARLEY_DATABASE_URL=pg_url,
        PARLEY_OBJECT_STORE_URL=s3_store_url,
        PARLEY_UPSTREAM_URL=sim.ws_base_url,
        PARLEY_RTC_HOST_ADDRESSES="127.0.0.1",
        PARLEY_RTC_REMOTE_ALLOW="127.0.0.0/8",
        PARLEY_DRAIN_TIMEOUT="1",
        PARLEY_MAX_LOOP_LAG_MS="2000",
    )
    relay = RelayProcess(env, tmp_path / "relay.log")
    rtc = RtcClient(ping_interval_s=1.0)
    try:
        await relay.start()
        async with aiohttp.ClientSession(relay.base_url) as http:
            learner = await signup(http)  # type: ignore[arg-type]
            call = await _connect(http, learner, rtc)
            await turn(call, 1)
            await turn(call, 2)
            coach_spool = tmp_path / "data" / "spool" / call.session_id / "coach"
            for n in range(3, 3 + KILL_TRIES):  # whether the worst moment comes depends on timing
                call.rtc.send_pcm(speech_like(SPEECH_S) + SILENCE)
                await call.wait_count("coach.speaking", n, timeout=30)
                speaking_at = time.monotonic()
                last_try = n == 2 + KILL_TRIES
                worst = await worst_kill_moment(coach_spool, speaking_at, last_try=last_try)
                if worst or last_try:
                    break
                await call.wait_count("coach.done", n, timeout=30)
            rtc.freeze()
            learner_sent = sent_ms(rtc)
            await relay.kill()
            killed_at = time.monotonic()
            done = {e["item_id"] for e in call.events("coach.done")}
            (current,) = {e["item_id"] for e in call.events("coach.speaking")} - done
            heard = min(coach_audio_ms(sim.sent, item_ids={current}), (killed_at - speaking_at) * 1000)
            coach_played = coach_audio_ms(sim.sent, item_ids=done) + heard
            await rtc.aclose()

            await relay.start()
            restarted_at = time.monotonic()
            async with asyncio.timeout(30):
                while True:
                    resp = await http.get(f"/v1/sessions/{call.session_id}", headers=learner.auth)
                    assert resp.status == 200, await resp.text()
                    if (await resp.json())["status"] == "interrupted":
                        break
                    await asyncio.sleep(0.2)
            recovered_s = time.monotonic() - restarted_at
            continued_id = await _continue_after_restart(http, call, sim)
        tracks = await stored_tracks(db, call.session_id)
        async with db.sessions() as s:
            session = (await s.execute(select(Session).where(Session.id == call.session_id))).scalar_one()
        learner_track, coach_track = tracks["learner"], tracks["coach"]
        report(
            "sigkill",
            learner_sent_ms=learner_sent,
            learner_stored_ms=learner_track.recording.duration_ms,
            learner_missing_ms=learner_sent - learner_track.recording.duration_ms,
            coach_played_ms=round(coach_played),
            coach_stored_ms=coach_track.recording.duration_ms,
            coach_missing_ms=round(coach_played - coach_track.recording.duration_ms),
            recovered_s=round(recovered_s, 2),
            killed_unsynced=worst,
            killed_into_answer_ms=round((killed_at - speaking_at) * 1000),
            answer=n,
            chunks={k: len(t.chunks) for k, t in tracks.items()},
        )
        assert session.status == "interrupted" and session.ended_at is not None
        async with db.sessions() as s:
            continued = (await s.execute(select(Session).where(Session.id == continued_id))).scalar_one()
        assert continued.continued_from_id == call.session_id
        for track in (learner_track, coach_track):
            assert track.recording.status == "interrupted", (track.recording.track, track.recording.status)
        check_manifest(learner_track, continuous=True)
        check_manifest(coach_track, continuous=False)
        await check_objects(s3_store_url, call.session_id, tracks)
        assert not (tmp_path / "data" / "spool" / call.session_id).exists(), "recovery left spool behind"
        for name, sent, stored in (
            ("learner", learner_sent, learner_track.recording.duration_ms),
            ("coach", coach_played, coach_track.recording.duration_ms),
        ):
            assert stored <= sent + MATCH_MS, f"{name}: {stored} ms stored, only {sent:.0f} ms sent"
            assert sent - stored <= KILL_LOSS_MS, f"{name}: {sent - stored:.0f} ms missing after the kill"
    finally:
        await rtc.aclose()
        await relay.stop()
        await sim.aclose()
        await db.aclose()
        assert not sim.failures, f"the simulator saw protocol drift: {sim.failures!r}"


# -- 4. the client vanishes ---------------------------------------------------------------------------


def vanish(rtc: RtcClient) -> int:
    """The tab dies: the browser's UDP sockets close without DTLS close_notify, SCTP ABORT or DELETE.

    Returns the ms of audio the browser sent.
    """
    rtc.freeze()
    sent = sent_ms(rtc)
    dtls: Any = rtc.pc.getTransceivers()[0].sender.transport
    for protocol in dtls.transport._connection._protocols:  # aioice's StunProtocol per local candidate
        protocol.transport.close()
    return sent


async def test_client_vanishing_without_goodbye_ends_the_recording_at_grace_expiry(
    pg_url: str, s3_store_url: str, tapped_sim: None, relay_factory: RelayFactory
) -> None:
    """A browser gone without a goodbye: the recording ends when the grace window expires, complete."""
    relay = await relay_factory(
        PARLEY_DATABASE_URL=pg_url,
        PARLEY_OBJECT_STORE_URL=s3_store_url,
        PARLEY_RECONNECT_GRACE=str(GRACE_S),
    )
    db = relay.client.app[DATABASE]
    call = await start_call(relay)
    await turn(call, 1)
    await turn(call, 2)
    sent = vanish(call.rtc)
    vanished_at = time.monotonic()
    async with asyncio.timeout(30):
        while True:
            resp = await relay.client.get(f"/v1/sessions/{call.session_id}", headers=call.learner.auth)
            if (await resp.json())["status"] in ENDED_OR_LATER:
                break
            await asyncio.sleep(0.1)
    ended_s = time.monotonic() - vanished_at
    tracks = await stored_tracks(db, call.session_id)
    async with db.sessions() as s:
        session = (await s.execute(select(Session).where(Session.id == call.session_id))).scalar_one()
    learner, coach = tracks["learner"], tracks["coach"]
    report(
        "vanish",
        ended_after_s=round(ended_s, 2),
        learner_sent_ms=sent,
        learner_stored_ms=learner.recording.duration_ms,
        coach_stored_ms=coach.recording.duration_ms,
        gaps={k: [(g.start_ms, g.end_ms, g.reason) for g in t.gaps] for k, t in tracks.items()},
        learner_end_ms=learner.end_ms,
    )
    assert session.end_reason == "grace_expired", session.end_reason
    check_complete(tracks, learner_ms=sent, coach_ms=coach_audio_ms(sim_log(relay)))
    for name, track in tracks.items():
        (gap,) = track.gaps
        assert gap.reason == "reconnect"
        # The peer was declared lost after the audio stopped; the gap then runs to the grace expiry.
        assert gap.start_ms >= track.end_ms - CONTIGUOUS_MS, (name, gap.start_ms, track.end_ms)
        span = gap.end_ms - gap.start_ms
        assert GRACE_S * 1000 <= span <= GRACE_S * 1000 + 1000, (name, gap.start_ms, gap.end_ms)
    assert ended_s <= 5.5 + GRACE_S + 2, f"the session ended {ended_s:.1f} s after the browser vanished"
    await check_objects(s3_store_url, call.session_id, tracks)


# -- 5. two minutes ---------------------------------------------------------------------------------


async def test_two_minute_session_is_stored_completely(
    pg_url: str, s3_store_url: str, tapped_sim: None, relay_factory: RelayFactory
) -> None:
    """2 minutes of conversation: both tracks match what was sent within 100 ms, every final in order."""
    relay = await relay_factory(PARLEY_DATABASE_URL=pg_url, PARLEY_OBJECT_STORE_URL=s3_store_url)
    db = relay.client.app[DATABASE]
    call = await start_call(relay)
    started = time.monotonic()
    turns = await converse_for(call, LONG_SESSION_S) - 1
    expected = finals_in_order(sim_log(relay))
    await wait_finals(call, len(expected))
    sent = await hang_up(relay, call)
    elapsed = time.monotonic() - started
    tracks = await stored_tracks(db, call.session_id)
    rows = await transcript_rows(db, call.session_id)
    coach_sent = coach_audio_ms(sim_log(relay))
    audio = await relay.client.get(f"/v1/sessions/{call.session_id}/audio/learner", headers=call.learner.auth)
    assert audio.status == 200, await audio.text()
    decoded_ms = decoded_duration_ms(await audio.read())
    report(
        "two minutes",
        session_s=round(elapsed, 1),
        turns=turns,
        learner_sent_ms=sent,
        learner_stored_ms=tracks["learner"].recording.duration_ms,
        learner_timeline_ms=(tracks["learner"].chunks[0].start_ms, tracks["learner"].end_ms),
        learner_decoded_ms=decoded_ms,
        coach_sent_ms=round(coach_sent),
        coach_stored_ms=tracks["coach"].recording.duration_ms,
        finals=len(expected),
        rows=len(rows),
        chunks={k: len(t.chunks) for k, t in tracks.items()},
    )
    same_finals(rows, expected)
    assert [r.speaker for r in rows] == ["learner", "coach"] * turns
    assert all(not t.gaps for t in tracks.values())
    await check_objects(s3_store_url, call.session_id, tracks)
    # Read back as one stream: on the session timeline from 0 (silence before the first packet).
    learner_end = tracks["learner"].end_ms
    assert abs(decoded_ms - learner_end) <= MATCH_MS, (
        f"the learner's stream plays {decoded_ms} of {learner_end} ms"
    )
    check_complete(tracks, learner_ms=sent, coach_ms=coach_sent)


# -- 6. the model drops, then post-processing fails -------------------------------------------------


async def test_upstream_drop_and_failing_rating_keep_audio_and_transcript_complete(
    pg_url: str, s3_store_url: str, tapped_sim: None, relay_factory: RelayFactory
) -> None:
    """The model's connection drops mid-conversation and the rating model fails every call: the
    session ends processing_failed with a failed rating, and both tracks and every stored final are
    complete and readable, the same before and after post-processing."""
    async with RatingSimulator(RatingSimulatorOptions(fail_status=503)) as rating_sim:
        relay = await relay_factory(
            PARLEY_DATABASE_URL=pg_url,
            PARLEY_OBJECT_STORE_URL=s3_store_url,
            PARLEY_WORKERS_IN_PROCESS="0",  # this test's own worker runs the job, with fast retries
        )
        db = relay.client.app[DATABASE]
        relay.set_upstream(drop_after_s=4.0)
        call = await start_call(relay)
        relay.set_upstream(drop_after_s=None)  # only the first upstream connection drops
        await turn(call, 1)
        await call.wait_event(lambda m: m.get("type") == "error" and m.get("code") == "upstream_retrying")
        await turn(call, 2)
        await turn(call, 3)
        sent = await hang_up(relay, call)
        tracks = await stored_tracks(db, call.session_id)
        rows = await transcript_rows(db, call.session_id)
        before = await readable(relay, call)

        async with db.sessions.begin() as s:  # two attempts, so the job dies within the test
            await s.execute(update(Job).where(Job.session_id == call.session_id).values(max_attempts=2))
        model = RatingModel(
            base_url=rating_sim.base_url, api_key=Secret("sk-parley-test"), model="rating-test",
            timeout_s=5.0, kind="simulator",
        )  # fmt: skip
        worker = Worker(db, relay.client.app[OBJECTS], default_kinds(model), metrics=Metrics(),
                        poll_s=0.05, backoff_base_s=0.01, backoff_cap_s=0.05)  # fmt: skip
        try:
            async with asyncio.timeout(30):
                while (await job_status(db, call.session_id)) != "dead":
                    if await worker.run_once() is None:
                        await asyncio.sleep(0.02)
        finally:
            await worker.aclose()
            await model.aclose()
        assert rating_sim.calls == 2

    report("upstream drop + failing rating", learner_sent_ms=sent, rows=len(rows),
           stored_ms={k: t.recording.duration_ms for k, t in tracks.items()})  # fmt: skip
    view = await (await relay.client.get(f"/v1/sessions/{call.session_id}", headers=call.learner.auth)).json()
    assert view["status"] == "processing_failed"
    assert view["rating"]["status"] == "failed" and view["rating"]["metrics"]["learner_turns"] >= 2
    # Audio: nothing declared lost, the learner's track is all the browser sent.
    learner, coach = tracks["learner"], tracks["coach"]
    assert learner.recording.status == coach.recording.status == "complete"
    assert learner.recording.lost_ms == coach.recording.lost_ms == 0
    assert abs(learner.recording.duration_ms - sent) <= MATCH_MS, (learner.recording.duration_ms, sent)
    check_manifest(learner, continuous=True)
    check_manifest(coach, continuous=False)
    assert 0 < coach.recording.duration_ms <= coach_audio_ms(sim_log(relay)) + MATCH_MS
    # Transcript: every stored row is a final the model sent, each once; the browser was told of each.
    # A coach answer cut when the upstream dropped is stored as what was heard: a truncated prefix.
    sent_finals = {(f.speaker, f.item_id): f.text for f in finals_in_order(sim_log(relay))}
    for r in rows:
        full = sent_finals.get((r.speaker, r.item_id))
        assert full is not None, (r.speaker, r.item_id)
        assert r.text == full or (r.truncated and full.startswith(r.text)), (r.text, full)
    assert sum(r.truncated for r in rows) <= 1
    assert len({(r.speaker, r.item_id) for r in rows}) == len(rows)
    assert [r.speaker for r in rows].count("coach") >= 3
    # The browser was told of each stored row (a cut answer twice: whole, then as heard).
    assert {e["segment"]["id"] for e in call.events("transcript.final")} == {r.id for r in rows}
    # Post-processing failing changed nothing the learner can read.
    assert await readable(relay, call) == before


async def readable(relay: Relay, call: Call) -> tuple[Any, bytes, bytes]:
    """The transcript and both audio tracks, as the learner reads them through the API."""
    auth = call.learner.auth
    transcript = await (
        await relay.client.get(f"/v1/sessions/{call.session_id}/transcript", headers=auth)
    ).json()
    tracks = []
    for track in ("learner", "coach"):
        resp = await relay.client.get(f"/v1/sessions/{call.session_id}/audio/{track}", headers=auth)
        assert resp.status == 200, track
        tracks.append(await resp.read())
    assert all(tracks) and len(transcript["segments"]) >= 6
    return transcript, tracks[0], tracks[1]


async def job_status(db: Database, session_id: str) -> str:
    async with db.sessions() as s:
        status: str = (await s.execute(select(Job.status).where(Job.session_id == session_id))).scalar_one()
    return status
