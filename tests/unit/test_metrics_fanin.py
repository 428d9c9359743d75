"""/metrics of `parley serve --workers N`: expositions merged with a worker label, siblings asked on
loopback, a sibling that does not answer left out and counted (relay/observability/fanin.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relay.app import build_app
from relay.cluster.identity import NodeIdentity
from relay.config import Settings
from relay.observability.fanin import (
    FAILURE_REASONS,
    GROUP_HEADER,
    LOCAL_SCOPE,
    SCOPE_PARAM,
    WORKER_HEADER,
    WorkerScrape,
    local_headers,
    merge_families,
    parse_exposition,
)
from relay.observability.metrics import Metrics
from storage import migrate, nodes
from storage.db import Database
from tests.conftest import FAST_PASSWORDS
from tests.fixtures_s3 import free_loopback_port

OWN = NodeIdentity("host-a-100-aaaaaa", None)
STALE_AFTER = timedelta(seconds=60)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str | bytes) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def with_worker(found: Samples, worker: str) -> Samples:
    return {(name, labels | {("worker", worker)}): value for (name, labels), value in found.items()}


def busy_metrics(requests: int, first_responses: list[float]) -> Metrics:
    """A process's metrics after some work: requests counted, first responses observed."""
    metrics = Metrics()
    for _ in range(requests):
        metrics.request_done("/v1/sessions", "POST", 201, 0.02)
    for seconds in first_responses:
        metrics.first_response.labels("first").observe(seconds)
    metrics.session_state(None, "connecting")
    metrics.session_state("connecting", "live")
    return metrics


# -- the merge ----------------------------------------------------------------------------------


def test_three_expositions_merge_into_one_with_every_sample_labelled_by_its_worker() -> None:
    """Each process's samples are all there, unchanged but for worker="<index>", counters and
    histograms (buckets, sum, count) included."""
    texts = {
        0: busy_metrics(3, [0.2, 0.4]).render().decode(),
        1: busy_metrics(0, []).render().decode(),
        2: busy_metrics(7, [1.2]).render().decode(),
    }
    merged = samples(merge_families({i: parse_exposition(t) for i, t in texts.items()}))
    expected: Samples = {}
    for index, text in texts.items():
        expected.update(with_worker(samples(text), str(index)))
    assert merged == expected
    requests = ("parley_http_requests_total", "POST", "/v1/sessions", "201")
    for worker, count in (("0", 3), ("1", 0), ("2", 7)):
        labels = {
            ("route", requests[2]),
            ("method", requests[1]),
            ("status", requests[3]),
            ("worker", worker),
        }
        assert merged.get((requests[0], frozenset(labels)), 0.0) == count
    first = frozenset({("turn", "first"), ("worker", "0")})
    assert merged[("parley_first_response_seconds_count", first)] == 2
    assert merged[("parley_first_response_seconds_sum", first)] == pytest.approx(0.6)
    assert merged[("parley_first_response_seconds_bucket", first | {("le", "0.3")})] == 1
    assert merged[("parley_first_response_seconds_bucket", first | {("le", "+Inf")})] == 2


def test_help_and_type_appear_once_per_family_and_each_family_is_contiguous() -> None:
    """Two processes' families give one HELP and one TYPE line each, followed by all its samples."""
    body = merge_families(
        {0: parse_exposition(busy_metrics(1, [0.1]).render().decode()),
         1: parse_exposition(busy_metrics(2, [0.3]).render().decode())}
    ).decode()  # fmt: skip
    helps = re.findall(r"^# HELP (\S+)", body, flags=re.M)
    types = re.findall(r"^# TYPE (\S+) (\S+)", body, flags=re.M)
    assert len(helps) == len(set(helps)) > 20
    assert len(types) == len(set(types)) == len(helps)
    assert ("parley_http_requests_total", "counter") in types
    assert ("parley_first_response_seconds", "histogram") in types
    # Samples of one family sit under its TYPE line, worker 0's before worker 1's.
    block = body.split("# TYPE parley_http_requests_total counter\n", 1)[1].split("# HELP", 1)[0]
    assert block.index('worker="0"') < block.index('worker="1"')
    assert block.count("parley_http_requests_total{") == 2


def test_a_family_only_one_process_has_samples_in_is_merged_with_its_samples_only() -> None:
    """A label set one process never used shows only under that process's worker label."""
    quiet, busy = Metrics(), Metrics()
    busy.peer_losses.labels("connect_timeout").inc(4)
    merged = samples(
        merge_families(
            {0: parse_exposition(quiet.render().decode()), 1: parse_exposition(busy.render().decode())}
        )
    )
    losses = {k: v for k, v in merged.items() if k[0] == "parley_peer_losses_total"}
    assert losses == {
        ("parley_peer_losses_total", frozenset({("cause", "connect_timeout"), ("worker", "1")})): 4.0
    }


def test_a_family_with_another_type_in_a_later_process_is_left_out_for_that_process() -> None:
    """One name, two types would be refused by Prometheus: the first process's type wins."""
    first = "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3.0\n"
    second = "# HELP x Things.\n# TYPE x gauge\nx 5.0\n# HELP y A gauge.\n# TYPE y gauge\ny 1.0\n"
    body = merge_families({0: parse_exposition(first), 1: parse_exposition(second)}).decode()
    assert samples(body) == {
        ("x_total", frozenset({("worker", "0")})): 3.0,
        ("y", frozenset({("worker", "1")})): 1.0,
    }
    assert body.count("# TYPE x") == 1


def test_an_answer_that_is_not_an_exposition_is_refused_by_the_parser() -> None:
    """HTML or a broken line is a ValueError, which the scrape counts as an invalid sibling."""
    for text in ("<html>Bad gateway</html>", 'x{a="1"} not-a-number\n'):
        with pytest.raises(ValueError):
            parse_exposition(text)


# -- asking the siblings ------------------------------------------------------------------------


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'nodes.db'}")
    await migrate.upgrade(database)
    try:
        yield database
    finally:
        await database.aclose()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass
class Sibling:
    """A fake child of the same parent: answers ``/metrics?scope=local`` with its registry."""

    index: int
    metrics: Metrics
    asked: int = 0


async def sibling_server(
    aiohttp_server: AiohttpServer, sibling: Sibling, handler: Handler | None = None
) -> str:
    async def scope_local(request: web.Request) -> web.StreamResponse:
        sibling.asked += 1
        assert request.query.get(SCOPE_PARAM) == LOCAL_SCOPE
        if handler is not None:
            return await handler(request)
        return web.Response(body=sibling.metrics.render(), headers=local_headers(sibling.index))

    app = web.Application()
    app.router.add_get("/metrics", scope_local)
    server: TestServer = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}"


def scrape(
    db: Database, metrics: Metrics, *, timeout_s: float = 2.0, stale_after: timedelta = STALE_AFTER
) -> WorkerScrape:
    """Worker 0's scrape, on node ``OWN`` (as the endpoint makes it)."""
    metrics.watch_siblings(FAILURE_REASONS)
    return WorkerScrape(db, OWN, metrics, index=0, stale_after=stale_after, timeout_s=timeout_s)


def failures(found: Samples, reason: str, worker: str = "0") -> float:
    key = ("parley_metrics_sibling_failures_total", frozenset({("reason", reason), ("worker", worker)}))
    return found[key]


async def test_a_scrape_answers_for_its_alive_loopback_siblings_on_this_machine_only(
    db: Database, aiohttp_server: AiohttpServer
) -> None:
    """Siblings on this machine's loopback are asked; another machine's node, a pod's node URL and a
    stale node are not."""
    mine, one, two = busy_metrics(1, []), Sibling(1, busy_metrics(5, [])), Sibling(2, busy_metrics(9, []))
    other_machine, pod = Sibling(3, Metrics()), Sibling(4, Metrics())
    await nodes.register(db, OWN.id, None)
    await nodes.register(db, "host-a-101-bbbbbb", await sibling_server(aiohttp_server, one))
    await nodes.register(db, "host-a-102-cccccc", await sibling_server(aiohttp_server, two) + "/")
    await nodes.register(db, "host-b-100-dddddd", await sibling_server(aiohttp_server, other_machine))
    # A node with PARLEY_NODE_URL (a pod) is scraped on its own; 127.0.0.2 keeps this test on
    # loopback, and the server listens on 127.0.0.1 only, so asking it would count as unreachable.
    pod_url = (await sibling_server(aiohttp_server, pod)).replace("127.0.0.1", "127.0.0.2")
    await nodes.register(db, "host-a-103-eeeeee", pod_url)
    await nodes.register(db, "host-a-104-ffffff", f"http://127.0.0.1:{free_loopback_port()}")
    # Every node stale (heartbeats older than 0 s): only this process answers, nobody is asked.
    alone = samples(await scrape(db, mine, stale_after=timedelta(0)).render())
    assert {dict(labels)["worker"] for _, labels in alone} == {"0"}
    assert one.asked == two.asked == 0

    body = await scrape(db, mine).render()
    found = samples(body)
    assert {dict(labels)["worker"] for _, labels in found} == {"0", "1", "2"}
    post = frozenset({("route", "/v1/sessions"), ("method", "POST"), ("status", "201")})
    for worker, count in (("0", 1), ("1", 5), ("2", 9)):
        assert found[("parley_http_requests_total", post | {("worker", worker)})] == count
    assert (one.asked, two.asked, other_machine.asked, pod.asked) == (1, 1, 0, 0)
    # host-a-104 is registered on loopback but gone: left out and counted in this same scrape.
    assert failures(found, "unreachable") == 1
    assert failures(found, "timeout") == failures(found, "invalid") == 0


async def test_a_sibling_that_does_not_answer_in_time_is_left_out_and_counted_as_timeout(
    db: Database, aiohttp_server: AiohttpServer
) -> None:
    """A hung sibling costs the scrape at most the timeout; the others are still in it."""

    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    mine, slow, fine = Metrics(), Sibling(1, Metrics()), Sibling(2, Metrics())
    await nodes.register(db, "host-a-101-bbbbbb", await sibling_server(aiohttp_server, slow, hang))
    await nodes.register(db, "host-a-102-cccccc", await sibling_server(aiohttp_server, fine))
    started = asyncio.get_running_loop().time()
    found = samples(await scrape(db, mine, timeout_s=0.3).render())
    assert asyncio.get_running_loop().time() - started < 2
    assert {dict(labels)["worker"] for _, labels in found} == {"0", "2"}
    assert failures(found, "timeout") == 1
    assert mine.registry.get_sample_value("parley_metrics_sibling_failures_total", {"reason": "timeout"}) == 1


async def test_an_answer_that_is_not_a_siblings_metrics_is_left_out_and_counted_as_invalid(
    db: Database, aiohttp_server: AiohttpServer
) -> None:
    """A 500, an exposition that does not parse, a missing or duplicate worker index: each is left
    out and counted; the scrape still answers."""

    async def error(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    async def garbage(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>no</html>", headers=local_headers(2))

    async def no_index(request: web.Request) -> web.StreamResponse:
        headers = local_headers(3)
        del headers[WORKER_HEADER]
        return web.Response(text="x 1\n", headers=headers)

    async def same_index(request: web.Request) -> web.StreamResponse:
        return web.Response(text="x 1\n", headers=local_headers(0))

    mine = Metrics()
    for n, handler in enumerate((error, garbage, no_index, same_index)):
        url = await sibling_server(aiohttp_server, Sibling(n + 1, Metrics()), handler)
        await nodes.register(db, f"host-a-{101 + n}-bbbbbb", url)
    found = samples(await scrape(db, mine).render())
    assert {dict(labels)["worker"] for _, labels in found} == {"0"}
    assert failures(found, "invalid") == 4


async def test_a_child_of_another_parent_on_this_machine_is_neither_shown_nor_counted(
    db: Database, aiohttp_server: AiohttpServer
) -> None:
    """Another `parley serve --workers` on the same machine and database has the same indexes: its
    answer would duplicate series, so it is skipped (it is no failure of ours)."""

    async def stranger(request: web.Request) -> web.StreamResponse:
        return web.Response(body=Metrics().render(), headers={**local_headers(1), GROUP_HEADER: "1"})

    mine = Metrics()
    await nodes.register(
        db, "host-a-101-bbbbbb", await sibling_server(aiohttp_server, Sibling(1, mine), stranger)
    )
    found = samples(await scrape(db, mine).render())
    assert {dict(labels)["worker"] for _, labels in found} == {"0"}
    assert all(failures(found, reason) == 0 for reason in FAILURE_REASONS)


async def test_an_unreadable_node_registry_leaves_this_process_alone_and_is_counted(tmp_path: Path) -> None:
    """The database is gone: the scrape still answers, with this process's metrics and the count."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'nodes.db'}")
    try:
        found = samples(await scrape(db, Metrics()).render())
    finally:
        await db.aclose()
    assert {dict(labels)["worker"] for _, labels in found} == {"0"}
    assert failures(found, "registry") == 1


# -- the endpoint -------------------------------------------------------------------------------


async def test_a_process_on_its_own_answers_metrics_as_before_without_a_worker_label(
    migrated_settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """No --workers (or a pod): no worker label, no sibling counter, no worker headers."""
    client = await aiohttp_client(build_app(migrated_settings, passwords=FAST_PASSWORDS))
    resp = await client.get("/metrics")
    body = await resp.text()
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert WORKER_HEADER not in resp.headers
    assert "worker=" not in body and "parley_metrics_sibling_failures" not in body
    assert "parley_sessions_processed_total 0.0" in body


async def test_a_worker_child_labels_its_metrics_and_answers_scope_local_unlabelled(
    migrated_settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """A child of --workers N: /metrics labels every sample worker="<index>"; ?scope=local is its
    own metrics as a single process gives them, with its index and parent in headers."""
    settings = dataclasses.replace(migrated_settings, worker_index=1)
    client = await aiohttp_client(build_app(settings, passwords=FAST_PASSWORDS))
    resp = await client.get("/metrics")
    assert resp.status == 200
    found = samples(await resp.text())
    assert {dict(labels).get("worker") for _, labels in found} == {"1"}
    assert failures(found, "registry", worker="1") == 0
    local = await client.get("/metrics", params={SCOPE_PARAM: LOCAL_SCOPE})
    assert local.status == 200
    assert local.headers[WORKER_HEADER] == "1"
    assert local.headers[GROUP_HEADER] == local_headers(1)[GROUP_HEADER]
    assert "worker=" not in await local.text()
