"""The `parley` command and `make run` as an operator uses them: real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.migrate import head_revision
from tests.leakscan import DETECTORS, find_leaks

ROOT = Path(__file__).resolve().parents[2]
PARLEY = [sys.executable, "-m", "relay"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "OPENAI_"))}
    env.update({"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_PORT": str(free_port()), **extra})
    return env


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (loopback test URL)
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never printed {needle!r}; exit code {proc.poll()}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run_failing(env: dict[str, str], *args: str) -> tuple[float, list[str]]:
    """Run a command expected to fail at start-up; return its run time and its human stderr lines."""
    started = time.monotonic()
    result = subprocess.run([*PARLEY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    human = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    return elapsed, human


def test_migrate_then_serve_answers_and_stops_on_sigterm(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """`parley migrate` then `parley serve` answer /healthz and /readyz, then exit 0 on SIGTERM."""
    env = base_env(tmp_path)
    migrated = subprocess.run(
        [*PARLEY, "migrate"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr
    assert f"empty -> {head_revision()}" in migrated.stdout
    proc = subprocess.Popen(
        [*PARLEY, "serve"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    processes.append(proc)
    line = wait_for_line(proc, "Parley is serving on")
    url = f"http://127.0.0.1:{env['PARLEY_PORT']}"
    assert url in line
    assert get(f"{url}/healthz") == (200, {"status": "ok"})
    assert get(f"{url}/readyz") == (200, {"database": "ok", "objects": "ok", "upstream": "simulator"})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None
    log_lines = proc.stderr.read().splitlines()
    events = [json.loads(log_line)["event"] for log_line in log_lines]  # every log line is one JSON object
    assert "serve.started" in events and "serve.stopped" in events
    # The leak scan of the test run (tests/test_leak_scan.py) sees only this process's records; the
    # logs of the real processes are scanned here, with the same detectors.
    found = find_leaks("\n".join([*log_lines, *migrated.stderr.splitlines()]), "parley stderr", DETECTORS)
    assert not found, "\n".join(map(str, found))


def test_serve_refuses_a_database_that_was_not_migrated(tmp_path: Path) -> None:
    """`parley serve` on an empty database exits 2 with one line telling to run `parley migrate`."""
    env = base_env(tmp_path)
    _, human = run_failing(env, "serve")
    assert len(human) == 1
    assert human[0].startswith("parley: PARLEY_DATABASE_URL: ") and "parley migrate" in human[0]
    with socket.socket() as s:  # nothing half-started: the port is free
        s.bind(("127.0.0.1", int(env["PARLEY_PORT"])))


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_unreachable_database_fails_fast_naming_the_variable(tmp_path: Path, command: str) -> None:
    """An unreachable PostgreSQL stops the start within seconds with one line naming the variable."""
    env = base_env(tmp_path, PARLEY_DATABASE_URL="postgresql://parley:pw-canary@127.0.0.1:1/parley")
    elapsed, human = run_failing(env, command)
    assert len(human) == 1
    assert human[0].startswith("parley: PARLEY_DATABASE_URL: cannot reach the database")
    assert "pw-canary" not in human[0]
    assert elapsed < 20


def test_unparseable_url_fails_with_one_line(tmp_path: Path) -> None:
    """A malformed URL fails before anything starts, with exactly one line on stderr."""
    env = base_env(tmp_path, PARLEY_OBJECT_STORE_URL="s3://key:secret-canary@minio:notaport/bucket")
    result = subprocess.run([*PARLEY, "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("parley: PARLEY_OBJECT_STORE_URL: ")
    assert "secret-canary" not in lines[0]


def test_unreachable_object_store_fails_fast_naming_the_variable(tmp_path: Path) -> None:
    """An S3 endpoint that does not answer stops `parley serve` with one line naming the variable."""
    env = base_env(tmp_path, PARLEY_OBJECT_STORE_URL="s3://ak:sk-canary@127.0.0.1:1/audio?secure=false")
    subprocess.run([*PARLEY, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True, timeout=60)
    elapsed, human = run_failing(env, "serve")
    assert len(human) == 1
    assert human[0].startswith("parley: PARLEY_OBJECT_STORE_URL: cannot use the object store")
    assert "sk-canary" not in human[0]
    assert elapsed < 30


def test_make_run_serves_on_embedded_defaults(tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    """The README's `make run` migrates and serves; /readyz names database and objects."""
    env = base_env(tmp_path)
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    processes.append(proc)
    wait_for_line(proc, "Parley is serving on", timeout=300)
    url = f"http://127.0.0.1:{env['PARLEY_PORT']}"
    assert get(f"{url}/healthz") == (200, {"status": "ok"})
    status, body = get(f"{url}/readyz")
    assert status == 200 and body["database"] == "ok" and body["objects"] == "ok"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)  # make and parley stop on SIGTERM
