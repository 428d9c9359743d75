"""Live sessions of this process: id -> LiveSession, admission, and drain on shutdown.

Admission refuses new live sessions (503 ``capacity`` + Retry-After) when the node holds its limit
or its event loop lags: every session on a lagging loop hears gaps, so adding one makes it worse
for all of them. The lag is a *sustained* figure (``LoopLagMonitor.sustained_lag_ms``: the 90th
percentile of the last 5 s), so a single stall such as one garbage collection does not refuse,
while a loop that is late on most ticks does, before a session count limit is reached.
Draining stops admissions and lets live sessions finish, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from relay.errors import CapacityError

__all__ = ["Live", "SessionRegistry", "StateWriter"]

log = logging.getLogger("relay.session.registry")

RETRY_AFTER_S: Final = 5

#: Persists a live session's state change: ``(session_id, status, code)``, the status row and its
#: audit event (relay/api/session_states.py). The session awaits each one, in order.
StateWriter = Callable[[str, str, "str | None"], Awaitable[None]]


class Live(Protocol):
    """A live session of either kind: a WebRTC LiveSession or a Realtime socket's bridge."""

    @property
    def id(self) -> str: ...

    async def end(self, reason: str) -> None: ...

    async def wait_ended(self) -> None: ...


class SessionRegistry:
    """Owns the live sessions of this process; :meth:`aclose` ends every one of them."""

    def __init__(
        self,
        *,
        max_sessions: int,
        max_loop_lag_ms: float,
        loop_lag_ms: Callable[[], float],
        on_refused: Callable[[str], None] = lambda cause: None,
        recording_ok: Callable[[], bool] = lambda: True,
    ) -> None:
        """``loop_lag_ms`` answers the loop's recent sustained lag; above ``max_loop_lag_ms`` new
        sessions are refused with cause ``loop_lag``."""
        self._sessions: dict[str, Live] = {}
        self._max = max_sessions
        self._max_lag_ms = max_loop_lag_ms
        self._lag = loop_lag_ms
        self._draining = False
        self._admitting: set[str] = set()
        self._on_refused = on_refused
        self._recording_ok = recording_ok

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Live | None:
        return self._sessions.get(session_id)

    def members(self) -> list[Live]:
        """The live sessions now (a copy: ending one removes it from the registry)."""
        return list(self._sessions.values())

    @property
    def draining(self) -> bool:
        return self._draining

    def admit(self, session_id: str) -> None:
        """Reserve a place for a new live session or raise :class:`CapacityError`."""
        if self._draining:
            self._on_refused("draining")
            raise CapacityError("This node is shutting down; try again.", retry_after_s=RETRY_AFTER_S)
        if len(self._sessions) + len(self._admitting) >= self._max:
            self._on_refused("capacity")
            raise CapacityError("This node is at capacity; try again shortly.", retry_after_s=RETRY_AFTER_S)
        if not self._recording_ok():
            self._on_refused("spool_full")
            raise CapacityError("Recording storage is full; try again later.", retry_after_s=RETRY_AFTER_S)
        lag = self._lag()
        if lag > self._max_lag_ms:
            self._on_refused("loop_lag")
            log.warning("registry.refused_lag", extra={"lag_ms": round(lag, 1), "limit": self._max_lag_ms})
            raise CapacityError("This node is overloaded; try again shortly.", retry_after_s=RETRY_AFTER_S)
        self._admitting.add(session_id)

    def release(self, session_id: str) -> None:
        """Give back a reservation that did not become a session."""
        self._admitting.discard(session_id)

    def add(self, session: Live) -> None:
        self._admitting.discard(session.id)
        self._sessions[session.id] = session

    def discard(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new sessions, wait up to ``timeout_s`` for live ones to end, then end the rest."""
        self._draining = True
        live = list(self._sessions.values())
        log.info("registry.draining", extra={"sessions": len(live)})
        if live:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(s.wait_ended()) for s in live], timeout=timeout_s
            )
            for waiter in pending:
                waiter.cancel()
        await self.aclose()

    async def aclose(self) -> None:
        """End every live session (reason ``shutdown``) and wait for their recordings to finalize."""
        self._draining = True
        sessions = list(self._sessions.values())
        await asyncio.gather(*(s.end("shutdown") for s in sessions), return_exceptions=True)
