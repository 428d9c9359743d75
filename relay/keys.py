"""Typed keys for what the application holds (aiohttp ``AppKey``), so handlers get real types."""

from __future__ import annotations

from aiohttp import web

from relay.config import Settings
from relay.observability.metrics import Metrics
from relay.security.limits import Limits
from relay.security.passwords import PasswordHasher
from relay.security.principals import Authenticator
from relay.security.tokens import TokenService
from relay.upstream import Upstream
from storage.db import Database
from storage.objects import ObjectStore

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DATABASE = web.AppKey("database", Database)
OBJECTS = web.AppKey("objects", ObjectStore)
TOKENS = web.AppKey("tokens", TokenService)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
PASSWORDS = web.AppKey("passwords", PasswordHasher)
LIMITS = web.AppKey("limits", Limits)
UPSTREAM = web.AppKey("upstream", Upstream)
