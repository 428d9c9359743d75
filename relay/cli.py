"""The ``parley`` command: ``serve``, ``migrate``, ``simulator``.

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
from typing import Final

from aiohttp import web

from relay.config import ConfigError, Settings
from relay.observability.logging import configure_logging

__all__ = ["main"]

log = logging.getLogger("relay.cli")

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
