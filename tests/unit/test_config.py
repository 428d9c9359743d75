"""Settings: defaults, validation naming the variable, secret handling."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigError, Secret, Settings, mask_url


def env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"PARLEY_DATA_DIR": str(tmp_path / "data"), **values}


def test_defaults_are_the_embedded_ones(tmp_path: Path) -> None:
    """With nothing set, Parley uses SQLite and local objects under the data dir and the simulator."""
    s = Settings.from_env(env(tmp_path), dotenv=None)
    data = (tmp_path / "data").resolve()
    assert (s.host, s.port, s.model, s.log_level) == ("127.0.0.1", 8080, "gpt-realtime", "INFO")
    assert s.database_url == f"sqlite+aiosqlite:///{data / 'parley.db'}"
    assert s.object_store_url == f"file://{data / 'objects'}"
    assert s.upstream_kind == "simulator"
    assert s.openai_api_key is None
    assert s.heap_trim_s == 10.0


def test_generated_secret_key_is_private_and_stable(tmp_path: Path) -> None:
    """Without PARLEY_SECRET_KEY a key is generated once, kept with mode 0600, and reused."""
    first = Settings.from_env(env(tmp_path), dotenv=None)
    key_file = tmp_path / "data" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = Settings.from_env(env(tmp_path), dotenv=None)
    assert first.secret_key == second.secret_key
    assert len(first.secret_key.reveal()) >= 32


def _key_when_told(data_dir: str, go: Any, out: Any) -> None:
    go.wait()
    try:
        out.put(Settings.from_env({"PARLEY_DATA_DIR": data_dir}, dotenv=None).secret_key.reveal())
    except ConfigError as exc:
        out.put(f"error: {exc}")


def test_processes_starting_together_share_one_whole_key(tmp_path: Path) -> None:
    """Eight processes creating the key at the same moment all end with the same, whole key
    (`parley serve --workers` and `parley worker`s start on one data dir together)."""
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    (tmp_path / "data").mkdir()
    procs = [ctx.Process(target=_key_when_told, args=(str(tmp_path / "data"), go, out)) for _ in range(8)]
    for proc in procs:
        proc.start()
    go.set()
    keys = [out.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert len(set(keys)) == 1 and len(keys[0]) >= 32, keys
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["secret_key"]  # no temporary file left


def test_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    """A signing key file that others can read stops the start, naming PARLEY_SECRET_KEY."""
    Settings.from_env(env(tmp_path), dotenv=None)
    os.chmod(tmp_path / "data" / "secret_key", 0o644)
    with pytest.raises(ConfigError, match=r"^PARLEY_SECRET_KEY: .*chmod 600"):
        Settings.from_env(env(tmp_path), dotenv=None)


def test_secrets_never_show_in_repr(tmp_path: Path) -> None:
    """The OpenAI key, signing key, database password and S3 secret are masked in repr()."""
    s = Settings.from_env(
        env(
            tmp_path,
            OPENAI_API_KEY="sk-canary-openai-123456789",
            PARLEY_SECRET_KEY="k" * 40 + "canarysigning",
            PARLEY_DATABASE_URL="postgresql://parley:dbcanarypw@db.internal:5432/parley",
            PARLEY_OBJECT_STORE_URL="s3://AKIA:s3canarysecret@minio:9000/audio?secure=false",
        ),
        dotenv=None,
    )
    text = repr(s) + str(s.secret_key) + str(s.openai_api_key)
    for canary in ("sk-canary", "canarysigning", "dbcanarypw", "s3canarysecret"):
        assert canary not in text
    assert "postgresql+asyncpg://parley:***@db.internal:5432/parley" in text
    assert s.upstream_kind == "openai"
    assert s.openai_api_key == Secret("sk-canary-openai-123456789")


def test_plain_database_schemes_map_to_async_drivers(tmp_path: Path) -> None:
    """postgres:// and sqlite:// URLs are accepted and use asyncpg and aiosqlite."""
    pg = Settings.from_env(env(tmp_path, PARLEY_DATABASE_URL="postgres://u@h/db"), dotenv=None)
    lite = Settings.from_env(env(tmp_path, PARLEY_DATABASE_URL="sqlite:////tmp/x.db"), dotenv=None)
    assert pg.database_url == "postgresql+asyncpg://u@h/db"
    assert lite.database_url == "sqlite+aiosqlite:////tmp/x.db"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PARLEY_DATABASE_URL", "mysql://u@h/db", "unsupported scheme 'mysql'"),
        ("PARLEY_DATABASE_URL", "postgresql://u@h:notaport/db", "is not a valid URL"),
        ("PARLEY_DATABASE_URL", "sqlite://", "needs a file path"),
        ("PARLEY_DATABASE_URL", "postgresql:///db", "needs a host"),
        ("PARLEY_OBJECT_STORE_URL", "ftp://x/y", "unsupported scheme 'ftp'"),
        ("PARLEY_OBJECT_STORE_URL", "s3://minio:9000/bucket", "needs credentials"),
        ("PARLEY_OBJECT_STORE_URL", "s3://a:b@minio:9000/", "has no bucket"),
        (
            "PARLEY_OBJECT_STORE_URL",
            "s3://a:b@minio:9000/bkt?colour=red",
            "unknown S3 object store URL option",
        ),
        ("PARLEY_OBJECT_STORE_URL", "file://relative/path", "file:///ABSOLUTE/PATH"),
        ("PARLEY_PORT", "eighty", "must be an integer"),
        ("PARLEY_PORT", "70000", "between 1 and 65535"),
        ("PARLEY_LOG_LEVEL", "LOUD", "must be one of"),
        ("PARLEY_SECRET_KEY", "short", "at least 32 characters"),
        ("PARLEY_UPSTREAM_URL", "http://127.0.0.1:9000/v1", "ws:// or wss://"),
        ("PARLEY_ICE_SERVERS", "stun:x", "not valid JSON"),
        ("PARLEY_ICE_SERVERS", '{"urls": "stun:x"}', "must be a JSON list"),
        ("PARLEY_ICE_SERVERS", '[{"username": "u"}]', "needs `urls`"),
        ("PARLEY_RTC_HOST_ADDRESSES", "127.0.0.1,eth0", "not an IP address"),
        ("PARLEY_RTC_REMOTE_ALLOW", "10.0.0.0/33", "not a network"),
        ("PARLEY_RECONNECT_GRACE", "soon", "must be a number"),
        ("PARLEY_RECONNECT_GRACE", "0", "between 1 and 600"),
        ("PARLEY_MAX_SESSION_SECONDS", "nan", "finite"),
        ("PARLEY_CLIENT_SECRET_TTL", "601", "between 1 and 600"),
        ("PARLEY_ACCESS_TOKEN_TTL", "10", "between 60 and 86400"),
        ("PARLEY_MAX_SESSIONS", "0", "at least 1"),
        ("PARLEY_COACH_COMPLEXITY", "11", "between 0 and 10"),
        ("PARLEY_COACH_COMPLEXITY", "-1", "between 0 and 10"),
        ("PARLEY_COACH_COMPLEXITY", "max", "must be an integer"),
        ("PARLEY_OIDC_ISSUER", "ftp://idp", "http(s) URL"),
        ("PARLEY_RETENTION_DAYS", "-1", "0 (off) or between 1 and 3650"),
        ("PARLEY_RETENTION_DAYS", "3651", "0 (off) or between 1 and 3650"),
        ("PARLEY_RETENTION_DAYS", "30d", "must be an integer"),
        ("PARLEY_RETENTION_SWEEP_SECONDS", "0", "more than 0"),
        ("PARLEY_RETENTION_SWEEP_SECONDS", "-60", "more than 0"),
        ("PARLEY_RETENTION_SWEEP_SECONDS", "604801", "at most 604800"),
        ("PARLEY_RETENTION_SWEEP_SECONDS", "hourly", "must be a number"),
        ("PARLEY_RETENTION_SWEEP_SECONDS", "inf", "finite"),
        ("PARLEY_HEAP_TRIM_SECONDS", "-1", "0 (off) or at most 86400"),
        ("PARLEY_HEAP_TRIM_SECONDS", "86401", "0 (off) or at most 86400"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_variable(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    """Each invalid setting raises ConfigError whose single-line message starts with its variable."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(tmp_path, **{variable: value}), dotenv=None)
    text = str(info.value)
    assert text.startswith(f"{variable}: ")
    assert message in text
    assert "\n" not in text
    assert info.value.variable == variable


def test_s3_secret_is_not_in_the_error_message(tmp_path: Path) -> None:
    """A rejected S3 URL does not echo its secret key."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(tmp_path, PARLEY_OBJECT_STORE_URL="s3://AK:topsecret@minio:9000/"), dotenv=None)
    assert "topsecret" not in str(info.value)


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    """Values come from .env unless the environment sets the same variable."""
    dotenv = tmp_path / ".env"
    dotenv.write_text('PARLEY_PORT=9191\nPARLEY_MODEL="gpt-realtime-2"\n')
    s = Settings.from_env(env(tmp_path, PARLEY_MODEL="gpt-realtime"), dotenv=dotenv)
    assert (s.port, s.model) == (9191, "gpt-realtime")


def test_mask_url_hides_only_the_password() -> None:
    """mask_url keeps user, host, port, path and query and replaces the password."""
    assert mask_url("s3://AK:SK@h:9000/b?secure=false") == "s3://AK:***@h:9000/b?secure=false"
    assert mask_url("sqlite+aiosqlite:////x.db") == "sqlite+aiosqlite:////x.db"


def test_settings_are_frozen(tmp_path: Path) -> None:
    """Settings cannot be changed after start-up."""
    s = Settings.from_env(env(tmp_path), dotenv=None)
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_live_session_settings_parse(tmp_path: Path) -> None:
    """ICE servers (JSON), host addresses and remote networks (comma lists) and timings are read."""
    s = Settings.from_env(
        env(
            tmp_path,
            PARLEY_ICE_SERVERS='[{"urls": ["turn:t:3478"], "username": "u", "credential": "c"}]',
            PARLEY_RTC_HOST_ADDRESSES="127.0.0.1, ::1",
            PARLEY_RTC_REMOTE_ALLOW="127.0.0.0/8",
            PARLEY_RECONNECT_GRACE="2.5",
            PARLEY_MAX_SESSIONS="3",
        ),
        dotenv=None,
    )
    assert s.ice_servers == ({"urls": ["turn:t:3478"], "username": "u", "credential": "c"},)
    assert s.rtc_host_addresses == ("127.0.0.1", "::1")
    assert s.rtc_remote_allow == ("127.0.0.0/8",)
    assert (s.reconnect_grace_s, s.max_sessions, s.max_session_s) == (2.5, 3, 3600.0)


@pytest.mark.parametrize(("raw", "expected"), [(None, 5), ("0", 0), ("10", 10), ("3", 3)])
def test_coach_complexity_defaults_to_5_and_reads_0_to_10(
    tmp_path: Path, raw: str | None, expected: int
) -> None:
    """PARLEY_COACH_COMPLEXITY is the coach encoder's Opus complexity: 5 unless set, 0..10 accepted."""
    values = {} if raw is None else {"PARLEY_COACH_COMPLEXITY": raw}
    assert Settings.from_env(env(tmp_path, **values), dotenv=None).coach_complexity == expected


@pytest.mark.parametrize(
    ("values", "days", "sweep_s"),
    [
        ({}, None, 3600.0),
        ({"PARLEY_RETENTION_DAYS": "0"}, None, 3600.0),
        ({"PARLEY_RETENTION_DAYS": ""}, None, 3600.0),
        ({"PARLEY_RETENTION_DAYS": "30", "PARLEY_RETENTION_SWEEP_SECONDS": "600"}, 30, 600.0),
        ({"PARLEY_RETENTION_DAYS": "3650", "PARLEY_RETENTION_SWEEP_SECONDS": "0.5"}, 3650, 0.5),
    ],
)
def test_retention_is_off_unless_set(
    tmp_path: Path, values: dict[str, str], days: int | None, sweep_s: float
) -> None:
    """PARLEY_RETENTION_DAYS unset or 0 means off (None); the sweep runs hourly unless told otherwise."""
    s = Settings.from_env(env(tmp_path, **values), dotenv=None)
    assert (s.retention_days, s.retention_sweep_s) == (days, sweep_s)
