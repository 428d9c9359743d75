"""log_failure: a dependency outage is logged by its class only, a bug with its traceback."""

from __future__ import annotations

import logging

import pytest

from relay.observability.logging import log_failure


def test_an_expected_outage_is_logged_by_class_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    """The exception's text (it names hosts and ports) never reaches the record: no exc_info."""
    logger = logging.getLogger("test.log_failure")
    error = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
    with caplog.at_level(logging.WARNING, logger="test.log_failure"):
        log_failure(logger, "thing.failed", error, expected=(OSError,), extra={"count": 2})
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.__dict__["error_type"] == "ConnectionRefusedError" and record.__dict__["count"] == 2
    assert "127.0.0.1" not in caplog.text


def test_an_unexpected_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Anything not expected is a bug to fix: logged at error level with the exception attached."""
    logger = logging.getLogger("test.log_failure")
    try:
        raise KeyError("x")
    except KeyError as exc:
        with caplog.at_level(logging.WARNING, logger="test.log_failure"):
            log_failure(logger, "thing.failed", exc, expected=(OSError,))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None and record.exc_info[0] is KeyError
