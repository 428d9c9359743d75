"""SC-004: no OpenAI key (nor any other key, token, presigned URL, email, IP address or learner text)
in the web client's files or in the log output of the whole test run.

The capture and the detectors live in ``tests/leakscan.py`` (a plugin of ``tests/conftest.py``).
``tests/integration/test_log_canaries.py`` plants canaries into single requests and records and
checks that output itself; this module scans everything else the run logged, after the last test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relay.observability.logging import JsonFormatter
from relay.simulator import script
from tests.api import signup
from tests.integration.recorded import PLANTED, finished_session
from tests.integration.test_log_canaries import CANARIES
from tests.leakscan import (
    DETECTORS,
    LAST_MARKER,
    STATIC_DETECTORS,
    Finding,
    LogCapture,
    capture,
    find_leaks,
    iter_log_capture,
    planted_detector,
    scan_log_capture,
    scan_tree,
)

Client = TestClient[web.Request, web.Application]

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
MAX_LISTED = 40

#: Transcript text the tests plant (and the simulated coach's lines, which become transcript rows).
PLANTED_TEXTS = (
    PLANTED,
    CANARIES["sentence"],
    "A coffee, please",
)
COACH_LINES = (
    *script._GREETINGS, *script._ACKNOWLEDGEMENTS, *script._TIPS, *script._GENERIC_QUESTIONS,
)  # fmt: skip
LOG_DETECTORS = (*DETECTORS, planted_detector(PLANTED_TEXTS + COACH_LINES))
WEB_DETECTORS = (*STATIC_DETECTORS, planted_detector(PLANTED_TEXTS))


def report(findings: list[Finding], scanned: str) -> str:
    listed = "\n".join(f"  {f}" for f in findings[:MAX_LISTED])
    more = f"\n  ... and {len(findings) - MAX_LISTED} more" if len(findings) > MAX_LISTED else ""
    return f"{len(findings)} finding(s) in {scanned} (pattern, where, redacted excerpt):\n{listed}{more}"


# --- the detectors themselves ----------------------------------------------------------------------

SAMPLES = {
    "openai_key": "calling upstream with sk-proj-AbCdEf0123456789xyz now",
    "ephemeral_key": 'client_secret {"value": "ek_68af1b2c3d4e5f60"}',
    "jwt": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c3IifQ.c2lnbmF0dXJl",
    "presigned_url": "GET /audio/x.ogg?X-Amz-Algorithm=AWS4&x-amz-credential=AKIA%2F2026",
    "email": "signup for learner-1f2e@example.org done",
    "ipv4": "peer 203.0.113.9:5000 connected (remote 127.0.0.1).",
    "ipv6": "candidate [2001:db8::8a2e:370:7334]:9 and ::1 and ::ffff:192.0.2.1",
    "canary": "pw-CANARY-123",
    "planted_text": 'coach said "My grandmother keeps purple tomatoes in the canary attic"',
}

#: Look-alikes that are not findings, each for a stated reason.
NOT_FINDINGS = (
    "parley v1.2.3.4 on python3.11.2.1",  # version numbers glued to a word
    "user agent Chrome/120.0.6099.109",  # an octet over 255: not an address
    "OID 1.3.6.1.4.1 and 1.2.3.4.5",  # longer dotted numbers
    "version 10.0.0.1",  # a version by its context
    "listening on 0.0.0.0 and ::",  # unspecified addresses name no host
    '{"ts":"2026-11-28T12:02:03.123Z","at":"12:02:03"}',  # clock times
    "li::marker a::before std::vector",  # selectors and scopes
    "task-runner-abcdefghijklmnop seek_position1234",  # words that contain sk- / ek_
    "icon@2x.png logo@3x.webp",  # asset density suffixes
    "<key> <jwt> <email> <ip> <param> Bearer <token>",  # what the scrubber leaves
)


@pytest.mark.parametrize("pattern", sorted(SAMPLES))
def test_each_detector_finds_its_pattern_in_a_sample(pattern: str) -> None:
    """Every detector finds its kind in a synthetic line, and its excerpt does not repeat the value."""
    findings = find_leaks(SAMPLES[pattern], "sample", LOG_DETECTORS)
    assert pattern in {f.pattern for f in findings}
    for finding in findings:
        assert "0123456789xyz" not in finding.excerpt and "purple tomatoes" not in finding.excerpt
        assert "203.0.113.9" not in finding.excerpt and "learner-1f2e" not in finding.excerpt


@pytest.mark.parametrize("text", NOT_FINDINGS)
def test_look_alikes_are_not_findings(text: str) -> None:
    """Version strings, clock times, unspecified addresses, selectors and placeholders pass."""
    assert find_leaks(text, "sample", LOG_DETECTORS) == []


def test_what_the_app_formatter_emits_passes_and_the_raw_record_does_not(tmp_path: Path) -> None:
    """Through a capture: the JSON rendering of a leaky warning is clean; its raw stderr rendering
    is caught, and the finding names the logger."""
    cap = LogCapture(tmp_path / "capture.jsonl")
    log = logging.getLogger("aiohttp.server.leakscan_selftest")
    log.addHandler(cap)
    log.propagate = False
    try:
        log.warning("Error handling request from %s with %s", "198.51.100.4", CANARIES["openai_key"])
    finally:
        log.removeHandler(cap)
        log.propagate = True
        cap.close()
    lines = list(iter_log_capture(cap.path))
    assert [line["stream"] for line in lines] == ["json", "raw"]
    _, findings = scan_log_capture(cap.path, LOG_DETECTORS)
    assert {f.pattern for f in findings} >= {"ipv4", "openai_key", "canary"}
    assert all(f.where.startswith("raw aiohttp.server.leakscan_selftest") for f in findings)


def test_the_scrubber_leaves_nothing_the_detectors_find() -> None:
    """Every canary in an allow-listed field comes out of JsonFormatter as a placeholder."""
    values = {k: v for k, v in CANARIES.items() if k != "sentence"}
    record = logging.makeLogRecord(
        {"name": "relay.x", "msg": "a.b " + " ".join(values.values()), "levelname": "INFO", "levelno": 20,
         "reason": " ".join(values.values())}
    )  # fmt: skip
    findings = find_leaks(JsonFormatter().format(record), "formatter", DETECTORS)
    assert [f.pattern for f in findings if f.pattern != "canary"] == []


# --- the web client --------------------------------------------------------------------------------


def test_web_scan_reads_every_file_but_node_modules(tmp_path: Path) -> None:
    """A web dir with a few files: each is read (nested, binary, maps), node_modules is skipped."""
    (tmp_path / "static" / "js").mkdir(parents=True)
    (tmp_path / "node_modules" / "dep").mkdir(parents=True)
    (tmp_path / "index.html").write_text(
        '<input placeholder="you@example.org"> <a href="mailto:ana@gmail.com">'
    )
    (tmp_path / "static" / "js" / "app.js.map").write_text('{"k": "sk-live0123456789abcdefXYZ"}')
    (tmp_path / "static" / "logo.bin").write_bytes(b"\x89PNG\x00\xff ek_abcdef012345 \x00")
    (tmp_path / "node_modules" / "dep" / "index.js").write_text("const k = 'sk-ignored0123456789abcdef';")
    files, findings = scan_tree(tmp_path, WEB_DETECTORS, skip_dirs={"node_modules"})
    assert files == 3
    assert sorted((f.pattern, f.where) for f in findings) == [
        ("email", "index.html"),
        ("ephemeral_key", "static/logo.bin"),
        ("openai_key", "static/js/app.js.map"),
    ]


def test_web_client_files_hold_no_keys_tokens_addresses_or_learner_text() -> None:
    """Every file of web/ (node_modules aside): no key, token, presigned URL, address, email or
    planted text; placeholders on reserved example domains are allowed."""
    assert WEB.is_dir()
    files, findings = scan_tree(WEB, WEB_DETECTORS, skip_dirs={"node_modules"})
    assert not findings, report(findings, f"{files} files under web/")


# --- the log output of the whole run ---------------------------------------------------------------


@pytest.mark.leak_scan_last
async def test_log_output_of_the_whole_run_holds_no_secrets_addresses_or_learner_text(
    client: Client, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Last test of the session: everything logged so far (and by a session of its own, planted
    text included) holds none of the patterns, neither as emitted (JSON) nor as raw WARNING+ text."""
    assert request.node.get_closest_marker(LAST_MARKER) is not None
    assert request.session.items[-1] is request.node, "the log scan must run after every other test"
    # Drive the app once more, so the scan never passes on a capture that came loose or stayed empty.
    learner = await signup(client)
    sid, _ = await finished_session(client, learner, tmp_path / "spool")
    for path in (f"/v1/sessions/{sid}/transcript", f"/v1/sessions/{sid}/export"):
        resp = await client.get(path, headers=learner.auth)
        assert resp.status == 200
        await resp.read()
    resp = await client.patch(f"/v1/sessions/{sid}", json={"retain": True}, headers=learner.auth)
    assert resp.status == 200
    assert (await client.delete(f"/v1/sessions/{sid}", headers=learner.auth)).status == 204

    cap = capture()
    mine = [
        line
        for line in iter_log_capture(cap.path)
        if line["test"] == request.node.nodeid and line["logger"].startswith(("relay.", "storage."))
    ]
    events = {line["text"].split('"event":"', 1)[-1].split('"', 1)[0] for line in mine}
    assert {"http.request", "session.created", "session.deleted"} <= events, events
    lines, findings = scan_log_capture(cap.path, LOG_DETECTORS)
    tests = {line["test"] for line in iter_log_capture(cap.path)}
    assert lines >= len(mine) > 0
    assert not findings, report(findings, f"{lines} captured log lines from {len(tests)} tests")
