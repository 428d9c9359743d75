"""No secret, token, address, email or learner text reaches the logs, whatever requests carry."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from aiohttp.test_utils import TestClient

from relay.observability.logging import JsonFormatter, configure_logging, hash_id, scrub

CANARIES = {
    "openai_key": "sk-proj-CANARYabcdef0123456789",
    "ephemeral_key": "ek_CANARY0123456789abcdef",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5hcnkifQ.c2lnbmF0dXJlY2FuYXJ5",
    "email": "canary.learner@example.org",
    "ip": "203.0.113.77",
    "ipv6": "2001:db8:85a3::8a2e:370:7334",
    "sentence": "My grandmother keeps purple tomatoes in the canary attic",
    "presigned": "X-Amz-Signature=deadbeefcanary",
}


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Route every logger through Parley's JSON handler at DEBUG into a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("DEBUG", stream)
    yield stream
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved_handlers:
        root.addHandler(h)
    root.setLevel(saved_level)


def assert_no_canaries(text: str) -> None:
    lowered = text.lower()
    for name, value in CANARIES.items():
        assert value.lower() not in lowered, f"{name} leaked into the logs"
    # Fragments too: the tail of a key or the middle of the sentence.
    for fragment in ("canaryabcdef", "purple tomatoes", "canary.learner", "113.77", "8a2e:370"):
        assert fragment not in lowered


async def test_requests_carrying_canaries_leave_no_trace_in_logs(
    client: TestClient,  # type: ignore[type-arg]
    captured_logs: io.StringIO,
) -> None:
    """Canaries in headers, query, path and body of requests never appear in the log output."""
    headers = {
        "Authorization": f"Bearer {CANARIES['jwt']}",
        "X-Forwarded-For": CANARIES["ip"],
        "X-OpenAI-Key": CANARIES["openai_key"],
        "User-Agent": CANARIES["sentence"],
    }
    await client.get(f"/healthz?email={CANARIES['email']}&{CANARIES['presigned']}", headers=headers)
    await client.get(f"/v1/{CANARIES['ephemeral_key']}/{CANARIES['ipv6']}", headers=headers)
    await client.post("/readyz", data=json.dumps(CANARIES), headers=headers)
    await client.get("/readyz", headers=headers)
    output = captured_logs.getvalue()
    assert '"event":"http.request"' in output  # the requests were logged, just not their content
    assert_no_canaries(output)


def test_library_records_keep_their_template_but_not_their_arguments(captured_logs: io.StringIO) -> None:
    """A library logging SDP, addresses and payloads as arguments shows only its message template."""
    lib = logging.getLogger("aiortc.rtcpeerconnection")
    lib.warning("candidate %s from %s: %s", f"a=candidate:1 1 udp 1 {CANARIES['ip']} 5000", CANARIES["ipv6"],
                CANARIES["sentence"])  # fmt: skip
    logging.getLogger("aiohttp.server").error(
        f"preformatted by the library: {CANARIES['email']} {CANARIES['ip']}"
    )
    output = captured_logs.getvalue()
    assert "candidate %s from %s: %s" in output
    assert_no_canaries(output)


def test_messages_a_library_formatted_itself_keep_only_their_leading_words(
    captured_logs: io.StringIO,
) -> None:
    """asyncio's "Task exception was never retrieved" carries the task and the exception's message
    (learner text, SQL parameters): only "Task exception was never retrieved" is logged."""
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        future.set_exception(ValueError(f"{CANARIES['sentence']} {CANARIES['email']}"))
        loop.call_exception_handler(
            {
                "message": "Task exception was never retrieved",
                "exception": future.exception(),
                "future": future,
            }
        )
        loop.call_exception_handler({"message": f"Exception in callback send({CANARIES['sentence']!r})"})
    finally:
        loop.close()
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("asyncio", "Task exception was never retrieved"),
        ("asyncio", "Exception in callback send"),
    ]
    assert lines[0]["error_type"] == "ValueError"
    assert_no_canaries(captured_logs.getvalue())


def test_object_store_client_retry_warnings_are_not_logged(captured_logs: io.StringIO) -> None:
    """urllib3 (under minio) puts the object store's address into its retry warnings: below ERROR,
    its records are not even created, so no handler (ours or another) can print the address."""
    logging.getLogger("urllib3.connectionpool").warning(
        "Retrying (%r) after connection broken by '%r': %s",
        "Retry(total=0)",
        f"host='{CANARIES['ip']}'",
        "/b/k",
    )
    assert captured_logs.getvalue() == ""
    assert not logging.getLogger("urllib3.connectionpool").isEnabledFor(logging.WARNING)


def test_own_records_keep_only_allow_listed_fields(captured_logs: io.StringIO) -> None:
    """Parley's records drop extra fields that are not on the allow-list and scrub allowed ones."""
    log = logging.getLogger("relay.test")
    log.info(
        "session.state",
        extra={
            "session_id": "ses_1",
            "status": "live",
            "transcript": CANARIES["sentence"],
            "sdp": f"c=IN IP4 {CANARIES['ip']}",
            "reason": f"upstream said {CANARIES['openai_key']}",
        },
    )
    line = json.loads(captured_logs.getvalue().strip().splitlines()[-1])
    assert line["event"] == "session.state"
    assert line["session_id"] == "ses_1"
    assert line["status"] == "live"
    assert "transcript" not in line and "sdp" not in line
    assert line["reason"] == "upstream said <key>"


def test_exceptions_log_their_type_not_their_message(captured_logs: io.StringIO) -> None:
    """A logged exception shows its type; its message, which may carry payloads, stays out."""
    try:
        raise ValueError(CANARIES["sentence"])
    except ValueError:
        logging.getLogger("relay.test").exception("job.failed", extra={"job_id": "job_1"})
    line = json.loads(captured_logs.getvalue().strip().splitlines()[-1])
    assert line["error_type"] == "ValueError"
    assert_no_canaries(json.dumps(line))


def test_scrub_replaces_each_kind_of_sensitive_text() -> None:
    """scrub() replaces keys, JWTs, emails, IPv4/IPv6 addresses, presigned parameters and bearer tokens."""
    secrets_only = {
        k: v for k, v in CANARIES.items() if k != "sentence"
    }  # free text cannot be pattern-matched
    out = scrub(" ".join(secrets_only.values()) + " Bearer abc.def")
    for value in secrets_only.values():
        assert value not in out
    for placeholder in ("<key>", "<jwt>", "<email>", "<ip>", "<param>", "Bearer <token>"):
        assert placeholder in out


def test_user_ids_are_hashed_stably() -> None:
    """hash_id gives the same short tag for the same id and different tags for different ids."""
    assert hash_id("usr_a") == hash_id("usr_a")
    assert hash_id("usr_a") != hash_id("usr_b")
    assert "usr_a" not in hash_id("usr_a") and len(hash_id("usr_a")) == 16


def test_formatter_output_is_one_json_object_per_line() -> None:
    """Each record is one line of valid JSON with ts, level, logger and event."""
    record = logging.makeLogRecord({"name": "relay.x", "msg": "a.b", "levelname": "INFO", "levelno": 20})
    out = JsonFormatter().format(record)
    assert "\n" not in out
    data = json.loads(out)
    assert data["event"] == "a.b" and data["level"] == "info" and data["logger"] == "relay.x"
    assert data["ts"].endswith("Z")


async def test_account_flows_leave_no_password_token_or_email_in_logs(
    client: TestClient,  # type: ignore[type-arg]
    captured_logs: io.StringIO,
) -> None:
    """Sign-up, sign-in (right and wrong), /v1/me, sessions and secrets log no password, token or email."""
    email, password = "canary.signup@example.org", "purple-canary-password-42"
    resp = await client.post("/v1/auth/signup", json={"email": email, "password": password})
    signup = await resp.json()
    await client.post("/v1/auth/token", json={"email": email, "password": "wrong-canary-password"})
    login = await (await client.post("/v1/auth/token", json={"email": email, "password": password})).json()
    auth = {"Authorization": f"Bearer {login['access_token']}"}
    await client.get("/v1/me", headers=auth)
    created = await (await client.post("/v1/sessions", json={"topic_id": "cafe-order"}, headers=auth)).json()
    await client.get("/v1/me", headers={"Authorization": f"Bearer {login['access_token']}x"})
    await client.post("/v1/auth/signup", json={"email": email, "password": password})  # 409
    output = captured_logs.getvalue()
    assert '"event":"auth.login_failed"' in output and '"event":"session.created"' in output
    secrets = [
        email, password, "wrong-canary-password", signup["access_token"], login["access_token"],
        created["client_secret"]["value"], signup["user"]["id"],
    ]  # fmt: skip
    for value in secrets:
        assert value not in output
    for token in (login["access_token"], created["client_secret"]["value"]):
        assert token.split(".")[2] not in output  # not even the signature part
