"""A UDP port range for ICE host candidates (``PARLEY_RTC_PORT_RANGE``).

aioice binds every host candidate with ``loop.create_datagram_endpoint(..., local_addr=(address, 0))``
(``aioice.ice.Connection.get_component_candidates``): an ephemeral port chosen by the kernel, with no
range option (aioice#47; the PRs adding one are unmerged). A firewall or a Kubernetes ``hostPort``
rule needs a fixed range, so :func:`install_port_range` wraps the running loop's
``create_datagram_endpoint``: a bind with ``local_addr=(host, 0)`` gets a free port of the range
instead, every other call passes straight through.

Why the loop and not aioice: the bind sits in the middle of a 70-line aioice coroutine that also
gathers STUN and TURN candidates; patching it would mean copying that coroutine and keeping the
copy in step with every aioice release. The loop method is a stable, documented asyncio API, it is
looked up on the loop at each call, and the wrapper only narrows a port aioice leaves to the kernel.
The wrapper is per loop (a test's other loops are untouched); everything on that loop that binds
port 0 over UDP is affected, which in the relay is only aioice (TURN and STUN sockets name a
``remote_addr`` and no local port, so they pass through).

When the range is exhausted the bind raises ``OSError(EADDRINUSE)``. aioice logs "Could not bind"
and skips that address; a session with another address still gets candidates there. When no
candidate at all is left, the peer could never connect: the candidate guard installed alongside
raises :class:`MediaPortsUnavailable` (a :class:`~relay.errors.CapacityError`, so the offer is
answered 503 ``capacity`` with ``Retry-After``) instead of letting aiortc answer with an SDP that
has no candidate and leave the learner waiting for ICE to time out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Callable
from typing import Any, Final

import aioice.ice

from relay.errors import CapacityError

__all__ = [
    "MediaPortsUnavailable",
    "PortRange",
    "PortRangeExhausted",
    "check_port_range",
    "install_port_range",
    "installed_port_range",
    "uninstall_port_range",
]

log = logging.getLogger("relay.browser.ports")

MIN_PORT: Final = 1024
MAX_PORT: Final = 65535
RETRY_AFTER_S: Final = 5

PortRange = tuple[int, int]
"""``(low, high)``, both included."""


class PortRangeExhausted(OSError):
    """Every port of the range is in use on the requested address (``errno`` is ``EADDRINUSE``)."""

    def __init__(self, ports: PortRange) -> None:
        low, high = ports
        super().__init__(errno.EADDRINUSE, f"no free UDP port in PARLEY_RTC_PORT_RANGE {low}-{high}")
        self.ports = ports


class MediaPortsUnavailable(CapacityError):
    """ICE gathering ended without a single candidate: the offer cannot be answered (503 ``capacity``)."""

    def __init__(self) -> None:
        super().__init__(
            "No media port could be opened on this node; try again shortly.", retry_after_s=RETRY_AFTER_S
        )


def check_port_range(ports: PortRange) -> None:
    """Raise ``ValueError`` unless ``1024 <= low <= high <= 65535``."""
    low, high = ports
    if not MIN_PORT <= low <= high <= MAX_PORT:
        raise ValueError(f"must satisfy {MIN_PORT} <= low <= high <= {MAX_PORT}, got {low}-{high}")


class _RangeBinder:
    """The replacement ``create_datagram_endpoint`` of one loop; see the module docstring."""

    def __init__(
        self,
        original: Callable[..., Any],
        ports: PortRange,
        on_exhausted: Callable[[], None] | None,
        rng: random.Random,
    ) -> None:
        self.original = original
        self.ports = ports
        self.on_exhausted = on_exhausted
        self.rng = rng

    async def __call__(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        local_addr: Any = kwargs.get("local_addr")
        if args or kwargs.get("sock") is not None or not _port_zero(local_addr):
            return await self.original(protocol_factory, *args, **kwargs)
        host, _, *rest = local_addr
        low, high = self.ports
        size = high - low + 1
        # A random start spreads concurrent sessions over the range: from the bottom, every offer
        # would probe the same busy ports first, and bind one syscall later each time.
        start = self.rng.randrange(size)
        for i in range(size):
            port = low + (start + i) % size
            try:
                return await self.original(protocol_factory, **{**kwargs, "local_addr": (host, port, *rest)})
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        if self.on_exhausted is not None:
            self.on_exhausted()
        # Counts only (the range's size), never the address: it is an interface of this node.
        log.warning("rtc.ports_exhausted", extra={"count": size})
        raise PortRangeExhausted(self.ports)


def _port_zero(local_addr: object) -> bool:
    return isinstance(local_addr, tuple) and len(local_addr) >= 2 and local_addr[1] == 0


def install_port_range(
    loop: asyncio.AbstractEventLoop,
    ports: PortRange,
    *,
    on_exhausted: Callable[[], None] | None = None,
    max_sessions: int | None = None,
    rng: random.Random | None = None,
) -> None:
    """Make UDP binds to port 0 on ``loop`` take a free port of ``ports`` (``(low, high)``, included).

    Also installs the process-wide candidate guard (:class:`MediaPortsUnavailable` when gathering
    found no candidate). Idempotent: installing again replaces the range and callback.
    ``on_exhausted`` is called (on the loop) each time a bind finds the whole range in use.
    ``max_sessions`` only sizes a start-up warning: each session takes one port per host address
    (those aioice gathers on now, so call this after
    :func:`~relay.browser.ice.restrict_host_addresses`). Raises ``ValueError`` for a range outside
    1024-65535.
    """
    check_port_range(ports)
    current = _binder(loop)
    original = current.original if current is not None else loop.create_datagram_endpoint
    binder = _RangeBinder(original, ports, on_exhausted, rng or random.Random())
    # An instance attribute shadows the class's method for every caller that looks it up on the
    # loop, as aioice does (asyncio.get_running_loop().create_datagram_endpoint) at each bind.
    setattr(loop, "create_datagram_endpoint", binder)  # noqa: B010 (mypy forbids assigning a method)
    _install_candidate_guard()
    if max_sessions is not None:
        _warn_if_small(ports, max_sessions)


def uninstall_port_range(loop: asyncio.AbstractEventLoop) -> None:
    """Undo :func:`install_port_range` on ``loop`` and remove the candidate guard; idempotent."""
    if _binder(loop) is not None:
        delattr(loop, "create_datagram_endpoint")
    _ICE_MODULE.Connection.gather_candidates = _ORIGINAL_GATHER


def installed_port_range(loop: asyncio.AbstractEventLoop) -> PortRange | None:
    """The range installed on ``loop``, if any."""
    binder = _binder(loop)
    return None if binder is None else binder.ports


def _binder(loop: asyncio.AbstractEventLoop) -> _RangeBinder | None:
    found = vars(loop).get("create_datagram_endpoint")
    return found if isinstance(found, _RangeBinder) else None


def _warn_if_small(ports: PortRange, max_sessions: int) -> None:
    # What aioice will gather on: its own interface list, or relay.browser.ice's pinned one.
    addresses = len(_ICE_MODULE.get_host_addresses(True, True))
    size = ports[1] - ports[0] + 1
    fits = size // max(addresses, 1)
    if fits < max_sessions:
        # count: ports in the range; limit: sessions they hold; sessions: PARLEY_MAX_SESSIONS.
        log.warning("rtc.port_range_small", extra={"count": size, "limit": fits, "sessions": max_sessions})


# -- candidate guard --------------------------------------------------------------------------

# Typed as Any: the class attribute is replaced at run time, which its declared type forbids.
_ICE_MODULE: Any = aioice.ice
_ORIGINAL_GATHER: Callable[..., Any] = aioice.ice.Connection.gather_candidates


async def _gather_then_check(self: Any) -> None:
    """aioice's gathering, then: no candidate at all (every bind failed) is an error, not an answer."""
    await _ORIGINAL_GATHER(self)
    if not self.local_candidates:
        raise MediaPortsUnavailable()


def _install_candidate_guard() -> None:
    _ICE_MODULE.Connection.gather_candidates = _gather_then_check
