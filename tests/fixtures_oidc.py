"""pytest plugin: a local OIDC provider and a verifier pointed at it.

Loaded with ``pytest_plugins = ["tests.fixtures_oidc"]`` in ``tests/conftest.py`` (or
``-p tests.fixtures_oidc``).

* ``oidc_keys`` (session): a :class:`tests.jwks.KeyPool`; RSA-2048 and EC P-256 keys are generated
  once per test session, on first use.
* ``oidc_provider``: a running :class:`tests.jwks.OidcProvider` on ``127.0.0.1`` (discovery at
  ``{issuer}/.well-known/openid-configuration``, keys at ``{issuer}/jwks.json``); ``mint()`` tokens,
  ``rotate()`` keys, read ``jwks_fetches``. Stopped afterwards.
* ``oidc_verifier``: an :class:`relay.security.oidc.OidcVerifier` for that provider (discovery, its
  audience), closed afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.security.oidc import OidcVerifier
from tests.jwks import KeyPool, OidcProvider


@pytest.fixture(scope="session")
def oidc_keys() -> KeyPool:
    """Signing keys shared by the whole session (RSA key generation is slow-ish)."""
    return KeyPool()


@pytest.fixture
async def oidc_provider(oidc_keys: KeyPool) -> AsyncIterator[OidcProvider]:
    """A real local OIDC provider serving discovery and a JWKS of one RSA and one EC key."""
    provider = OidcProvider(oidc_keys)
    await provider.start()
    try:
        yield provider
    finally:
        await provider.stop()


@pytest.fixture
async def oidc_verifier(oidc_provider: OidcProvider) -> AsyncIterator[OidcVerifier]:
    """A verifier for ``oidc_provider`` (keys found by discovery, audience required)."""
    verifier = OidcVerifier(oidc_provider.issuer, audience=oidc_provider.audience, jwks_url=None)
    try:
        yield verifier
    finally:
        await verifier.aclose()
