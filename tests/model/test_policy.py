"""Pure parts of the link: the bounded outbound queue, the retry policy and failure classification."""

from __future__ import annotations

import json

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus, InvalidURI
from websockets.frames import Close
from websockets.http11 import Response

from relay.model.link import OutboundQueue, RetryPolicy, classify, classify_error_event


def test_queue_keeps_order_of_audio_and_control() -> None:
    """Audio chunks and control events leave in the order they were pushed."""
    queue = OutboundQueue(10)
    queue.push_audio(b"a1")
    queue.push_control({"type": "response.cancel"})
    queue.push_audio(b"a2")
    assert [queue.pop(), queue.pop(), queue.pop(), queue.pop()] == [
        b"a1",
        {"type": "response.cancel"},
        b"a2",
        None,
    ]


def test_full_queue_drops_the_oldest_audio_never_control() -> None:
    """At the bound, new audio evicts the oldest audio; control events are kept (even past the bound)."""
    queue = OutboundQueue(3)
    queue.push_control({"type": "c1"})
    assert [queue.push_audio(p) for p in (b"a1", b"a2", b"a3", b"a4")] == [0, 0, 1, 1]
    assert [queue.push_control({"type": c}) for c in ("c2", "c3")] == [1, 1]  # room made by dropping audio
    assert queue.push_audio(b"a5") == 1  # only control queued: the new chunk is the oldest audio
    assert queue.push_control({"type": "c4"}) == 0  # no audio left to drop: queued past the bound
    drained = []
    while (entry := queue.pop()) is not None:
        drained.append(entry)
    assert drained == [{"type": "c1"}, {"type": "c2"}, {"type": "c3"}, {"type": "c4"}]


def test_drop_audio_and_requeue() -> None:
    """drop_audio removes every chunk and says how many; requeue puts an entry back at the front."""
    queue = OutboundQueue(5)
    queue.push_audio(b"a1")
    queue.push_control({"type": "c"})
    queue.push_audio(b"a2")
    assert queue.drop_audio() == 2 and len(queue) == 1 and queue.audio_chunks == 0
    queue.requeue(b"a0")
    assert queue.audio_chunks == 1 and queue.pop() == b"a0" and queue.pop() == {"type": "c"}
    with pytest.raises(ValueError):
        OutboundQueue(0)


def test_queue_bound_counts_the_chunks_of_coalesced_audio() -> None:
    """An entry of 2 chunks weighs 2 against the bound; dropping it reports 2 chunks; pop_entry says 2."""
    queue = OutboundQueue(4)
    assert queue.push_audio(b"a1a2", chunks=2) == 0
    assert queue.push_audio(b"a3a4", chunks=2) == 0
    assert queue.audio_chunks == 4 and len(queue) == 2
    assert queue.push_audio(b"a5a6", chunks=2) == 2  # the oldest 2-chunk entry made room
    assert queue.push_control({"type": "c"}) == 2  # full: the oldest audio entry goes, whole
    assert queue.pop_entry() == (b"a5a6", 2)
    queue.requeue(b"a5a6", 2)
    assert queue.audio_chunks == 2
    assert queue.drop_audio() == 2 and queue.pop_entry() == ({"type": "c"}, 0) and queue.pop() is None
    with pytest.raises(ValueError):
        queue.push_audio(b"x", chunks=0)


def test_control_only_queue_refuses_coalesced_audio_that_does_not_fit() -> None:
    """With only control events queued and no room, new audio is dropped and counted in chunks."""
    queue = OutboundQueue(2)
    queue.push_control({"type": "c1"})
    assert queue.push_audio(b"a1a2", chunks=2) == 2
    assert queue.push_audio(b"a3") == 0
    assert [queue.pop(), queue.pop(), queue.pop()] == [{"type": "c1"}, b"a3", None]


@pytest.mark.parametrize(
    "fields",
    [
        {"max_attempts": 0},
        {"initial_delay_s": -1},
        {"initial_delay_s": 2, "max_delay_s": 1},
        {"jitter": 1.5},
        {"connect_timeout_s": 0},
        {"close_timeout_s": 0},
        {"stable_after_s": -1},
    ],
)
def test_retry_policy_validates(fields: dict[str, float]) -> None:
    """RetryPolicy refuses impossible values when it is built."""
    with pytest.raises(ValueError):
        RetryPolicy(**fields)  # type: ignore[arg-type]


def test_retry_delay_doubles_up_to_the_cap_with_jitter_below() -> None:
    """Delays double from initial_delay_s, stop at max_delay_s, and jitter only shortens them."""
    policy = RetryPolicy(initial_delay_s=0.5, max_delay_s=3.0, jitter=0.25)
    assert [policy.delay(n, lambda: 0.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(2, lambda: 1.0) == 0.75
    assert all(0.75 <= policy.delay(1) / 0.5 <= 1.0 for _ in range(100))


def _status(code: int, body: dict[str, object] | None = None) -> InvalidStatus:
    raw = json.dumps(body).encode() if body is not None else b""
    return InvalidStatus(Response(code, "x", Headers(), raw))


def _closed(code: int | None, reason: str = "") -> ConnectionClosedError:
    return ConnectionClosedError(Close(code, reason) if code is not None else None, None)


@pytest.mark.parametrize(
    ("exc", "retryable", "code"),
    [
        (_status(401), False, "upstream_auth_failed"),
        (_status(403), False, "upstream_auth_failed"),
        (_status(404), False, "upstream_rejected"),
        (_status(400), False, "upstream_rejected"),
        (_status(429), True, "upstream_retrying"),
        (_status(429, {"error": {"code": "insufficient_quota"}}), False, "upstream_quota"),
        (_status(500), True, "upstream_retrying"),
        (_status(503), True, "upstream_retrying"),
        (_closed(None), True, "upstream_retrying"),
        (_closed(1011), True, "upstream_retrying"),
        (_closed(1012), True, "upstream_retrying"),
        (_closed(1013), True, "upstream_retrying"),
        (ConnectionClosedOK(Close(1000, ""), None), True, "upstream_retrying"),
        (ConnectionClosedOK(Close(1001, "server shutting down"), None), True, "upstream_retrying"),
        (
            ConnectionClosedOK(Close(1001, "Your session hit the maximum duration of 60 minutes."), None),
            True,
            "session_expired",
        ),
        (_closed(1008), False, "upstream_rejected"),
        (_closed(1002), False, "upstream_rejected"),
        (_closed(4000), False, "upstream_rejected"),
        (TimeoutError(), True, "upstream_retrying"),
        (ConnectionRefusedError(), True, "upstream_retrying"),
        (InvalidURI("x", "bad"), False, "upstream_rejected"),
    ],
)
def test_classify_connection_failures(exc: BaseException, retryable: bool, code: str) -> None:
    """Handshake statuses, close codes and transport errors map to retryable or fatal with a code."""
    failure = classify(exc)
    assert failure is not None and (failure.retryable, failure.code) == (retryable, code)


def test_classify_leaves_bugs_alone() -> None:
    """Anything that is not an upstream failure (a bug, a KeyError) is not classified: it propagates."""
    assert classify(KeyError("x")) is None and classify(RuntimeError()) is None


@pytest.mark.parametrize(
    ("code", "kind", "expected"),
    [
        ("invalid_api_key", "invalid_request_error", (False, "upstream_auth_failed")),
        (None, "authentication_error", (False, "upstream_auth_failed")),
        ("insufficient_quota", "insufficient_quota", (False, "upstream_quota")),
        ("billing_hard_limit_reached", "invalid_request_error", (False, "upstream_quota")),
        ("session_expired", "invalid_request_error", (True, "session_expired")),
        ("server_error", "server_error", None),
        ("conversation_already_has_active_response", "invalid_request_error", None),
        ("response_cancel_not_active", "invalid_request_error", None),
        (None, "invalid_request_error", None),
    ],
)
def test_classify_error_events(code: str | None, kind: str, expected: tuple[bool, str] | None) -> None:
    """Key and quota error events are fatal, session_expired is retryable, everything else harmless."""
    failure = classify_error_event(code, kind)
    assert (None if failure is None else (failure.retryable, failure.code)) == expected
