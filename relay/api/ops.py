"""Operations endpoints: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Final

from aiohttp import web

from relay.cluster.presence import STALE_BEATS
from relay.keys import DATABASE, METRICS, NODE, OBJECTS, SETTINGS, UPSTREAM
from relay.observability.fanin import FAILURE_REASONS, LOCAL_SCOPE, SCOPE_PARAM, WorkerScrape, local_headers

__all__ = ["routes"]

log = logging.getLogger("relay.api.ops")
routes = web.RouteTableDef()

READY_TIMEOUT_S: Final = 3.0


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """200 while the process runs and its event loop answers."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """200 when the database and the object store answer; 503 naming the failing part otherwise."""
    app = request.app
    checks = {"database": app[DATABASE].check(), "objects": app[OBJECTS].check()}
    names = list(checks)
    results = await asyncio.gather(
        *(asyncio.wait_for(c, READY_TIMEOUT_S) for c in checks.values()), return_exceptions=True
    )
    body: dict[str, str] = {}
    failing = []
    metrics = app[METRICS]
    for name, result in zip(names, results, strict=True):
        ok = not isinstance(result, BaseException)
        metrics.dependency_checked(name, ok)
        body[name] = "ok" if ok else "unavailable"
        if not ok:
            failing.append(name)
            log.warning("ready.check_failed", extra={"component": name, "error_type": type(result).__name__})
    body["upstream"] = app[UPSTREAM].kind
    if failing:
        return web.json_response({**body, "code": "not_ready", "failing": failing}, status=503)
    return web.json_response(body)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's metrics.

    On a child of ``parley serve --workers N`` also its alive siblings' on this machine, every sample
    labelled ``worker="<index>"``, so that scrapes of the shared port agree whichever child answers
    (relay/observability/fanin.py); ``?scope=local`` there: this child's alone, unlabelled.
    """
    app = request.app
    registry = app[METRICS]
    index = app[SETTINGS].worker_index
    # prometheus_client's content type carries parameters that aiohttp's content_type= refuses.
    headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    if index is None:
        return web.Response(body=registry.render(), headers=headers)
    registry.watch_siblings(FAILURE_REASONS)
    if request.query.get(SCOPE_PARAM) == LOCAL_SCOPE:
        return web.Response(body=registry.render(), headers={**headers, **local_headers(index)})
    scrape = WorkerScrape(
        app[DATABASE], app[NODE], registry, index=index,
        stale_after=timedelta(seconds=app[SETTINGS].node_heartbeat_s * STALE_BEATS),
    )  # fmt: skip
    return web.Response(body=await scrape.render(), headers=headers)
