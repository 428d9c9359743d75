"""Integration API keys: shown once, stored hashed, scoped to their owner, revoked at once."""

from __future__ import annotations

import hashlib

from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select

from relay.keys import DATABASE
from storage.models import ApiKey
from tests.api import problem, signup

Client = TestClient[web.Request, web.Application]


async def _new_key(client: Client, auth: dict[str, str], name: str = "telephony bridge") -> dict[str, str]:
    resp = await client.post("/v1/api-keys", json={"name": name}, headers=auth)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Cache-Control"] == "no-store"
    body: dict[str, str] = await resp.json()
    return body


async def test_a_new_key_is_shown_once_and_stored_only_as_its_hash(both_client: Client) -> None:
    """201 carries the key; the database holds its SHA-256 and the listing never shows it."""
    ana = await signup(both_client)
    body = await _new_key(both_client, ana.auth)
    assert set(body) == {"id", "name", "key", "created_at", "last_used_at"}
    assert body["key"].startswith("pk_") and body["name"] == "telephony bridge"
    async with both_client.app[DATABASE].sessions() as s:
        stored = (await s.execute(select(ApiKey).where(ApiKey.id == body["id"]))).scalar_one()
    assert stored.key_hash == hashlib.sha256(body["key"].encode()).hexdigest()
    assert body["key"] not in repr(stored.__dict__)
    listing = await both_client.get("/v1/api-keys", headers=ana.auth)
    assert listing.status == 200
    keys = (await listing.json())["api_keys"]
    assert [k["id"] for k in keys] == [body["id"]]
    assert "key" not in keys[0] and body["key"] not in await listing.text()


async def test_a_key_acts_as_its_owner_on_the_rest_api(both_client: Client) -> None:
    """A bearer API key reads the owner's /v1/me and stamps its last use."""
    ana = await signup(both_client)
    key = (await _new_key(both_client, ana.auth))["key"]
    me = await both_client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert me.status == 200 and (await me.json())["id"] == ana.id
    keys = (await (await both_client.get("/v1/api-keys", headers=ana.auth)).json())["api_keys"]
    assert keys[0]["last_used_at"] is not None


async def test_a_revoked_key_stops_working_at_once(both_client: Client) -> None:
    """DELETE answers 204 and the next request with the key is 401."""
    ana = await signup(both_client)
    body = await _new_key(both_client, ana.auth)
    bearer = {"Authorization": f"Bearer {body['key']}"}
    assert (await both_client.get("/v1/me", headers=bearer)).status == 200
    resp = await both_client.delete(f"/v1/api-keys/{body['id']}", headers=ana.auth)
    assert resp.status == 204
    await problem(await both_client.get("/v1/me", headers=bearer), 401, "unauthorized")
    await problem(await both_client.delete(f"/v1/api-keys/{body['id']}", headers=ana.auth), 404, "not_found")


async def test_another_users_key_is_404_and_keeps_working(both_client: Client) -> None:
    """Bo cannot revoke or list Ana's key: the same 404 as a key that does not exist."""
    ana, bo = await signup(both_client), await signup(both_client)
    body = await _new_key(both_client, ana.auth)
    await problem(await both_client.delete(f"/v1/api-keys/{body['id']}", headers=bo.auth), 404, "not_found")
    assert (await (await both_client.get("/v1/api-keys", headers=bo.auth)).json())["api_keys"] == []
    me = await both_client.get("/v1/me", headers={"Authorization": f"Bearer {body['key']}"})
    assert me.status == 200


async def test_a_key_cannot_manage_keys(both_client: Client) -> None:
    """A key may not mint, list or revoke keys (403 api_key_not_allowed): that needs the owner's sign-in."""
    ana = await signup(both_client)
    body = await _new_key(both_client, ana.auth)
    bearer = {"Authorization": f"Bearer {body['key']}"}
    await problem(
        await both_client.post("/v1/api-keys", json={"name": "x"}, headers=bearer), 403, "api_key_not_allowed"
    )
    await problem(await both_client.get("/v1/api-keys", headers=bearer), 403, "api_key_not_allowed")
    await problem(
        await both_client.delete(f"/v1/api-keys/{body['id']}", headers=bearer), 403, "api_key_not_allowed"
    )


async def test_bad_names_and_missing_credentials_are_refused(both_client: Client) -> None:
    """422 for a blank, too long or unknown-field body; 401 without credentials or with a wrong key."""
    ana = await signup(both_client)
    for body in (
        {"name": "   "},
        {"name": "x" * 201},
        {},
        {"name": "ok", "scope": "admin"},
        {"name": "a\nb"},
    ):
        await problem(
            await both_client.post("/v1/api-keys", json=body, headers=ana.auth), 422, "invalid_request"
        )
    await problem(await both_client.post("/v1/api-keys", json={"name": "x"}), 401, "unauthorized")
    wrong = {"Authorization": "Bearer pk_" + "A" * 40}
    await problem(await both_client.get("/v1/me", headers=wrong), 401, "unauthorized")


async def test_deleting_the_account_revokes_its_keys(both_client: Client) -> None:
    """DELETE /v1/me removes the keys with the account."""
    ana = await signup(both_client)
    key = (await _new_key(both_client, ana.auth))["key"]
    assert (await both_client.delete("/v1/me", headers=ana.auth)).status == 204
    await problem(
        await both_client.get("/v1/me", headers={"Authorization": f"Bearer {key}"}), 401, "unauthorized"
    )


async def test_a_user_has_at_most_max_keys(both_client: Client) -> None:
    """Past MAX_KEYS_PER_USER live keys a new one is 409 too_many_api_keys; revoking one frees a place."""
    from storage.api_keys import MAX_KEYS_PER_USER

    ana = await signup(both_client)
    made = [await _new_key(both_client, ana.auth, f"k{i}") for i in range(MAX_KEYS_PER_USER)]
    resp = await both_client.post("/v1/api-keys", json={"name": "one more"}, headers=ana.auth)
    await problem(resp, 409, "too_many_api_keys")
    assert (await both_client.delete(f"/v1/api-keys/{made[0]['id']}", headers=ana.auth)).status == 204
    await _new_key(both_client, ana.auth, "one more")
