"""The relay as a real process (``python -m relay serve``), for tests that kill it.

:class:`RelayProcess` starts ``parley serve`` with a given environment, waits for its
"Parley is serving on" line and its ``/healthz``, and can SIGKILL it (no cleanup of any kind runs:
the spool, the database rows and the objects stay as the crash left them) or stop it with SIGTERM.
Its log (JSON lines on stderr, the banner on stdout) goes to a file, shown when start-up fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import aiohttp

__all__ = ["ROOT", "RelayProcess", "relay_env"]

ROOT = Path(__file__).resolve().parents[2]
_START_TIMEOUT_S = 60.0


def relay_env(**settings: str) -> dict[str, str]:
    """This process's environment without any PARLEY_/OPENAI_ variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "OPENAI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


class RelayProcess:
    """One ``parley serve`` process at a time on ``env["PARLEY_PORT"]``; :meth:`start` again after a kill.

    ``workers``: ``parley serve --workers`` (1, the default here: one process; more: a parent and
    its children, which die with it on a kill).
    """

    def __init__(self, env: dict[str, str], log_path: Path, *, workers: int = 1) -> None:
        self.env = env
        self.workers = workers
        self.log_path = log_path
        self.port = int(env["PARLEY_PORT"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            raise RuntimeError("the relay is already running")
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "serve", "--workers", str(self.workers), cwd=ROOT,
                env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        try:
            async with asyncio.timeout(_START_TIMEOUT_S), aiohttp.ClientSession() as http:
                while True:
                    if self.proc.returncode is not None:
                        raise AssertionError(f"the relay exited with {self.proc.returncode}")
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{self.base_url}/healthz") as resp:
                            if resp.status == 200:
                                return
                    await asyncio.sleep(0.1)
        except (TimeoutError, AssertionError) as exc:
            await self.kill()
            raise AssertionError(f"the relay did not start ({exc!r}); log:\n{self.log_tail()}") from None

    async def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush, finalize or close anything."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                await self.kill()
        return proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
