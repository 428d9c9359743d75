"""Metrics: GC pause timing through gc.callbacks, and latency histograms fine enough to read."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from relay.observability.metrics import Metrics


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    made = Metrics()
    yield made
    made.unwatch_gc()


def gc_count(metrics: Metrics, generation: int) -> float:
    labels = {"generation": str(generation)}
    value = metrics.registry.get_sample_value("parley_gc_pause_seconds_count", labels)
    assert value is not None
    return value


def test_gc_pauses_are_timed_by_generation(metrics: Metrics) -> None:
    """While watched, every collection adds one pause to parley_gc_pause_seconds{generation}."""
    metrics.watch_gc()
    before = [gc_count(metrics, g) for g in range(3)]
    gc.collect(0)
    gc.collect(2)
    assert gc_count(metrics, 0) >= before[0] + 1
    assert gc_count(metrics, 2) >= before[2] + 1
    total = metrics.registry.get_sample_value("parley_gc_pause_seconds_sum", {"generation": "2"})
    assert total is not None and total > 0
    inf = metrics.registry.get_sample_value(
        "parley_gc_pause_seconds_bucket", {"generation": "2", "le": "+Inf"}
    )
    assert inf == gc_count(metrics, 2)
    text = metrics.render().decode()
    assert "# TYPE parley_gc_pause_seconds histogram" in text
    assert 'parley_gc_pause_seconds_bucket{generation="1",le="0.001"}' in text


def test_watching_gc_is_idempotent_and_unwatching_stops_timing(metrics: Metrics) -> None:
    """watch_gc twice hooks once; unwatch_gc (twice) removes the hook and collections go uncounted."""
    callbacks = len(gc.callbacks)
    metrics.watch_gc()
    metrics.watch_gc()
    assert len(gc.callbacks) == callbacks + 1
    metrics.unwatch_gc()
    metrics.unwatch_gc()
    assert len(gc.callbacks) == callbacks
    counted = gc_count(metrics, 2)
    gc.collect()
    assert gc_count(metrics, 2) == counted


def test_a_stop_without_its_start_is_ignored(metrics: Metrics) -> None:
    """A hook added mid-collection sees only the stop: it records nothing rather than a bogus pause."""
    metrics.gc_pauses.hook("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert gc_count(metrics, 2) == 0


def bucket(metrics: Metrics, name: str, le: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"{name}_bucket", {**labels, "le": le})


def test_first_response_buckets_resolve_tens_of_milliseconds(metrics: Metrics) -> None:
    """A 12 ms first response is counted under le=0.02, not lumped into a 100 ms bucket."""
    metrics.first_response.labels("first").observe(0.012)
    name = "parley_first_response_seconds"
    assert bucket(metrics, name, "0.01", turn="first") == 0
    assert bucket(metrics, name, "0.02", turn="first") == 1
    assert bucket(metrics, name, "0.05", turn="first") == 1


def test_inbound_latency_buckets_resolve_single_milliseconds(metrics: Metrics) -> None:
    """A 1.5 ms inbound latency is counted under le=0.002 (the old finest bucket was 5 ms)."""
    metrics.inbound_latency.observe(0.0015)
    name = "parley_inbound_latency_seconds"
    assert bucket(metrics, name, "0.001") == 0
    assert bucket(metrics, name, "0.002") == 1
