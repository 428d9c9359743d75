"""ModelLink against the real simulator via the official SDK: turns, control events, faults, reconnects."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest
from openai.types.realtime import (
    ConversationItemTruncatedEvent,
    InputAudioBufferCommittedEvent,
    RealtimeErrorEvent,
    RealtimeSessionCreateRequest,
    ResponseDoneEvent,
    SessionUpdatedEvent,
)

from relay.errors import UpstreamError, is_retryable
from relay.model import protocol
from relay.model.link import LinkStatus, ModelLink, RetryPolicy, UpstreamFatal
from relay.simulator import SimulatorOptions, SimulatorServer

from .conftest import (
    FAST_RETRY,
    FAST_SIM,
    HISTORY,
    INSTRUCTIONS,
    Harness,
    MakeHarness,
    MakeSim,
    eventually,
    heal_after_first_ready,
)

TURN_ORDER = [
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "response.created",
    "response.output_audio.delta",
    "response.done",
]


def is_subsequence(wanted: list[str], types: list[str]) -> bool:
    it = iter(types)
    return all(kind in it for kind in wanted)


def replayed(h: Harness) -> list[tuple[str, str]]:
    """(item id, text) of the replayed items the simulator confirmed with conversation.item.added."""
    out = []
    for event in h.events:
        item = getattr(event, "item", None)
        if (
            event.type == "conversation.item.added"
            and item is not None
            and (item.id or "").startswith("replay_")
        ):
            out.append((item.id, item.content[0].text))
    return out


async def test_connects_and_configures_the_session(sim: SimulatorServer, make_harness: MakeHarness) -> None:
    """On connect the link sends session.update; session.updated echoes the instructions; status ready."""
    h = make_harness(sim)
    h.start()
    updated = await h.until_event("session.updated")
    assert h.types()[:2] == ["session.created", "session.updated"]
    assert isinstance(updated, SessionUpdatedEvent)
    assert isinstance(updated.session, RealtimeSessionCreateRequest)
    assert updated.session.instructions == INSTRUCTIONS
    assert h.statuses == [("connecting", None), ("ready", None)]
    assert h.link.connected and (h.link.session_id or "").startswith("sess_")
    assert h.history_calls == 0 and h.config_calls == 1  # nothing to replay on the first connection
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert {"test:model-link:recv", "test:model-link:send"} <= names


async def test_a_continuing_conversation_replays_its_history_on_the_first_connection(
    sim: SimulatorServer, make_harness: MakeHarness
) -> None:
    """With replay_first (a session continuing one whose relay died) the first upstream session gets
    session.update, then the earlier conversation as items, before the link reports ready."""
    h = make_harness(sim, replay_first=True)
    h.start()
    await h.until_ready()
    assert h.history_calls == 1 and h.link.stats.reconnects == 0
    assert h.link.stats.replayed_items == len(HISTORY)
    await eventually(lambda: len(replayed(h)) == len(HISTORY), "replayed items")
    assert [text for _, text in replayed(h)] == [item.text for item in HISTORY]
    assert h.types()[:2] == ["session.created", "session.updated"]
    h.push_turn()  # the learner's next words come after what was said before
    committed = await h.until_event("input_audio_buffer.committed")
    assert isinstance(committed, InputAudioBufferCommittedEvent)
    assert committed.previous_item_id == replayed(h)[-1][0]


async def test_a_spoken_turn_arrives_through_on_event(
    sim: SimulatorServer, make_harness: MakeHarness
) -> None:
    """Speech pushed as 20 ms chunks gives a full server-VAD turn, in order, through on_event."""
    h = make_harness(sim)
    h.start()
    await h.until_ready()
    pushed = h.push_turn()
    done = await h.until_event("response.done")
    assert is_subsequence(TURN_ORDER, h.types()), h.types()
    assert isinstance(done, ResponseDoneEvent) and done.response.status == "completed"
    assert h.link.active_response_id is None
    # The turn can end before the last (trailing silence) chunk's 40 ms batch timer fires: every
    # chunk must still go out, none dropped.
    await eventually(lambda: h.link.stats.audio_chunks_sent == pushed, f"all {pushed} chunks sent")
    assert h.link.stats.dropped_audio_chunks == 0


async def test_control_event_truncate_goes_out(sim: SimulatorServer, make_harness: MakeHarness) -> None:
    """send(truncate) reaches the upstream, which answers conversation.item.truncated for the coach item."""
    h = make_harness(sim)
    h.start()
    await h.until_ready()
    h.push_turn()
    done = await h.until_event("response.done")
    assert isinstance(done, ResponseDoneEvent) and done.response.output
    answer = done.response.output[0].id
    assert answer is not None
    h.link.send(protocol.truncate(answer, 120))
    truncated = await h.until_event("conversation.item.truncated")
    assert isinstance(truncated, ConversationItemTruncatedEvent)
    assert (truncated.item_id, truncated.audio_end_ms) == (answer, 120)
    assert h.link.stats.control_events_sent == 1


async def test_drop_mid_turn_reconnects_configures_and_replays_history(
    make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """A TCP drop mid-answer: retrying, a new session gets session.update and the history, then ready."""
    sim = await make_sim(drop_after_s=0.6, realtime_pacing=True)
    dropped_while_away: list[int] = []

    def hook(h: Harness, status: LinkStatus, code: str | None) -> None:
        heal_after_first_ready(h, status, code)
        if status == "retrying":  # audio pushed while the upstream is away is dropped, not queued
            h.link.push_audio(b"\x00\x00" * 480)
            dropped_while_away.append(h.link.stats.audio_dropped_disconnected)

    h = make_harness(sim, on_status=hook)
    h.start()
    await h.until_ready()
    h.push_turn()
    await h.until_event("session.created", 2)
    await h.until_ready(2)
    first_turn = h.types()[: h.types().index("session.created", 1)]
    assert "response.created" in first_turn and "response.done" not in first_turn  # dropped mid-answer
    assert h.statuses == [
        ("connecting", None),
        ("ready", None),
        ("retrying", "upstream_retrying"),
        ("ready", None),
    ]
    assert dropped_while_away and dropped_while_away[0] >= 1
    assert h.link.active_response_id is None  # per-connection state did not survive

    updated = await h.until_event("session.updated", 2)
    assert isinstance(updated, SessionUpdatedEvent)
    assert isinstance(updated.session, RealtimeSessionCreateRequest)
    assert updated.session.instructions == INSTRUCTIONS
    await eventually(lambda: len(replayed(h)) == 2, "replayed items")
    assert replayed(h) == [("replay_00000", HISTORY[0].text), ("replay_00001", HISTORY[1].text)]
    second = h.events[h.events.index(updated) :]  # session.update went out before the replay
    assert [e.type for e in second[:5]] == [
        "session.updated",
        *["conversation.item.added", "conversation.item.done"] * 2,
    ]
    assert (h.history_calls, h.config_calls) == (1, 2)
    assert (h.link.stats.reconnects, h.link.stats.replayed_items) == (1, 2)

    h.push_turn()  # new audio lands after the replayed history
    committed = await h.until_event("input_audio_buffer.committed", 2)
    assert isinstance(committed, InputAudioBufferCommittedEvent)
    assert committed.previous_item_id == "replay_00001"


async def test_session_expiry_is_survived_in_a_fresh_session(
    make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """session_expired + close 1001: retrying (session_expired), then a configured, replayed session."""
    sim = await make_sim(max_session_s=0.3)
    h = make_harness(sim, on_status=heal_after_first_ready)
    h.start()
    await h.until_ready(2)
    error = await h.until_event("error")
    assert isinstance(error, RealtimeErrorEvent) and error.error.code == "session_expired"  # forwarded too
    assert h.statuses == [
        ("connecting", None),
        ("ready", None),
        ("retrying", "session_expired"),
        ("ready", None),
    ]
    await eventually(lambda: len(replayed(h)) == 2, "replayed items")
    assert h.count("session.updated") == 2


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012, 1013])
async def test_retryable_close_codes_reconnect(
    make_sim: MakeSim, make_harness: MakeHarness, code: int
) -> None:
    """An upstream close with 1000/1001/1011/1012/1013 is retried into a new, configured session."""
    sim = await make_sim(close_after_s=0.1, close_code=code)
    h = make_harness(sim, on_status=heal_after_first_ready)
    h.start()
    await h.until_ready(2)
    assert h.statuses[2] == ("retrying", "upstream_retrying")
    await h.until_event("session.updated", 2)
    assert h.link.stats.reconnects == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_handshake_auth_rejection_is_fatal_without_retry(
    make_sim: MakeSim, make_harness: MakeHarness, status: int
) -> None:
    """A handshake refused with 401/403 fails at once with upstream_auth_failed, never retried."""
    sim = await make_sim(reject_status=status)
    h = make_harness(sim)
    error = await h.run_to_failure()
    assert isinstance(error, UpstreamFatal) and isinstance(error, UpstreamError)
    assert (error.code, error.retryable, is_retryable(error)) == ("upstream_auth_failed", False, False)
    assert h.statuses == [("connecting", None), ("failed", "upstream_auth_failed")]
    assert h.link.stats.connect_attempts == 1


async def test_wrong_api_key_is_fatal(make_harness: MakeHarness) -> None:
    """With a key-checking simulator, a wrong key ends in upstream_auth_failed after one attempt."""
    async with SimulatorServer(SimulatorOptions(**{**FAST_SIM, "api_key": "sk-right"})) as sim:
        h = make_harness(sim, api_key="sk-wrong")
        error = await h.run_to_failure()
    assert isinstance(error, UpstreamFatal) and error.code == "upstream_auth_failed"
    assert h.link.stats.connect_attempts == 1


@pytest.mark.parametrize(
    ("error_code", "fatal_code"),
    [("insufficient_quota", "upstream_quota"), ("invalid_api_key", "upstream_auth_failed")],
)
async def test_fatal_error_event_ends_the_link(
    make_sim: MakeSim, make_harness: MakeHarness, error_code: str, fatal_code: str
) -> None:
    """An error event with a quota or key code is forwarded, then run() raises UpstreamFatal; no retry."""
    sim = await make_sim(error_after_s=0.05, error_code=error_code)
    h = make_harness(sim)
    error = await h.run_to_failure()
    assert isinstance(error, UpstreamFatal) and error.code == fatal_code
    last = h.events[-1]
    assert isinstance(last, RealtimeErrorEvent) and last.error.code == error_code
    assert h.statuses == [("connecting", None), ("ready", None), ("failed", fatal_code)]
    assert h.link.stats.connect_attempts == 1


async def test_harmless_error_event_keeps_the_session(make_sim: MakeSim, make_harness: MakeHarness) -> None:
    """A server_error event is only forwarded: the link stays ready on the same upstream session."""
    sim = await make_sim(error_after_s=0.05)
    h = make_harness(sim)
    h.start()
    await h.until_event("error")
    h.push_turn()
    await h.until_event("response.done")
    assert h.statuses == [("connecting", None), ("ready", None)] and h.link.stats.connect_attempts == 1


@pytest.mark.parametrize("code", [1008, 4000])
async def test_policy_close_is_fatal(make_sim: MakeSim, make_harness: MakeHarness, code: int) -> None:
    """Close 1008 or 4xxx is not retried: upstream_rejected."""
    sim = await make_sim(close_after_s=0.05, close_code=code)
    h = make_harness(sim)
    error = await h.run_to_failure()
    assert isinstance(error, UpstreamFatal) and error.code == "upstream_rejected"
    assert h.link.stats.connect_attempts == 1


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retries_exhausted_is_fatal_upstream_unavailable(
    make_sim: MakeSim, make_harness: MakeHarness, status: int
) -> None:
    """Handshakes refused with 429/5xx are retried max_attempts times, then upstream_unavailable."""
    sim = await make_sim(reject_status=status)
    h = make_harness(sim, retry=RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.02))
    error = await h.run_to_failure()
    assert isinstance(error, UpstreamFatal) and error.code == "upstream_unavailable"
    assert h.statuses == [
        ("connecting", None),
        ("retrying", "upstream_retrying"),
        ("retrying", "upstream_retrying"),
        ("failed", "upstream_unavailable"),
    ]
    assert h.link.stats.connect_attempts == 3


async def test_flapping_upstream_runs_out_of_attempts(make_sim: MakeSim, make_harness: MakeHarness) -> None:
    """Sessions that drop before stable_after_s do not reset the attempt count: the link gives up."""
    sim = await make_sim(close_after_s=0.05, close_code=1011)
    h = make_harness(sim, retry=RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.02))
    error = await h.run_to_failure()
    assert isinstance(error, UpstreamFatal) and error.code == "upstream_unavailable"
    assert [s for s, _ in h.statuses] == [
        "connecting",
        "ready",
        "retrying",
        "ready",
        "retrying",
        "ready",
        "failed",
    ]


async def test_handshake_timeout_is_retried(make_harness: MakeHarness, sim: SimulatorServer) -> None:
    """A server that never answers the upgrade times out each attempt, then upstream_unavailable."""
    async with SilentServer() as url:
        policy = RetryPolicy(max_attempts=2, initial_delay_s=0.01, max_delay_s=0.01, connect_timeout_s=0.2)
        h = make_harness(sim, base_url=url, retry=policy)
        started = time.monotonic()
        error = await h.run_to_failure()
    assert isinstance(error, UpstreamFatal) and error.code == "upstream_unavailable"
    assert h.link.stats.connect_attempts == 2 and time.monotonic() - started < 2


async def test_push_audio_never_blocks_and_drops_the_oldest(
    sim: SimulatorServer, make_harness: MakeHarness
) -> None:
    """push_audio is synchronous; past max_send_queue the oldest audio is dropped and counted."""
    h = make_harness(sim, max_send_queue=4)
    h.start()
    await h.until_ready()
    chunk = b"\x00\x00" * 480
    started = time.perf_counter()
    for _ in range(1000):
        h.link.push_audio(chunk)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.25
    assert h.link.stats.audio_dropped_overflow == 996
    await eventually(lambda: h.link.stats.audio_chunks_sent == 4, "the 4 queued chunks sent")
    assert h.link.stats.dropped_audio_chunks == 996


async def test_audio_before_ready_is_dropped(sim: SimulatorServer, make_harness: MakeHarness) -> None:
    """Audio pushed before an upstream session is ready is counted as dropped, never sent late."""
    h = make_harness(sim)
    h.link.push_audio(b"\x00\x00" * 480)
    h.link.push_audio(b"")  # nothing to send, nothing counted
    with pytest.raises(ValueError):
        h.link.push_audio(b"\x00")
    h.start()
    await h.until_ready()
    await asyncio.sleep(0.05)
    assert (h.link.stats.audio_dropped_disconnected, h.link.stats.audio_chunks_sent) == (1, 0)


async def test_aclose_is_idempotent_drains_control_and_run_returns(
    sim: SimulatorServer, make_harness: MakeHarness
) -> None:
    """aclose (twice, concurrently): queued control events go out, the socket closes, run() returns None."""
    h = make_harness(sim)
    task = h.start()
    await h.until_ready()
    h.link.send({"type": "response.cancel"})
    h.link.send(protocol.truncate("item_unknown", 10))
    await asyncio.gather(h.link.aclose(), h.link.aclose())
    assert task.done() and task.result() is None
    assert h.link.stats.control_events_sent == 2
    assert not h.link.connected and h.link.session_id is None
    await h.link.aclose()
    h.link.send({"type": "response.cancel"})  # ignored after close
    h.link.push_audio(b"\x00\x00")
    await eventually(lambda: sim.active_connections == 0, "the simulator to see the close")


async def test_aclose_during_backoff_returns_promptly(make_sim: MakeSim, make_harness: MakeHarness) -> None:
    """aclose while waiting to retry ends run() at once, without a fatal error."""
    sim = await make_sim(reject_status=503)
    h = make_harness(sim, retry=RetryPolicy(initial_delay_s=30, max_delay_s=30))
    task = h.start()
    await h.until_status("retrying")
    started = time.monotonic()
    await h.link.aclose()
    assert task.done() and task.result() is None and time.monotonic() - started < 1


async def test_aclose_during_handshake_returns_promptly(
    sim: SimulatorServer, make_harness: MakeHarness
) -> None:
    """aclose while a handshake hangs cancels it; run() returns."""
    async with SilentServer() as url:
        h = make_harness(sim, base_url=url, retry=RetryPolicy(connect_timeout_s=30))
        task = h.start()
        await eventually(lambda: h.link.stats.connect_attempts == 1, "a connection attempt")
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await h.link.aclose()
        assert task.done() and task.result() is None and time.monotonic() - started < 1
    assert h.statuses == [("connecting", None)]


async def test_aclose_before_run_and_run_only_once(sim: SimulatorServer, make_harness: MakeHarness) -> None:
    """aclose before run makes run return at once, silently; a second run() is refused."""
    h = make_harness(sim)
    await h.link.aclose()
    await asyncio.wait_for(h.link.run(), 1)
    assert h.statuses == [] and h.link.stats.connect_attempts == 0
    with pytest.raises(RuntimeError):
        await h.link.run()


async def test_cancelling_run_closes_the_socket(sim: SimulatorServer, make_harness: MakeHarness) -> None:
    """Cancelling the task running run() closes the upstream socket and leaves no task behind."""
    h = make_harness(sim)
    task = h.start()
    await h.until_ready()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not h.link.connected
    await eventually(lambda: sim.active_connections == 0, "the simulator to see the close")
    await asyncio.wait_for(h.link.aclose(), 1)


async def test_logs_carry_no_key_and_no_payload(
    make_sim: MakeSim, make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG, a turn plus a reconnect logs ids, types, codes and counts, never the key or any text."""
    caplog.set_level(logging.DEBUG, logger="relay.model")
    sim = await make_sim(close_after_s=0.4)
    h = make_harness(sim, api_key="sk-secret-test-key-123", on_status=heal_after_first_ready)
    h.start()
    await h.until_ready()
    h.push_turn()
    await h.until_ready(2)
    records = [r for r in caplog.records if r.name.startswith("relay.model")]
    assert {"upstream_ready", "upstream_lost", "history_replayed"} <= {r.getMessage() for r in records}
    transcripts = [getattr(e, "transcript", None) for e in h.events]
    secrets = ["sk-secret-test-key-123", INSTRUCTIONS, *(i.text for i in HISTORY)]
    secrets += [t for t in transcripts if t]
    for record in records:
        dumped = repr(record.__dict__)
        assert not [s for s in secrets if s in dumped], record.getMessage()


def test_link_constructor_validates() -> None:
    """A zero-sized send queue is refused when the link is built."""
    with pytest.raises(ValueError):
        ModelLink(
            client=None,  # type: ignore[arg-type]
            model="gpt-realtime",
            session_config=dict,
            history=_no_history,
            on_event=lambda e: None,
            on_status=lambda s, c: None,
            max_send_queue=0,
            retry=FAST_RETRY,
        )


async def _no_history() -> list[protocol.HistoryItem]:
    return []


class SilentServer:
    """A TCP server that accepts connections and never answers: WebSocket handshakes hang."""

    def __init__(self) -> None:
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await reader.read()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()
        await asyncio.sleep(0.01)


async def test_a_burst_of_buffered_upstream_events_is_handled_one_per_loop_turn(
    make_sim: MakeSim, make_harness: MakeHarness
) -> None:
    """An answer's audio deltas arrive faster than real time and sit in the socket's buffer; the
    link hands them on one per event-loop turn, so other callbacks (every session's 20 ms playout
    timer) run between them instead of waiting behind the whole burst."""
    sim = await make_sim(chunk_ms=10)
    h = make_harness(sim)
    loop = asyncio.get_running_loop()
    turns = 0
    ticker: list[asyncio.Handle] = []

    def tick() -> None:  # runs once per loop turn
        nonlocal turns
        turns += 1
        ticker[:] = [loop.call_soon(tick)]

    at_delta: list[int] = []
    deliver = h.link._on_event

    def on_event(event: Any) -> Any:
        if event.type == "response.output_audio.delta":
            at_delta.append(turns)
        return deliver(event)

    h.link._on_event = on_event
    h.start()
    await h.until_ready()
    tick()
    try:
        h.push_turn()
        await h.until_event("response.done")
    finally:
        ticker[0].cancel()
    assert len(at_delta) >= 20, at_delta
    assert all(b > a for a, b in itertools.pairwise(at_delta)), at_delta
