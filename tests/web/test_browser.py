"""The learner web client end to end in Debian's Chromium: both sides are checked.

The page must show what the learner needs (live transcript, states, plain-word failures); the relay
and its stores must hold what happened (session rows, the learner's recorded audio, transcript rows).
"""

from __future__ import annotations

import asyncio
import io
import math
import time
import zipfile
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path

import av
import pytest
from playwright.async_api import Locator

from relay.keys import REGISTRY, SETTINGS
from relay.security.tokens import TokenService
from tests.api import ENDED_OR_LATER
from tests.live.conftest import Relay
from tests.web.conftest import (
    SPEECH_S,
    MakeWeb,
    call_state,
    check_screen,
    session_id_of,
    sign_up,
    start_topic,
)

pytestmark = pytest.mark.e2e

MakeRelay = Callable[..., Awaitable[Relay]]
# The browser needs a few seconds to notice a dead leg and re-offer; the live-suite default of 5 s is tight.
RELAY_ENV = {"PARLEY_RECONNECT_GRACE": "20"}


def voiced_span_s(ogg: bytes) -> tuple[float, float]:
    """(first, last) second of the decoded audio whose 20 ms RMS is clearly above silence."""
    frames: list[float] = []
    with av.open(io.BytesIO(ogg)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        pcm = bytearray()
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                pcm += bytes(out.planes[0])[: out.samples * 2]
    samples = array("h", bytes(pcm[: len(pcm) // 2 * 2]))
    step = 960
    for i in range(0, len(samples) - step, step):
        chunk = samples[i : i + step]
        frames.append(math.sqrt(sum(s * s for s in chunk) / step))
    voiced = [i for i, r in enumerate(frames) if r > 500]
    assert voiced, "the learner track is silent"
    return voiced[0] * 0.02, (voiced[-1] + 1) * 0.02


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_full_session_then_replay_export_publish_and_delete(
    relay_factory: MakeRelay, web: MakeWeb, speech_wav: Path
) -> None:
    """Talk, hear the coach, see the transcript, end; then replay, export, publish, unpublish, delete."""
    relay = await relay_factory(**RELAY_ENV)
    w = await web(relay, wav=speech_wav)
    page = w.page
    await check_screen(w)  # the sign-in page
    await sign_up(w)
    assert await page.locator("#view-topics li.topic").count() >= 8
    await check_screen(w)

    # -- the call ---------------------------------------------------------------------------------
    await start_topic(w, "cafe-order")
    await call_state(w, "live")
    session_id = session_id_of(await page.locator("#view-call").get_attribute("data-session-id"))
    await page.wait_for_function("() => document.getElementById('mic-level').value > 30")  # the meter moves
    await page.locator('#turn-indicator[data-state="coach"]').wait_for()  # "The coach is speaking"
    await page.locator('#live-transcript li[data-speaker="learner"][data-final="true"]').wait_for()
    await page.locator('#live-transcript li[data-speaker="coach"][data-final="true"]').wait_for()
    await page.locator('#turn-indicator[data-state="listening"]').wait_for()
    await check_screen(w)
    stats = await w.coach_audio_stats()
    assert stats["packets"] > 50, stats  # the coach's voice arrived over WebRTC…
    assert stats["samples"] > 48000, stats  # …and was decoded: more than a second of it
    live = relay.client.app[REGISTRY].get(session_id)
    assert live is not None and live.state == "live"

    await page.get_by_role("button", name="End session").click()
    await call_state(w, "ended")
    assert relay.client.app[REGISTRY].get(session_id) is None

    # -- the server's side --------------------------------------------------------------------------
    auth = await w.auth()
    session = await (await relay.client.get(f"/v1/sessions/{session_id}", headers=auth)).json()
    assert session["status"] in ENDED_OR_LATER
    assert {a["track"] for a in session["audio"]} == {"learner", "coach"}
    segments = (await (await relay.client.get(f"/v1/sessions/{session_id}/transcript", headers=auth)).json())[
        "segments"
    ]
    assert {s["speaker"] for s in segments} == {"learner", "coach"}
    learner_ogg = await (
        await relay.client.get(f"/v1/sessions/{session_id}/audio/learner", headers=auth)
    ).read()
    first, last = voiced_span_s(learner_ogg)
    # The WAV's 3 s of speech, as recorded by the relay (bursts: the last one ends 0.2 s before).
    assert SPEECH_S - 0.7 <= last - first <= SPEECH_S + 0.3, (first, last)

    # -- replay --------------------------------------------------------------------------------------
    await page.get_by_role("link", name="Replay this session").click()
    await page.locator("#play-pause").wait_for()
    await page.locator("#play-pause").click()
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#view-session audio')].every(a => a.currentTime > 0.3)"
    )
    tracks = await page.evaluate(
        "[...document.querySelectorAll('#view-session audio')].map(a => a.dataset.track)"
    )
    assert sorted(tracks) == ["coach", "learner"]
    # Seek: jump to the coach's answer from its transcript line; both tracks follow.
    coach_line = page.locator('#session-transcript li[data-speaker="coach"]').first
    coach_start = next(s for s in segments if s["speaker"] == "coach")["start_ms"] / 1000
    await coach_line.get_by_role("button").click()
    await page.wait_for_function(
        "s => [...document.querySelectorAll('#view-session audio')]"
        ".every(a => Math.abs(a.currentTime - s) < 1.0)",
        arg=coach_start,
    )
    await page.wait_for_function(
        "() => document.querySelector('#session-transcript li[data-speaker=\"coach\"]')"
        ".getAttribute('aria-current') === 'true'"
    )
    await page.get_by_role("button", name="Pause").click()
    await check_screen(w)

    # -- history ----------------------------------------------------------------------------------
    await page.get_by_role("link", name="History").click()
    item = page.locator(f'#history-list li[data-session-id="{session_id}"]')
    await item.wait_for()
    shown = await item.inner_text()
    assert any(label in shown for label in ("Ended", "Being processed", "Ready"))  # ENDED_OR_LATER
    await item.get_by_role("link").click()
    await page.locator("#export-session").wait_for()

    # -- export -------------------------------------------------------------------------------------
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download (zip)").click()
    download = await download_info.value
    archive = zipfile.ZipFile(io.BytesIO(await asyncio.to_thread(Path(await download.path()).read_bytes)))
    names = set(archive.namelist())
    assert {
        "session.json",
        "transcript.json",
        "transcript.vtt",
        "audio/learner.ogg",
        "audio/coach.ogg",
    } <= names

    # -- publish (two steps), then private again ------------------------------------------------------
    await page.get_by_role("button", name="Publish…").click()
    dialog = page.get_by_role("dialog")
    await dialog.get_by_role("button", name="Continue").click()
    await dialog.get_by_text("Nothing is public yet").wait_for()
    await check_screen(w, phone=False)
    assert (await (await relay.client.get(f"/v1/sessions/{session_id}", headers=auth)).json())[
        "visibility"
    ] == "private"
    await dialog.get_by_role("button", name="Yes, publish it").click()
    public_url = await dialog.locator("#public-link").input_value()
    await dialog.get_by_role("button", name="Done").click()
    await page.locator('#view-session[data-visibility="public"]').wait_for(state="attached")
    assert await page.locator('#view-session [data-fact="visibility"]').inner_text() == "Public"
    assert public_url in await page.locator("#public-url").inner_text()
    public_path = public_url.removeprefix(w.base_url.rstrip("/"))
    assert (await relay.client.get(public_path)).status == 200
    await page.get_by_role("button", name="Make private").click()
    await page.get_by_role("dialog").get_by_role("button", name="Make private").click()
    await page.locator('#view-session[data-visibility="private"]').wait_for(state="attached")
    assert (await relay.client.get(public_path)).status == 404

    # -- delete, with a confirmation -------------------------------------------------------------
    await page.get_by_role("button", name="Delete…").click()
    confirm = page.get_by_role("dialog")
    await confirm.get_by_text("cannot be undone").wait_for()
    await confirm.get_by_role("button", name="Delete for good").click()
    await page.get_by_text("The session was deleted.").wait_for()
    await page.get_by_text("No sessions yet.").wait_for()  # the history, reloaded without it
    assert await page.locator(f'#history-list li[data-session-id="{session_id}"]').count() == 0
    assert (await relay.client.get(f"/v1/sessions/{session_id}", headers=auth)).status == 404

    assert w.unexpected_errors() == []


async def test_mic_denied_says_how_to_fix_and_creates_no_session(
    relay_factory: MakeRelay, web: MakeWeb, speech_wav: Path
) -> None:
    """A denied microphone: a message naming the problem and the fix, and nothing on the server."""
    relay = await relay_factory(**RELAY_ENV)
    w = await web(relay, wav=speech_wav, mic="deny")
    await sign_up(w)
    page = w.page
    # Keyboard only: Tab to the first topic's Start button, press Enter.
    for _ in range(25):
        await page.keyboard.press("Tab")
        if await page.evaluate("() => document.activeElement.textContent") == "Start talking":
            break
    else:
        raise AssertionError("no Start button reachable with Tab")
    await page.keyboard.press("Enter")
    await call_state(w, "failed")
    assert await page.locator("#call-status").inner_text() == "Microphone access is blocked"
    notice = await page.locator("#call-notices").inner_text()
    assert "needs your microphone" in notice and 'set Microphone to "Allow"' in notice
    await page.get_by_role("button", name="Try again").wait_for()
    sessions = await (await relay.client.get("/v1/sessions", headers=await w.auth())).json()
    assert sessions["sessions"] == []
    assert len(relay.client.app[REGISTRY]) == 0
    assert await page.evaluate("window.__peers.length") == 0
    assert w.unexpected_errors() == []


def cut_network(relay: Relay, session_id: str) -> str:
    """Blackhole the relay's current leg of a session both ways, as a dead Wi-Fi would; returns its peer id.

    Every UDP datagram of that leg's ICE sockets is dropped on the relay, inbound and outbound: no
    close, no error, just silence (the browser's ICE stays "connected" for seconds; only the
    heartbeat notices).
    """
    live = relay.client.app[REGISTRY].get(session_id)
    assert live is not None and live.peer is not None
    pc = live.peer._pc
    for ice in pc._RTCPeerConnection__iceTransports:  # aiortc keeps them name-mangled
        for protocol in ice._connection._protocols:

            async def drop_data(data: bytes, addr: tuple[str, int]) -> None:
                return None

            protocol.datagram_received = lambda data, addr: None
            protocol.send_data = drop_data
            protocol.send_stun = lambda message, addr: None
    return str(live.peer.peer_id)


async def test_network_drop_reconnects_to_the_same_session(
    relay_factory: MakeRelay, web: MakeWeb, chatty_wav: Path
) -> None:
    """The network of a live call dies: the page shows "reconnecting", re-offers with a fresh client
    secret to the same session on its own, and the transcript goes on."""
    relay = await relay_factory(**RELAY_ENV)
    w = await web(relay, wav=chatty_wav)
    page = w.page
    await sign_up(w)
    await start_topic(w)
    await call_state(w, "live")
    session_id = session_id_of(await page.locator("#view-call").get_attribute("data-session-id"))
    learner_finals = page.locator('#live-transcript li[data-speaker="learner"][data-final="true"]')
    await learner_finals.first.wait_for()
    before = await learner_finals.count()

    # "reconnecting" may last only a few hundred milliseconds: record every state and status shown.
    await page.evaluate(
        """() => {
          window.__shown = [];
          const view = document.getElementById('view-call');
          const status = document.getElementById('call-status');
          new MutationObserver(() => window.__shown.push([view.dataset.callState, status.textContent]))
            .observe(view, { attributes: true, subtree: true, childList: true, characterData: true });
        }"""
    )
    old_peer = cut_network(relay, session_id)
    started = time.monotonic()
    await page.wait_for_function(
        "() => window.__shown.some(([state]) => state === 'reconnecting')", timeout=10_000
    )
    await call_state(w, "live", timeout_ms=15_000)
    recovered_s = time.monotonic() - started
    shown = await page.evaluate("window.__shown")
    assert ["reconnecting", "Connection lost. Reconnecting…"] in shown, shown
    live = relay.client.app[REGISTRY].get(session_id)
    assert live is not None and live.peer is not None and live.peer.peer_id != old_peer
    assert await page.locator("#view-call").get_attribute("data-session-id") == session_id
    assert await page.evaluate("window.__peers.length") == 2
    assert await page.evaluate("window.__peers[0].connectionState") == "closed"  # the old leg is gone

    # The conversation goes on in the same transcript: new learner lines after the drop.
    await wait_until(lambda: _count_greater(learner_finals, before), timeout_s=20)
    assert await page.locator("#live-transcript li").first.inner_text() != ""
    stats = await w.coach_audio_stats()  # the new leg only (the old one is closed)
    assert stats["packets"] > 0, stats
    sessions = (await (await relay.client.get("/v1/sessions", headers=await w.auth())).json())["sessions"]
    assert [s["id"] for s in sessions] == [session_id]
    await page.get_by_role("button", name="End session").click()
    await call_state(w, "ended")
    assert recovered_s < 12, recovered_s
    assert w.unexpected_errors() == []


async def _count_greater(locator: Locator, n: int) -> bool:
    return await locator.count() > n


async def test_expired_access_token_during_a_call_asks_to_sign_in_and_keeps_the_page(
    relay_factory: MakeRelay, web: MakeWeb, speech_wav: Path
) -> None:
    """The access token runs out mid-call: ending asks the learner to sign in again in a dialog,
    the call page and its transcript stay, and the session then ends normally."""
    relay = await relay_factory(**RELAY_ENV)
    w = await web(relay, wav=speech_wav)
    page = w.page
    email = await sign_up(w)
    await start_topic(w)
    await call_state(w, "live")
    session_id = session_id_of(await page.locator("#view-call").get_attribute("data-session-id"))
    await page.locator('#live-transcript li[data-speaker="coach"][data-final="true"]').wait_for()

    me = await (await relay.client.get("/v1/me", headers=await w.auth())).json()
    an_hour_ago = TokenService(relay.client.app[SETTINGS].secret_key, clock=lambda: time.time() - 7200)
    expired, _ = an_hour_ago.mint_access(me["id"])
    await page.evaluate(
        "t => { const v = JSON.parse(sessionStorage.getItem('parley.auth')); v.token = t;"
        " sessionStorage.setItem('parley.auth', JSON.stringify(v)); }",
        expired,
    )

    await page.get_by_role("button", name="End session").click()
    dialog = page.get_by_role("dialog", name="Please sign in again")
    await dialog.wait_for()
    assert await dialog.get_by_label("Email").input_value() == email
    # The page behind the dialog is intact: same session, transcript still there.
    assert await page.locator("#view-call").get_attribute("data-session-id") == session_id
    assert await page.locator("#live-transcript li").count() >= 2
    await dialog.get_by_label("Password").fill("correct horse battery")
    await dialog.get_by_role("button", name="Sign in").click()
    await call_state(w, "ended")
    assert relay.client.app[REGISTRY].get(session_id) is None
    session = await (await relay.client.get(f"/v1/sessions/{session_id}", headers=await w.auth())).json()
    assert session["status"] in ENDED_OR_LATER
    assert await w.token() != expired
    assert w.unexpected_errors("status of 401") == []
