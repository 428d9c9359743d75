"""Loop-lag monitor: the sustained figure admission reads, on a fake clock, and the real sampler."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.observability.looplag import LoopLagMonitor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed(monitor: LoopLagMonitor, clock: FakeClock, lags: list[float], every_s: float = 0.1) -> None:
    """Record ``lags`` as the sampler would, one every ``every_s`` of fake time."""
    for lag in lags:
        clock.now += every_s
        monitor.record(lag)


def monitor_on(clock: FakeClock) -> LoopLagMonitor:
    return LoopLagMonitor(clock=clock)


def test_one_stall_in_the_window_is_not_sustained_lag() -> None:
    """A single 400 ms stall (one full GC, say) among 5 s of quiet ticks leaves sustained lag low."""
    clock = FakeClock()
    monitor = monitor_on(clock)
    feed(monitor, clock, [1.0] * 45 + [400.0] + [1.0] * 4)
    assert monitor.lag_ms == 400.0  # the worst of the last second still shows it
    assert monitor.sustained_lag_ms == 1.0


def test_lag_on_most_ticks_is_sustained() -> None:
    """When more than a tenth of the last 5 s of ticks are late, the 90th percentile is their lateness."""
    clock = FakeClock()
    monitor = monitor_on(clock)
    feed(monitor, clock, [1.0] * 40 + [30.0] * 10)
    assert monitor.sustained_lag_ms == 30.0
    feed(monitor, clock, [1.0] * 46 + [30.0] * 4)  # the old lag left the window; under a tenth is not enough
    assert monitor.sustained_lag_ms == 1.0


def test_samples_older_than_the_window_do_not_count() -> None:
    """Five seconds after an overload ends, quiet samples alone make up the sustained figure."""
    clock = FakeClock()
    monitor = monitor_on(clock)
    feed(monitor, clock, [200.0] * 50)
    assert monitor.sustained_lag_ms == 200.0
    feed(monitor, clock, [0.5] * 51)
    assert monitor.sustained_lag_ms == 0.5


def test_too_few_samples_say_nothing_sustained() -> None:
    """Right after start-up (fewer than 10 samples), even bad samples are not yet sustained lag."""
    clock = FakeClock()
    monitor = monitor_on(clock)
    feed(monitor, clock, [500.0] * 9)
    assert monitor.sustained_lag_ms == 0.0
    feed(monitor, clock, [500.0])
    assert monitor.sustained_lag_ms == 500.0


def test_a_loop_too_late_to_fill_the_window_is_judged_on_its_last_samples() -> None:
    """Ticks 1 s late leave ~5 samples per window; the latest 10 samples are used instead of nothing."""
    clock = FakeClock()
    monitor = monitor_on(clock)
    feed(monitor, clock, [1.0] * 50)
    feed(monitor, clock, [1000.0] * 10, every_s=1.1)
    assert monitor.sustained_lag_ms == 1000.0


def test_samples_are_reported_in_seconds_and_memory_stays_bounded() -> None:
    """on_sample gets each lag in seconds (for the histogram); old samples are forgotten."""
    clock = FakeClock()
    seen: list[float] = []
    monitor = LoopLagMonitor(on_sample=seen.append, clock=clock)
    feed(monitor, clock, [20.0] * 1000)
    assert seen == [0.02] * 1000
    assert len(monitor._samples) <= 51


def test_bad_parameters_are_refused() -> None:
    """A window, percentile or minimum that cannot work is refused when the monitor is built."""
    for kwargs in ({"window_s": 0}, {"percentile": 0}, {"percentile": 1.5}, {"min_samples": 0}):
        with pytest.raises(ValueError):
            LoopLagMonitor(**kwargs)  # type: ignore[arg-type]


async def test_the_sampler_measures_a_blocked_loop() -> None:
    """The running monitor sees a 300 ms block of the loop as one sample of roughly that lateness."""
    monitor = LoopLagMonitor()
    monitor.start()
    try:
        await asyncio.sleep(0.15)
        time.sleep(0.3)  # noqa: ASYNC251 (blocks the loop on purpose)
        await asyncio.sleep(0.15)
        assert 150 <= monitor.lag_ms < 1000
    finally:
        await monitor.aclose()
