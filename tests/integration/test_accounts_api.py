"""Accounts: sign-up, sign-in, /v1/me, and the limits around them."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient

from tests.api import PASSWORD, problem, signup


async def test_signup_creates_an_account_and_signs_it_in(client: TestClient) -> None:  # type: ignore[type-arg]
    """POST /v1/auth/signup answers 201 with the user, a Bearer access token and its lifetime."""
    resp = await client.post("/v1/auth/signup", json={"email": "  Ana@Example.ORG ", "password": PASSWORD})
    assert resp.status == 201
    body = await resp.json()
    assert set(body) == {"user", "access_token", "token_type", "expires_in"}
    assert body["user"]["email"] == "ana@example.org"
    assert body["user"]["id"].startswith("usr_")
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    me = await client.get("/v1/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status == 200
    info = await me.json()
    assert info["id"] == body["user"]["id"] and info["email"] == "ana@example.org"
    assert info["created_at"].endswith("Z")


async def test_signup_with_a_taken_email_is_409(client: TestClient) -> None:  # type: ignore[type-arg]
    """A second account for the same email, in any letter case, answers 409 email_taken."""
    await signup(client, "bo@example.org")
    resp = await client.post("/v1/auth/signup", json={"email": "BO@example.org", "password": PASSWORD})
    await problem(resp, 409, "email_taken")


async def test_concurrent_signups_for_one_email_create_one_account(client: TestClient) -> None:  # type: ignore[type-arg]
    """Two simultaneous sign-ups with the same email: one 201, one 409."""
    body = {"email": "race@example.org", "password": PASSWORD}
    a, b = await asyncio.gather(
        client.post("/v1/auth/signup", json=body), client.post("/v1/auth/signup", json=body)
    )
    assert sorted([a.status, b.status]) == [201, 409]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "a@example.org", "password": "short"}, "password"),
        ({"email": "a@example.org"}, "password"),
        ({"password": PASSWORD}, "email"),
        ({"email": "a@example.org", "password": PASSWORD, "admin": True}, "admin"),
        ({"email": 5, "password": PASSWORD}, "email"),
    ],
)
async def test_signup_schema_errors_are_422_naming_the_field(
    client: TestClient,  # type: ignore[type-arg]
    body: dict[str, object],
    field: str,
) -> None:
    """A body that breaks the schema answers 422 invalid_request with the field named."""
    resp = await client.post("/v1/auth/signup", json=body)
    problem_body = await problem(resp, 422, "invalid_request")
    assert problem_body["field"] == field
    assert PASSWORD not in json.dumps(problem_body)


async def test_malformed_json_is_400(client: TestClient) -> None:  # type: ignore[type-arg]
    """A body that is not JSON answers 400 invalid_json."""
    resp = await client.post(
        "/v1/auth/signup", data=b'{"email": ', headers={"Content-Type": "application/json"}
    )
    await problem(resp, 400, "invalid_json")


async def test_oversized_body_is_413(client: TestClient) -> None:  # type: ignore[type-arg]
    """A body over the JSON limit answers 413 request_too_large, declared or streamed."""
    big = json.dumps({"email": "a@example.org", "password": "x" * 20_000})
    await problem(await client.post("/v1/auth/signup", data=big), 413, "request_too_large")

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b"x" * 1024

    await problem(await client.post("/v1/auth/token", data=chunks()), 413, "request_too_large")


async def test_token_exchanges_credentials_for_an_access_token(client: TestClient) -> None:  # type: ignore[type-arg]
    """POST /v1/auth/token with the right password answers 200 with a working access token."""
    learner = await signup(client)
    resp = await client.post("/v1/auth/token", json={"email": learner.email.upper(), "password": PASSWORD})
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    me = await client.get("/v1/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert (await me.json())["id"] == learner.id


async def test_wrong_password_and_unknown_email_answer_alike(client: TestClient) -> None:  # type: ignore[type-arg]
    """A wrong password and an unknown email both answer 401 invalid_credentials with the same body."""
    learner = await signup(client)
    wrong = await client.post("/v1/auth/token", json={"email": learner.email, "password": "not the password"})
    unknown = await client.post(
        "/v1/auth/token", json={"email": "nobody@example.org", "password": "not the password"}
    )
    a = await problem(wrong, 401, "invalid_credentials")
    b = await problem(unknown, 401, "invalid_credentials")
    assert a == b


async def test_failed_logins_are_limited_per_account(client: TestClient) -> None:  # type: ignore[type-arg]
    """After 5 failed sign-ins an account answers 429 with Retry-After, even to the right password."""
    learner = await signup(client)
    for _ in range(5):
        resp = await client.post(
            "/v1/auth/token", json={"email": learner.email, "password": "wrong password!"}
        )
        assert resp.status == 401
    resp = await client.post("/v1/auth/token", json={"email": learner.email, "password": PASSWORD})
    await problem(resp, 429, "rate_limited")
    assert int(resp.headers["Retry-After"]) > 0
    other = await signup(client)  # other accounts are not locked out by it
    ok = await client.post("/v1/auth/token", json={"email": other.email, "password": PASSWORD})
    assert ok.status == 200


async def test_failed_logins_are_limited_per_client_address(client: TestClient) -> None:  # type: ignore[type-arg]
    """20 failed sign-ins from one address across many emails lock that address out with 429."""
    for i in range(20):
        resp = await client.post(
            "/v1/auth/token", json={"email": f"x{i}@example.org", "password": "wrong password!"}
        )
        assert resp.status == 401
    resp = await client.post(
        "/v1/auth/token", json={"email": "x99@example.org", "password": "wrong password!"}
    )
    await problem(resp, 429, "rate_limited")


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer a b", "bearer not-a-token", "Token abc"],
)
async def test_me_without_valid_credentials_is_401(client: TestClient, header: str | None) -> None:  # type: ignore[type-arg]
    """GET /v1/me without a usable bearer token answers 401 with WWW-Authenticate."""
    headers = {} if header is None else {"Authorization": header}
    resp = await client.get("/v1/me", headers=headers)
    await problem(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
