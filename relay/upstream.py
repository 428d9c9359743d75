"""Where the Realtime upstream is: OpenAI, a configured Realtime-compatible URL, or the embedded simulator.

With no ``OPENAI_API_KEY`` and no ``PARLEY_UPSTREAM_URL`` the app starts Parley's simulator on a
loopback port, so a new user can try everything offline. The key never leaves this process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from openai import AsyncOpenAI

from relay.config import Secret, Settings
from relay.simulator import SimulatorOptions, SimulatorServer

__all__ = ["Upstream", "open_upstream"]

# The simulator ignores keys; OpenAI needs a real one. This placeholder is not a secret.
LOCAL_KEY: Final = "sk-parley-local"


@dataclass(frozen=True, slots=True)
class Upstream:
    kind: str  # "openai" or "simulator"
    websocket_base_url: str | None  # None: OpenAI's default
    api_key: Secret

    def client(self) -> AsyncOpenAI:
        """A fresh SDK client for one live session (cheap: no connection until used)."""
        return AsyncOpenAI(
            api_key=self.api_key.reveal(), websocket_base_url=self.websocket_base_url, max_retries=0
        )


async def open_upstream(settings: Settings) -> AsyncIterator[Upstream]:
    """Yield the upstream for these settings; an embedded simulator lives exactly as long."""
    key = settings.openai_api_key or Secret(LOCAL_KEY)
    if settings.upstream_kind == "openai":
        yield Upstream("openai", settings.upstream_url, key)
        return
    async with SimulatorServer(SimulatorOptions(), host="127.0.0.1", port=0) as sim:
        yield Upstream("simulator", sim.ws_base_url, key)
