"""Prometheus metrics: the only module that defines metrics with ``prometheus_client`` (its sibling
:mod:`relay.observability.fanin` only parses and re-exposes expositions of ``parley serve --workers``).

Each application owns one :class:`Metrics` (its own registry), so tests can run several apps in one
process and read exact counts. Components call verb helpers (``metrics.request_done(...)``) instead
of touching metric objects. Label values are bounded sets (routes, states, codes), never ids.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Fine enough below 200 ms that a p95 of tens of ms is not an interpolation inside a 100 ms bucket.
FIRST_RESPONSE_BUCKETS: Final = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip
INBOUND_LATENCY_BUCKETS: Final = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.2, 0.5, 1.0)
GC_PAUSE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GC_GENERATIONS: Final = 3
JOB_BUCKETS: Final = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


class GcPauses(Collector):
    """``parley_gc_pause_seconds{generation}``: how long each garbage collection stopped the process.

    :meth:`hook` goes into ``gc.callbacks``. It takes no lock, unlike ``Histogram.observe``: a
    collection can start inside any allocation, also in a thread that holds that histogram's
    (non-reentrant) lock. The interpreter runs one collection at a time, so the hook's plain counters
    never race with each other; a scrape may read them mid-update, which costs at most one sample.
    """

    def __init__(self, buckets: tuple[float, ...] = GC_PAUSE_BUCKETS) -> None:
        self._bounds = buckets
        # Per generation: count per bucket (not cumulative), the last one for +Inf.
        self._counts = [[0] * (len(buckets) + 1) for _ in range(GC_GENERATIONS)]
        self._sums = [0.0] * GC_GENERATIONS
        self._started: float | None = None

    def hook(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` entry: ``start`` and ``stop`` of one collection."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        started, self._started = self._started, None
        generation = info.get("generation", GC_GENERATIONS - 1)
        if started is None or not 0 <= generation < GC_GENERATIONS:
            return  # hooked in mid-collection, or a generation this interpreter does not have
        elapsed = time.perf_counter() - started
        self._counts[generation][bisect.bisect_left(self._bounds, elapsed)] += 1
        self._sums[generation] += elapsed

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "parley_gc_pause_seconds",
            "Garbage-collection pauses of the process (every thread and session waits), by generation; "
            "start-up objects are frozen out of full collections.",
            labels=["generation"],
        )
        for generation in range(GC_GENERATIONS):
            cumulative = list(itertools.accumulate(list(self._counts[generation])))
            buckets = [(str(b), n) for b, n in zip(self._bounds, cumulative, strict=False)]
            buckets.append(("+Inf", cumulative[-1]))
            family.add_metric([str(generation)], buckets, self._sums[generation])
        yield family


#: (current subscribers, subscriptions, slow-consumer cut-offs, resume gaps) of the event feeds.
FeedCounts = Callable[[], tuple[int, int, int, int]]


class FeedCollector(Collector):
    """The event feeds' counters, read at scrape time from the feed registry (which owns them)."""

    def __init__(self, read: FeedCounts) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        subscribers, subscriptions, cut_offs, gaps = self._read()
        yield GaugeMetricFamily(
            "parley_event_feed_subscribers", "Event-feed sockets open now.", value=subscribers
        )
        yield CounterMetricFamily(
            "parley_event_feed_subscriptions", "Event-feed sockets opened.", value=subscriptions
        )
        refused = CounterMetricFamily(
            "parley_event_feed_disconnects",
            "Event-feed subscribers cut off: slow_consumer (fell too far behind), resume_gap (resumed "
            "after events no longer held).",
            labels=["reason"],
        )
        refused.add_metric(["slow_consumer"], cut_offs)
        refused.add_metric(["resume_gap"], gaps)
        yield refused


class Metrics:
    """All of one process's metrics, registered on a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.http_requests = Counter(
            "parley_http_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "parley_http_request_duration_seconds",
            "Time to answer an HTTP request (until the handler returns), by route template and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dependency_up = Gauge(
            "parley_dependency_up",
            "1 when the last readiness check of a dependency succeeded, else 0.",
            ["dependency"],
            registry=r,
        )

        self.sessions_active = Gauge(
            "parley_sessions_active", "Live sessions in this process, by state.", ["state"], registry=r
        )
        self.session_outcomes = Counter(
            "parley_session_outcomes_total",
            "Live sessions that ended, by end reason (learner, user_request, grace_expired, no_peer, "
            "max_duration, upstream_failed, shutdown, ...).",
            ["reason"],
            registry=r,
        )
        self.session_refusals = Counter(
            "parley_session_admission_refused_total",
            "Offers refused by admission control, by cause (capacity, loop_lag, draining).",
            ["cause"],
            registry=r,
        )
        self.first_response = Histogram(
            "parley_first_response_seconds",
            "From the end of the learner's utterance to the first coach audio frame sent to the browser; "
            "turn=first is the session's first answer (SC-001).",
            ["turn"],
            buckets=FIRST_RESPONSE_BUCKETS,
            registry=r,
        )
        self.inbound_latency = Histogram(
            "parley_inbound_latency_seconds",
            "Relay's own inbound latency: RTP packet arrival to audio handed to the upstream.",
            buckets=INBOUND_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_reconnects = Counter(
            "parley_upstream_reconnects_total",
            "Upstream (Realtime) reconnect attempts, by outcome (ok, failed).",
            ["outcome"],
            registry=r,
        )
        self.barge_ins = Counter(
            "parley_barge_ins_total", "Learner barge-ins during coach audio.", registry=r
        )
        self.playout_frames = Counter(
            "parley_playout_frames_total",
            "Coach playout frames by kind (sent, late: more than 5 ms after their slot, dropped: drained "
            "past the max latency or skipped after a stall).",
            ["kind"],
            registry=r,
        )
        self.peer_losses = Counter(
            "parley_peer_losses_total", "Browser legs declared dead, by cause.", ["cause"], registry=r
        )
        # No labels, so it is exposed at 0 from the start and its first increase shows in rate().
        self.rtc_port_exhausted = Counter(
            "parley_rtc_port_exhausted_total",
            "ICE host-candidate binds that found every port of PARLEY_RTC_PORT_RANGE in use (one per "
            "host address per offer); an offer left with no candidate is refused with 503.",
            registry=r,
        )
        self.heap_released = Counter(
            "parley_heap_released_bytes",
            "Resident memory the periodic heap trim gave back to the OS (relay/heap.py): freed C heap "
            "that glibc kept after sessions ended.",
            registry=r,
        )
        self.loop_lag = Histogram(
            "parley_event_loop_lag_seconds",
            "How late a 100 ms timer fires on the event loop.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.upstream_audio_dropped = Counter(
            "parley_upstream_audio_dropped_total",
            "Learner audio chunks not sent upstream (queue full or upstream reconnecting); still recorded.",
            registry=r,
        )

        self.retention_deletions = Counter(
            "parley_retention_deleted_sessions_total",
            "Sessions deleted because their retention expired, by outcome (deleted; incomplete: "
            "something was left behind and is retried on the next sweep; failed: an error stopped it).",
            ["outcome"],
            registry=r,
        )
        self.retention_sweeps = Counter(
            "parley_retention_sweeps_total",
            "Retention sweeps, by outcome (ok, failed: the database or object store was unavailable).",
            ["outcome"],
            registry=r,
        )

        self.jobs = Gauge(
            "parley_jobs",
            "Post-processing jobs in the queue, by kind and status (queued, running, dead: waiting for an "
            "operator's `parley jobs retry`), as last counted by this process's worker; every worker "
            "reports the same numbers, so aggregate with max, not sum.",
            ["kind", "status"],
            registry=r,
        )
        self.job_duration = Histogram(
            "parley_job_duration_seconds",
            "How long one run of a job took, from claim to its outcome, by kind and outcome.",
            ["kind", "outcome"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_wait = Histogram(
            "parley_job_wait_seconds",
            "How long a job waited between being due (enqueued, or its backoff over) and its claim.",
            ["kind"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_outcomes = Counter(
            "parley_job_outcomes_total",
            "Job runs by kind and outcome: done, retried (queued again after a backoff), dead (out of "
            "attempts or fatal), fenced (session deleted), lease_lost (another worker took it over), "
            "released (this worker stopped), failed_to_record (the database refused the outcome).",
            ["kind", "outcome"],
            registry=r,
        )
        self.job_retries = Counter(
            "parley_job_retries_total",
            "Failed job runs queued again after a backoff, by kind.",
            ["kind"],
            registry=r,
        )
        self.job_dead_letters = Counter(
            "parley_job_dead_letters_total",
            "Jobs that went dead (out of attempts, a fatal error, or their workers kept dying), by kind.",
            ["kind"],
            registry=r,
        )
        self.job_poll_errors = Counter(
            "parley_job_poll_errors_total",
            "Worker polls (claim or queue count) that failed, e.g. while the database was down.",
            registry=r,
        )

        # SC-005, the business measure: learners completing sessions that are rated positively.
        self.sessions_processed = Counter(
            "parley_sessions_processed_total",
            "Sessions whose post-processing finished (processed, or processing_failed with the audio and "
            "transcript kept), counted once per session.",
            registry=r,
        )
        self.sessions_rated_positive = Counter(
            "parley_sessions_rated_positive_total",
            "Processed sessions whose rating counts as positive (storage.ratings.is_positive: a done rating "
            "whose four scores average 60 or more); a subset of parley_sessions_processed_total.",
            registry=r,
        )

        self.spool_bytes = Gauge(
            "parley_spool_bytes", "Audio waiting in the local spool for the object store.", registry=r
        )
        self.upload_lag = Histogram(
            "parley_upload_lag_seconds",
            "From a closed segment handed to the uploader to its listing in the manifest.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.upload_oldest_pending = Gauge(
            "parley_upload_oldest_pending_seconds",
            "How long the oldest segment waiting for upload has waited (0 when none): grows while the "
            "object store or the database is down.",
            registry=r,
        )
        self.upload_errors = Counter(
            "parley_upload_errors_total",
            "Failed upload attempts (each is retried), by what failed: store, database, file.",
            ["part"],
            registry=r,
        )
        self.realtime_refused = Counter(
            "parley_realtime_refused_events_total",
            "Client events refused on the Realtime socket, by error code (invalid ones and changes a "
            "client may not make).",
            ["code"],
            registry=r,
        )
        self.session_starts = Counter(
            "parley_session_starts_total",
            "Sessions that began connecting, by result: live (the conversation started) or failed (it "
            "never did: the upstream or the media never came up). The ratio is the start success rate.",
            ["result"],
            registry=r,
        )
        self.spool_max_bytes = Gauge(
            "parley_spool_max_bytes",
            "PARLEY_SPOOL_MAX_BYTES: the spool budget; past it new sessions are refused.",
            registry=r,
        )
        # Registered only by watch_siblings(): a process on its own has no siblings, and its /metrics
        # stays exactly what it was before --workers existed.
        self.sibling_failures = Counter(
            "parley_metrics_sibling_failures_total",
            "Scrapes of `parley serve --workers N` that left a sibling process out, by reason: timeout "
            "(no answer in time), unreachable (connection refused or reset: it died), invalid (an answer "
            "that is not its metrics), registry (the node registry could not be read, so every sibling "
            "was left out).",
            ["reason"],
            registry=None,
        )
        self.gc_pauses = GcPauses()
        self._zero_known_labels()
        r.register(self.gc_pauses)
        self._gc_hook = self.gc_pauses.hook
        self._siblings_watched = False

    def _zero_known_labels(self) -> None:
        """Create every known label value at 0: a series that first appears at 1 is invisible to
        ``rate()``/``increase()``, so the first refusal or failure of a kind would never alert."""
        for result in ("live", "failed"):
            self.session_starts.labels(result)
        for cause in ("capacity", "loop_lag", "draining", "spool_full"):
            self.session_refusals.labels(cause)
        for outcome in ("ok", "failed"):
            self.upstream_reconnects.labels(outcome)
        for kind in ("sent", "late", "dropped"):
            self.playout_frames.labels(kind)
        for part in ("store", "database", "file"):
            self.upload_errors.labels(part)

    def session_started(self, live: bool) -> None:
        """A session reached ``live`` for the first time, or ended without ever doing so."""
        self.session_starts.labels("live" if live else "failed").inc()

    def watch_siblings(self, reasons: Iterable[str]) -> None:
        """Expose ``parley_metrics_sibling_failures_total`` (a child of ``--workers N``); idempotent.
        ``reasons``: every reason it counts, created at 0 so the first failure shows in ``rate()``."""
        for reason in reasons:
            self.sibling_failures.labels(reason)
        if not self._siblings_watched:
            self._siblings_watched = True
            self.registry.register(self.sibling_failures)

    def sibling_left_out(self, reason: str) -> None:
        """One sibling's metrics are missing from this scrape (see :meth:`watch_siblings`)."""
        self.sibling_failures.labels(reason).inc()

    def watch_feeds(self, read: FeedCounts) -> None:
        """Expose the event feeds' counters (call once per app)."""
        self.registry.register(FeedCollector(read))

    def watch_gc(self) -> None:
        """Time every garbage collection from now on (``gc.callbacks``); idempotent."""
        if self._gc_hook not in gc.callbacks:
            gc.callbacks.append(self._gc_hook)

    def unwatch_gc(self) -> None:
        """Stop timing collections; idempotent. The owner calls it when the app closes."""
        while self._gc_hook in gc.callbacks:
            gc.callbacks.remove(self._gc_hook)

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route, method).observe(seconds)

    def dependency_checked(self, dependency: str, ok: bool) -> None:
        self.dependency_up.labels(dependency).set(1 if ok else 0)

    def session_state(self, old: str | None, new: str | None) -> None:
        """A live session (of either kind) moved; also counts its start: the one move into ``live``
        from ``connecting`` (a reconnect comes from ``reconnecting``), or the end as ``failed``."""
        if new == "live" and old == "connecting":
            self.session_started(live=True)
        elif new == "failed":
            self.session_started(live=False)
        if old is not None:
            self.sessions_active.labels(old).dec()
        if new is not None:
            self.sessions_active.labels(new).inc()

    def retention_deleted(self, outcome: str) -> None:
        """One expired session deleted (``deleted``), left incomplete, or ``failed``."""
        self.retention_deletions.labels(outcome).inc()

    def retention_swept(self, outcome: str) -> None:
        self.retention_sweeps.labels(outcome).inc()

    def job_claimed(self, kind: str, waited_s: float) -> None:
        self.job_wait.labels(kind).observe(max(0.0, waited_s))

    def job_finished(self, kind: str, outcome: str, seconds: float) -> None:
        """One run of a job ended with ``outcome`` (see ``parley_job_outcomes_total``)."""
        self.job_outcomes.labels(kind, outcome).inc()
        self.job_duration.labels(kind, outcome).observe(seconds)
        if outcome == "retried":
            self.job_retries.labels(kind).inc()
        elif outcome == "dead":
            self.job_dead_letters.labels(kind).inc()

    def session_processed(self, positive: bool) -> None:
        """One session finished post-processing; ``positive``: ``storage.ratings.is_positive`` of its
        rating. Call it once per session (where the job records its outcome), not once per run."""
        self.sessions_processed.inc()
        if positive:
            self.sessions_rated_positive.inc()

    def job_poll_failed(self) -> None:
        self.job_poll_errors.inc()

    def job_depth(self, counts: dict[tuple[str, str], int], kinds: Iterable[str]) -> None:
        """Set ``parley_jobs`` from a count by (kind, status); kinds and statuses not in it are 0."""
        for kind in {*kinds, *(k for k, _ in counts)}:
            for status in ("queued", "running", "dead"):
                self.jobs.labels(kind, status).set(counts.get((kind, status), 0))

    def render(self) -> bytes:
        """The text exposition format, for ``GET /metrics``."""
        return generate_latest(self.registry)
