"""Who this ``parley serve`` process is among the nodes: its id and where other nodes reach it."""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import dataclass

__all__ = ["NodeIdentity", "machine_of", "new_node_id"]


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """``url`` is where other nodes send forwarded signalling (None: nowhere; it gets none)."""

    id: str
    url: str | None


def new_node_id() -> str:
    """``<host>-<pid>-<random>``: readable in logs, unique across restarts and machines.

    Only the host name's first label, so a host named by its address never puts one in logs.
    """
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:40] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def machine_of(node_id: str) -> str:
    """The host part of a node id: nodes with the same one run on one machine (or one pod)."""
    return node_id.rsplit("-", 2)[0]
