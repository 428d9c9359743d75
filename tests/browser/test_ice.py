"""ICE settings: host addresses pinned process-wide, explicit STUN/TURN only, network lists."""

from __future__ import annotations

import asyncio
import ipaddress

import aioice.ice
import pytest

import relay.browser.ice
from relay.browser.ice import (
    install_consent_guard,
    parse_networks,
    restore_host_addresses,
    restrict_host_addresses,
    rtc_configuration,
)


def test_restrict_host_addresses_replaces_aioice_answer_and_restores() -> None:
    """aioice gathers on exactly the pinned addresses (loopback included), per family, until restored."""
    original = aioice.ice.get_host_addresses
    try:
        restrict_host_addresses(["127.0.0.1", "::1"])
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        restrict_host_addresses(["127.0.0.1"])  # idempotent: replaces, never stacks
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1"]
    finally:
        restore_host_addresses()
        restore_host_addresses()
    assert aioice.ice.get_host_addresses is original


def test_restrict_host_addresses_refuses_names() -> None:
    """Only literal IP addresses can be pinned."""
    with pytest.raises(ValueError):
        restrict_host_addresses(["localhost"])


async def test_pinned_addresses_are_the_only_candidates(loopback_ice: None) -> None:
    """An aioice connection gathers a single host candidate, on 127.0.0.1."""
    conn = aioice.ice.Connection(ice_controlling=True)
    try:
        await conn.gather_candidates()
        assert [(c.host, c.type) for c in conn.local_candidates] == [("127.0.0.1", "host")]
    finally:
        await conn.close()


def test_empty_ice_servers_means_no_stun_at_all() -> None:
    """[] stays [] (aiortc would substitute Google's STUN server only for None)."""
    assert rtc_configuration([]).iceServers == []


def test_turn_and_stun_servers_are_converted() -> None:
    """JSON entries become RTCIceServer objects with their credentials."""
    config = rtc_configuration(
        [
            {"urls": "stun:stun.example:3478"},
            {
                "urls": ["turn:turn.example:3478", "turns:turn.example:443?transport=tcp"],
                "username": "u",
                "credential": "c",
            },
        ]
    )
    assert config.iceServers is not None
    stun, turn = config.iceServers
    assert stun.urls == ["stun:stun.example:3478"] and stun.username is None
    assert (turn.urls[1], turn.username, turn.credential) == (
        "turns:turn.example:443?transport=tcp",
        "u",
        "c",
    )


@pytest.mark.parametrize(
    "entry",
    [
        "stun:x",
        {"url": "stun:x"},
        {"urls": []},
        {"urls": 5},
        {"urls": "http://x"},
        {"urls": "turn:x:3478"},
        {"urls": "turn:x:3478?transport=sctp", "username": "u", "credential": "c"},
        {"urls": "turns:x:443?transport=udp", "username": "u", "credential": "c"},
        {"urls": "stun:x", "username": 1},
        {"urls": "stun:x", "extra": True},
    ],
)
def test_malformed_ice_servers_fail_at_startup(entry: object) -> None:
    """A configuration aiortc would silently skip is an error when it is read."""
    with pytest.raises(ValueError):
        rtc_configuration([entry])  # type: ignore[list-item]


def test_parse_networks() -> None:
    """Comma-separated networks, bare addresses as single hosts, blanks ignored, junk refused."""
    assert parse_networks("127.0.0.0/8, ::1/128,,10.0.0.1") == [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.0.0.1/32"),
    ]
    assert parse_networks("") == []
    for bad in ("10.0.0.1/8", "nonsense", "300.1.1.1"):
        with pytest.raises(ValueError):
            parse_networks(bad)


async def _close_as_checks_complete(loopback_ice: None) -> aioice.ice.Connection:
    """Two real aioice connections; one is closed after its checks completed but before connect() resumed."""
    a = aioice.ice.Connection(ice_controlling=True)
    b = aioice.ice.Connection(ice_controlling=False)
    for conn in (a, b):
        await conn.gather_candidates()
    for conn, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            await conn.add_remote_candidate(candidate)
        await conn.add_remote_candidate(None)
        conn.remote_username, conn.remote_password = other.local_username, other.local_password
    connects = [asyncio.create_task(conn.connect()) for conn in (a, b)]
    async with asyncio.timeout(10):
        while a._check_list_state.empty() and not connects[0].done():
            await asyncio.sleep(0)
    await a.close()
    await asyncio.gather(*connects, return_exceptions=True)
    await b.close()
    return a


async def test_consent_guard_stops_the_consent_task_of_a_connection_closed_while_connecting(
    loopback_ice: None,
) -> None:
    """aioice starts consent checks on a connection closed mid-connect; the guard cancels that task."""
    original = aioice.ice.Connection.connect
    try:
        install_consent_guard()
        install_consent_guard()  # idempotent: wraps once
        a = await _close_as_checks_complete(loopback_ice)
        await asyncio.sleep(0)
        assert a._query_consent_task is None
        assert not [t for t in asyncio.all_tasks() if "query_consent" in repr(t.get_coro()) and not t.done()]
    finally:
        aioice.ice.Connection.connect = original  # type: ignore[method-assign]


async def test_without_the_guard_aioice_leaks_the_consent_task(loopback_ice: None) -> None:
    """The race the guard exists for is real: unguarded, the closed connection keeps a consent task."""
    original = aioice.ice.Connection.connect
    aioice.ice.Connection.connect = relay.browser.ice._ORIGINAL_CONNECT  # type: ignore[method-assign]
    try:
        a = await _close_as_checks_complete(loopback_ice)
        task = a._query_consent_task
        assert task is not None and not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        aioice.ice.Connection.connect = original  # type: ignore[method-assign]
