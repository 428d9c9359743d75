"""Publication confirmations: bound to one user and one session, short-lived, never another token kind."""

from __future__ import annotations

import pytest

from relay.config import Secret
from relay.security.tokens import (
    PUBLICATION_CONFIRMATION_TTL_S,
    ClientSecretError,
    TokenError,
    TokenService,
)

SECRET = Secret("unit-test-signing-key-" + "p" * 32)
NOW = 1_900_000_000
USER, SESSION = "usr_0001", "ses_0001"


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(clock: Clock) -> TokenService:
    return TokenService(SECRET, clock=clock)


def test_confirmation_round_trip(service: TokenService) -> None:
    """A confirmation verifies for its user and session and carries its jti and expiry."""
    token, claims = service.mint_publication_confirmation(USER, SESSION)
    verified = service.verify_publication_confirmation(token, user_id=USER, session_id=SESSION)
    assert verified == claims
    assert claims.expires_at.timestamp() == NOW + PUBLICATION_CONFIRMATION_TTL_S


@pytest.mark.parametrize(
    ("user", "session", "reason"), [("usr_0002", SESSION, "sub"), (USER, "ses_0002", "sid")]
)
def test_confirmation_is_bound_to_user_and_session(
    service: TokenService, user: str, session: str, reason: str
) -> None:
    """Another user's or another session's confirmation is refused, naming the claim."""
    token, _ = service.mint_publication_confirmation(USER, SESSION)
    with pytest.raises(TokenError) as caught:
        service.verify_publication_confirmation(token, user_id=user, session_id=session)
    assert caught.value.reason == reason


def test_lapsed_confirmation_is_refused(service: TokenService, clock: Clock) -> None:
    """Past its lifetime (and the leeway) a confirmation fails with reason exp."""
    token, _ = service.mint_publication_confirmation(USER, SESSION)
    clock.now += PUBLICATION_CONFIRMATION_TTL_S + 31
    with pytest.raises(TokenError) as caught:
        service.verify_publication_confirmation(token, user_id=USER, session_id=SESSION)
    assert caught.value.reason == "exp"


def test_token_kinds_do_not_stand_in_for_each_other(service: TokenService) -> None:
    """A client secret or access token is no confirmation, and a confirmation is neither of them."""
    secret, _ = service.mint_client_secret(USER, SESSION)
    access, _ = service.mint_access(USER)
    for other in (secret, access):
        with pytest.raises(TokenError) as caught:
            service.verify_publication_confirmation(other, user_id=USER, session_id=SESSION)
        assert caught.value.reason == "aud"
    confirmation, _ = service.mint_publication_confirmation(USER, SESSION)
    with pytest.raises(ClientSecretError):
        service.verify_client_secret(confirmation, session_id=SESSION)
    with pytest.raises(TokenError):
        service.verify_access(confirmation)


def test_confirmation_lifetime_is_bounded() -> None:
    """The lifetime must be between 1 s and 10 min."""
    for bad in (0, 601):
        with pytest.raises(ValueError, match="publication_ttl_s"):
            TokenService(SECRET, publication_ttl_s=bad)
