"""``/metrics`` on the shared port of a real ``parley serve --workers 2``: whichever child a scrape
reaches, it answers for both, each sample labelled worker="0" or worker="1"; a killed child is left
out and counted, never failing the scrape (relay/observability/fanin.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.cluster.routing import NODE_HEADER
from relay.observability.fanin import FAILURE_REASONS, LOCAL_SCOPE, SCOPE_PARAM, WORKER_HEADER
from storage import nodes
from storage.db import Database
from tests.fakes.relay_process import RelayProcess, relay_env
from tests.fixtures_s3 import free_loopback_port
from tests.integration.test_nodes import db  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

HEARTBEAT_S: Final = 1.0
STALE_S: Final = 3 * HEARTBEAT_S  # relay/cluster/presence.py STALE_BEATS
# What only the test asks for, of one child on its loopback URL: a path no route matches.
UNMATCHED: Final = {"route": "unmatched", "method": "GET", "status": "404"}
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def relay(tmp_path: Path, db: Database) -> AsyncIterator[RelayProcess]:
    """`parley serve --workers 2` on PostgreSQL and local objects, both children registered."""
    env = relay_env(
        PARLEY_DATA_DIR=str(tmp_path / "data"),
        PARLEY_PORT=str(free_loopback_port()),
        PARLEY_SECRET_KEY="k" * 48,
        PARLEY_DATABASE_URL=db.engine.url.render_as_string(hide_password=False),
        PARLEY_NODE_HEARTBEAT_SECONDS=str(HEARTBEAT_S),
        PARLEY_RTC_HOST_ADDRESSES="127.0.0.1",
        PARLEY_DRAIN_TIMEOUT="1",
    )
    process = RelayProcess(env, tmp_path / "relay.log", workers=2)
    await process.start()
    try:
        async with asyncio.timeout(20):
            while len(await children(db)) < 2:  # start() returns once either child answers
                await asyncio.sleep(0.1)
        yield process
    finally:
        await process.stop()


async def children(db: Database) -> dict[str, str]:
    """Alive children: worker index -> node URL (loopback), as each says on ``?scope=local``."""
    listed = await nodes.list_nodes(db, stale_after=timedelta(seconds=STALE_S))
    found: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        for node, alive in listed:
            if alive and node.url is not None:
                # A child registers before it listens: one that refuses is not up yet.
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(f"{node.url}/metrics", params={SCOPE_PARAM: LOCAL_SCOPE}) as resp:
                        found[resp.headers[WORKER_HEADER]] = node.url
    return found


async def scrape(relay: RelayProcess) -> tuple[str, Series]:
    """One scrape of the shared port on a new connection (the kernel spreads connections, not
    requests): the node that answered, and every sample."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.get(f"{relay.base_url}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
        node = resp.headers[NODE_HEADER]
    series = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return node, series


def workers_in(series: Series) -> set[str]:
    return {dict(labels).get("worker", "-") for _, labels in series}


def value(series: Series, name: str, **labels: str) -> float | None:
    return series.get((name, frozenset(labels.items())))


def failures(series: Series, reason: str, worker: str) -> float:
    """``parley_metrics_sibling_failures_total{reason, worker}``, which every child exposes."""
    found = value(series, "parley_metrics_sibling_failures_total", reason=reason, worker=worker)
    assert found is not None, (reason, worker)
    return found


async def test_every_scrape_of_the_shared_port_shows_both_workers_and_a_counter_only_one_increments(
    relay: RelayProcess, db: Database
) -> None:
    """Scrapes answered by either child all carry worker="0" and worker="1" series, with the same
    process start times, and a counter raised on worker 1 alone shows on every scrape."""
    urls = await children(db)
    assert set(urls) == {"0", "1"}
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(f"{urls['1']}/no-such-page") as resp:
                assert resp.status == 404
    answered: set[str] = set()
    starts: set[tuple[float | None, float | None]] = set()
    scrapes = 0
    async with asyncio.timeout(30):
        while scrapes < 10 or len(answered) < 2:
            node, series = await scrape(relay)
            answered.add(node)
            scrapes += 1
            assert workers_in(series) == {"0", "1"}, node
            assert value(series, "parley_http_requests_total", **UNMATCHED, worker="1") == 3
            assert value(series, "parley_http_requests_total", **UNMATCHED, worker="0") is None
            starts.add(
                (
                    value(series, "process_start_time_seconds", worker="0"),
                    value(series, "process_start_time_seconds", worker="1"),
                )
            )
            assert [failures(series, reason, w) for reason in FAILURE_REASONS for w in "01"] == [0.0] * 8
    assert len(answered) == 2  # both children answered scrapes, and told the same story
    assert len(starts) == 1 and None not in next(iter(starts))


async def test_a_killed_worker_is_left_out_and_counted_and_scrapes_still_succeed(
    relay: RelayProcess, db: Database
) -> None:
    """SIGKILL to worker 1: every scrape still answers 200 with worker 0's series; until the dead
    child's heartbeat is stale it is counted as unreachable, then it is no longer asked."""
    urls = await children(db)
    async with aiohttp.ClientSession() as http, http.get(f"{urls['1']}/healthz") as resp:
        pid = int(resp.headers[NODE_HEADER].rsplit("-", 2)[1])
    os.kill(pid, signal.SIGKILL)
    killed_at = asyncio.get_running_loop().time()
    _, series = await scrape(relay)
    assert asyncio.get_running_loop().time() - killed_at < STALE_S, "too slow to see the stale window"
    assert workers_in(series) == {"0"}
    assert failures(series, "unreachable", "0") >= 1
    await asyncio.sleep(STALE_S + HEARTBEAT_S)
    _, before = await scrape(relay)
    _, after = await scrape(relay)
    assert workers_in(after) == {"0"}
    assert failures(after, "unreachable", "0") == failures(before, "unreachable", "0")
