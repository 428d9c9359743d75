"""Time-limited TURN credentials in coturn's REST-API scheme (``use-auth-secret``).

The relay and coturn share ``static-auth-secret`` (``PARLEY_TURN_SECRET``). A credential is valid
until the Unix time in its username: ``username = "<expiry>:<label>"`` and
``credential = base64(HMAC-SHA1(secret, username))``; coturn recomputes the HMAC and checks the
expiry, so no state is shared and nothing is stored. The label is a hash of the user id, never the
id or email: coturn logs usernames.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["ice_servers_for", "turn_credential"]


def turn_credential(secret: str, label: str, *, ttl_s: int, now: float | None = None) -> tuple[str, str]:
    """``(username, credential)`` valid for ``ttl_s`` seconds from ``now``."""
    expiry = int(now if now is not None else time.time()) + ttl_s
    username = f"{expiry}:{label}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def _stun_only(server: dict[str, Any]) -> bool:
    urls = server.get("urls")
    listed = [urls] if isinstance(urls, str) else list(urls or [])
    plain = "username" not in server and "credential" not in server
    return plain and bool(listed) and all(str(u).startswith(("stun:", "stuns:")) for u in listed)


def ice_servers_for(
    *,
    configured: Sequence[dict[str, Any]],
    turn_urls: Sequence[str],
    secret: str | None,
    label: str,
    ttl_s: int,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """The ``iceServers`` a browser gets: the STUN servers of ``PARLEY_ICE_SERVERS`` (never an entry
    with a static credential: that is the relay's own), plus TURN with a fresh credential."""
    servers = [dict(server) for server in configured if _stun_only(server)]
    if secret and turn_urls:
        username, credential = turn_credential(secret, label, ttl_s=ttl_s, now=now)
        servers.append({"urls": list(turn_urls), "username": username, "credential": credential})
    return servers
