"""The retention rule on its own: when a session expires, from which time, and what keeps it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from relay.api.views import public_session_view, session_view
from storage.models import Session, SessionStatus
from storage.retention import expires_at, policy

CREATED = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
ENDED = datetime(2026, 1, 3, 9, 0, tzinfo=UTC)


def session(**values: object) -> Session:
    fields: dict[str, object] = {
        "status": SessionStatus.ENDED, "created_at": CREATED, "ended_at": ENDED, "retain": False,
        "retention_days": None,
    }  # fmt: skip
    fields.update(values)
    return Session(**fields)


def test_a_session_expires_the_deployments_days_after_it_ended() -> None:
    """With only the deployment's days, the clock starts when the session ended."""
    assert expires_at(session(), 30) == ENDED + timedelta(days=30)
    assert policy(session()) == "default"


def test_a_session_that_never_ended_counts_from_its_creation() -> None:
    """A session abandoned before it started (no ended_at) counts from created_at."""
    never = session(status=SessionStatus.CREATED, ended_at=None)
    assert expires_at(never, 7) == CREATED + timedelta(days=7)


def test_the_sessions_own_days_win_over_the_deployment_and_apply_when_it_is_off() -> None:
    """retention_days replaces the deployment's days, longer or shorter, and also applies when off."""
    assert expires_at(session(retention_days=2), 30) == ENDED + timedelta(days=2)
    assert expires_at(session(retention_days=90), 30) == ENDED + timedelta(days=90)
    assert expires_at(session(retention_days=5), None) == ENDED + timedelta(days=5)
    assert policy(session(retention_days=5)) == "days"


def test_nothing_expires_when_retention_is_off() -> None:
    """No deployment days and no days of its own: kept until the learner deletes it."""
    assert expires_at(session(), None) is None


def test_retain_keeps_a_session_forever() -> None:
    """retain=True wins over both the deployment's and the session's own days."""
    assert expires_at(session(retain=True), 30) is None
    assert expires_at(session(retain=True, retention_days=1), 30) is None
    assert policy(session(retain=True, retention_days=1)) == "retain"


@pytest.mark.parametrize(
    "status",
    [SessionStatus.CONNECTING, SessionStatus.LIVE, SessionStatus.RECONNECTING, SessionStatus.ENDING],
)
def test_a_session_still_going_never_expires(status: str) -> None:
    """Connecting, live, reconnecting and ending sessions have no expiry, however old."""
    assert expires_at(session(status=status, ended_at=None, retention_days=1), 1) is None


@pytest.mark.parametrize(
    "status",
    [
        SessionStatus.CREATED, SessionStatus.ENDED, SessionStatus.PROCESSING, SessionStatus.PROCESSED,
        SessionStatus.PROCESSING_FAILED, SessionStatus.INTERRUPTED, SessionStatus.FAILED,
    ],
)  # fmt: skip
def test_every_other_state_expires(status: str) -> None:
    """Created, finished, processed, failed and interrupted sessions all expire."""
    assert expires_at(session(status=status), 1) == ENDED + timedelta(days=1)


def test_the_session_view_shows_the_choice_and_the_public_view_does_not() -> None:
    """Session.retention is {retain, retention_days, expires_at}; the public view has null there."""
    row = session(id="ses_1", topic_id="cafe-order", visibility="public", retention_days=3)
    assert session_view(row, default_retention_days=30)["retention"] == {
        "retain": False,
        "retention_days": 3,
        "expires_at": "2026-01-06T09:00:00.000Z",
    }
    assert public_session_view(row, "slug")["retention"] is None
