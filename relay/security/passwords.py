"""Password hashing with scrypt (memory-hard, in the standard library), off the event loop.

Stored form: ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``, so parameters can be raised later
and old hashes still verify.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

__all__ = ["PasswordHasher"]

_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32


@dataclass(frozen=True, slots=True)
class PasswordHasher:
    """scrypt with n = 2**log2_n; the default costs 32 MiB and about 0.1 s per hash."""

    log2_n: int = 15
    r: int = 8
    p: int = 1

    async def hash(self, password: str) -> str:
        salt = secrets.token_bytes(_SALT_BYTES)
        digest = await asyncio.to_thread(self._derive, password, salt, self.log2_n, self.r, self.p)
        return "$".join(("scrypt", str(self.log2_n), str(self.r), str(self.p), _b64(salt), _b64(digest)))

    async def verify(self, password: str, stored: str | None) -> bool:
        """Constant-time check. With ``stored=None`` (unknown user) it does the same work and says no."""
        if stored is None:
            await asyncio.to_thread(self._derive, password, b"\0" * _SALT_BYTES, self.log2_n, self.r, self.p)
            return False
        try:
            scheme, log2_n, r, p, salt, expected = stored.split("$")
            if scheme != "scrypt":
                return False
            params = int(log2_n), int(r), int(p)
            salt_bytes, expected_bytes = _unb64(salt), _unb64(expected)
        except ValueError:
            return False
        digest = await asyncio.to_thread(self._derive, password, salt_bytes, *params)
        return hmac.compare_digest(digest, expected_bytes)

    @staticmethod
    def _derive(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
        n = 1 << log2_n
        return hashlib.scrypt(
            password.encode(), salt=salt, n=n, r=r, p=p, dklen=_KEY_BYTES, maxmem=256 * r * n + (1 << 20)
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
