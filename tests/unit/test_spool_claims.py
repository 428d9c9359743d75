"""Spool claims (storage/spool_claims.py): one writer per spool, and only a dead writer's spool is
ever handed to recovery. ``flock`` locks belong to open files, so two claims in one test process
behave as two processes would."""

from __future__ import annotations

import os
from pathlib import Path

from relay.cluster.workers import default_workers
from storage.spool_claims import LOCK_FILE, NODE_SPOOLS, SHARED_SPOOL, claim_orphans, claim_spool


def test_the_first_process_takes_the_shared_spool_and_the_next_its_own(tmp_path: Path) -> None:
    """The first claim is <data>/spool (as a single process always had); a second gets spools/<id>."""
    first = claim_spool(tmp_path, "vm-1-aaaaaa")
    second = claim_spool(tmp_path, "vm-2-bbbbbb")
    try:
        assert first.path == tmp_path / SHARED_SPOOL
        assert second.path == tmp_path / NODE_SPOOLS / "vm-2-bbbbbb"
        assert (second.path / LOCK_FILE).exists()
        assert not (tmp_path / NODE_SPOOLS / ".vm-2-bbbbbb").exists()
    finally:
        first.release()
        second.release()


def test_a_live_writers_spool_is_never_an_orphan(tmp_path: Path) -> None:
    """While both writers hold their spools, neither is offered to the other for recovery."""
    first = claim_spool(tmp_path, "vm-1-aaaaaa")
    second = claim_spool(tmp_path, "vm-2-bbbbbb")
    try:
        assert claim_orphans(tmp_path, own=first.path) == []
        assert claim_orphans(tmp_path, own=second.path) == []
    finally:
        first.release()
        second.release()


def test_a_released_spool_is_claimed_once_and_an_emptied_one_removed(tmp_path: Path) -> None:
    """A dead writer's spool goes to one recoverer at a time; removed after recovery, it is gone."""
    own = claim_spool(tmp_path, "vm-1-aaaaaa")
    dead = claim_spool(tmp_path, "vm-2-bbbbbb")
    dead.release()  # as the kernel does when the process dies
    try:
        (orphan,) = claim_orphans(tmp_path, own=own.path)
        assert orphan.path == dead.path
        assert claim_orphans(tmp_path, own=own.path) == []  # held by the first recoverer
        orphan.release(remove=True)
        orphan.release(remove=True)  # idempotent
        assert not dead.path.exists()
        assert claim_orphans(tmp_path, own=own.path) == []
    finally:
        own.release()


def test_a_dead_first_process_leaves_the_shared_spool_to_recover_and_reuse(tmp_path: Path) -> None:
    """The shared spool of a dead first process is recoverable by a sibling and taken by the next start."""
    first = claim_spool(tmp_path, "vm-1-aaaaaa")
    second = claim_spool(tmp_path, "vm-2-bbbbbb")
    first.release()
    try:
        (orphan,) = claim_orphans(tmp_path, own=second.path)
        assert orphan.path == tmp_path / SHARED_SPOOL
        orphan.release()
        third = claim_spool(tmp_path, "vm-3-cccccc")
        assert third.path == tmp_path / SHARED_SPOOL
        third.release()
    finally:
        second.release()


def test_default_workers_is_one_per_usable_core() -> None:
    """`--workers` defaults to the cores this process may run on (at least one)."""
    assert 1 <= default_workers() <= len(os.sched_getaffinity(0))
