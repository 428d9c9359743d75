"""The operators' business measure (SC-005): processed sessions and those rated positively."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay.observability.metrics import Metrics


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    made = Metrics()
    yield made
    made.unwatch_gc()


def test_business_counters_render_at_zero_before_any_session(metrics: Metrics) -> None:
    """Both counters are exported from the start, so a dashboard's rate() has a series to read."""
    text = metrics.render().decode()
    assert "# TYPE parley_sessions_processed_total counter" in text
    assert "# TYPE parley_sessions_rated_positive_total counter" in text
    assert "parley_sessions_processed_total 0.0" in text
    assert "parley_sessions_rated_positive_total 0.0" in text


def test_session_processed_counts_every_session_and_only_positive_ones_as_positive(metrics: Metrics) -> None:
    """session_processed(positive) adds one processed session, and one positive only when positive."""
    metrics.session_processed(positive=True)
    metrics.session_processed(positive=False)
    metrics.session_processed(positive=True)
    assert metrics.registry.get_sample_value("parley_sessions_processed_total") == 3
    assert metrics.registry.get_sample_value("parley_sessions_rated_positive_total") == 2
    text = metrics.render().decode()
    assert "parley_sessions_processed_total 3.0" in text
    assert "parley_sessions_rated_positive_total 2.0" in text
