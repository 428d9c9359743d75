"""Leak scan (the seed's SC-004): keys, tokens, addresses, emails and planted text found anywhere
they must not be: in the web client's files and in the log output of the whole test run.

A pytest plugin (loaded by ``tests/conftest.py``) and the detectors it shares with
``tests/test_leak_scan.py``:

- **Capture.** From start-up on, :class:`LogCapture` sits on the root logger and writes each record
  into a temporary JSON-lines file twice over: as the app's own handler renders it
  (:func:`relay.observability.logging.json_handler`: the allow-list and scrubbing applied, i.e. what
  ``parley serve`` emits), and, from WARNING up, as Python's plain stderr formatter renders it
  (message with its arguments, traceback included: what reaches stderr wherever the JSON handler is
  not installed). Each line names the logger and the test that was running. Levels follow the app's
  policy (:func:`relay.observability.logging.set_levels`) at INFO, with Parley's own loggers at
  DEBUG. Tests that swap the root handlers on purpose to plant canaries in records
  (``tests/integration/test_log_canaries.py``) check their own output; the handler is put back
  before every test in case one does not restore it. ``PARLEY_TEST_LOG_CAPTURE=path`` keeps the
  capture after the run.
- **Order.** The test marked ``leak_scan_last`` runs after every other collected test.
- **Detectors.** :data:`DETECTORS` and :func:`find_leaks`; findings carry a redacted excerpt only, so
  a failing scan does not leak what it found into CI output.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from relay.observability.logging import json_handler, set_levels

__all__ = [
    "DETECTORS",
    "LAST_MARKER",
    "STATIC_DETECTORS",
    "Detector",
    "Finding",
    "LogCapture",
    "capture",
    "find_leaks",
    "iter_log_capture",
    "planted_detector",
    "scan_log_capture",
    "scan_tree",
]

LAST_MARKER: Final = "leak_scan_last"
# The app's policy at its default level, with Parley's own loggers at DEBUG. Libraries stay at INFO:
# their DEBUG records are framework chatter (aiosqlite traces every statement) whose JSON rendering
# keeps only the constant template, and capturing them would flood every failing test's report.
CAPTURE_LEVEL: Final = "INFO"
OWN_LOGGERS: Final = ("relay", "storage", "parley")
EXCERPT_CONTEXT: Final = 32
# Set to a path to keep the capture after the run (e.g. as a CI artifact); by default it is removed.
KEEP_ENV: Final = "PARLEY_TEST_LOG_CAPTURE"


# --- detectors ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    pattern: re.Pattern[str]
    # Given the match and the text it is in: is it a real finding? (The exceptions, each justified.)
    accept: Callable[[re.Match[str], str], bool] = lambda m, text: True


@dataclass(frozen=True, slots=True)
class Finding:
    pattern: str
    excerpt: str
    where: str

    def __str__(self) -> str:
        return f"{self.pattern:<14} {self.where}: {self.excerpt}"


def _valid_ipv4(match: re.Match[str], text: str) -> bool:
    try:
        address = ipaddress.IPv4Address(match.group())
    except ValueError:
        return False  # an octet over 255 (a version such as 120.0.6099.109), or leading zeros
    # 0.0.0.0 is "every interface" (a bind address), never anyone's address.
    if address.is_unspecified:
        return False
    # A version number, said so by its context ("version 1.2.3.4", "v1.2.3.4" is excluded by the
    # pattern's left boundary), is not an address. Every other dotted quad of valid octets is a
    # finding, loopback included: tests only ever talk over 127.0.0.1, so exempting it would make
    # the address check blind in exactly the run that is scanned.
    before = text[max(0, match.start() - 12) : match.start()]
    return not re.search(r"(?i)\b(?:version|ver|v)[\s:=/]*$", before)


def _valid_ipv6(match: re.Match[str], text: str) -> bool:
    candidate = match.group().rstrip(".")
    if candidate.count(":") < 2:
        return False
    try:
        address = ipaddress.IPv6Address(candidate)
    except ValueError:
        return False  # clock times (12:02:03), "::" in code, hex runs that are not an address
    return not address.is_unspecified  # "::" alone is "every interface", like 0.0.0.0


# File extensions that follow "@" in asset names such as icon@2x.png (a density suffix, not a mail).
_ASSET_SUFFIXES: Final = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "avif", "ico", "js", "css"})


# Domains reserved for documentation and testing (RFC 2606, RFC 6761): nobody's mailbox.
_RESERVED_DOMAINS: Final = re.compile(
    r"(?i)(?:^|\.)(?:example\.(?:com|org|net)|[\w-]+\.(?:test|example|invalid))$"
)


def _real_email(match: re.Match[str], text: str) -> bool:
    return match.group().rsplit(".", 1)[-1].lower() not in _ASSET_SUFFIXES


def _real_email_not_placeholder(match: re.Match[str], text: str) -> bool:
    domain = match.group().rsplit("@", 1)[-1]
    return _real_email(match, text) and not _RESERVED_DOMAINS.search(domain)


_EMAIL: Final = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


DETECTORS: Final[tuple[Detector, ...]] = (
    # The left boundaries keep words that merely contain the prefix ("task-", "seek_") out.
    Detector("openai_key", re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{16,}")),
    Detector("ephemeral_key", re.compile(r"(?<![A-Za-z0-9])ek_[A-Za-z0-9]{8,}")),
    Detector("jwt", re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")),
    Detector("presigned_url", re.compile(r"(?i)X-Amz-(?:Signature|Credential)")),
    # In logs every address is a finding, example.org included: the tests' accounts all use it.
    Detector("email", _EMAIL, _real_email),
    # Not part of a longer dotted number (1.2.3.4.5) nor glued to a word (v1.2.3.4, build1.2.3.4).
    Detector("ipv4", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)(?!\w)"), _valid_ipv4),
    Detector("ipv6", re.compile(r"(?<![\w:.])[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*(?![\w:])"), _valid_ipv6),
    # Every secret and sentence the tests plant is called a canary (tests/integration/test_log_canaries.py,
    # test_cli.py, test_config.py, test_oidc.py); none of Parley's own output says the word.
    Detector("canary", re.compile(r"(?i)canary")),
)


#: For static files (the web client): a placeholder such as you@example.org in a form names nobody.
STATIC_DETECTORS: Final[tuple[Detector, ...]] = tuple(
    Detector("email", _EMAIL, _real_email_not_placeholder) if d.name == "email" else d for d in DETECTORS
)


def planted_detector(texts: Iterable[str]) -> Detector:
    """A detector for literal planted text (transcript sentences), also JSON- or HTML-escaped."""
    variants: set[str] = set()
    for text in texts:
        variants.update({text, json.dumps(text)[1:-1], html.escape(text)})
    alternatives = "|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True) if v)
    return Detector("planted_text", re.compile(f"(?i)(?:{alternatives})"))


def find_leaks(text: str, where: str, detectors: Sequence[Detector]) -> list[Finding]:
    """Every finding of ``detectors`` in ``text``, each with an excerpt in which findings are masked."""
    found: list[Finding] = []
    for detector in detectors:
        for match in detector.pattern.finditer(text):
            if match.group() and detector.accept(match, text):
                found.append(Finding(detector.name, _excerpt(text, match, detectors), where))
    return found


def _excerpt(text: str, match: re.Match[str], detectors: Sequence[Detector]) -> str:
    start, end = max(0, match.start() - EXCERPT_CONTEXT), min(len(text), match.end() + EXCERPT_CONTEXT)
    # Mask every stretch any detector matches in the whole text (a planted sentence only matches
    # whole), clipped to the window, overlaps merged.
    spans = sorted(
        (max(m.start(), start), min(m.end(), end), d.name)
        for d in detectors
        for m in d.pattern.finditer(text)
        if m.end() > start and m.start() < end and m.group() and d.accept(m, text)
    )
    out, at = [], start
    for s, e, name in spans:
        if e <= at:
            continue
        s = max(s, at)
        out.append(text[at:s])
        out.append(_mask(name, text[s:e]))
        at = e
    out.append(text[at:end])
    return "…" + "".join(out).replace("\n", " ") + "…"


def _mask(name: str, value: str) -> str:
    return f"<{name}:{value[:3]}…{len(value)}ch>"


def scan_tree(
    root: Path, detectors: Sequence[Detector], *, skip_dirs: Iterable[str] = ()
) -> tuple[int, list[Finding]]:
    """Scan every regular file under ``root`` (symbolic links and ``skip_dirs`` left out).

    Returns how many files were read and what was found in them; binary files are read as text
    with undecodable bytes dropped, so a key inside a source map or a wasm blob is still seen.
    """
    skip = set(skip_dirs)
    files = 0
    findings: list[Finding] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            files += 1
            text = path.read_bytes().decode("utf-8", errors="ignore")
            findings.extend(find_leaks(text, str(path.relative_to(root)), detectors))
    return files, findings


# --- capture -----------------------------------------------------------------------------------


class LogCapture(logging.Handler):
    """Writes each record as the app's handler renders it, and WARNING+ also as plain stderr text."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.NOTSET)
        self.path = path
        self.test = "<collection>"
        self.records = 0
        self._app = json_handler()  # formats only; never emits
        self._raw = logging.Formatter()  # what logging.lastResort / a bare StreamHandler prints
        self._file = path.open("a", encoding="utf-8")
        self._write_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entries: list[tuple[str, str]] = []
            if self._app.filter(record):
                entries.append(("json", self._app.format(record)))
            if record.levelno >= logging.WARNING:
                entries.append(("raw", self._raw.format(record)))
            lines = "".join(
                json.dumps({"stream": stream, "logger": record.name, "test": self.test, "text": text}) + "\n"
                for stream, text in entries
            )
            with self._write_lock:
                self._file.write(lines)
                self._file.flush()
                self.records += 1
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self._write_lock:
            if not self._file.closed:
                self._file.close()
        self._app.close()
        super().close()


_capture: LogCapture | None = None


def capture() -> LogCapture:
    """The capture of this run (installed at start-up)."""
    assert _capture is not None, "tests.leakscan is not loaded as a plugin"
    return _capture


def _install(handler: LogCapture) -> None:
    root = logging.getLogger()
    if handler not in root.handlers:
        root.addHandler(handler)
    if root.level != logging.getLevelName(CAPTURE_LEVEL):
        set_levels(CAPTURE_LEVEL)
    for name in OWN_LOGGERS:
        own = logging.getLogger(name)
        if own.getEffectiveLevel() > logging.DEBUG:
            own.setLevel(logging.DEBUG)


def iter_log_capture(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def scan_log_capture(path: Path, detectors: Sequence[Detector]) -> tuple[int, list[Finding]]:
    """Scan every captured line: the rendered text, and (JSON lines) each decoded string in it."""
    lines = 0
    findings: list[Finding] = []
    for entry in iter_log_capture(path):
        lines += 1
        where = f"{entry['stream']} {entry['logger']} (during {entry['test']})"
        texts = [entry["text"]]
        if entry["stream"] == "json":
            texts.extend(_strings(json.loads(entry["text"])))
        seen: set[str] = set()  # one finding per pattern and line (raw and decoded text overlap)
        for text in texts:
            for finding in find_leaks(text, where, detectors):
                if finding.pattern not in seen:
                    seen.add(finding.pattern)
                    findings.append(finding)
    return lines, findings


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


# --- pytest hooks ------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    global _capture
    config.addinivalue_line("markers", f"{LAST_MARKER}: runs after every other test (the log leak scan)")
    kept = os.environ.get(KEEP_ENV)
    if kept:
        path = Path(kept)
        path.write_text("")
    else:
        fd, name = tempfile.mkstemp(prefix="parley-log-capture-", suffix=".jsonl")
        os.close(fd)
        path = Path(name)
    _capture = LogCapture(path)
    _install(_capture)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _capture
    if _capture is None:
        return
    logging.getLogger().removeHandler(_capture)
    _capture.close()
    if not os.environ.get(KEEP_ENV):
        _capture.path.unlink(missing_ok=True)
    _capture = None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # trylast: after every other reordering; a stable sort keeps the rest in their order.
    items.sort(key=lambda item: item.get_closest_marker(LAST_MARKER) is not None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    if _capture is not None:
        _capture.test = item.nodeid
        _install(_capture)
    try:
        return (yield)
    finally:
        if _capture is not None:
            _capture.test = "<between tests>"
