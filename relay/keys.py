"""Typed keys for what the application holds (aiohttp ``AppKey``), so handlers get real types."""

from __future__ import annotations

from aiohttp import web

from relay.config import Settings
from relay.observability.metrics import Metrics
from storage.db import Database
from storage.objects import ObjectStore

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DATABASE = web.AppKey("database", Database)
OBJECTS = web.AppKey("objects", ObjectStore)
