"""``GET /v1/lead-stage-changes/{key}`` on a real socket: a change's status through its life, and who may read it."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import jsonschema_rs  # schemathesis's own validator (the fuzz tests' dependency)
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from producers.openapi import CHANGES_PATH, openapi_document
from producers.status import account_secrets, status_token
from producers.webhook import create_app
from tests.harness import eventually, reconciling_soon, worker_settings
from tests.webhook_signing import signed_headers
from worker.core.settings import Account, Secret, Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker

SECRET = "whsec_" + base64.b64encode(b"leadstage status test secret!!!!").decode()
HOT = {"name": "Hot", "applyTo": "lead"}
Client = TestClient[Any, Any]


@pytest.fixture
def settings(redis_url: str, fake_ivvy: RunningFakeIvvy) -> Settings:
    base = worker_settings(
        redis_url, fake_ivvy.url, webhook_secret=Secret(SECRET), backoff_base_s=0.3, backoff_max_s=0.3
    )
    acme = dataclasses.replace(base.accounts["default"], name="acme")
    accounts: dict[str, Account] = {**base.accounts, "acme": acme}
    return dataclasses.replace(base, accounts=accounts)


@pytest.fixture
async def client(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings, redis_client), host="127.0.0.1")) as test_client:
        yield test_client


def conforms(body: dict[str, Any]) -> bool:
    """Whether a 200 body is a ChangeStatus as the OpenAPI document describes it."""
    document = openapi_document(1024)
    schema = {"components": document["components"], "$ref": "#/components/schemas/ChangeStatus"}
    return bool(jsonschema_rs.validator_for(schema).is_valid(body))


async def post(client: Client, payload: object, *, msg_id: str | None = None) -> tuple[int, dict[str, Any], str | None]:
    """A signed POST of ``payload`` (the webhook-id is its idempotency key)."""
    body = orjson.dumps(payload)
    response = await client.post(CHANGES_PATH, data=body, headers=signed_headers(body, SECRET, msg_id=msg_id))
    return response.status, await response.json(), response.headers.get("Location")


async def get(client: Client, location: str, token: str | None, **headers: str) -> tuple[int, dict[str, Any]]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = await client.get(location, headers=headers)
    return response.status, await response.json(content_type=None)


async def test_the_status_of_a_change_through_its_life(
    client: Client, settings: Settings, fake_ivvy: RunningFakeIvvy
) -> None:
    status, accepted, location = await post(client, HOT)
    assert status == 202
    [receipt] = accepted["receipts"]
    assert location == receipt["location"] == f"{CHANGES_PATH}/{receipt['idempotency_key']}"
    token = status_token(SECRET)

    code, queued = await get(client, location, token)
    assert code == 200
    assert (queued["state"], queued["attempts"], queued["event"]) == ("queued", 0, None)
    assert conforms(queued)

    fake_ivvy.fake.update_faults({"error_rate": 1})  # iVvy answers 500: the change is retried
    async with running_worker(reconciling_soon(settings)):
        seen: list[dict[str, Any]] = []

        async def retrying() -> bool:
            code, body = await get(client, location, token)
            seen.append(body)
            return code == 200 and bool(body["state"] == "retrying")

        await eventually(retrying)
        failing = seen[-1]
        assert failing["event"] is None
        assert failing["history"][0]["error_code"] == "unavailable"  # the fake's 503
        assert failing["next_attempt_at"] is not None
        assert conforms(failing)

        fake_ivvy.fake.update_faults({"error_rate": 0})

        async def succeeded() -> bool:
            return bool((await get(client, location, token))[1]["state"] == "succeeded")

        await eventually(succeeded)
    code, done = await get(client, location, token)
    assert code == 200
    assert conforms(done)
    event = done["event"]
    assert (event["event"], event["idempotency_key"], event["retryable"]) == (
        "succeeded",
        receipt["idempotency_key"],
        None,
    )
    assert event["stage_id"] == done["stage_id"]
    assert fake_ivvy.fake.stages[event["stage_id"]].name == "Hot"
    assert event["attempt"] == done["attempts"] >= 2


async def test_only_a_token_of_the_changes_account_reads_it(client: Client) -> None:
    _, accepted, location = await post(client, {**HOT, "account": "acme"})
    assert location is not None
    assert location.endswith("?account=acme")
    key = accepted["receipts"][0]["idempotency_key"]
    assert (await get(client, location, status_token(SECRET, "acme")))[0] == 200

    for token in (None, "", status_token(SECRET, "default"), status_token(base64.b64encode(b"other"), "acme")):
        code, problem = await get(client, location, token)
        assert code == 401, token
        assert "account 'acme'" in problem["detail"]
    wrong_scheme = await client.get(location, headers={"Authorization": f"Basic {status_token(SECRET, 'acme')}"})
    assert wrong_scheme.status == 401
    assert wrong_scheme.headers["WWW-Authenticate"].startswith("Bearer")

    # The default account's token, asking as the default account, does not find acme's change.
    code, problem = await get(client, f"{CHANGES_PATH}/{key}", status_token(SECRET))
    assert code == 404
    assert "'default' has no change" in problem["detail"]


def test_a_token_comes_from_a_secret_that_may_sign_for_the_account(settings: Settings) -> None:
    """WEBHOOK_SECRET's secrets sign for every account, an account's own only for it (rotation: each)."""
    own, old = (base64.b64encode(bytes([n]) * 32).decode() for n in (1, 2))
    both = dataclasses.replace(settings, webhook_account_secrets={"acme": Secret(f"whsec_{own} whsec_{old}")})
    shared = base64.b64decode(SECRET.removeprefix("whsec_"))
    assert account_secrets(both, "acme") == (shared, base64.b64decode(own), base64.b64decode(old))
    assert account_secrets(both, "default") == (shared,)


async def test_any_key_round_trips_through_its_location(client: Client, redis_client: aioredis.Redis) -> None:
    key = "order/7?x=1&y=%20 #frag"
    status, _, location = await post(client, HOT, msg_id=key)
    assert status == 202
    assert location == f"{CHANGES_PATH}/{quote(key, safe='')}"
    code, standing = await get(client, location, status_token(SECRET))
    assert code == 200
    assert standing["idempotency_key"] == key


async def test_bad_requests_are_named(client: Client, settings: Settings, redis_url: str) -> None:
    token = status_token(SECRET)
    code, problem = await get(client, f"{CHANGES_PATH}/k", token, **{"X-Leadstage-Account": "no spaces allowed"})
    assert code == 400
    assert problem["errors"][0]["field"] == "X-Leadstage-Account"
    code, problem = await get(client, f"{CHANGES_PATH}/{'k' * 256}", token)
    assert code == 400
    assert problem["errors"][0]["field"] == "idempotency_key"
    assert (await get(client, f"{CHANGES_PATH}/never", token))[0] == 404

    down = aioredis.Redis.from_url("redis://127.0.0.1:18999/0", socket_connect_timeout=1)  # nothing listens there
    async with TestClient(TestServer(create_app(settings, down), host="127.0.0.1")) as unreachable:
        response = await unreachable.get(f"{CHANGES_PATH}/k", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 503
        assert response.headers["Retry-After"]
    await down.aclose()
