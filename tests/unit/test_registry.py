"""Admission control of the session registry."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from relay.errors import CapacityError
from relay.observability.looplag import LoopLagMonitor
from relay.session.registry import SessionRegistry


def registry(lag: float = 0.0, limit: int = 2) -> tuple[SessionRegistry, list[str]]:
    refused: list[str] = []
    reg = SessionRegistry(
        max_sessions=limit, max_loop_lag_ms=100, loop_lag_ms=lambda: lag, on_refused=refused.append
    )
    return reg, refused


def test_reservations_count_toward_the_limit() -> None:
    """Sessions being admitted count like live ones; releasing a reservation frees its place."""
    reg, refused = registry(limit=2)
    reg.admit("a")
    reg.admit("b")
    with pytest.raises(CapacityError) as info:
        reg.admit("c")
    assert info.value.code == "capacity" and info.value.retry_after_s > 0
    reg.release("b")
    reg.admit("c")
    assert refused == ["capacity"]


def test_a_lagging_loop_refuses_new_sessions() -> None:
    """Past the lag threshold new sessions are refused, even with free places."""
    reg, refused = registry(lag=250.0)
    with pytest.raises(CapacityError):
        reg.admit("a")
    assert refused == ["loop_lag"]


async def test_draining_refuses_everything() -> None:
    """Once draining, the registry admits nothing."""
    reg, refused = registry()
    await reg.drain(0.1)
    with pytest.raises(CapacityError):
        reg.admit("a")
    assert refused == ["draining"]


Tick = Callable[[float], None]


def monitored_registry(threshold_ms: float = 20.0) -> tuple[SessionRegistry, LoopLagMonitor, Tick, list[str]]:
    """A registry reading a real monitor's sustained lag, wired as relay/app.py does; ``tick(lag_ms)``
    records one sample 100 ms of fake time after the previous one."""
    now = [0.0]
    monitor = LoopLagMonitor(clock=lambda: now[0])

    def tick(lag_ms: float) -> None:
        now[0] += 0.1
        monitor.record(lag_ms)

    refused: list[str] = []
    reg = SessionRegistry(
        max_sessions=100,
        max_loop_lag_ms=threshold_ms,
        loop_lag_ms=lambda: monitor.sustained_lag_ms,
        on_refused=refused.append,
    )
    return reg, monitor, tick, refused


def test_a_single_long_stall_does_not_refuse_new_sessions() -> None:
    """One 218 ms stall (a full GC) in 5 s of calm ticks: new sessions are still admitted."""
    reg, monitor, tick, refused = monitored_registry(threshold_ms=20.0)
    for lag in [0.5] * 40 + [218.0] + [0.5] * 9:
        tick(lag)
    assert monitor.lag_ms == 218.0
    reg.admit("a")
    assert refused == []


def test_sustained_loop_lag_refuses_and_recovery_admits_again() -> None:
    """Ticks 30 ms late for 5 s refuse (cause loop_lag) under a 20 ms limit; 5 calm seconds admit again."""
    reg, _, tick, refused = monitored_registry(threshold_ms=20.0)
    for _ in range(50):
        tick(30.0)
    with pytest.raises(CapacityError) as info:
        reg.admit("a")
    assert info.value.code == "capacity" and info.value.retry_after_s > 0
    assert refused == ["loop_lag"]
    for _ in range(51):
        tick(1.0)
    reg.admit("a")
    assert refused == ["loop_lag"]
