"""TURN credentials in coturn's REST-API scheme, and the ICE servers a browser is handed."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from relay.config import ConfigError, Settings
from relay.security.turn import ice_servers_for, turn_credential

SECRET = "a-shared-coturn-secret-of-32-chars!"


def coturn_accepts(secret: str, username: str, credential: str, now: int) -> bool:
    """What coturn's use-auth-secret check does: the HMAC-SHA1 of the username, and its expiry."""
    expected = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return hmac.compare_digest(expected, credential) and int(username.split(":", 1)[0]) > now


def test_a_credential_is_valid_until_its_ttl_and_only_with_the_shared_secret() -> None:
    """The username carries the expiry: coturn's check passes before it, not after or with another secret."""
    username, credential = turn_credential(SECRET, "u1a2b3", ttl_s=600, now=1_000_000)
    assert username == "1000600:u1a2b3"
    assert coturn_accepts(SECRET, username, credential, now=1_000_599)
    assert not coturn_accepts(SECRET, username, credential, now=1_000_600)
    assert not coturn_accepts("another-secret-of-at-least-32-chars", username, credential, now=1_000_000)


def test_the_browser_gets_stun_and_a_fresh_turn_credential_never_a_static_one() -> None:
    """Configured STUN passes through; an entry with a static credential (the relay's own) never does."""
    configured = [
        {"urls": "stun:stun.example.org:3478"},
        {"urls": ["turn:relay-only.example.org"], "username": "static", "credential": "do-not-share"},
        {"urls": ["stun:a.example.org", "turn:mixed.example.org"]},
    ]
    servers = ice_servers_for(
        configured=configured, turn_urls=["turn:turn.example.org:3478?transport=udp"], secret=SECRET,
        label="u1", ttl_s=3900, now=0,
    )  # fmt: skip
    assert servers[0] == {"urls": "stun:stun.example.org:3478"}
    assert len(servers) == 2 and "do-not-share" not in repr(servers)
    turn = servers[1]
    assert turn["urls"] == ["turn:turn.example.org:3478?transport=udp"] and turn["username"] == "3900:u1"
    assert coturn_accepts(SECRET, turn["username"], turn["credential"], now=0)
    assert ice_servers_for(configured=configured, turn_urls=[], secret=None, label="u1", ttl_s=60) == [
        servers[0]
    ]


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"PARLEY_TURN_SECRET": SECRET}, "PARLEY_TURN_SECRET"),  # without URLs
        ({"PARLEY_TURN_URLS": "turn:t.example.org"}, "PARLEY_TURN_SECRET"),  # without a secret
        ({"PARLEY_TURN_SECRET": "short", "PARLEY_TURN_URLS": "turn:t.example.org"}, "PARLEY_TURN_SECRET"),
        ({"PARLEY_TURN_SECRET": SECRET, "PARLEY_TURN_URLS": "stun:t.example.org"}, "PARLEY_TURN_URLS"),
        (
            {"PARLEY_TURN_SECRET": SECRET, "PARLEY_TURN_URLS": "turn:t", "PARLEY_TURN_TTL": "30"},
            "PARLEY_TURN_TTL",
        ),
    ],
)
def test_bad_turn_settings_name_their_variable(tmp_path: Path, values: dict[str, str], variable: str) -> None:
    """TURN settings are checked at start-up; the secret never shows in the settings' repr."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"PARLEY_DATA_DIR": str(tmp_path), **values}, dotenv=None)
    assert caught.value.variable == variable
    good = Settings.from_env(
        {
            "PARLEY_DATA_DIR": str(tmp_path),
            "PARLEY_TURN_SECRET": SECRET,
            "PARLEY_TURN_URLS": "turns:t.example.org",
        },
        dotenv=None,
    )
    assert good.turn_urls == ("turns:t.example.org",) and SECRET not in repr(good)
