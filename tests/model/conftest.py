"""Fixtures for the model-edge tests: strict in-process simulators, and ModelLinks driven against them.

The leaked-task check comes from ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent

from relay.model import protocol
from relay.model.link import LinkStatus, ModelLink, RetryPolicy
from relay.model.protocol import HistoryItem
from relay.simulator import SimulatorServer
from tests.realtime_checks import strict_simulators
from tests.simulator.audio import BYTES_PER_MS, silence, speech

FAST_SIM: dict[str, Any] = {
    "strict": True,
    "first_audio_ms": 20,
    "realtime_pacing": False,
    "transcription_delay_ms": 10,
}
FAST_RETRY = RetryPolicy(initial_delay_s=0.01, max_delay_s=0.05, connect_timeout_s=3.0, close_timeout_s=1.0)
INSTRUCTIONS = (
    "You are a friendly English coach. Topic: travel. Ask the learner: Where did you go last summer?"
)
VAD: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 200,
}
HISTORY = (
    HistoryItem("coach", "Hello! Where did you go last summer?"),
    HistoryItem("learner", "I went to the mountains with my sister."),
)
WAIT_S = 10.0
"""Longest wait for an expected condition; a test waiting longer is stuck, not slow."""

MakeSim = Callable[..., Awaitable[SimulatorServer]]


def turn_audio(words: int = 3) -> list[bytes]:
    """A spoken turn (silence, speech, end-of-turn silence) as 20 ms pcm16 24 kHz chunks."""
    pcm = silence(300) + speech(words) + silence(800)
    step = 20 * BYTES_PER_MS
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def eventually(check: Callable[[], bool], what: str, limit_s: float = WAIT_S) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``limit_s``."""
    try:
        async with asyncio.timeout(limit_s):
            # Polling on purpose: the conditions span events, counters and simulator state.
            while not check():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class Harness:
    """A ModelLink with recording callbacks, running in a named task against one simulator."""

    def __init__(
        self,
        sim: SimulatorServer,
        *,
        api_key: str = "sk-test",
        history: Sequence[HistoryItem] = HISTORY,
        retry: RetryPolicy = FAST_RETRY,
        max_send_queue: int = 200,
        append_ms: int = 40,
        on_status: Callable[[Harness, LinkStatus, str | None], None] | None = None,
        base_url: str | None = None,
        replay_first: bool = False,
    ) -> None:
        self.sim = sim
        self.client = AsyncOpenAI(api_key=api_key, websocket_base_url=base_url or sim.ws_base_url)
        self.events: list[RealtimeServerEvent] = []
        self.statuses: list[tuple[LinkStatus, str | None]] = []
        self.history = list(history)
        self.history_calls = 0
        self.config_calls = 0
        self.audio_latencies: list[float] = []
        self._status_hook = on_status
        self.link = ModelLink(
            client=self.client,
            model="gpt-realtime",
            session_config=self._config,
            history=self._history,
            on_event=self._on_event,
            on_status=self._on_status,
            max_send_queue=max_send_queue,
            append_ms=append_ms,
            on_audio_queued=self.audio_latencies.append,
            retry=retry,
            name="test:model-link",
            replay_first=replay_first,
        )
        self.task: asyncio.Task[None] | None = None

    def _config(self) -> dict[str, Any]:
        self.config_calls += 1
        return protocol.session_object(instructions=INSTRUCTIONS, turn_detection=VAD)

    async def _history(self) -> Sequence[HistoryItem]:
        self.history_calls += 1
        await asyncio.sleep(0)
        return list(self.history)

    async def _on_event(self, event: RealtimeServerEvent) -> None:
        self.events.append(event)

    def _on_status(self, status: LinkStatus, code: str | None) -> None:
        self.statuses.append((status, code))
        if self._status_hook is not None:
            self._status_hook(self, status, code)

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.link.run(), name="test:model-link:run")
        return self.task

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.type == kind)

    def ready_count(self) -> int:
        return self.statuses.count(("ready", None))

    async def until_event(self, kind: str, nth: int = 1) -> RealtimeServerEvent:
        await eventually(lambda: self.count(kind) >= nth, f"{kind} #{nth} (got {self.types()[-8:]})")
        return [e for e in self.events if e.type == kind][nth - 1]

    async def until_ready(self, nth: int = 1) -> None:
        await eventually(lambda: self.ready_count() >= nth, f"ready #{nth} (statuses {self.statuses})")

    async def until_status(self, status: LinkStatus) -> None:
        await eventually(lambda: any(s == status for s, _ in self.statuses), f"{status} ({self.statuses})")

    def push_turn(self, words: int = 3) -> int:
        chunks = turn_audio(words)
        for chunk in chunks:
            self.link.push_audio(chunk)
        return len(chunks)

    async def run_to_failure(self) -> BaseException:
        """Run the link to its fatal error and return it."""
        try:
            async with asyncio.timeout(WAIT_S):
                await self.link.run()
        except Exception as exc:
            return exc
        raise AssertionError(f"run() returned without an error (statuses {self.statuses})")

    async def aclose(self) -> None:
        await self.link.aclose()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    """Start strict simulators (fast test defaults plus overrides); close and check them afterwards."""
    async with strict_simulators(FAST_SIM) as make:
        yield make


@pytest.fixture
async def sim(make_sim: MakeSim) -> SimulatorServer:
    """A strict simulator with the fast test defaults."""
    return await make_sim()


MakeHarness = Callable[..., Harness]


@pytest.fixture
async def make_harness() -> AsyncIterator[MakeHarness]:
    """Build ModelLink harnesses; each is closed (aclose, run task awaited, client closed) afterwards."""
    made: list[Harness] = []

    def make(sim: SimulatorServer, **kwargs: Any) -> Harness:
        harness = Harness(sim, **kwargs)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.aclose()


def heal(sim: SimulatorServer) -> None:
    """Later connections to ``sim`` get no fault knobs (options are read at each handshake)."""
    sim.options = dataclasses.replace(
        sim.options,
        drop_after_s=None,
        close_after_s=None,
        error_after_s=None,
        reject_status=None,
        max_session_s=3600.0,
    )


def heal_after_first_ready(harness: Harness, status: LinkStatus, code: str | None) -> None:
    """An on_status hook: once the first session is ready, the simulator stops injecting faults."""
    if status == "ready" and harness.ready_count() == 1:
        heal(harness.sim)
