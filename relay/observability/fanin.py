"""``/metrics`` of ``parley serve --workers N``: every scrape answers for all the machine's processes.

The N children share the public port (``SO_REUSEPORT``), so a scrape of it reaches one of them,
a different one each time: on its own, each answer would show one process, counters would jump
between processes' values and sessions would come and go. Here the child that a scrape reaches
(:class:`WorkerScrape`) asks its alive siblings on this machine for their own metrics, on their
loopback node URLs (``GET /metrics?scope=local``, which never fans out again), all at once and for at
most :data:`SIBLING_TIMEOUT_S`, and answers with one exposition in which every sample carries
``worker="<index>"``: the child's place among the N (0..N-1, given by the parent), not its node id,
which is new at every restart. A series is then the same whichever child answers. A sibling that
does not answer in time, or answers with something that is not its metrics, is left out of that
scrape and counted in ``parley_metrics_sibling_failures_total{reason}``; the scrape itself never
fails for it. A process on its own (no ``--workers``, ``--workers 1``, a pod with
``PARLEY_NODE_URL``) has no index and answers as before, without a ``worker`` label.

Why not prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): it adds up only the
values that Counter/Gauge/Histogram objects write to per-process files. Custom collectors yield
nothing there (``GcPauses``, ``FeedCollector``, and ``ProcessCollector``/``PlatformCollector``, whose
CPU and memory would describe only the answering process), gauges read at scrape time from live
state (``set_function``: spool bytes, oldest pending upload) are not supported, and the directory must
be wiped at each start while dead processes' files stay behind. Asking each process for its own
exposition keeps every registry exactly as it is, at the cost of one loopback request per sibling
per scrape.

Expositions are merged with prometheus_client's own parser and exposition code, not as text: each
family keeps one HELP and TYPE line, and histograms' buckets, sums and counts stay together.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from relay.cluster.identity import NodeIdentity, machine_of
from relay.observability.logging import log_failure
from relay.observability.metrics import Metrics
from storage import nodes
from storage.db import Database
from storage.uploader import RETRYABLE

__all__ = [
    "FAILURE_REASONS",
    "GROUP_HEADER",
    "LOCAL_SCOPE",
    "SCOPE_PARAM",
    "SIBLING_TIMEOUT_S",
    "WORKER_HEADER",
    "WORKER_LABEL",
    "WorkerScrape",
    "local_headers",
    "merge_families",
    "parse_exposition",
]

log = logging.getLogger("relay.observability.fanin")

#: The label every sample gets under ``--workers N``: the child's index, 0..N-1.
WORKER_LABEL: Final = "worker"
#: ``GET /metrics?scope=local``: only this process's metrics (what a sibling asks for).
SCOPE_PARAM: Final = "scope"
LOCAL_SCOPE: Final = "local"
#: On a ``scope=local`` answer: the answering child's index, and its parent's pid. The pid tells a
#: sibling from a child of another ``parley serve --workers`` on this machine and database: its
#: indexes would collide with ours, and a duplicate series fails the whole scrape in Prometheus.
WORKER_HEADER: Final = "x-parley-worker"
GROUP_HEADER: Final = "x-parley-worker-group"
#: How long a scrape waits for the node registry, then for the siblings (concurrently); together
#: well inside Prometheus's default 10 s scrape timeout.
SIBLING_TIMEOUT_S: Final = 2.0
#: Why a sibling was left out of a scrape (``parley_metrics_sibling_failures_total{reason}``).
FAILURE_REASONS: Final = ("timeout", "unreachable", "invalid", "registry")

_LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_REGISTRY_FAILURES: Final = (*RETRYABLE, SQLAlchemyError, TimeoutError)
_FETCH_FAILURES: Final = (aiohttp.ClientError, TimeoutError)


def local_headers(index: int) -> dict[str, str]:
    """Headers of a child's ``scope=local`` answer: who answered, and whose child it is."""
    return {WORKER_HEADER: str(index), GROUP_HEADER: str(os.getppid())}


def parse_exposition(text: str) -> list[Metric]:
    """The metric families of one text exposition; raises ValueError if it is not one.

    CPU-bound (a few ms per process): callers on the event loop run it in a thread.
    """
    # The parser is lazy: listing it here makes a malformed line raise now, not during the merge.
    return list(text_string_to_metric_families(text))


def merge_families(workers: Mapping[int, Sequence[Metric]]) -> bytes:
    """One text exposition of several processes' families, each sample labelled ``worker="<index>"``.

    Families keep the order in which they first appear (lowest index first) and one HELP/TYPE each,
    the first process's. Within a family, samples are grouped by worker in index order, so an
    answer reads the same whichever process gives it. A family whose TYPE differs from the first
    one's is left out for that worker: only a mix of versions could cause it, and one name with two
    types would make Prometheus refuse the whole scrape. CPU-bound, like :func:`parse_exposition`.
    """
    merged: dict[str, Metric] = {}
    for index in sorted(workers):
        worker = str(index)
        for family in workers[index]:
            into = merged.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = into
            elif into.type != family.type:
                continue
            # A label the process set itself of the same name would be overwritten; none has one.
            into.samples.extend(s._replace(labels={**s.labels, WORKER_LABEL: worker}) for s in family.samples)
    return generate_latest(_Families(list(merged.values())))


class _Families(Collector):
    """Already-collected families, for ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class WorkerScrape:
    """One scrape of a child of ``parley serve --workers N``: its metrics and its siblings'.

    Made per request and stateless: which siblings are alive is read from the node registry each
    time, so a child that died drops out once its heartbeat is stale (until then it is counted as
    unreachable, as is a child in the moment between registering and listening at its start).
    Cancelling :meth:`render` (the scraper hung up) cancels the sibling requests.
    """

    def __init__(
        self,
        db: Database,
        node: NodeIdentity,
        metrics: Metrics,
        *,
        index: int,
        stale_after: timedelta,
        timeout_s: float = SIBLING_TIMEOUT_S,
    ) -> None:
        self._db = db
        self._node = node
        self._metrics = metrics
        self._index = index
        self._stale_after = stale_after
        self._timeout_s = timeout_s
        self._group = str(os.getppid())

    async def render(self) -> bytes:
        """The merged exposition; never raises for a sibling or the registry, only counts them."""
        siblings = await self._siblings()
        answers: dict[int, list[Metric]] = {}
        if siblings is None:
            self._metrics.sibling_left_out("registry")
        elif siblings:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                results = await asyncio.gather(*(self._fetch(http, *sibling) for sibling in siblings))
            for (node_id, _), result in zip(siblings, results, strict=True):
                if result is None:
                    continue
                index, families = result
                if index == self._index or index in answers:
                    self._left_out(node_id, "invalid", duplicate_worker=index)
                    continue
                answers[index] = families
        # Rendered on the loop (collectors read loop-owned state) and after the siblings answered,
        # so the failures of this very scrape are in it.
        own = self._metrics.render().decode()
        # Parsing and exposing are pure Python: in a thread, the loop keeps its 20 ms audio pacing
        # while they run (the GIL is handed over every few ms).
        return await asyncio.to_thread(_merge_with_own, self._index, own, answers)

    async def _siblings(self) -> list[tuple[str, str]] | None:
        """(node id, URL) of this machine's other alive children; None if the registry is unreadable."""
        try:
            async with asyncio.timeout(self._timeout_s):
                listed = await nodes.list_nodes(self._db, stale_after=self._stale_after)
        except Exception as exc:  # the scrape goes on with this process alone
            log_failure(log, "metrics.registry_unavailable", exc, expected=_REGISTRY_FAILURES)
            return None
        machine = machine_of(self._node.id)
        return [
            (node.id, node.url)
            for node, alive in listed
            if alive
            and node.id != self._node.id
            and node.url is not None
            # Children of --workers are reached on loopback only; a node with PARLEY_NODE_URL (a pod)
            # is scraped on its own, and another machine's loopback URL means nothing here.
            and urlsplit(node.url).hostname in _LOOPBACK_NAMES
            and machine_of(node.id) == machine
        ]

    async def _fetch(
        self, http: aiohttp.ClientSession, node_id: str, url: str
    ) -> tuple[int, list[Metric]] | None:
        """A sibling's index and families; None when it is left out (counted) or is no sibling."""
        try:
            async with http.get(f"{url.rstrip('/')}/metrics", params={SCOPE_PARAM: LOCAL_SCOPE}) as resp:
                if resp.headers.get(GROUP_HEADER) != self._group:
                    if resp.status == 200 and GROUP_HEADER in resp.headers:
                        # A child of another `parley serve --workers` on this machine: not ours to show.
                        log.debug("metrics.not_a_sibling", extra={"node_id": node_id})
                        return None
                    self._left_out(node_id, "invalid", http_status=resp.status)
                    return None
                index = _index_of(resp.headers.get(WORKER_HEADER))
                if resp.status != 200 or index is None:
                    self._left_out(node_id, "invalid", http_status=resp.status)
                    return None
                body = await resp.read()
        except _FETCH_FAILURES as exc:
            # TimeoutError also covers aiohttp's own timeouts, which subclass it (and ClientError).
            reason = "timeout" if isinstance(exc, TimeoutError) else "unreachable"
            fields = {"node_id": node_id, "reason": reason}
            log_failure(log, "metrics.sibling_failed", exc, expected=_FETCH_FAILURES, extra=fields)
            self._metrics.sibling_left_out(reason)
            return None
        try:
            families = await asyncio.to_thread(parse_exposition, body.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is one too
            self._left_out(node_id, "invalid", http_status=200)
            return None
        return index, families

    def _left_out(self, node_id: str, reason: str, **fields: object) -> None:
        log.warning("metrics.sibling_failed", extra={"node_id": node_id, "reason": reason, **fields})
        self._metrics.sibling_left_out(reason)


def _merge_with_own(index: int, own: str, siblings: dict[int, list[Metric]]) -> bytes:
    return merge_families({index: parse_exposition(own), **siblings})


def _index_of(raw: str | None) -> int | None:
    if raw is None or not (raw.isascii() and raw.isdigit()):
        return None
    return int(raw)
