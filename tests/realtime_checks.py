"""Strictness checks for Realtime events, written independently of the code under test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pydantic

from relay.simulator import SimulatorOptions, SimulatorServer


def unknown_keys(model: object, path: str = "$") -> list[str]:
    """Paths of keys the SDK's models accepted only as extras (REALTIME.md §7: they allow extras)."""
    if isinstance(model, pydantic.BaseModel):
        found = [f"{path}.{k}" for k in model.model_extra or {}]
        for name in type(model).model_fields:
            found += unknown_keys(getattr(model, name), f"{path}.{name}")
        return found
    if isinstance(model, list):
        return [e for i, v in enumerate(model) for e in unknown_keys(v, f"{path}[{i}]")]
    return []


MakeSimulator = Callable[..., Awaitable[SimulatorServer]]


@contextlib.asynccontextmanager
async def strict_simulators(
    defaults: Mapping[str, Any],
) -> AsyncIterator[Callable[..., Awaitable[SimulatorServer]]]:
    """A factory of simulators (``defaults`` plus overrides); each is closed and checked afterwards."""
    servers: list[SimulatorServer] = []

    async def make(**overrides: Any) -> SimulatorServer:
        server = SimulatorServer(SimulatorOptions(**{**defaults, **overrides}))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.aclose()
        assert server.failures == []
        assert server.active_connections == 0
