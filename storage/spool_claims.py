"""Which spool directory each ``parley serve`` process on a data dir writes, and whose are orphaned.

Several processes may share one data dir (``parley serve --workers N``, or two started by hand).
Each writes its own spool, and holds an exclusive ``flock`` on ``<spool>/.lock`` for as long as it
runs. The kernel releases the lock when the process dies, however it dies (SIGKILL included), so
on one machine the lock is the exact answer to "is this spool's writer alive?": a process recovers
another spool only after taking its lock, and never while its writer lives.

Layout under the data dir: ``spool/`` (the first process takes it, as a single process always
has) and ``spools/<node id>/`` for every further process. A per-node directory is locked before it
appears under its name (made as ``spools/.<node id>/``, locked, renamed), so no other process can
take a new directory for an orphan. The data dir must be on a local disk: ``flock`` over NFS is not
this guarantee.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = ["LOCK_FILE", "NODE_SPOOLS", "SHARED_SPOOL", "SpoolClaim", "claim_orphans", "claim_spool"]

SHARED_SPOOL: Final = "spool"
NODE_SPOOLS: Final = "spools"
LOCK_FILE: Final = ".lock"
STAGING_GRACE_S: Final = 60.0


@dataclass(slots=True)
class SpoolClaim:
    """A spool directory this process holds the lock of; :meth:`release` is idempotent."""

    path: Path
    _fd: int | None = field(default=None, repr=False)

    def release(self, *, remove: bool = False) -> None:
        """Give the lock back; with ``remove``, first delete the (emptied) per-node directory."""
        if self._fd is None:
            return
        try:
            if remove:
                # Under the lock, so no one is between taking it and using the directory.
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.path.rmdir()
        finally:
            os.close(self._fd)
            self._fd = None


def _try_lock(directory: Path) -> int | None:
    """An fd holding the exclusive lock of ``directory``'s lock file, or None if another holds it.

    After a process removed an orphan directory, a lock taken on its unlinked lock file is worth
    nothing: the lock must still be the file at its path.
    """
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None  # the directory went meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def claim_spool(data_dir: Path, node_id: str) -> SpoolClaim:
    """This process's spool: ``<data dir>/spool`` if no live process holds it, else a new
    ``<data dir>/spools/<node_id>``."""
    shared = data_dir / SHARED_SPOOL
    shared.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(shared)
    if fd is not None:
        return SpoolClaim(shared, fd)
    nodes = data_dir / NODE_SPOOLS
    nodes.mkdir(parents=True, exist_ok=True)
    staging = nodes / f".{node_id}"
    staging.mkdir()
    fd = _try_lock(staging)
    if fd is None:  # a fresh directory only this process knows of
        raise RuntimeError("cannot lock a new spool directory")
    final = nodes / node_id
    staging.rename(final)
    return SpoolClaim(final, fd)


def claim_orphans(data_dir: Path, *, own: Path) -> list[SpoolClaim]:
    """Lock each spool on this data dir whose writer is gone (never ``own``); blocking file I/O.

    The caller recovers each returned spool, then releases it. A staging directory a process died
    in before naming it (``spools/.<id>``) is removed once it is lockable and a minute old (younger,
    its process may be about to lock it).
    """
    candidates = [data_dir / SHARED_SPOOL]
    nodes = data_dir / NODE_SPOOLS
    if nodes.is_dir():
        candidates += sorted(p for p in nodes.iterdir() if p.is_dir())
    claims: list[SpoolClaim] = []
    for directory in candidates:
        if directory == own or not directory.is_dir():
            continue
        staging = directory.name.startswith(".")
        with contextlib.suppress(OSError):
            if staging and time.time() - directory.stat().st_mtime < STAGING_GRACE_S:
                continue
        fd = _try_lock(directory)
        if fd is None:
            continue
        claim = SpoolClaim(directory, fd)
        if staging:
            shutil.rmtree(directory, ignore_errors=True)
            claim.release()
            continue
        claims.append(claim)
    return claims
