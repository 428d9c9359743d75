"""Admission control of the session registry."""

from __future__ import annotations

import pytest

from relay.errors import CapacityError
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
