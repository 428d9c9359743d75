"""The local spool: segments wait here between the encoder and the object store.

Layout: ``<root>/<session_id>/<track>/<seq:06d>.ogg.part`` while a segment is written, renamed to
``.ogg`` when closed. The upstream event log (JSON lines, audio payloads removed) goes the same way
as ``<root>/<session_id>/events/<seq:06d>.jsonl.part``, renamed to ``.jsonl``.
``<root>/<session_id>/gaps.jsonl`` lists gaps and losses as they happen, and
``<root>/<session_id>/closed`` marks a session whose recorder finalized (its leftovers are uploads
still owed, not a crash). :class:`Spool` keeps the byte count used for the budget and metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "CLOSED_MARKER",
    "EVENTS_DIR",
    "GAPS_FILE",
    "Spool",
    "SpoolSegment",
    "event_log_key",
    "object_key",
    "scan",
    "scan_event_logs",
    "truncate_to_last_line",
]

PART_SUFFIX: Final = ".ogg.part"
DONE_SUFFIX: Final = ".ogg"
EVENTS_DIR: Final = "events"
EVENTS_PART_SUFFIX: Final = ".jsonl.part"
EVENTS_DONE_SUFFIX: Final = ".jsonl"
GAPS_FILE: Final = "gaps.jsonl"
CLOSED_MARKER: Final = "closed"


def object_key(session_id: str, track: str, seq: int) -> str:
    return f"sessions/{session_id}/audio/{track}/{seq:06d}.ogg"


def event_log_key(session_id: str, seq: int) -> str:
    return f"sessions/{session_id}/{EVENTS_DIR}/{seq:06d}{EVENTS_DONE_SUFFIX}"


class Spool:
    """The spool directory and its size (thread-safe counter, seeded from disk)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        self._bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    def used(self) -> int:
        with self._lock:
            return self._bytes

    def add(self, n: int) -> None:
        with self._lock:
            self._bytes = max(0, self._bytes + n)

    def segment_path(self, session_id: str, track: str, seq: int, *, part: bool) -> Path:
        return self.root / session_id / track / f"{seq:06d}{PART_SUFFIX if part else DONE_SUFFIX}"

    def event_log_path(self, session_id: str, seq: int, *, part: bool) -> Path:
        suffix = EVENTS_PART_SUFFIX if part else EVENTS_DONE_SUFFIX
        return self.root / session_id / EVENTS_DIR / f"{seq:06d}{suffix}"

    def append_gap(self, session_id: str, record: Mapping[str, object]) -> None:
        """Durably note a gap/loss for recovery (called from the encoder thread)."""
        path = self.root / session_id / GAPS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with path.open("ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.add(len(line))

    def mark_closed(self, session_id: str, status: str) -> None:
        path = self.root / session_id / CLOSED_MARKER
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(status)

    def remove(self, path: Path) -> None:
        """Delete one spool file and account for it."""
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.add(-size)

    def prune_session(self, session_id: str) -> bool:
        """Remove a session's directory if no segment (or event log) is left in it; returns whether it
        was removed."""
        base = self.root / session_id
        if any(
            any(base.glob(f"*/*{suffix}"))
            for suffix in (DONE_SUFFIX, PART_SUFFIX, EVENTS_DONE_SUFFIX, EVENTS_PART_SUFFIX)
        ):
            return False
        for extra in (base / GAPS_FILE, base / CLOSED_MARKER):
            self.remove(extra)
        for track_dir in base.glob("*"):
            with contextlib.suppress(OSError):
                track_dir.rmdir()
        with contextlib.suppress(OSError):
            base.rmdir()
        return True

    def remove_session(self, session_id: str) -> None:
        """Delete everything of a session (it was deleted: delete means gone)."""
        base = self.root / session_id
        for path in sorted(base.rglob("*"), reverse=True):
            if path.is_file():
                self.remove(path)
            else:
                with contextlib.suppress(OSError):
                    path.rmdir()
        with contextlib.suppress(OSError):
            base.rmdir()


@dataclass(frozen=True, slots=True)
class SpoolSegment:
    session_id: str
    track: str
    seq: int
    path: Path
    part: bool


def scan(root: Path) -> list[SpoolSegment]:
    """Every segment in the spool, by session, track and seq."""
    out: list[SpoolSegment] = []
    if not root.is_dir():
        return out
    for session_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for track_dir in sorted(p for p in session_dir.iterdir() if p.is_dir()):
            for path in sorted(track_dir.iterdir()):
                name = path.name
                part = name.endswith(PART_SUFFIX)
                if not part and not name.endswith(DONE_SUFFIX):
                    continue
                stem = name[: -len(PART_SUFFIX)] if part else name[: -len(DONE_SUFFIX)]
                if stem.isdigit():
                    out.append(SpoolSegment(session_dir.name, track_dir.name, int(stem), path, part))
    return out


def scan_event_logs(root: Path) -> list[SpoolSegment]:
    """Every upstream event log in the spool, by session and seq (``track`` is ``"events"``)."""
    out: list[SpoolSegment] = []
    if not root.is_dir():
        return out
    for session_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        events_dir = session_dir / EVENTS_DIR
        if not events_dir.is_dir():
            continue
        for path in sorted(events_dir.iterdir()):
            name = path.name
            part = name.endswith(EVENTS_PART_SUFFIX)
            if not part and not name.endswith(EVENTS_DONE_SUFFIX):
                continue
            stem = name[: -len(EVENTS_PART_SUFFIX)] if part else name[: -len(EVENTS_DONE_SUFFIX)]
            if stem.isdigit():
                out.append(SpoolSegment(session_dir.name, EVENTS_DIR, int(stem), path, part))
    return out


def truncate_to_last_line(path: Path) -> int:
    """Cut a ``.jsonl.part`` left by a crash after its last complete line; returns the bytes kept.

    Lines are appended whole and synced every second, so what follows the last newline is a line
    the crash interrupted (or file system padding) and is dropped.
    """
    with path.open("r+b") as fh:
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return keep


def read_gaps(root: Path, session_id: str) -> list[dict[str, object]]:
    path = root / session_id / GAPS_FILE
    out: list[dict[str, object]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out
