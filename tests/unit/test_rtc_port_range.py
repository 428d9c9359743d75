"""PARLEY_RTC_PORT_RANGE: parsing, and the loop wrapper giving aioice's port-0 binds a range port."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from relay.browser.ports import (
    MediaPortsUnavailable,
    PortRangeExhausted,
    install_port_range,
    installed_port_range,
    uninstall_port_range,
)
from relay.config import ConfigError, Settings
from relay.errors import CapacityError
from tests.fakes.rtc_client import loopback_ice  # noqa: F401 (fixture)
from tests.fixtures_s3 import free_udp_range

HOST = "127.0.0.1"


class FixedStart(random.Random):
    """An rng whose ``randrange`` always answers ``start``: the probe order becomes predictable."""

    def __init__(self, start: int) -> None:
        super().__init__(0)
        self.start = start

    def randrange(self, *args: object, **kwargs: object) -> int:  # type: ignore[override]
        return self.start


@pytest.fixture
async def loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    running = asyncio.get_running_loop()
    yield running
    uninstall_port_range(running)


@pytest.fixture
def occupied() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def occupy(socks: list[socket.socket], port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    socks.append(s)
    s.bind((HOST, port))


async def bind0(loop: asyncio.AbstractEventLoop) -> asyncio.DatagramTransport:
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
    return transport


def port_of(transport: asyncio.BaseTransport) -> int:
    return int(transport.get_extra_info("sockname")[1])


# -- configuration ------------------------------------------------------------------------------


def settings(tmp_path: Path, value: str | None) -> Settings:
    environ = {"PARLEY_DATA_DIR": str(tmp_path / "data")}
    if value is not None:
        environ["PARLEY_RTC_PORT_RANGE"] = value
    return Settings.from_env(environ, dotenv=None)


def test_port_range_unset_means_ephemeral_ports(tmp_path: Path) -> None:
    """Without PARLEY_RTC_PORT_RANGE (or with it empty) there is no range: the kernel picks ports."""
    assert settings(tmp_path, None).rtc_port_range is None
    assert settings(tmp_path, "").rtc_port_range is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("40000-40999", (40000, 40999)), (" 1024-65535 ", (1024, 65535)), ("50000-50000", (50000, 50000))],
)
def test_port_range_parses_low_high_inclusive(tmp_path: Path, value: str, expected: tuple[int, int]) -> None:
    """'low-high' is read as both ends included; a one-port range is allowed."""
    assert settings(tmp_path, value).rtc_port_range == expected


@pytest.mark.parametrize(
    "value", ["40000", "40000-", "-40000", "a-b", "40000:40999", "40000-40999-41000", "4e4-5e4"]
)
def test_malformed_port_range_is_a_startup_error_naming_the_variable(tmp_path: Path, value: str) -> None:
    """Anything but two integers around one '-' fails start-up with PARLEY_RTC_PORT_RANGE in the message."""
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, value)
    assert caught.value.variable == "PARLEY_RTC_PORT_RANGE"
    assert str(caught.value).startswith("PARLEY_RTC_PORT_RANGE: ")


@pytest.mark.parametrize("value", ["80-1000", "1023-2000", "40999-40000", "60000-65536", "0-0"])
def test_out_of_bounds_port_range_is_a_startup_error(tmp_path: Path, value: str) -> None:
    """The range must satisfy 1024 <= low <= high <= 65535 (no privileged ports, no inverted range)."""
    with pytest.raises(ConfigError, match=r"^PARLEY_RTC_PORT_RANGE: must satisfy 1024 <= low <= high"):
        settings(tmp_path, value)


# -- the loop wrapper -----------------------------------------------------------------------------


async def test_port_zero_binds_get_distinct_ports_inside_the_range(loop: asyncio.AbstractEventLoop) -> None:
    """Every bind to (address, 0) gets a different port of the range until the range is full."""
    low, high = free_udp_range(5)
    install_port_range(loop, (low, high))
    assert installed_port_range(loop) == (low, high)
    transports = [await bind0(loop) for _ in range(5)]
    try:
        ports = [port_of(t) for t in transports]
        assert sorted(ports) == list(range(low, high + 1))
    finally:
        for t in transports:
            t.close()


async def test_busy_ports_are_skipped(loop: asyncio.AbstractEventLoop, occupied: list[socket.socket]) -> None:
    """A port another socket holds (EADDRINUSE) is skipped; the next one of the range is taken."""
    low, high = free_udp_range(4)
    occupy(occupied, low)
    occupy(occupied, low + 1)
    install_port_range(loop, (low, high), rng=FixedStart(0))
    transport = await bind0(loop)
    try:
        assert port_of(transport) == low + 2
    finally:
        transport.close()


async def test_probing_wraps_around_from_the_random_start(
    loop: asyncio.AbstractEventLoop, occupied: list[socket.socket]
) -> None:
    """Starting near the top of a range whose top is busy, the search wraps to the bottom."""
    low, high = free_udp_range(4)
    occupy(occupied, high)
    install_port_range(loop, (low, high), rng=FixedStart(3))
    transport = await bind0(loop)
    try:
        assert port_of(transport) == low
    finally:
        transport.close()


async def test_exhausted_range_raises_eaddrinuse_and_reports_once(
    loop: asyncio.AbstractEventLoop, occupied: list[socket.socket]
) -> None:
    """With every port taken the bind raises OSError(EADDRINUSE) naming the range, and on_exhausted fires."""
    low, high = free_udp_range(3)
    for port in range(low, high + 1):
        occupy(occupied, port)
    exhausted: list[None] = []
    install_port_range(loop, (low, high), on_exhausted=lambda: exhausted.append(None))
    with pytest.raises(PortRangeExhausted) as caught:
        await bind0(loop)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.EADDRINUSE
    assert f"PARLEY_RTC_PORT_RANGE {low}-{high}" in str(caught.value)
    assert HOST not in str(caught.value)  # aioice logs the message: no address in it
    assert len(exhausted) == 1


async def test_ports_come_back_when_sockets_close(loop: asyncio.AbstractEventLoop) -> None:
    """A closed transport's port is free again at once (UDP has no TIME_WAIT)."""
    low, high = free_udp_range(1)
    install_port_range(loop, (low, high))
    first = await bind0(loop)
    with pytest.raises(PortRangeExhausted):
        await bind0(loop)
    first.close()
    await asyncio.sleep(0)  # the transport closes its socket on the next loop iteration
    second = await bind0(loop)
    try:
        assert port_of(second) == low
    finally:
        second.close()


async def test_other_errors_are_not_retried(loop: asyncio.AbstractEventLoop) -> None:
    """A bind error other than EADDRINUSE (an address not on this host) is raised at once, not counted."""
    low, high = free_udp_range(50)
    exhausted: list[None] = []
    install_port_range(loop, (low, high), on_exhausted=lambda: exhausted.append(None))
    with pytest.raises(OSError) as caught:
        await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("192.0.2.1", 0))
    assert caught.value.errno == errno.EADDRNOTAVAIL
    assert not exhausted


async def test_explicit_port_sock_and_remote_only_binds_pass_through(loop: asyncio.AbstractEventLoop) -> None:
    """Binds to a chosen port, to a given socket, or with only remote_addr (TURN, STUN) are left alone."""
    low, high = free_udp_range(3)
    outside_low, _ = free_udp_range(1)
    install_port_range(loop, (low, high))
    explicit, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=(HOST, outside_low)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    given, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
    remote, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(HOST, 9))
    try:
        assert port_of(explicit) == outside_low
        assert port_of(given) == sock.getsockname()[1]
        for transport in (given, remote):
            assert not low <= port_of(transport) <= high
    finally:
        for transport in (explicit, given, remote):
            transport.close()


async def test_random_start_spreads_first_picks_over_the_range(loop: asyncio.AbstractEventLoop) -> None:
    """Successive binds start probing at random offsets, so sessions do not all queue at the bottom."""
    low, high = free_udp_range(10)
    install_port_range(loop, (low, high), rng=random.Random(7))
    picks = []
    for _ in range(30):
        transport = await bind0(loop)
        picks.append(port_of(transport))
        transport.close()
        await asyncio.sleep(0)
    assert all(low <= p <= high for p in picks)
    assert len(set(picks)) >= 6


async def test_install_is_idempotent_and_uninstall_restores_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Installing twice keeps one wrapper (the second range wins); uninstall restores the loop's method."""
    original = loop.create_datagram_endpoint
    first, second = free_udp_range(2), free_udp_range(2)
    install_port_range(loop, first)
    install_port_range(loop, second)
    assert installed_port_range(loop) == second
    transport = await bind0(loop)
    assert second[0] <= port_of(transport) <= second[1]
    transport.close()
    uninstall_port_range(loop)
    uninstall_port_range(loop)
    assert installed_port_range(loop) is None
    assert loop.create_datagram_endpoint == original


def test_install_refuses_a_range_outside_the_allowed_ports() -> None:
    """install_port_range checks the range itself too (a caller that skipped Settings)."""
    other = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="1024 <= low <= high <= 65535"):
            install_port_range(other, (500, 600))
    finally:
        other.close()


async def test_startup_warns_when_the_range_cannot_hold_max_sessions(
    loop: asyncio.AbstractEventLoop, loopback_ice: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A range smaller than max sessions x host addresses logs rtc.port_range_small, with counts only."""
    with caplog.at_level(logging.WARNING, logger="relay.browser.ports"):
        install_port_range(loop, (40000, 40002), max_sessions=4)
        install_port_range(loop, (40000, 40003), max_sessions=4)
    small = [r for r in caplog.records if r.getMessage() == "rtc.port_range_small"]
    assert len(small) == 1
    fields = vars(small[0])
    assert (fields["count"], fields["limit"], fields["sessions"]) == (3, 3, 4)


# -- the candidate guard ---------------------------------------------------------------------------


async def test_offer_with_no_free_port_fails_with_capacity_error(
    loop: asyncio.AbstractEventLoop, loopback_ice: None, occupied: list[socket.socket]
) -> None:
    """Gathering that binds no candidate raises MediaPortsUnavailable (503 capacity), not an empty SDP."""
    low, high = free_udp_range(2)
    for port in range(low, high + 1):
        occupy(occupied, port)
    install_port_range(loop, (low, high))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    try:
        with pytest.raises(MediaPortsUnavailable) as caught:
            await pc.setLocalDescription(await pc.createOffer())
        assert isinstance(caught.value, CapacityError) and caught.value.code == "capacity"
        assert caught.value.retry_after_s > 0
    finally:
        await pc.close()


async def test_offer_with_a_free_port_gathers_an_in_range_candidate(
    loop: asyncio.AbstractEventLoop, loopback_ice: None
) -> None:
    """With the guard installed a normal gathering is unchanged: one host candidate, on a range port."""
    low, high = free_udp_range(3)
    install_port_range(loop, (low, high))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        lines = [line for line in pc.localDescription.sdp.splitlines() if line.startswith("a=candidate:")]
        assert len(lines) == 1
        assert low <= int(lines[0].split()[5]) <= high
    finally:
        await pc.close()
