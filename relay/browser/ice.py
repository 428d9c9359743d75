"""ICE plumbing for the browser peer: host-address pinning, STUN/TURN configuration, network lists.

aioice has no option for which interfaces to gather on: it asks :func:`aioice.ice.get_host_addresses`
and offers every non-loopback address, docker bridges included (AIORTC.md, "Ports, interfaces").
:func:`restrict_host_addresses` replaces that function's answer, which is the only seam aioice has.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcicetransport import parse_stun_turn_uri

__all__ = [
    "IPNetwork",
    "install_consent_guard",
    "parse_networks",
    "restore_host_addresses",
    "restrict_host_addresses",
    "rtc_configuration",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The function aioice shipped with, kept so tests (and only tests) can put it back.
# Typed as Any: the module attribute is replaced at run time, which its declared type forbids.
_ICE_MODULE: Any = aioice.ice
_ORIGINAL_GET_HOST_ADDRESSES: Callable[[bool, bool], list[str]] = _ICE_MODULE.get_host_addresses


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Make aioice gather host candidates on exactly ``addresses`` (loopback allowed).

    Process-wide: aioice looks the function up on its module each time a connection gathers, so
    this affects every ``RTCPeerConnection`` in the process that gathers afterwards, including
    in-process test clients. Idempotent: calling it again replaces the list. ``use_ipv4`` and
    ``use_ipv6`` are still honoured per family. Raises ``ValueError`` for a string that is not an
    IP address (no names: aioice binds the literal address).
    """
    pinned = tuple(str(ipaddress.ip_address(a)) for a in addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in pinned if (use_ipv6 if ":" in a else use_ipv4)]

    get_host_addresses.parley_pinned = pinned  # type: ignore[attr-defined]
    _ICE_MODULE.get_host_addresses = get_host_addresses


def restore_host_addresses() -> None:
    """Undo :func:`restrict_host_addresses` (for tests); idempotent."""
    _ICE_MODULE.get_host_addresses = _ORIGINAL_GET_HOST_ADDRESSES


def rtc_configuration(ice_servers: list[dict[str, Any]]) -> RTCConfiguration:
    """Build the ``RTCConfiguration`` for browser peers from JSON-shaped STUN/TURN entries.

    ``[]`` means no STUN or TURN at all: aiortc substitutes Google's public STUN server only when
    ``iceServers`` is ``None``, so the list is always passed explicitly. Each entry is
    ``{"urls": str | [str], "username"?: str, "credential"?: str}``; a malformed entry or URL raises
    ``ValueError`` at startup rather than being skipped by aiortc at the first connection. aiortc
    uses only the first STUN and the first TURN URL it finds (AIORTC.md); later ones are accepted
    here but have no effect.
    """
    servers: list[RTCIceServer] = []
    for i, entry in enumerate(ice_servers):
        if not isinstance(entry, dict):
            raise ValueError(f"ice server {i}: expected an object")
        unknown = set(entry) - {"urls", "username", "credential"}
        if unknown:
            raise ValueError(f"ice server {i}: unknown keys {sorted(unknown)}")
        urls = entry.get("urls")
        url_list = [urls] if isinstance(urls, str) else urls
        if not isinstance(url_list, list) or not url_list or not all(isinstance(u, str) for u in url_list):
            raise ValueError(f"ice server {i}: 'urls' must be a string or a non-empty list of strings")
        for url in url_list:
            parsed = parse_stun_turn_uri(url)
            if parsed["scheme"] in ("turn", "turns") and parsed["transport"] not in ("udp", "tcp"):
                raise ValueError(f"ice server {i}: unsupported TURN transport")
            if parsed["scheme"] == "turns" and parsed["transport"] != "tcp":
                raise ValueError(f"ice server {i}: turns: needs transport=tcp")
            if parsed["scheme"] in ("turn", "turns") and not (
                entry.get("username") and entry.get("credential")
            ):
                raise ValueError(f"ice server {i}: TURN needs 'username' and 'credential'")
        username, credential = entry.get("username"), entry.get("credential")
        if username is not None and not isinstance(username, str):
            raise ValueError(f"ice server {i}: 'username' must be a string")
        if credential is not None and not isinstance(credential, str):
            raise ValueError(f"ice server {i}: 'credential' must be a string")
        servers.append(RTCIceServer(urls=list(url_list), username=username, credential=credential))
    return RTCConfiguration(iceServers=servers)


def parse_networks(value: str) -> list[IPNetwork]:
    """Parse a comma-separated list of networks such as ``"127.0.0.0/8,::1/128"``.

    A bare address means that single host. Blank items are ignored; anything else that is not a
    network raises ``ValueError`` (host bits set included, so a typo cannot widen the set).
    """
    return [ipaddress.ip_network(item.strip()) for item in value.split(",") if item.strip()]


# aioice 0.13 races close() against connect(): when the check list completed just before close(),
# connect() resumes afterwards and starts the consent-freshness task on a closed connection. That
# task never ends (it has no nominated pairs left, so it never counts a failure) and keeps the loop
# waking every five seconds for the life of the process: one leak per peer closed while connecting.
_ORIGINAL_CONNECT: Callable[..., Any] = aioice.ice.Connection.connect


async def _connect_then_check_closed(self: Any) -> None:
    await _ORIGINAL_CONNECT(self)
    if getattr(self, "_closing", False):
        task = getattr(self, "_query_consent_task", None)
        if task is not None and not task.done():
            task.cancel()
        self._query_consent_task = None


def install_consent_guard() -> None:
    """Cancel the consent task aioice starts on a connection closed mid-connect (process-wide, idempotent)."""
    _ICE_MODULE.Connection.connect = _connect_then_check_closed
