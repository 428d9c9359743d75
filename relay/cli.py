"""The ``parley`` command: ``serve``, ``worker``, ``jobs list|retry``, ``migrate``, ``simulator``.

Configuration errors end the command with one line on stderr naming the variable, and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from aiohttp import web

from relay.config import ConfigError, Settings
from relay.observability.logging import configure_logging

if TYPE_CHECKING:
    from storage.db import Database

__all__ = ["main"]

log = logging.getLogger("relay.cli")

EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
SHUTDOWN_TIMEOUT_S: Final = 30.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        if args.command == "serve":
            return _serve_command(settings, args.workers, args.worker_of, args.worker_index)
        elif args.command == "worker":
            asyncio.run(_worker(settings, args.concurrency, args.metrics_port))
        elif args.command == "jobs" and args.jobs_command in ("list", "retry"):
            return asyncio.run(_jobs(settings, args))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "simulator":
            asyncio.run(_simulator(args.host, args.port))
        else:
            parser.print_help()
            return EXIT_CONFIG
    except ConfigError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley relay for spoken-language practice.")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the HTTP API, WebRTC signalling and the web client")
    serve.add_argument(
        "--workers", type=_positive, default=None,
        help="relay processes on this machine, all on PARLEY_PORT (default: one per core on PostgreSQL, "
        "1 on SQLite; 1: this process)",
    )  # fmt: skip
    # Internal: set by `--workers N` on its children (relay/cluster/workers.py).
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=_index, default=None, help=argparse.SUPPRESS)
    worker = sub.add_parser("worker", help="run post-processing jobs (as `parley serve` also does)")
    worker.add_argument("--concurrency", type=_positive, default=1, help="jobs run at once (default 1)")
    worker.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on PARLEY_HOST:PORT"
    )
    jobs = sub.add_parser("jobs", help="look at the post-processing queue; retry dead jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command")
    listing = jobs_sub.add_parser("list", help="list jobs (ids, kinds, statuses, attempts, error codes)")
    listing.add_argument("--status", choices=("queued", "running", "done", "dead"))
    listing.add_argument("--kind")
    listing.add_argument("--limit", type=_positive, default=100)
    retry = jobs_sub.add_parser("retry", help="queue a dead job again with fresh attempts")
    retry.add_argument("job_id")
    sub.add_parser("migrate", help="upgrade the database schema to this version")
    sim = sub.add_parser("simulator", help="run the local OpenAI Realtime simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9000)
    return parser


def _serve_command(
    settings: Settings, workers: int | None, worker_of: int | None, worker_index: int | None
) -> int:
    """``parley serve``: this process serves (``--workers 1``, or a child of ``--workers N``), or it
    starts and watches N processes that do (relay/cluster/workers.py)."""
    from relay.cluster.workers import default_workers, die_with_parent, supervise

    if worker_of is not None:
        die_with_parent(worker_of)
        # The parent numbers its children (0..N-1): their metrics' `worker` label.
        settings = dataclasses.replace(settings, worker_index=worker_index)
        asyncio.run(_serve(settings, worker=True))
        return 0
    if workers is not None:
        count = workers
    elif settings.database_url.startswith("sqlite"):
        # SQLite takes one writer at a time: several processes would queue on its lock (the
        # embedded default is for trying Parley out; scale out on PostgreSQL).
        count = 1
    else:
        count = default_workers()
    if count == 1:
        asyncio.run(_serve(settings, worker=False))
        return 0
    if settings.node_url is not None:
        raise ConfigError(
            "PARLEY_NODE_URL",
            f"names one process, and --workers {count} runs {count}: leave it unset (each process is "
            "then reached on its own loopback port) or run `parley serve --workers 1` per address",
        )
    asyncio.run(_check_dependencies(settings))  # a bad configuration fails once, not once per child
    url = f"http://{settings.host}:{settings.port}"
    banner = f"Parley is serving on {url}  (upstream: {settings.upstream_kind}, {count} processes)"
    command = [sys.executable, "-m", "relay", "serve", "--worker-of", str(os.getpid())]
    return asyncio.run(supervise(count, command, banner=banner))


async def _check_dependencies(settings: Settings) -> None:
    """The checks each relay process makes at start (database at this schema, object store usable)."""
    from storage.objects import ObjectStoreError, open_object_store

    db = await _open_database(settings)
    await db.aclose()
    store = open_object_store(settings.object_store_url)
    try:
        await store.setup()
        await store.check()
    except ObjectStoreError as exc:
        raise ConfigError("PARLEY_OBJECT_STORE_URL", f"cannot use the object store ({exc})") from None
    finally:
        await store.aclose()


async def _serve(settings: Settings, *, worker: bool) -> None:
    """Serve until SIGTERM/SIGINT. ``worker``: a child of ``--workers N``, sharing the port with
    its siblings (SO_REUSEPORT) and telling the parent when it serves."""
    from relay.app import build_app
    from relay.cluster.identity import NodeIdentity, new_node_id
    from relay.cluster.workers import READY_LINE
    from storage.spool_claims import claim_spool

    node_id = new_node_id()
    try:
        claim = await asyncio.to_thread(claim_spool, settings.data_dir, node_id)
    except OSError as exc:
        raise ConfigError("PARLEY_DATA_DIR", f"cannot claim a spool directory: {exc.strerror}") from None
    settings = dataclasses.replace(settings, spool_path=claim.path)
    # Other nodes on this machine forward signalling to a loopback port of this process's own:
    # the shared port would hand it to any sibling.
    internal: socket.socket | None = None
    node_url = settings.node_url
    if node_url is None:
        internal = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        internal.bind(("127.0.0.1", 0))
        node_url = f"http://127.0.0.1:{internal.getsockname()[1]}"
    app = build_app(settings, node=NodeIdentity(node_id, node_url))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    try:
        try:
            await runner.setup()  # opens the database and object store; raises ConfigError when they fail
        except BaseException:
            await runner.cleanup()  # closes what did open before the failure
            raise
        try:
            site = web.TCPSite(runner, settings.host, settings.port, reuse_port=worker or None)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    "PARLEY_PORT", f"cannot listen on {settings.port}: {exc.strerror}"
                ) from None
            if internal is not None:
                await web.SockSite(runner, internal).start()
            if worker:
                print(f"{READY_LINE} {node_id}", flush=True)
            else:
                url = f"http://{settings.host}:{settings.port}"
                print(f"Parley is serving on {url}  (upstream: {settings.upstream_kind})", flush=True)
            log.info(
                "serve.started",
                extra={"port": settings.port, "upstream": settings.upstream_kind, "node_id": node_id},
            )
            await _wait_for_signal()
            log.info("serve.stopping", extra={"node_id": node_id})
        finally:
            await runner.cleanup()
    finally:
        if internal is not None:
            internal.close()
        claim.release()
    log.info("serve.stopped", extra={"node_id": node_id})


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _index(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def _open_database(settings: Settings) -> Database:
    """The database, reachable and at this code's schema (the same check ``parley serve`` makes)."""
    from relay.app import open_database

    return await open_database(settings)


async def _worker(settings: Settings, concurrency: int, metrics_port: int | None) -> None:
    """Run jobs until SIGTERM/SIGINT; a job still running then goes back to the queue."""
    from relay.observability.metrics import CONTENT_TYPE, Metrics
    from relay.worker.jobs import Worker
    from relay.worker.kinds import default_kinds
    from relay.worker.rating_model import open_rating_model
    from storage.objects import ObjectStoreError, open_object_store

    metrics = Metrics()
    db = await _open_database(settings)
    store = open_object_store(settings.object_store_url)
    runner: web.AppRunner | None = None
    try:
        try:
            await store.setup()
            await store.check()
        except ObjectStoreError as exc:
            raise ConfigError("PARLEY_OBJECT_STORE_URL", f"cannot use the object store ({exc})") from None
        if metrics_port is not None:

            async def scrape(_request: web.Request) -> web.Response:
                return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

            app = web.Application()
            app.router.add_get("/metrics", scrape)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, settings.host, metrics_port).start()
            except OSError as exc:
                raise ConfigError(
                    "--metrics-port", f"cannot listen on {metrics_port}: {exc.strerror}"
                ) from None
        async with open_rating_model(settings) as rating:
            worker = Worker(
                db, store, default_kinds(rating), metrics=metrics, concurrency=concurrency,
                lease_s=settings.job_lease_s,
            )  # fmt: skip
            worker.start()
            print(f"Parley worker is running ({concurrency} at a time; rating: {rating.kind})", flush=True)
            log.info("worker.started", extra={"count": concurrency, "kind": rating.kind})
            try:
                await _wait_for_signal()
            finally:
                await worker.aclose()
        log.info("worker.stopped")
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.aclose()
        await db.aclose()


async def _jobs(settings: Settings, args: argparse.Namespace) -> int:
    """``parley jobs list|retry``: ids, kinds, states, counts and error codes only, never content."""
    from storage import jobs

    db = await _open_database(settings)
    try:
        if args.jobs_command == "retry":
            if await jobs.retry_dead(db, args.job_id):
                print(f"{args.job_id}: dead -> queued", flush=True)
                return 0
            job = await jobs.get_job(db, args.job_id)
            why = "no such job" if job is None else f"it is {job.status}, only dead jobs are retried"
            print(f"parley: cannot retry {args.job_id}: {why}", file=sys.stderr)
            return EXIT_FAILED
        rows = await jobs.list_jobs(db, status=args.status, kind=args.kind, limit=args.limit)
    finally:
        await db.aclose()
    table = [("ID", "KIND", "SESSION", "STATUS", "ATTEMPTS", "RUNS", "RUN_AFTER", "ERROR")]
    for job in rows:
        table.append(
            (
                job.id, job.kind, job.session_id or "-", job.status, f"{job.attempts}/{job.max_attempts}",
                str(job.runs), job.run_after.strftime("%Y-%m-%dT%H:%M:%SZ"), job.last_error_code or "-",
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), flush=True)
    return 0


async def _migrate(settings: Settings) -> None:
    from storage import migrate
    from storage.db import Database, DatabaseUnavailable

    db = Database(settings.database_url)
    try:
        try:
            await db.check()
        except DatabaseUnavailable as exc:
            raise ConfigError("PARLEY_DATABASE_URL", f"cannot reach the database ({exc})") from None
        before = await migrate.current_revision(db)
        await migrate.upgrade(db)
        after = await migrate.current_revision(db)
    finally:
        await db.aclose()
    print(f"database schema: {before or 'empty'} -> {after}", flush=True)


async def _simulator(host: str, port: int) -> None:
    from relay.simulator import SimulatorOptions, serve_forever

    with contextlib.suppress(asyncio.CancelledError):
        await serve_forever(host, port, SimulatorOptions())
