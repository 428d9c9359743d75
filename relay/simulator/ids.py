"""Ids shaped like the Realtime API's: a prefix, an underscore and 21 base62 characters."""

from __future__ import annotations

import os
import random

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_LENGTH = 21
_rng = random.Random(os.urandom(16))
"""Ids need to be unique, not secret: a seeded PRNG is ten times cheaper than ``secrets`` per event."""


def _reseed() -> None:
    _rng.seed(os.urandom(16))


os.register_at_fork(after_in_child=_reseed)


def new_id(prefix: str) -> str:
    """Return a fresh random id such as ``event_4kN0yQ1c2D3e4F5g6H7i8``.

    Prefixes used by the real server: ``event``, ``sess``, ``item``, ``resp``, ``conv``.
    """
    return prefix + "_" + "".join(_rng.choices(_ALPHABET, k=_ID_LENGTH))


def random_padding(length: int) -> str:
    """Return ``length`` random base62 characters (the ``obfuscation`` field of transcript deltas)."""
    return "".join(_rng.choices(_ALPHABET, k=length))
