"""Password hashing and sliding-window limits."""

from __future__ import annotations

from relay.security.passwords import PasswordHasher
from relay.security.ratelimit import SlidingWindow


async def test_default_hash_is_scrypt_with_32_mib_and_verifies() -> None:
    """The production hasher stores scrypt n=2**15, r=8 with a random salt, and verifies only the password."""
    hasher = PasswordHasher()
    stored = await hasher.hash("correct horse battery")
    scheme, log2_n, r, p, salt, digest = stored.split("$")
    assert (scheme, log2_n, r, p) == ("scrypt", "15", "8", "1")
    assert stored != await hasher.hash("correct horse battery")  # salted
    assert await hasher.verify("correct horse battery", stored)
    assert not await hasher.verify("correct horse batterY", stored)


async def test_hashes_keep_verifying_after_parameters_change() -> None:
    """A hash made with older parameters still verifies with a hasher configured differently."""
    old = await PasswordHasher(log2_n=10).hash("a long password")
    assert await PasswordHasher(log2_n=12).verify("a long password", old)


async def test_unknown_user_and_corrupt_hashes_never_verify() -> None:
    """verify() says no for a missing hash (after doing the work) and for malformed stored values."""
    hasher = PasswordHasher(log2_n=10)
    assert not await hasher.verify("anything at all", None)
    for bad in ("", "plain", "bcrypt$1$2$3$4$5", "scrypt$x$8$1$AA$AA", "scrypt$10$8$1$!!$??"):
        assert not await hasher.verify("anything at all", bad)


def test_window_allows_limit_hits_then_says_how_long_to_wait() -> None:
    """A window admits `limit` hits, then refuses with the seconds until the oldest expires."""
    now = [1000.0]
    window = SlidingWindow(3, 60, clock=lambda: now[0])
    assert [window.hit("k") for _ in range(3)] == [0, 0, 0]
    now[0] += 10
    assert window.hit("k") == 50
    assert window.hit("other") == 0
    now[0] += 50.5
    assert window.hit("k") == 0


def test_reset_clears_a_key() -> None:
    """reset() forgets a key's hits (a successful sign-in clears failures)."""
    window = SlidingWindow(1, 60)
    window.hit("k")
    assert window.retry_after("k") > 0
    window.reset("k")
    assert window.retry_after("k") == 0
