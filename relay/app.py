"""The aiohttp application: ``build_app(settings)`` wires resources, middlewares and routes.

Resources live in ``cleanup_ctx`` generators, so each is closed if and only if it was opened, and a
start-up failure (database unreachable, schema behind, object store down) stops the whole start with
a :class:`~relay.config.ConfigError` naming the variable to fix: nothing half-starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from relay.api import (
    api_keys,
    auth,
    deletion,
    events,
    exports,
    ops,
    progress,
    publication,
    realtime,
    recordings,
    sessions,
    signaling,
    topics,
    transcripts,
)
from relay.api.forwarding import stamp_node
from relay.api.problems import problem_middleware
from relay.browser.ice import restrict_host_addresses
from relay.browser.ports import install_port_range, uninstall_port_range
from relay.cluster.identity import NodeIdentity, new_node_id
from relay.cluster.orphans import OrphanSpoolReaper
from relay.cluster.presence import NodePresence
from relay.cluster.routing import OwnerRouter
from relay.config import ConfigError, Settings
from relay.heap import HeapTrimmer, load_malloc_trim, pin_mmap_threshold
from relay.integrations.bridge import RealtimeBridge
from relay.keys import (
    AUTHENTICATOR,
    DATABASE,
    FEEDS,
    JOBS,
    LIMITS,
    LIVE,
    LOOP_LAG,
    METRICS,
    NODE,
    OBJECTS,
    PASSWORDS,
    RATING,
    RECORDERS,
    REGISTRY,
    RETENTION,
    ROUTER,
    SETTINGS,
    TOKENS,
    UPSTREAM,
)
from relay.observability.logging import log_failure
from relay.observability.looplag import LoopLagMonitor
from relay.observability.metrics import Metrics
from relay.security.limits import Limits
from relay.security.oidc import OidcVerifier
from relay.security.passwords import PasswordHasher
from relay.security.principals import Authenticator
from relay.security.tokens import TokenService
from relay.session.feed import FeedRegistry
from relay.session.registry import SessionRegistry
from relay.upstream import open_upstream
from relay.worker.jobs import Worker
from relay.worker.kinds import default_kinds
from relay.worker.rating_model import open_rating_model
from relay.worker.retention import RetentionSweeper
from storage import migrate
from storage.db import Database, DatabaseUnavailable
from storage.objects import ObjectStoreError, open_object_store
from storage.recorder import SpoolRecorderFactory, recover_spool
from storage.spool import Spool
from storage.uploader import RETRYABLE

__all__ = ["GC_FREEZE", "GcFreeze", "build_app", "open_database"]

log = logging.getLogger("relay.app")

WEB_DIR: Final = Path(__file__).resolve().parent.parent / "web"
# Only the client's own assets are public: web/ also holds its tests, package files and node_modules.
STATIC_DIR: Final = WEB_DIR / "static"
# Request bodies above this are refused with 413 before a handler reads them (SDP offers are < 64 KiB).
MAX_BODY_BYTES: Final = 1024 * 1024
MAX_HEADER_BYTES: Final = 16 * 1024


def build_app(
    settings: Settings, *, passwords: PasswordHasher | None = None, node: NodeIdentity | None = None
) -> web.Application:
    """Create the application; resources open when it starts and close when it stops.

    ``passwords`` lets tests use cheaper scrypt parameters; production keeps the default. ``node``:
    this process among the relay nodes (``parley serve`` passes the URL it listens on for other
    nodes); by default a new id, reached at ``PARLEY_NODE_URL`` if set.
    """
    app = web.Application(
        middlewares=[_metrics_middleware, problem_middleware],
        client_max_size=MAX_BODY_BYTES,
        # Room for an oversized bearer token to reach the auth layer and get a proper 401.
        handler_args={"max_field_size": MAX_HEADER_BYTES},
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[TOKENS] = TokenService(
        settings.secret_key,
        access_ttl_s=settings.access_token_ttl_s,
        client_secret_ttl_s=settings.client_secret_ttl_s,
    )
    app[PASSWORDS] = passwords or PasswordHasher()
    app[LIMITS] = Limits.from_settings(settings)
    app[NODE] = node or NodeIdentity(new_node_id(), settings.node_url)
    app[_GC_HOLD] = _GcHold()
    app.cleanup_ctx.append(_garbage_collector)  # first in, so it is the last to close
    app.cleanup_ctx.append(_heap_trimmer)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_object_store)
    app.cleanup_ctx.append(_authenticator)
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_node)  # before the sessions: deregistered after they drained
    app.cleanup_ctx.append(_event_feeds)  # before the sessions: closed after they drained
    app.cleanup_ctx.append(_live_sessions)
    app.cleanup_ctx.append(_retention)
    app.cleanup_ctx.append(_rating_model)
    app.cleanup_ctx.append(_jobs)
    for module in (
        ops, auth, api_keys, topics, sessions, signaling, transcripts, recordings, publication, exports,
        deletion, progress, realtime, events,
    ):  # fmt: skip
        app.add_routes(module.routes)
    if (WEB_DIR / "index.html").is_file():
        app.router.add_get("/", _index)
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    # After every cleanup_ctx set-up (aiohttp runs those from the first on_startup handler).
    app.on_startup.append(_freeze_start_up_objects)
    app.on_response_prepare.append(stamp_node)
    app.on_shutdown.append(_feeds_going_away)
    app.on_shutdown.append(_realtime_going_away)
    return app


class GcFreeze:
    """``gc.freeze()`` is process-wide, so apps in one process (tests, embedders) share one freeze:
    the first holder collects and freezes, the last to let go unfreezes. Each app holds it from
    start-up until it closes; a test session may hold it across all its apps, so each start-up
    costs no full collection of the test process's objects (0.2-0.4 s each)."""

    def __init__(self) -> None:
        self._holders = 0

    @property
    def held(self) -> bool:
        return self._holders > 0

    def hold(self) -> bool:
        """Take a hold; True when this call collected and froze."""
        self._holders += 1
        if self._holders > 1:
            return False
        gc.collect()
        gc.freeze()
        return True

    def release(self) -> None:
        if self._holders == 0:
            return
        self._holders -= 1
        if self._holders == 0:
            gc.unfreeze()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        self.hold()
        try:
            yield
        finally:
            self.release()


GC_FREEZE: Final = GcFreeze()


@dataclass
class _GcHold:
    held: bool = False


_GC_HOLD: Final = web.AppKey("gc_hold", _GcHold)


async def _freeze_start_up_objects(app: web.Application) -> None:
    """Collect once, then freeze what is left: the ~200k long-lived objects of start-up (openai and
    pydantic models, SQLAlchemy, aiortc) are never traversed again by a full collection, which
    otherwise stalls every session's pacing for 40-220 ms (tests/bench/RESULTS.md). From here on,
    each collection's pause is timed into ``parley_gc_pause_seconds``."""
    froze = GC_FREEZE.hold()
    app[_GC_HOLD].held = True
    app[METRICS].watch_gc()
    if froze:
        log.info("gc.frozen", extra={"count": gc.get_freeze_count()})


async def _garbage_collector(app: web.Application) -> AsyncIterator[None]:
    """Undo :func:`_freeze_start_up_objects` when the app closes, after every other resource closed
    (also after a failed start-up, when there is nothing to undo). Several apps in one process each
    remove their own hook and let go of their hold on the shared freeze (:class:`GcFreeze`)."""
    yield
    app[METRICS].unwatch_gc()
    hold = app[_GC_HOLD]
    if hold.held:
        hold.held = False
        GC_FREEZE.release()


async def _heap_trimmer(app: web.Application) -> AsyncIterator[None]:
    """Give freed C heap back to the OS every PARLEY_HEAP_TRIM_SECONDS, and map large blocks on
    their own so they never fragment the heap (relay/heap.py)."""
    interval = app[SETTINGS].heap_trim_s
    if not interval:
        yield
        return
    pin_mmap_threshold()
    trimmer = HeapTrimmer(interval, load_malloc_trim(), on_released=app[METRICS].heap_released.inc)
    trimmer.start()
    try:
        yield
    finally:
        await trimmer.aclose()


async def open_database(settings: Settings) -> Database:
    """The database, reachable and at this code's schema, or a ConfigError naming the variable."""
    db = Database(settings.database_url)
    try:
        try:
            await db.check()
        except DatabaseUnavailable as exc:
            raise ConfigError("PARLEY_DATABASE_URL", f"cannot reach the database ({exc})") from None
        current, head = await migrate.current_revision(db), migrate.head_revision()
        if current != head:
            raise ConfigError(
                "PARLEY_DATABASE_URL",
                f"schema is at {current or 'nothing'}, this code needs {head}: run `parley migrate`",
            )
    except BaseException:
        await db.aclose()
        raise
    return db


async def _database(app: web.Application) -> AsyncIterator[None]:
    db = await open_database(app[SETTINGS])
    app[DATABASE] = db
    log.info("database.ready", extra={"backend": db.dialect, "revision": migrate.head_revision()})
    yield
    await db.aclose()


async def _object_store(app: web.Application) -> AsyncIterator[None]:
    store = open_object_store(app[SETTINGS].object_store_url)
    try:
        await store.setup()
        await store.check()
    except ObjectStoreError as exc:
        await store.aclose()
        raise ConfigError("PARLEY_OBJECT_STORE_URL", f"cannot use the object store ({exc})") from None
    except BaseException:
        await store.aclose()
        raise
    app[OBJECTS] = store
    log.info("objects.ready", extra={"backend": store.kind})
    yield
    await store.aclose()


async def _authenticator(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    oidc = None
    if settings.oidc_issuer:
        oidc = OidcVerifier(
            settings.oidc_issuer, audience=settings.oidc_audience, jwks_url=settings.oidc_jwks_url
        )
    app[AUTHENTICATOR] = Authenticator(
        app[TOKENS], app[DATABASE], oidc=oidc, admin_emails=settings.admin_emails
    )
    yield
    if oidc is not None:
        await oidc.aclose()


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    async for upstream in open_upstream(app[SETTINGS]):
        app[UPSTREAM] = upstream
        log.info("upstream.ready", extra={"upstream": upstream.kind})
        yield


async def _node(app: web.Application) -> AsyncIterator[None]:
    """This process as a relay node: its registry row and heartbeat, the router that forwards
    signalling to other nodes, and the recovery of spools whose process died beside this one."""
    settings, node = app[SETTINGS], app[NODE]
    presence = NodePresence(app[DATABASE], node, heartbeat_s=settings.node_heartbeat_s)
    router = OwnerRouter(app[DATABASE], node.id, stale_after_s=presence.stale_after.total_seconds())
    app[ROUTER] = router
    reaper = OrphanSpoolReaper(
        app[DATABASE], app[OBJECTS], settings.data_dir, own=settings.spool_dir,
        interval_s=presence.stale_after.total_seconds(),
    )  # fmt: skip
    try:
        await presence.start()
        reaper.start()
        yield
    finally:
        await reaper.aclose()
        await presence.aclose()
        await router.aclose()


async def _event_feeds(app: web.Application) -> AsyncIterator[None]:
    feeds = FeedRegistry()
    app[FEEDS] = feeds
    stats = feeds.stats
    app[METRICS].watch_feeds(
        lambda: (stats.subscribers, stats.subscriptions, stats.cut_offs, stats.resume_gaps)
    )
    try:
        yield
    finally:
        await feeds.aclose()


async def _feeds_going_away(app: web.Application) -> None:
    """Close event-feed sockets (1001) as shutdown begins: aiohttp waits for open handlers before it
    runs the cleanup contexts (and drains live sessions), so an open feed would hold shutdown up."""
    feeds = app.get(FEEDS)
    if feeds is not None:
        await feeds.aclose()
    router = app.get(ROUTER)
    if router is not None:  # feeds this node relays from their owners
        await router.streams_going_away()


async def _live_sessions(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.rtc_host_addresses:
        # Process-wide by necessity: aioice asks one module-level function for host addresses.
        restrict_host_addresses(list(settings.rtc_host_addresses))
    loop = asyncio.get_running_loop()
    if settings.rtc_port_range is not None:
        # Per loop (and a process-wide candidate guard): aioice binds port 0 and has no range option.
        install_port_range(
            loop,
            settings.rtc_port_range,
            on_exhausted=app[METRICS].rtc_port_exhausted.inc,
            max_sessions=settings.max_sessions,
        )
    monitor = LoopLagMonitor(on_sample=app[METRICS].loop_lag.observe)
    monitor.start()
    app[LOOP_LAG] = monitor
    spool_root = settings.spool_dir
    app[METRICS].spool_max_bytes.set(settings.spool_max_bytes)
    recorders = SpoolRecorderFactory(
        app[DATABASE],
        app[OBJECTS],
        spool_root,
        max_spool_bytes=settings.spool_max_bytes,
        on_uploaded=app[METRICS].upload_lag.observe,
        on_upload_error=lambda part: app[METRICS].upload_errors.labels(part).inc(),
    )
    app[RECORDERS] = recorders
    app[METRICS].spool_bytes.set_function(recorders.spool_bytes)
    app[METRICS].upload_oldest_pending.set_function(recorders.uploader.oldest_pending_s)
    # Whatever a killed process left in the spool is uploaded and marked interrupted, in the background.
    recovery = asyncio.create_task(_recover(app, recorders.spool), name="recorder:recover-spool")
    registry = SessionRegistry(
        max_sessions=settings.max_sessions,
        max_loop_lag_ms=settings.max_loop_lag_ms,
        loop_lag_ms=lambda: monitor.sustained_lag_ms,
        on_refused=lambda cause: app[METRICS].session_refusals.labels(cause).inc(),
        recording_ok=lambda: recorders.accepting,
    )
    app[REGISTRY] = registry
    live: set[asyncio.Task[None]] = set()
    app[LIVE] = live
    try:
        yield
    finally:
        await registry.drain(settings.drain_timeout_s)
        await asyncio.gather(*live, return_exceptions=True)
        recovery.cancel()
        await asyncio.gather(recovery, return_exceptions=True)
        await recorders.aclose()
        await monitor.aclose()
        if settings.rtc_port_range is not None:
            uninstall_port_range(loop)


async def _retention(app: web.Application) -> AsyncIterator[None]:
    """The retention sweeper's task: after the registry (it skips live sessions), closed first."""
    settings, registry, recorders = app[SETTINGS], app[REGISTRY], app[RECORDERS]

    async def settle(session_id: str) -> None:
        # As DELETE /v1/sessions/{id}: uploads in flight for the fenced session finish or give up.
        if isinstance(recorders, SpoolRecorderFactory):
            await recorders.uploader.wait_session(session_id, deletion.UPLOAD_SETTLE_S)

    sweeper = RetentionSweeper(
        app[DATABASE],
        app[OBJECTS],
        settings.spool_dir,
        default_days=settings.retention_days,
        interval_s=settings.retention_sweep_s,
        is_live=lambda session_id: registry.get(session_id) is not None,
        metrics=app[METRICS],
        settle=settle,
    )
    app[RETENTION] = sweeper
    sweeper.start()
    try:
        yield
    finally:
        await sweeper.aclose()


async def _realtime_going_away(app: web.Application) -> None:
    """End Realtime-socket sessions (close 1001) as shutdown begins, for the same reason as the feeds:
    their handlers are open sockets. Their clients reconnect to another node; WebRTC sessions, which
    hold no handler open, are drained later with the grace of PARLEY_DRAIN_TIMEOUT."""
    registry = app.get(REGISTRY)
    if registry is None:
        return
    bridges = [live for live in registry.members() if isinstance(live, RealtimeBridge)]
    await asyncio.gather(*(bridge.end("shutdown") for bridge in bridges), return_exceptions=True)


async def _rating_model(app: web.Application) -> AsyncIterator[None]:
    """The rating model the in-process worker uses (OpenAI, PARLEY_RATING_URL, or the built-in rating
    simulator); not opened when no worker runs in process. Closed after the worker stopped."""
    settings = app[SETTINGS]
    if settings.workers_in_process == 0:
        yield
        return
    async with open_rating_model(settings) as rating:
        app[RATING] = rating
        log.info("rating.ready", extra={"kind": rating.kind})
        yield


async def _jobs(app: web.Application) -> AsyncIterator[None]:
    """The in-process job worker (``PARLEY_WORKERS_IN_PROCESS`` slots; 0: none). Closed first, before
    live sessions drain: jobs of sessions that end during the drain wait in the queue for the next
    start or for a `parley worker`, and a job still running is given back to the queue."""
    slots = app[SETTINGS].workers_in_process
    if slots == 0:
        yield
        return
    kinds = default_kinds(app[RATING])
    worker = Worker(
        app[DATABASE], app[OBJECTS], kinds, metrics=app[METRICS], concurrency=slots,
        lease_s=app[SETTINGS].job_lease_s,
    )  # fmt: skip
    app[JOBS] = worker
    worker.start()
    try:
        yield
    finally:
        await worker.aclose()


async def _recover(app: web.Application, spool: Spool) -> None:
    try:
        recovered = await recover_spool(app[DATABASE], app[OBJECTS], spool.root, spool=spool)
    except Exception as exc:
        log_failure(log, "recorder.recovery_failed", exc, expected=RETRYABLE)
        return
    if recovered:
        log.warning("recorder.recovered", extra={"sessions": len(recovered)})


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        elapsed = time.perf_counter() - started
        request.app[METRICS].request_done(route, request.method, status, elapsed)
        if route not in ("/metrics", "/healthz", "/readyz"):
            log.info(
                "http.request",
                extra={
                    "method": request.method,
                    "route": route,
                    "http_status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")
