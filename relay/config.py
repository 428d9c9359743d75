"""Settings: read once at start-up from the environment (and an optional ``.env``), frozen afterwards.

Library code never reads ``os.environ``; it receives a :class:`Settings` (or a part of it).
Every validation error names the variable it comes from, so a bad deployment fails with one
clear line instead of half-starting.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit, urlunsplit

from dotenv import dotenv_values

__all__ = ["ConfigError", "Secret", "Settings", "mask_url"]

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECRET_KEY_FILE: Final = "secret_key"  # noqa: S105 (a file name, not a secret)
MIN_SECRET_KEY_LEN: Final = 32
MAX_CLIENT_SECRET_TTL_S: Final = 600
# Longest retention a deployment or a session may set (ten years).
MAX_RETENTION_DAYS: Final = 3650
MAX_RETENTION_SWEEP_S: Final = 7 * 86400
MAX_WORKERS_IN_PROCESS: Final = 16
MAX_JOB_LEASE_S: Final = 3600.0
MAX_HEAP_TRIM_S: Final = 86400.0
# coturn checks a REST-API credential's expiry again on every allocation refresh, so a credential
# must outlive the longest call (PARLEY_MAX_SESSION_SECONDS, 1 h by default); each new client secret
# (every reconnect) brings a fresh one.
DEFAULT_TURN_TTL_S: Final = 3900
MIN_TURN_TTL_S: Final = 60
MAX_TURN_TTL_S: Final = 86400
DEFAULT_RATING_MODEL: Final = "gpt-4.1-mini"
MAX_RATING_TIMEOUT_S: Final = 600.0
# storage.models.Rating.model holds the model's name.
MAX_RATING_MODEL_LEN: Final = 128
MIN_NODE_HEARTBEAT_S: Final = 0.2
MAX_NODE_HEARTBEAT_S: Final = 60.0
# Below 1024 a bind needs privileges the relay must not have.
MIN_RTC_PORT: Final = 1024


class ConfigError(ValueError):
    """A configuration value is missing or invalid; ``variable`` names the culprit."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class Secret:
    """A string that never shows itself in ``repr``/``str``; call :meth:`reveal` where it is used."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def mask_url(url: str) -> str:
    """Return ``url`` with any password (or S3 secret key) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything Parley is configured with. Build it with :meth:`from_env`."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data").resolve()
    database_url: str = field(default="", repr=False)
    object_store_url: str = field(default="", repr=False)
    secret_key: Secret = field(default_factory=lambda: Secret(secrets.token_urlsafe(48)))
    openai_api_key: Secret | None = None
    upstream_url: str | None = None
    model: str = "gpt-realtime"
    log_level: str = "INFO"
    access_token_ttl_s: int = 3600
    client_secret_ttl_s: int = 60
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    admin_emails: frozenset[str] = frozenset()
    # Abuse limits, per user per minute (429 with Retry-After past them).
    session_create_per_minute: int = 10
    client_secret_per_minute: int = 30
    # Live sessions (WebRTC and the model link).
    ice_servers: tuple[dict[str, Any], ...] = ()
    # TURN for browsers: coturn's REST-API shared secret, its URLs, and how long a credential lasts.
    turn_secret: Secret | None = None
    turn_urls: tuple[str, ...] = ()
    turn_ttl_s: int = DEFAULT_TURN_TTL_S
    rtc_host_addresses: tuple[str, ...] = ()
    rtc_remote_allow: tuple[str, ...] = ()
    # UDP ports for ICE host candidates, (low, high) both included; None: ephemeral ports (the kernel's).
    rtc_port_range: tuple[int, int] | None = None
    reconnect_grace_s: float = 30.0
    max_session_s: float = 3600.0
    max_sessions: int = 15
    max_loop_lag_ms: float = 150.0
    drain_timeout_s: float = 60.0
    coach_bitrate: int = 32000
    coach_complexity: int = 5
    spool_max_bytes: int = 512 * 1024 * 1024
    # How often freed C heap goes back to the OS (relay/heap.py); 0: never.
    heap_trim_s: float = 10.0
    # Retention: sessions are deleted this many days after they ended (None: kept until deleted;
    # PARLEY_RETENTION_DAYS unset or 0). A session's own choice (retain, retention_days) wins.
    retention_days: int | None = None
    retention_sweep_s: float = 3600.0
    # Post-processing jobs run concurrently inside `parley serve` (0: only `parley worker` runs them).
    workers_in_process: int = 1
    # How long a job's claim lasts without renewal: a crashed worker's job is taken over after it.
    job_lease_s: float = 60.0
    # Rating: the text model that scores a finished session (any OpenAI-compatible Chat Completions API).
    rating_model: str = DEFAULT_RATING_MODEL
    rating_url: str | None = None
    rating_timeout_s: float = 60.0
    # Scaling out (relay/cluster/): the URL other nodes reach this process at (None: its own internal
    # loopback listener, one machine only), and how often it renews its row in the node registry.
    node_url: str | None = None
    node_heartbeat_s: float = 5.0
    # The spool this process claimed (storage/spool_claims.py), set by `parley serve`; None: <data dir>/spool.
    spool_path: Path | None = None
    # Set by `parley serve --workers N` on its children, never from the environment: this child's
    # index (0..N-1). Its /metrics then also answers for its siblings, each labelled worker="<index>"
    # (relay/observability/fanin.py). None: a process on its own (no worker label, as in a pod).
    worker_index: int | None = None

    def __post_init__(self) -> None:
        # Derived defaults depend on data_dir; frozen dataclasses need object.__setattr__ for them.
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite+aiosqlite:///{self.data_dir / 'parley.db'}")
        if not self.object_store_url:
            object.__setattr__(self, "object_store_url", (self.data_dir / "objects").as_uri())
        object.__setattr__(self, "database_url", _normalise_database_url(self.database_url))
        _check_object_store_url(self.object_store_url)
        if not 0 < self.port < 65536:
            raise ConfigError("PARLEY_PORT", f"must be between 1 and 65535, got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("PARLEY_LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}")
        if len(self.secret_key.reveal()) < MIN_SECRET_KEY_LEN:
            raise ConfigError("PARLEY_SECRET_KEY", f"must be at least {MIN_SECRET_KEY_LEN} characters")
        if self.upstream_url is not None:
            _check_upstream_url(self.upstream_url)
        if not self.model:
            raise ConfigError("PARLEY_MODEL", "must not be empty")
        if not 60 <= self.access_token_ttl_s <= 86400:
            raise ConfigError("PARLEY_ACCESS_TOKEN_TTL", "must be between 60 and 86400 seconds")
        if not 1 <= self.client_secret_ttl_s <= MAX_CLIENT_SECRET_TTL_S:
            raise ConfigError(
                "PARLEY_CLIENT_SECRET_TTL", f"must be between 1 and {MAX_CLIENT_SECRET_TTL_S} seconds"
            )
        for variable, url in (
            ("PARLEY_OIDC_ISSUER", self.oidc_issuer),
            ("PARLEY_OIDC_JWKS_URL", self.oidc_jwks_url),
        ):
            if url is not None and urlsplit(url).scheme not in ("https", "http"):
                raise ConfigError(variable, "must be an http(s) URL")
        if self.oidc_jwks_url and not self.oidc_issuer:
            raise ConfigError("PARLEY_OIDC_JWKS_URL", "needs PARLEY_OIDC_ISSUER too")
        if not 1 <= self.reconnect_grace_s <= 600:
            raise ConfigError("PARLEY_RECONNECT_GRACE", "must be between 1 and 600 seconds")
        if not 10 <= self.max_session_s <= 4 * 3600:
            raise ConfigError("PARLEY_MAX_SESSION_SECONDS", "must be between 10 and 14400 seconds")
        if self.spool_max_bytes < 1024 * 1024:
            raise ConfigError("PARLEY_SPOOL_MAX_BYTES", "must be at least 1048576 (1 MiB)")
        if not 6000 <= self.coach_bitrate <= 128000:
            raise ConfigError("PARLEY_COACH_BITRATE", "must be between 6000 and 128000 bit/s")
        if not 0 <= self.coach_complexity <= 10:
            raise ConfigError(
                "PARLEY_COACH_COMPLEXITY", f"must be between 0 and 10, got {self.coach_complexity}"
            )
        for address in self.rtc_host_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError("PARLEY_RTC_HOST_ADDRESSES", f"{address!r} is not an IP address") from None
        for network in self.rtc_remote_allow:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError("PARLEY_RTC_REMOTE_ALLOW", f"{network!r} is not a network (CIDR)") from None
        for server in self.ice_servers:
            urls = server.get("urls")
            if not isinstance(urls, (str, list)):
                raise ConfigError("PARLEY_ICE_SERVERS", "each server needs `urls` (a string or a list)")
        for url in self.turn_urls:
            if not url.startswith(("turn:", "turns:")):
                raise ConfigError("PARLEY_TURN_URLS", f"{url!r} is not a turn: or turns: URL")
        if bool(self.turn_urls) != (self.turn_secret is not None):
            raise ConfigError("PARLEY_TURN_SECRET", "PARLEY_TURN_SECRET and PARLEY_TURN_URLS go together")
        if self.turn_secret is not None and len(self.turn_secret.reveal()) < MIN_SECRET_KEY_LEN:
            raise ConfigError("PARLEY_TURN_SECRET", f"must be at least {MIN_SECRET_KEY_LEN} characters")
        if not MIN_TURN_TTL_S <= self.turn_ttl_s <= MAX_TURN_TTL_S:
            raise ConfigError(
                "PARLEY_TURN_TTL", f"must be between {MIN_TURN_TTL_S} and {MAX_TURN_TTL_S} seconds"
            )
        if self.retention_days == 0:
            object.__setattr__(self, "retention_days", None)  # 0 means off, like unset
        if self.retention_days is not None and not 1 <= self.retention_days <= MAX_RETENTION_DAYS:
            raise ConfigError(
                "PARLEY_RETENTION_DAYS",
                f"must be 0 (off) or between 1 and {MAX_RETENTION_DAYS} days, got {self.retention_days}",
            )
        if not 0 <= self.heap_trim_s <= MAX_HEAP_TRIM_S:
            raise ConfigError(
                "PARLEY_HEAP_TRIM_SECONDS", f"must be 0 (off) or at most {MAX_HEAP_TRIM_S:g} seconds"
            )
        if not 0 < self.retention_sweep_s <= MAX_RETENTION_SWEEP_S:
            raise ConfigError(
                "PARLEY_RETENTION_SWEEP_SECONDS",
                f"must be more than 0 and at most {MAX_RETENTION_SWEEP_S} seconds",
            )
        if not 0 <= self.workers_in_process <= MAX_WORKERS_IN_PROCESS:
            raise ConfigError(
                "PARLEY_WORKERS_IN_PROCESS",
                f"must be between 0 (off) and {MAX_WORKERS_IN_PROCESS}, got {self.workers_in_process}",
            )
        if not 1 <= self.job_lease_s <= MAX_JOB_LEASE_S:
            raise ConfigError(
                "PARLEY_JOB_LEASE_SECONDS", f"must be between 1 and {MAX_JOB_LEASE_S:.0f} seconds"
            )
        if not self.rating_model or len(self.rating_model) > MAX_RATING_MODEL_LEN:
            raise ConfigError("PARLEY_RATING_MODEL", f"must be 1 to {MAX_RATING_MODEL_LEN} characters")
        if self.rating_url is not None:
            _check_rating_url(self.rating_url)
        if not 0 < self.rating_timeout_s <= MAX_RATING_TIMEOUT_S:
            raise ConfigError(
                "PARLEY_RATING_TIMEOUT", f"must be more than 0 and at most {MAX_RATING_TIMEOUT_S:g} seconds"
            )
        if self.node_url is not None:
            _check_node_url(self.node_url)
        if not MIN_NODE_HEARTBEAT_S <= self.node_heartbeat_s <= MAX_NODE_HEARTBEAT_S:
            raise ConfigError(
                "PARLEY_NODE_HEARTBEAT_SECONDS",
                f"must be between {MIN_NODE_HEARTBEAT_S:g} and {MAX_NODE_HEARTBEAT_S:g} seconds",
            )
        if self.rtc_port_range is not None:
            low, high = self.rtc_port_range
            if not MIN_RTC_PORT <= low <= high <= 65535:
                raise ConfigError(
                    "PARLEY_RTC_PORT_RANGE",
                    f"must satisfy {MIN_RTC_PORT} <= low <= high <= 65535, got {low}-{high}",
                )
        for variable, value in (
            ("PARLEY_MAX_SESSIONS", self.max_sessions),
            ("PARLEY_SESSIONS_PER_MINUTE", self.session_create_per_minute),
            ("PARLEY_CLIENT_SECRETS_PER_MINUTE", self.client_secret_per_minute),
        ):
            if value < 1:
                raise ConfigError(variable, "must be at least 1")

    def __repr__(self) -> str:
        return (
            f"Settings(host={self.host!r}, port={self.port}, data_dir={str(self.data_dir)!r}, "
            f"database_url={mask_url(self.database_url)!r}, "
            f"object_store_url={mask_url(self.object_store_url)!r}, secret_key={self.secret_key!r}, "
            f"openai_api_key={self.openai_api_key!r}, upstream_url={self.upstream_url!r}, "
            f"model={self.model!r}, log_level={self.log_level!r}, "
            f"oidc_issuer={self.oidc_issuer!r}, admin_emails=<{len(self.admin_emails)}>, "
            f"ice_servers=<{len(self.ice_servers)}>, turn_secret={self.turn_secret!r}, "
            f"turn_urls={self.turn_urls!r}, max_sessions={self.max_sessions}, "
            f"retention_days={self.retention_days}, workers_in_process={self.workers_in_process}, "
            f"rating_model={self.rating_model!r}, "
            f"rating_url={None if self.rating_url is None else mask_url(self.rating_url)!r}, "
            f"rating_timeout_s={self.rating_timeout_s})"
        )

    @property
    def spool_dir(self) -> Path:
        """Where this process's recordings wait for the object store (under the data dir)."""
        return self.spool_path if self.spool_path is not None else self.data_dir / "spool"

    @property
    def upstream_kind(self) -> str:
        """``"openai"`` when a key or an explicit upstream is configured, else ``"simulator"``."""
        return "openai" if self.openai_api_key is not None or self.upstream_url else "simulator"

    @property
    def rating_kind(self) -> str:
        """``"openai"`` (or the compatible API at ``PARLEY_RATING_URL``) when a key or that URL is
        configured, else ``"simulator"`` (the built-in rating simulator)."""
        return "openai" if self.openai_api_key is not None or self.rating_url else "simulator"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dotenv: Path | None = Path(".env")
    ) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``) over an optional ``.env`` file.

        Creates the data directory, and the signing key file in it when ``PARLEY_SECRET_KEY`` is unset.
        """
        env: dict[str, str] = {}
        if dotenv is not None and dotenv.is_file():
            env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        env.update(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else None

        data_dir = Path(get("PARLEY_DATA_DIR") or "data").expanduser().resolve()
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("PARLEY_DATA_DIR", f"cannot create {data_dir}: {exc.strerror}") from None

        key = get("PARLEY_SECRET_KEY")
        api_key = get("OPENAI_API_KEY")
        return cls(
            host=get("PARLEY_HOST") or "127.0.0.1",
            port=_int("PARLEY_PORT", get("PARLEY_PORT"), 8080),
            data_dir=data_dir,
            database_url=get("PARLEY_DATABASE_URL") or "",
            object_store_url=get("PARLEY_OBJECT_STORE_URL") or "",
            secret_key=Secret(key) if key else _load_or_create_key(data_dir),
            openai_api_key=Secret(api_key) if api_key else None,
            upstream_url=get("PARLEY_UPSTREAM_URL"),
            model=get("PARLEY_MODEL") or "gpt-realtime",
            log_level=(get("PARLEY_LOG_LEVEL") or "INFO").upper(),
            access_token_ttl_s=_int("PARLEY_ACCESS_TOKEN_TTL", get("PARLEY_ACCESS_TOKEN_TTL"), 3600),
            client_secret_ttl_s=_int("PARLEY_CLIENT_SECRET_TTL", get("PARLEY_CLIENT_SECRET_TTL"), 60),
            oidc_issuer=get("PARLEY_OIDC_ISSUER"),
            oidc_audience=get("PARLEY_OIDC_AUDIENCE"),
            oidc_jwks_url=get("PARLEY_OIDC_JWKS_URL"),
            admin_emails=frozenset(
                e.strip().lower() for e in (get("PARLEY_ADMIN_EMAILS") or "").split(",") if e.strip()
            ),
            session_create_per_minute=_int(
                "PARLEY_SESSIONS_PER_MINUTE", get("PARLEY_SESSIONS_PER_MINUTE"), 10
            ),
            client_secret_per_minute=_int(
                "PARLEY_CLIENT_SECRETS_PER_MINUTE", get("PARLEY_CLIENT_SECRETS_PER_MINUTE"), 30
            ),
            ice_servers=_ice_servers(get("PARLEY_ICE_SERVERS")),
            turn_secret=Secret(turn) if (turn := get("PARLEY_TURN_SECRET")) else None,
            turn_urls=_csv(get("PARLEY_TURN_URLS")),
            turn_ttl_s=_int("PARLEY_TURN_TTL", get("PARLEY_TURN_TTL"), DEFAULT_TURN_TTL_S),
            rtc_host_addresses=_csv(get("PARLEY_RTC_HOST_ADDRESSES")),
            rtc_remote_allow=_csv(get("PARLEY_RTC_REMOTE_ALLOW")),
            rtc_port_range=_port_range(get("PARLEY_RTC_PORT_RANGE")),
            reconnect_grace_s=_float("PARLEY_RECONNECT_GRACE", get("PARLEY_RECONNECT_GRACE"), 30.0),
            max_session_s=_float("PARLEY_MAX_SESSION_SECONDS", get("PARLEY_MAX_SESSION_SECONDS"), 3600.0),
            max_sessions=_int("PARLEY_MAX_SESSIONS", get("PARLEY_MAX_SESSIONS"), 15),
            max_loop_lag_ms=_float("PARLEY_MAX_LOOP_LAG_MS", get("PARLEY_MAX_LOOP_LAG_MS"), 150.0),
            drain_timeout_s=_float("PARLEY_DRAIN_TIMEOUT", get("PARLEY_DRAIN_TIMEOUT"), 60.0),
            coach_bitrate=_int("PARLEY_COACH_BITRATE", get("PARLEY_COACH_BITRATE"), 32000),
            coach_complexity=_int("PARLEY_COACH_COMPLEXITY", get("PARLEY_COACH_COMPLEXITY"), 5),
            spool_max_bytes=_int("PARLEY_SPOOL_MAX_BYTES", get("PARLEY_SPOOL_MAX_BYTES"), 512 * 1024 * 1024),
            heap_trim_s=_float("PARLEY_HEAP_TRIM_SECONDS", get("PARLEY_HEAP_TRIM_SECONDS"), 10.0),
            retention_days=_int("PARLEY_RETENTION_DAYS", get("PARLEY_RETENTION_DAYS"), 0),
            retention_sweep_s=_float(
                "PARLEY_RETENTION_SWEEP_SECONDS", get("PARLEY_RETENTION_SWEEP_SECONDS"), 3600.0
            ),
            workers_in_process=_int("PARLEY_WORKERS_IN_PROCESS", get("PARLEY_WORKERS_IN_PROCESS"), 1),
            job_lease_s=_float("PARLEY_JOB_LEASE_SECONDS", get("PARLEY_JOB_LEASE_SECONDS"), 60.0),
            rating_model=get("PARLEY_RATING_MODEL") or DEFAULT_RATING_MODEL,
            rating_url=get("PARLEY_RATING_URL"),
            rating_timeout_s=_float("PARLEY_RATING_TIMEOUT", get("PARLEY_RATING_TIMEOUT"), 60.0),
            node_url=get("PARLEY_NODE_URL"),
            node_heartbeat_s=_float(
                "PARLEY_NODE_HEARTBEAT_SECONDS", get("PARLEY_NODE_HEARTBEAT_SECONDS"), 5.0
            ),
        )


def _int(variable: str, raw: str | None, default: int) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(variable, f"must be an integer, got {raw!r}") from None


def _float(variable: str, raw: str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(variable, f"must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(variable, "must be a finite number")
    return value


def _csv(raw: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (raw or "").split(",") if part.strip())


def _port_range(raw: str | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    low, _, high = raw.partition("-")  # no "-": high is "", which int() refuses too
    try:
        return int(low), int(high)
    except ValueError:
        raise ConfigError(
            "PARLEY_RTC_PORT_RANGE", f"must be low-high, e.g. 40000-40999, got {raw!r}"
        ) from None


def _ice_servers(raw: str | None) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError("PARLEY_ICE_SERVERS", "is not valid JSON") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError("PARLEY_ICE_SERVERS", 'must be a JSON list like [{"urls": "stun:host:3478"}]')
    return tuple(value)


def _normalise_database_url(url: str) -> str:
    """Map plain scheme names to the async drivers Parley uses; refuse anything else."""
    variable = "PARLEY_DATABASE_URL"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(variable, "is not a valid URL") from None
    scheme = parts.scheme
    drivers = {
        "sqlite": "sqlite+aiosqlite",
        "sqlite+aiosqlite": "sqlite+aiosqlite",
        "postgres": "postgresql+asyncpg",
        "postgresql": "postgresql+asyncpg",
        "postgresql+asyncpg": "postgresql+asyncpg",
    }
    if scheme not in drivers:
        raise ConfigError(
            variable,
            f"unsupported scheme {scheme!r} (use sqlite+aiosqlite:///path or postgresql+asyncpg://...)",
        )
    if drivers[scheme].startswith("sqlite"):
        if not parts.path or parts.path == "/":
            raise ConfigError(variable, "a SQLite URL needs a file path, e.g. sqlite:////var/lib/parley.db")
    elif not parts.hostname and "host=" not in parts.query:
        raise ConfigError(variable, "a PostgreSQL URL needs a host")
    return drivers[scheme] + url[len(scheme) :]


def _check_object_store_url(url: str) -> None:
    # One parser for these URLs: the object store's own, so validation cannot drift from use.
    from storage.objects import parse_file_url, parse_s3_url

    variable = "PARLEY_OBJECT_STORE_URL"
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    parsers = {"file": parse_file_url, "s3": parse_s3_url}
    if scheme not in parsers:
        raise ConfigError(variable, f"unsupported scheme {scheme!r} (use file:// or s3://)")
    try:
        parsers[scheme](url)
    except ValueError as exc:
        raise ConfigError(variable, str(exc)) from None


def _check_upstream_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError("PARLEY_UPSTREAM_URL", "is not a valid URL") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(
            "PARLEY_UPSTREAM_URL", "must be a ws:// or wss:// base URL, e.g. ws://127.0.0.1:9000/v1"
        )


def _check_rating_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError("PARLEY_RATING_URL", "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "PARLEY_RATING_URL",
            "must be the http(s) base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1",
        )


def _check_node_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError("PARLEY_NODE_URL", "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(
            "PARLEY_NODE_URL", "must be this node's http(s) base URL, e.g. http://10.0.0.5:8080"
        )


def _load_or_create_key(data_dir: Path) -> Secret:
    """Keep one generated signing key per data dir so tokens survive restarts.

    Several processes may start on one data dir at once (``parley serve --workers``, workers): the
    key is written to a private temporary file first and linked into place in one step, so a
    process either creates the whole file or finds another's whole file, never a partial one.
    """
    path = data_dir / SECRET_KEY_FILE
    if not path.exists():
        key = secrets.token_urlsafe(48)
        tmp = data_dir / f".{SECRET_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(key + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)  # atomic, and fails if another process linked its key first
            return Secret(key)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError("PARLEY_SECRET_KEY", f"cannot create {path}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        key = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigError("PARLEY_SECRET_KEY", f"cannot read {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError("PARLEY_SECRET_KEY", f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    if len(key) < MIN_SECRET_KEY_LEN:
        raise ConfigError("PARLEY_SECRET_KEY", f"{path} holds a key that is too short")
    return Secret(key)
