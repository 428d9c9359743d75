"""Prometheus metrics: the only module that imports ``prometheus_client``.

Each application owns one :class:`Metrics` (its own registry), so tests can run several apps in one
process and read exact counts. Components call verb helpers (``metrics.request_done(...)``) instead
of touching metric objects. Label values are bounded sets (routes, states, codes), never ids.
"""

from __future__ import annotations

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

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route, method).observe(seconds)

    def dependency_checked(self, dependency: str, ok: bool) -> None:
        self.dependency_up.labels(dependency).set(1 if ok else 0)

    def render(self) -> bytes:
        """The text exposition format, for ``GET /metrics``."""
        return generate_latest(self.registry)
