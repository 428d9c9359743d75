"""The abuse limits of one process, built from settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from relay.config import Settings
from relay.security.ratelimit import SlidingWindow

__all__ = ["Limits"]

LOGIN_WINDOW_S: Final = 15 * 60


@dataclass(frozen=True, slots=True)
class Limits:
    failed_logins_per_account: SlidingWindow = field(default_factory=lambda: SlidingWindow(5, LOGIN_WINDOW_S))
    failed_logins_per_address: SlidingWindow = field(
        default_factory=lambda: SlidingWindow(20, LOGIN_WINDOW_S)
    )
    signups_per_address: SlidingWindow = field(default_factory=lambda: SlidingWindow(20, 3600))
    session_creation: SlidingWindow = field(default_factory=lambda: SlidingWindow(10, 60))
    secret_minting: SlidingWindow = field(default_factory=lambda: SlidingWindow(30, 60))

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            session_creation=SlidingWindow(settings.session_create_per_minute, 60),
            secret_minting=SlidingWindow(settings.client_secret_per_minute, 60),
        )
