"""pytest plugin: a real S3-compatible server (moto) and object stores on both backends.

Loaded with ``pytest_plugins = ["tests.fixtures_s3"]`` in ``tests/conftest.py`` (or ``-p tests.fixtures_s3``).

* ``s3_server`` (session): starts ``moto_server`` as a subprocess on a free 127.0.0.1 port and yields
  ``s3://test:test@127.0.0.1:PORT/parley?secure=false`` (use :func:`with_bucket` for another
  bucket). If it cannot start, every test using it FAILS with the server's log; it never skips.
  moto checks no credentials or signatures: tests against it do not cover authentication.
* ``s3_store_url``: that URL with a fresh, not yet created bucket; the bucket is emptied and removed
  afterwards.
* ``local_store`` / ``s3_store``: a set-up store of each kind, closed afterwards.
* ``object_store``: parametrised over ``"file"`` and ``"s3"``; the S3 server only starts for ``s3``.
"""

from __future__ import annotations

import http.client
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from storage.objects import LocalObjectStore, ObjectStore, S3ObjectStore, open_object_store

S3_ACCESS_KEY = "test"
S3_SECRET_KEY = "test"
_STARTUP_TIMEOUT_S = 20.0


def free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_udp_range(size: int) -> tuple[int, int]:
    """``size`` consecutive UDP ports on 127.0.0.1 that were all free a moment ago (low, high)."""
    rng = random.Random()
    for _ in range(200):
        # Below the kernel's ephemeral range (32768+), so no other socket grabs a port meanwhile.
        low = rng.randrange(20000, 32000 - size)
        socks: list[socket.socket] = []
        try:
            for port in range(low, low + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return low, low + size - 1
    raise AssertionError("no free port range found")


def with_bucket(url: str, bucket: str) -> str:
    """``url`` (an ``s3://`` URL) pointing at ``bucket`` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{bucket}"))


def fresh_bucket_name() -> str:
    return f"test-{secrets.token_hex(6)}"


def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server process on 127.0.0.1 for the whole session; yields an s3:// URL for it."""
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    failures: list[str] = []
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_loopback_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                _moto_command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None and not _answers(port):
            time.sleep(0.1)
        if proc.poll() is None and _answers(port):
            break
        _stop(proc)
        failures.append(f"port {port}: exit code {proc.returncode}")
    else:
        pytest.fail(
            "could not start the S3 test server (moto_server from moto[server]; `make venv` installs it): "
            f"{'; '.join(failures)}\n--- {log_path} ---\n{_tail(log_path)}",
            pytrace=False,
        )
    try:
        yield f"s3://{S3_ACCESS_KEY}:{S3_SECRET_KEY}@127.0.0.1:{port}/parley?secure=false"
    finally:
        _stop(proc)


def _remove_bucket(url: str) -> None:
    parts = urlsplit(url)
    client = Minio(f"{parts.hostname}:{parts.port}", S3_ACCESS_KEY, S3_SECRET_KEY, secure=False)
    bucket = parts.path.strip("/")
    try:
        if not client.bucket_exists(bucket):
            return
        names = [o.object_name for o in client.list_objects(bucket, recursive=True)]
        for _error in client.remove_objects(bucket, (DeleteObject(n) for n in names)):
            pass
        client.remove_bucket(bucket)
    except S3Error:
        pass  # best effort: the server is wiped when the session ends anyway


@pytest.fixture
def s3_store_url(s3_server: str) -> Iterator[str]:
    """An s3:// URL on the test server with a fresh bucket (not created yet), removed afterwards."""
    url = with_bucket(s3_server, fresh_bucket_name())
    yield url
    _remove_bucket(url)


@pytest.fixture
async def s3_store(s3_store_url: str) -> AsyncIterator[S3ObjectStore]:
    """A set-up S3 object store on its own bucket of the test server."""
    store = S3ObjectStore.from_url(s3_store_url)
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[LocalObjectStore]:
    """A set-up local object store rooted in ``tmp_path / "objects"``."""
    store = LocalObjectStore(tmp_path / "objects")
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture(params=["file", "s3"])
async def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    """A set-up, empty object store of each kind: local disk, and S3 on the moto server."""
    if request.param == "file":
        url = (tmp_path / "objects").as_uri()
    else:
        url = request.getfixturevalue("s3_store_url")
    store = open_object_store(url)
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()
