"""aiortc's close()-during-connect race: media tasks started on a closing peer are stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection

import relay.browser.close_race
from relay.browser.close_race import install_close_race_guard, running_media_tasks

_CONNECT = "_RTCPeerConnection__connect"


@pytest.fixture
def original_connect() -> Iterator[Callable[..., Any]]:
    """Whatever connect the process has now is put back after the test."""
    current = getattr(RTCPeerConnection, _CONNECT)
    yield current
    setattr(RTCPeerConnection, _CONNECT, current)


async def _close_while_dtls_completes() -> RTCPeerConnection:
    """Close the answerer just after close() passed its senders and before it stopped DTLS, and
    hold it there until the connect task finished DTLS and started the media (the race, made sure)."""
    config = RTCConfiguration(iceServers=[])
    offerer, answerer = RTCPeerConnection(config), RTCPeerConnection(config)
    offerer.addTransceiver("audio", direction="sendrecv")
    offerer.createDataChannel("events")
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    answerer.addTrack(AudioStreamTrack())  # sendrecv, as the relay's peer
    transceiver = answerer.getTransceivers()[0]
    sctp = answerer.sctp
    assert sctp is not None
    original_stop = sctp.stop

    async def stop_once_media_started() -> None:
        async with asyncio.timeout(10):
            while not transceiver.receiver._RTCRtpReceiver__started:  # type: ignore[attr-defined]
                await asyncio.sleep(0.005)
        await original_stop()

    sctp.stop = stop_once_media_started  # type: ignore[method-assign]
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)
    await answerer.close()
    for _ in range(5):  # the connect task's tail and the guard's stops
        await asyncio.sleep(0.01)
    await offerer.close()
    return answerer


async def test_the_guard_stops_media_started_on_a_peer_closed_while_connecting(
    loopback_ice: None, original_connect: Callable[..., Any]
) -> None:
    """A peer closed while its DTLS handshake completes ends with no RTP or RTCP task running."""
    install_close_race_guard()
    install_close_race_guard()  # idempotent: wraps once
    answerer = await _close_while_dtls_completes()
    assert answerer.signalingState == "closed"
    transceiver = answerer.getTransceivers()[0]
    assert transceiver.currentDirection == "sendrecv"
    assert transceiver.sender._RTCRtpSender__started  # type: ignore[attr-defined]  # the race happened
    assert running_media_tasks(answerer) == []


async def test_without_the_guard_aiortc_leaks_the_rtcp_tasks(
    loopback_ice: None, original_connect: Callable[..., Any]
) -> None:
    """The race the guard exists for is real: unguarded, the closed peer keeps its RTCP tasks."""
    setattr(RTCPeerConnection, _CONNECT, relay.browser.close_race._ORIGINAL_CONNECT)
    answerer = await _close_while_dtls_completes()
    leaked = running_media_tasks(answerer)
    try:
        names = {t.get_coro().__qualname__ for t in leaked}  # type: ignore[union-attr]
        assert {"RTCRtpSender._run_rtcp", "RTCRtpReceiver._run_rtcp"} <= names, names
    finally:
        transceiver = answerer.getTransceivers()[0]
        await transceiver.sender.stop()
        await transceiver.receiver.stop()  # its decoder thread too, which a later test would see
    assert running_media_tasks(answerer) == []
