"""Signalling edge cases: bad offers, client-secret rules, admission control."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.api import problem, signup
from tests.live.conftest import Relay, offer, start_call

VIDEO_ONLY = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=fingerprint:sha-256 AA:BB\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\na=ice-ufrag:abcd\r\n"
    "a=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=setup:actpass\r\na=rtcp-mux\r\na=sendrecv\r\n"
)


async def new_session(relay: Relay) -> tuple[str, str, dict[str, str]]:
    """A fresh learner's session: (session id, client secret, learner auth headers)."""
    learner = await signup(relay.client)
    resp = await relay.client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=learner.auth)
    body = await resp.json()
    return body["session"]["id"], body["client_secret"]["value"], learner.auth


async def post_sdp(
    relay: Relay, session_id: str, secret: str, sdp: str | bytes, ctype: str = "application/sdp"
) -> Any:
    return await relay.client.post(
        f"/v1/sessions/{session_id}/webrtc",
        data=sdp,
        headers={"Authorization": f"Bearer {secret}", "Content-Type": ctype},
    )


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        ("hello, relay", "application/sdp"),
        ('{"sdp": "v=0"}', "application/json"),
        (VIDEO_ONLY, "application/sdp"),
        ("v=0\r\n" + "a=x-pad:" + "x" * 70_000 + "\r\n", "application/sdp"),
        (b"\xff\xfe\x00v=0", "application/sdp"),
    ],
    ids=["not-sdp", "json", "video-only", "oversized", "binary"],
)
async def test_bad_offers_are_400_and_keep_the_secret(relay: Relay, body: str | bytes, ctype: str) -> None:
    """Malformed, oversized and video-only offers answer 400 invalid_sdp; the secret stays usable."""
    session_id, secret, auth = await new_session(relay)
    await problem(await post_sdp(relay, session_id, secret, body, ctype), 400, "invalid_sdp")
    rtc = relay.new_rtc()
    good = await offer(relay, session_id, secret, rtc)  # the same secret: nothing was spent
    assert good.status == 201, await good.text()
    await rtc.accept(await good.text())
    assert (await relay.client.post(f"/v1/sessions/{session_id}/end", headers=auth)).status == 200


async def test_client_secret_rules(relay: Relay) -> None:
    """A replayed secret is 401 client_secret_used; another session's secret and an access token are 401."""
    session_id, secret, auth = await new_session(relay)
    other_id, other_secret, other_auth = await new_session(relay)
    access_token = auth["Authorization"].split()[1]
    rtc = relay.new_rtc()
    sdp = await rtc.offer()
    await problem(await post_sdp(relay, session_id, other_secret, sdp), 401, "client_secret_invalid")
    await problem(await post_sdp(relay, session_id, access_token, sdp), 401, "client_secret_invalid")
    first = await post_sdp(relay, session_id, secret, sdp)
    assert first.status == 201
    await problem(await post_sdp(relay, session_id, secret, sdp), 401, "client_secret_used")
    await rtc.accept(await first.text())
    await relay.client.post(f"/v1/sessions/{session_id}/end", headers=auth)
    fresh = await relay.client.post(f"/v1/sessions/{session_id}/client-secret", headers=auth)
    await problem(fresh, 409, "session_ended")
    await relay.client.post(f"/v1/sessions/{other_id}/end", headers=other_auth)


async def test_expired_client_secret_is_401(relay_factory: Callable[..., Awaitable[Relay]]) -> None:
    """A client secret past its lifetime answers 401 client_secret_expired."""
    relay = await relay_factory(PARLEY_CLIENT_SECRET_TTL="1")
    session_id, secret, auth = await new_session(relay)
    rtc = relay.new_rtc()
    sdp = await rtc.offer()
    await asyncio.sleep(1.5)  # past the lifetime: the stored expiry has no clock-skew leeway
    await problem(await post_sdp(relay, session_id, secret, sdp), 401, "client_secret_expired")


async def test_admission_refuses_past_capacity_with_retry_after(
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    """At the session limit a new call gets 503 capacity with Retry-After, and may retry with its secret."""
    relay = await relay_factory(PARLEY_MAX_SESSIONS="1")
    first = await start_call(relay)
    session_id, secret, auth = await new_session(relay)
    rtc = relay.new_rtc()
    refused = await offer(relay, session_id, secret, rtc)
    await problem(refused, 503, "capacity")
    assert int(refused.headers["Retry-After"]) > 0
    await relay.client.post(f"/v1/sessions/{first.session_id}/end", headers=first.learner.auth)
    retry_rtc = relay.new_rtc()
    again = await offer(relay, session_id, secret, retry_rtc)
    assert again.status == 201, await again.text()
    await retry_rtc.accept(await again.text())
    await relay.client.post(f"/v1/sessions/{session_id}/end", headers=auth)
