"""Browser-edge fixtures: loopback-only ICE for every test here (see tests/fakes/rtc_client.py)."""

from __future__ import annotations

from tests.fakes.rtc_client import loopback_ice

__all__ = ["loopback_ice"]
