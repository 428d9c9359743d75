"""Parley's local stand-in for the OpenAI Realtime API (GA protocol over WebSocket).

Data flow: ``server`` (websockets I/O, ``options`` and their fault knobs) feeds client frames to
``state``, the Sans-I/O session. It checks each event with ``validation`` (the SDK's own types),
keeps the ``session`` config, finds turns with ``vad``, stores conversation ``items`` and answers
with events whose words come from ``script``, whose audio comes from ``voice`` (in one of the
``formats``) and whose token counts come from ``usage``.
"""

from __future__ import annotations

from relay.simulator.options import KNOBS, SimulatorOptions
from relay.simulator.server import SimulatorServer, serve_forever

__all__ = ["KNOBS", "SimulatorOptions", "SimulatorServer", "serve_forever"]
