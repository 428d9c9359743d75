"""The ``parley`` command: ``serve``, ``worker``, ``jobs list|retry``, ``migrate``, ``simulator``.

Configuration errors end the command with one line on stderr naming the variable, and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
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
            asyncio.run(_serve(settings))
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
    sub.add_parser("serve", help="serve the HTTP API, WebRTC signalling and the web client")
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


async def _serve(settings: Settings) -> None:
    from relay.app import build_app

    runner = web.AppRunner(build_app(settings), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    try:
        await runner.setup()  # opens the database and object store; raises ConfigError when they fail
    except BaseException:
        await runner.cleanup()  # closes what did open before the failure
        raise
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError("PARLEY_PORT", f"cannot listen on {settings.port}: {exc.strerror}") from None
        url = f"http://{settings.host}:{settings.port}"
        print(f"Parley is serving on {url}  (upstream: {settings.upstream_kind})", flush=True)
        log.info("serve.started", extra={"port": settings.port, "upstream": settings.upstream_kind})
        await _wait_for_signal()
        log.info("serve.stopping")
    finally:
        await runner.cleanup()
    log.info("serve.stopped")


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
