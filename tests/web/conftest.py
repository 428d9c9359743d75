"""Debian's Chromium driven by Playwright (async API, in pytest-aiohttp's loop) against a real relay.

The relay is :func:`tests.live.conftest.relay_factory`'s: the whole app on a loopback socket, the
strict simulator as upstream, SQLite and the local object store, ICE pinned to 127.0.0.1. The
browser gets a fake microphone that plays a generated WAV (``%noloop``: once, then silence) and
``--allow-loopback-in-peer-connection``, so every packet stays on 127.0.0.1.

Never a downloaded browser: ``executable_path`` is the system Chromium (``make test`` installs it
with apt as root, see ``tests/tools/ensure-chromium.sh``). A missing Chromium fails the tests.
"""

from __future__ import annotations

import os
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright, async_playwright

from tests.fakes.rtc_client import RATE, loopback_ice, speech_like  # noqa: F401 (fixture)
from tests.live.conftest import Relay, relay_factory  # noqa: F401 (fixture)

CHROMIUM = os.environ.get("PARLEY_CHROMIUM", "/usr/bin/chromium")
PAD_S = 1.5  # silence before the speech: the start of the file plays while the call connects
SPEECH_S = 3.0
TIMEOUT_MS = 20_000

# Every RTCPeerConnection the page creates, for getStats() from the test (no hook in the app).
TRACK_PEERS = """
(() => {
  const Native = window.RTCPeerConnection;
  window.__peers = [];
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...args);
    window.__peers.push(pc);
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
})();
"""


def write_wav(path: Path, pcm: bytes) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(pcm)
    return path


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * RATE) * 2)


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.5 s of silence, 3 s of voiced bursts (what the simulator's VAD hears as speech), 1.5 s of silence."""
    pcm = silence(PAD_S) + speech_like(SPEECH_S) + silence(1.5)
    return write_wav(tmp_path_factory.mktemp("wav") / "speech.wav", pcm)


@pytest.fixture(scope="session")
def chatty_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learner who keeps talking: 2 s of speech, 2.5 s of silence, eight times over."""
    pcm = silence(PAD_S) + (speech_like(2.0) + silence(2.5)) * 8
    return write_wav(tmp_path_factory.mktemp("wav") / "chatty.wav", pcm)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium; its absence is a failure (CI or not), never a skip."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: run tests/tools/ensure-chromium.sh as root "
            "(`make test` does), or set PARLEY_CHROMIUM."
        )
    return CHROMIUM


@dataclass
class Web:
    """One browser with one page on the relay, and what its console said."""

    page: Page
    context: BrowserContext
    base_url: str
    console_errors: list[str] = field(default_factory=list)

    def unexpected_errors(self, *allowed: str) -> list[str]:
        """Console errors, less those containing one of ``allowed`` (e.g. an HTTP status a test provokes)."""
        return [e for e in self.console_errors if not any(a in e for a in allowed)]

    async def token(self) -> str:
        """The learner's access token, from where the app keeps it (sessionStorage)."""
        value = await self.page.evaluate("JSON.parse(sessionStorage.getItem('parley.auth')).token")
        assert isinstance(value, str)
        return value

    async def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token()}"}

    async def coach_audio_stats(self) -> dict[str, int]:
        """Inbound audio of every peer connection the page made, summed (getStats ``inbound-rtp``)."""
        stats: dict[str, int] = await self.page.evaluate(
            """async () => {
              let packets = 0, samples = 0;
              for (const pc of window.__peers) {
                if (pc.connectionState === 'closed') continue;
                const report = await pc.getStats();
                report.forEach((s) => {
                  if (s.type === 'inbound-rtp' && s.kind === 'audio') {
                    packets += s.packetsReceived || 0;
                    samples += s.totalSamplesReceived || 0;
                  }
                });
              }
              return { packets, samples, peers: window.__peers.length };
            }"""
        )
        return stats


MakeWeb = Callable[..., Awaitable[Web]]


@pytest.fixture
async def web(chromium: str) -> AsyncIterator[MakeWeb]:
    """Open Chromium on a relay: ``await web(relay, wav=..., mic="grant" | "deny")``; closed afterwards."""
    playwright: Playwright | None = None
    browsers: list[Browser] = []

    async def make(relay: Relay, *, wav: Path, mic: str = "grant") -> Web:
        nonlocal playwright
        if playwright is None:
            playwright = await async_playwright().start()
        args = [
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop",
            "--allow-loopback-in-peer-connection",
            "--use-fake-ui-for-media-stream" if mic == "grant" else "--use-fake-ui-for-media-stream=deny",
            "--no-first-run",
            "--disable-features=MediaRouter",
        ]
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True, args=args)
        browsers.append(browser)
        context = await browser.new_context(viewport={"width": 1000, "height": 900}, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        await context.add_init_script(TRACK_PEERS)
        page = await context.new_page()
        base_url = str(relay.client.make_url("/"))
        made = Web(page, context, base_url)

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                made.console_errors.append(f"{message.text} @ {message.location.get('url', '')}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: made.console_errors.append(f"pageerror: {exc}"))
        await page.goto(base_url)
        return made

    yield make
    for browser in browsers:
        await browser.close()
    if playwright is not None:
        await playwright.stop()


async def sign_up(web: Web) -> str:
    """Create an account through the sign-in page; returns the email."""
    page = web.page
    email = f"learner-{time.monotonic_ns()}@example.org"
    await page.get_by_role("button", name="Create an account").click()
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill("correct horse battery")
    await page.get_by_role("button", name="Create account").click()
    await page.locator("#view-topics li.topic").first.wait_for()
    return email


async def start_topic(web: Web, topic_id: str = "cafe-order") -> None:
    await (
        web.page.locator(f'li.topic[data-topic-id="{topic_id}"]')
        .get_by_role("button", name="Start talking")
        .click()
    )


async def call_state(web: Web, state: str, timeout_ms: int = TIMEOUT_MS) -> None:
    await web.page.locator(f'#view-call[data-call-state="{state}"]').wait_for(
        state="attached", timeout=timeout_ms
    )


def session_id_of(page_value: Any) -> str:
    assert isinstance(page_value, str) and page_value, page_value
    return page_value


# Every visible control must have an accessible name (label, aria-label/-labelledby or its text).
_UNLABELLED = """() => {
  const shown = (el) => el.getClientRects().length > 0;
  const byId = (id) => document.getElementById(id)?.textContent ?? '';
  const text = (ids) => ids.split(/\\s+/).map(byId).join(' ');
  const problems = [];
  for (const el of document.querySelectorAll('button, a[href], input, select, textarea, meter, summary')) {
    if (!shown(el)) continue;
    const tag = el.tagName.toLowerCase();
    const name = [
      el.getAttribute('aria-label'),
      el.getAttribute('aria-labelledby') && text(el.getAttribute('aria-labelledby')),
      el.labels && [...el.labels].map((l) => l.textContent).join(' '),
      ['button', 'a', 'summary'].includes(tag) ? el.textContent : '',
    ].filter(Boolean).join(' ').trim();
    if (!name) problems.push(el.outerHTML.slice(0, 120));
  }
  return problems;
}"""


async def check_screen(web: Web, *, phone: bool = True) -> None:
    """Labelled controls on the current screen, and (``phone``) no sideways scrolling at 360 px."""
    page = web.page
    assert await page.evaluate(_UNLABELLED) == []
    if phone:
        size = page.viewport_size
        await page.set_viewport_size({"width": 360, "height": 740})
        overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{overflow}px wider than a phone screen"
        if size is not None:
            await page.set_viewport_size(size)
