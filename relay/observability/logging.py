"""Structured, allow-listed JSON logs: one object per line.

Parley's own records carry an event name as their message and facts in ``extra``; only keys on
:data:`ALLOWED_FIELDS` reach the output, so a careless ``extra={"sdp": ...}`` is dropped rather than
leaked. Records from libraries (aiohttp, aiortc, aioice, ...) keep only their unformatted message
template, never their arguments (which hold addresses, SDP and payloads), and every string that
leaves passes through :func:`scrub` as a last line of defence. A library message without arguments
was formatted by the library itself (asyncio's "Task exception was never retrieved" carries the
task's repr and the exception's message): only its leading words are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

__all__ = [
    "ALLOWED_FIELDS",
    "ContextLogger",
    "JsonFormatter",
    "configure_logging",
    "hash_id",
    "json_handler",
    "log_failure",
    "scrub",
    "set_levels",
]

ALLOWED_FIELDS: Final = frozenset(
    {
        # ids (user ids only hashed, see hash_id)
        "session_id", "peer_id", "user", "topic_id", "job_id", "item_id", "response_id", "request_id",
        "node_id", "worker_id", "key_id", "jti_hash",
        # states, codes, kinds
        "status", "state", "from_state", "to_state", "code", "reason", "kind", "track", "outcome",
        "method", "route", "http_status", "backend", "upstream", "component", "direction", "close_code",
        "error_type",
        # numbers
        "duration_ms", "count", "bytes", "attempt", "max_attempts", "delay_ms", "lag_ms", "port",
        "sessions", "frames", "seq", "limit", "retry_after_s", "revision", "skipped",
    }
)  # fmt: skip

_REDACTIONS: Final = (
    (re.compile(r"\beyJ[\w-]*\.[\w-]*\.[\w-]*"), "<jwt>"),
    (re.compile(r"\b(?:sk|ek|pk|rk)[-_][\w-]{8,}"), "<key>"),
    (re.compile(r"\bpk_[\w-]{8,}"), "<key>"),
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "<email>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), "<ip>"),
    # IPv6, compressed forms included; may also catch clock times, which is the safe side to err on.
    (re.compile(r"(?<![\w:])[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7}(?![\w:])"), "<ip>"),
    (re.compile(r"(?i)\b(?:X-Amz-Signature|X-Amz-Credential|Signature|token|password|secret)=[^&\s]+"),
     "<param>"),
    (re.compile(r"(?i)\bBearer\s+\S+"), "Bearer <token>"),
    (re.compile(r"(?m)^a=(?:candidate|fingerprint|ice-ufrag|ice-pwd).*$"), "<sdp>"),
)  # fmt: skip

# Where a message a library formatted itself turns into data: a new line, a colon, a bracket, a quote.
_DATA_STARTS: Final = re.compile(r"""[\n:(<\[{='"]""")

_STD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def scrub(text: str) -> str:
    """Replace anything that looks like a credential, address or contact with a placeholder."""
    for pattern, placeholder in _REDACTIONS:
        text = pattern.sub(placeholder, text)
    return text


def _leading_words(message: str) -> str:
    """The wording of a message a library formatted before logging, without the data in it.

    asyncio, for one, logs ``"Task exception was never retrieved\nfuture: <Task ... exception=
    ValueError('<whatever the exception said>')>"`` and ``"Exception in callback f(<args>)"`` as
    ready-made strings: there is no template to keep, so only the words before the data are.
    """
    return _DATA_STARTS.split(message, 1)[0].rstrip() or "(preformatted)"


def hash_id(value: str, *, key: bytes = b"parley-log") -> str:
    """A short, stable, non-reversible tag for a user id, so logs can be correlated but not joined."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object with only allow-listed fields."""

    def __init__(self, own_prefixes: tuple[str, ...] = ("relay", "storage", "parley")) -> None:
        super().__init__()
        self._own = own_prefixes

    def format(self, record: logging.LogRecord) -> str:
        own = record.name.split(".", 1)[0] in self._own
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        # Library records: the template only, never the arguments that fill it.
        if not isinstance(record.msg, str):
            out["event"] = type(record.msg).__name__
        elif own or record.args:
            out["event"] = scrub(record.msg)
        else:
            out["event"] = scrub(_leading_words(record.msg))
        if own:
            out.update(_allowed(record.__dict__))
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type says what went wrong; its message may carry payloads, so it stays out.
            out["error_type"] = record.exc_info[0].__name__
        return json.dumps(out, separators=(",", ":"), default=str)


def _allowed(attrs: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in _STD_ATTRS or key not in ALLOWED_FIELDS:
            continue
        if isinstance(value, (bool, int, float)) or value is None:
            result[key] = value
        else:
            result[key] = scrub(str(value))
    return result


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    """The handler Parley logs through: one :class:`JsonFormatter` line per record on ``stream``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


def set_levels(level: str) -> None:
    """The root level, and the libraries kept quieter than it (or off) whatever the level."""
    logging.getLogger().setLevel(level)
    # aiohttp's access log formats the client address into the message; Parley logs requests itself.
    logging.getLogger("aiohttp.access").disabled = True
    # These libraries log SDP, candidates and frames at DEBUG; keep them quiet even when we debug.
    for noisy in ("aioice", "aiortc", "websockets", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.INFO))
    # urllib3 (under the minio client) formats the object store's address into its retry warnings
    # ("Retrying ... HTTPConnection(host='10.0.0.5', ...)"), which any handler other than ours would
    # print; the uploader ("uploader.retry") and /readyz report object-store failures themselves.
    logging.getLogger("urllib3").setLevel(max(logging.getLevelName(level), logging.ERROR))


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Route every logger through one JSON handler on ``stream`` (stderr by default)."""
    handler = json_handler(stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_levels(level)
    return handler


class ContextLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger carrying fixed fields (e.g. ``session_id``) merged with each call's ``extra``.

    Python 3.11's ``LoggerAdapter`` replaces a call's ``extra`` with its own; this one merges them.
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def log_failure(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    event: str,
    exc: BaseException,
    *,
    expected: tuple[type[BaseException], ...],
    extra: Mapping[str, object] | None = None,
) -> None:
    """Log a failure of a background loop: an ``expected`` one (a dependency is down) by its class
    only, since its text names hosts and ports; anything else with its traceback, to be fixed."""
    fields = dict(extra or {})
    if isinstance(exc, expected):
        logger.warning(event, extra={**fields, "error_type": type(exc).__name__})
    else:
        logger.error(event, extra=fields, exc_info=exc)
