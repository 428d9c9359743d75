"""Typed keys for what the application holds (aiohttp ``AppKey``), so handlers get real types."""

from __future__ import annotations

import asyncio

from aiohttp import web

from relay.cluster.identity import NodeIdentity
from relay.cluster.routing import OwnerRouter
from relay.config import Settings
from relay.observability.looplag import LoopLagMonitor
from relay.observability.metrics import Metrics
from relay.security.limits import Limits
from relay.security.passwords import PasswordHasher
from relay.security.principals import Authenticator
from relay.security.tokens import TokenService
from relay.session.feed import FeedRegistry
from relay.session.registry import SessionRegistry
from relay.upstream import Upstream
from relay.worker.jobs import Worker
from relay.worker.rating_model import RatingModel
from relay.worker.retention import RetentionSweeper
from storage.db import Database
from storage.objects import ObjectStore
from storage.ports import RecorderFactory

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DATABASE = web.AppKey("database", Database)
OBJECTS = web.AppKey("objects", ObjectStore)
TOKENS = web.AppKey("tokens", TokenService)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
PASSWORDS = web.AppKey("passwords", PasswordHasher)
LIMITS = web.AppKey("limits", Limits)
UPSTREAM = web.AppKey("upstream", Upstream)
REGISTRY = web.AppKey("registry", SessionRegistry)
# The event feeds of live sessions, for GET /v1/sessions/{id}/events.
FEEDS = web.AppKey("feeds", FeedRegistry)
RECORDERS = web.AppKey("recorders", RecorderFactory)
LOOP_LAG = web.AppKey("loop_lag", LoopLagMonitor)
RETENTION = web.AppKey("retention", RetentionSweeper)
# Set only while `parley serve` runs post-processing jobs itself (PARLEY_WORKERS_IN_PROCESS > 0).
JOBS = web.AppKey("jobs", Worker)
# The text model that rates finished sessions; set only while the in-process worker runs.
RATING = web.AppKey("rating", RatingModel)
# The main tasks of live sessions, so shutdown can wait for them.
LIVE = web.AppKey[set[asyncio.Task[None]]]("live_tasks")
# This process among the relay nodes (relay/cluster/), and how signalling reaches a session's owner.
NODE = web.AppKey("node", NodeIdentity)
ROUTER = web.AppKey("router", OwnerRouter)
