"""The HTTP producer on a real loopback socket, signed by the Standard Webhooks reference library."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import io
import json
import logging
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import structlog
from aiohttp import ClientTimeout
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from producers.openapi import CHANGES_PATH, MAX_BATCH
from producers.status import status_token
from producers.webhook import create_app
from tests.conftest import TEST_API_SECRET
from tests.redis_servers import redis_servers
from tests.webhook_signing import signed_headers
from worker.core import keys
from worker.core.errors import ConfigError
from worker.core.logs import configure_logging
from worker.core.redis_connection import connect_redis_of
from worker.core.settings import Account, Secret, Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy

SECRET = "whsec_" + base64.b64encode(b"leadstage webhook test secret!!!").decode()
HOT = {"name": "Hot", "applyTo": "lead"}
PROBLEM = "application/problem+json"


def signed(
    body: bytes, *, msg_id: str | None = None, at: datetime | None = None, content_type: str = "application/json"
) -> dict[str, str]:
    """Headers of a webhook signed with ``SECRET`` by the reference library."""
    return signed_headers(body, SECRET, msg_id=msg_id, at=at, content_type=content_type)


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, webhook_secret=Secret(SECRET), webhook_max_body_bytes=64 * 1024)


async def serve(settings: Settings, redis: aioredis.Redis) -> TestClient[Any, Any]:
    return TestClient(TestServer(create_app(settings, redis), host="127.0.0.1"))


@pytest.fixture
async def client(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[TestClient[Any, Any]]:
    async with await serve(settings, redis_client) as test_client:
        yield test_client


async def post(
    client: TestClient[Any, Any], payload: object, *, extra: dict[str, str] | None = None, **sign: Any
) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps(payload)
    response = await client.post(CHANGES_PATH, data=body, headers={**signed(body, **sign), **(extra or {})})
    return response.status, await response.json(content_type=None)


async def queue(redis_client: aioredis.Redis) -> list[bytes]:
    """The job ids queued for every account (a queue per account)."""
    members: list[bytes] = []
    async for name in redis_client.scan_iter(match=keys.queue_key("leadstage:queue", "*")):
        members += await redis_client.zrange(name, 0, -1)
    return sorted(members)


async def test_a_signed_change_is_enqueued_once_even_when_redelivered(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    body = orjson.dumps(HOT)
    headers = signed(body, msg_id="msg_1")
    first = await client.post(CHANGES_PATH, data=body, headers=headers)
    assert first.status == 202
    assert await first.json() == {
        "receipts": [
            {
                "job_id": "default:msg_1",
                "idempotency_key": "msg_1",
                "status": "queued",
                "location": "/v1/lead-stage-changes/msg_1",
            }
        ]
    }
    assert first.headers["Location"] == "/v1/lead-stage-changes/msg_1"
    again = await client.post(CHANGES_PATH, data=body, headers=headers)
    assert again.status == 202
    assert (await again.json())["receipts"][0]["status"] == "duplicate"
    assert await queue(redis_client) == [b"default:msg_1"]
    assert await redis_client.hget(keys.ledger_key("default:msg_1"), "source") == b"webhook:msg_1"  # type: ignore[misc]  # redis-py's async stubs


async def test_a_list_gets_one_key_per_item(client: TestClient[Any, Any], redis_client: aioredis.Redis) -> None:
    status, body = await post(client, {"changes": [HOT, {"id": 1001, "colour": "#FF0000"}]}, msg_id="msg_2")
    assert status == 202
    assert [r["idempotency_key"] for r in body["receipts"]] == ["msg_2:0", "msg_2:1"]
    assert await queue(redis_client) == [b"default:msg_2:0", b"default:msg_2:1"]


async def test_the_key_is_the_signed_webhook_id_and_an_unsigned_header_cannot_change_it(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    """One captured signed add, replayed within the tolerance with other Idempotency-Key values,
    must not become more changes (it created four stages before)."""
    body = orjson.dumps(HOT)
    headers = signed(body, msg_id="order-7")
    for key in ("k1", "k2", '"k3"'):
        response = await client.post(CHANGES_PATH, data=body, headers={**headers, "Idempotency-Key": key})
        assert response.status == 400
        problem = await response.json(content_type=PROBLEM)
        assert problem["errors"][0]["field"] == "Idempotency-Key"
        assert "webhook-id" in problem["errors"][0]["reason"]
    assert await redis_client.dbsize() == 0
    # The header may repeat the signed key (bare or as a structured-field string).
    for key in ("order-7", '"order-7"'):
        response = await client.post(CHANGES_PATH, data=body, headers={**headers, "Idempotency-Key": key})
        assert response.status == 202
    assert await queue(redis_client) == [b"default:order-7"]
    # Another delivery with the same key and a different change: refused.
    status, problem = await post(client, {"name": "Cold", "applyTo": 2}, msg_id="order-7")
    assert status == 422
    assert problem["status"] == 422
    assert "order-7" in problem["detail"]
    assert await queue(redis_client) == [b"default:order-7"]


async def test_the_webhook_id_follows_the_change_models_key_rules(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    """The key rules are worker.core.change's, as for the CLI and the library: checked on the signed id,
    and on each item's key of a list (the id and ':{index}')."""
    status, problem = await post(client, HOT, msg_id="k" * 256)
    assert status == 400
    assert problem["errors"][0]["field"] == "webhook-id"
    status, problem = await post(client, {"changes": [HOT] * 11}, msg_id="k" * 254)
    assert status == 400
    assert {e["index"] for e in problem["errors"]} == set(range(11))
    assert await redis_client.dbsize() == 0


async def test_the_account_is_signed_and_an_unsigned_header_or_query_cannot_change_it(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    status, body = await post(client, {**HOT, "account": "eu"}, msg_id="m")
    assert (status, body["receipts"][0]["job_id"]) == (202, "eu:m")
    status, body = await post(client, {"account": "us", "changes": [HOT]}, msg_id="m")
    assert (status, body["receipts"][0]["job_id"]) == (202, "us:m:0")
    # The header and the query may repeat the signed account, not change it.
    status, body = await post(client, {**HOT, "account": "eu"}, msg_id="m", extra={"X-Leadstage-Account": "eu"})
    assert (status, body["receipts"][0]["status"]) == (202, "duplicate")
    payload = orjson.dumps(HOT)
    headers = signed(payload, msg_id="n")
    for name in ("X-Leadstage-Account", "account"):
        if name == "account":
            response = await client.post(CHANGES_PATH + "?account=eu", data=payload, headers=headers)
        else:
            response = await client.post(CHANGES_PATH, data=payload, headers={**headers, name: "eu"})
        assert response.status == 400
        problem = await response.json(content_type=PROBLEM)
        assert problem["errors"][0]["field"] == name
        assert "not covered by the signature" in problem["errors"][0]["reason"]
    status, problem = await post(client, {**HOT, "account": "not valid"})
    assert status == 400
    assert problem["errors"][0]["field"] == "account"
    status, problem = await post(client, {**HOT, "account": 7})
    assert (status, problem["errors"]) == (400, [{"field": "account", "reason": "must be a string"}])
    assert await queue(redis_client) == [b"eu:m", b"us:m:0"]


async def test_an_unknown_account_is_refused_when_accounts_are_configured(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    account = Account("default", "https://ivvy.example", "key", Secret(TEST_API_SECRET), 5.0)
    async with await serve(dataclasses.replace(settings, accounts={"default": account}), redis_client) as client:
        status, problem = await post(client, {**HOT, "account": "other"})
        assert status == 400
        assert problem["errors"] == [
            {
                "field": "account",
                "reason": "is not configured (see LEADSTAGE_ACCOUNT_NAMES, LEADSTAGE_ACCOUNTS_FILE, "
                "LEADSTAGE_WEBHOOK_SECRETS_FILE)",
            }
        ]
        assert (await post(client, HOT))[0] == 202


EU_SECRET = "whsec_" + base64.b64encode(b"the eu account's own secret key!").decode()
EU_OLD_SECRET = "whsec_" + base64.b64encode(b"the eu account's old secret key!").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"leadstage webhook's next secret!").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"a secret configured nowhere at all").decode()


def signed_with(secret: str, body: bytes, msg_id: str) -> dict[str, str]:
    return signed_headers(body, secret, msg_id=msg_id)


async def test_an_accounts_own_secret_decides_the_account(settings: Settings, redis_client: aioredis.Redis) -> None:
    """Per-account secrets (LEADSTAGE_WEBHOOK_SECRETS_FILE): the secret that verifies is the
    account, two of them valid at once while rotating; the body may only repeat it."""
    per_account = dataclasses.replace(
        settings, webhook_account_secrets={"eu": Secret(f"{EU_SECRET} {EU_OLD_SECRET}"), "us": Secret(NEW_SECRET)}
    )
    async with await serve(per_account, redis_client) as client:
        body = orjson.dumps(HOT)
        for number, secret in enumerate((EU_SECRET, EU_OLD_SECRET)):
            response = await client.post(CHANGES_PATH, data=body, headers=signed_with(secret, body, f"e{number}"))
            assert response.status == 202
            assert (await response.json())["receipts"][0]["job_id"] == f"eu:e{number}"
        named = orjson.dumps({**HOT, "account": "us"})
        response = await client.post(CHANGES_PATH, data=named, headers=signed_with(EU_SECRET, named, "e2"))
        assert response.status == 403
        assert "'eu'" in (await response.json(content_type=PROBLEM))["detail"]
        response = await client.post(
            CHANGES_PATH, data=body, headers={**signed_with(EU_SECRET, body, "e3"), "X-Leadstage-Account": "us"}
        )
        assert response.status == 400
        # WEBHOOK_SECRET's secret serves the accounts of the list, named in the body; not others.
        assert (await post(client, {**HOT, "account": "us"}, msg_id="g"))[0] == 202
        assert (await post(client, {**HOT, "account": "asia"}, msg_id="h"))[0] == 400
        # A secret of no account: 401.
        response = await client.post(CHANGES_PATH, data=body, headers=signed_with(OTHER_SECRET, body, "x"))
        assert response.status == 401
    assert await queue(redis_client) == [b"eu:e0", b"eu:e1", b"us:g"]


async def test_several_webhook_secrets_are_valid_at_once_for_rotation(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    rotating = dataclasses.replace(settings, webhook_secret=Secret(f"{NEW_SECRET} {SECRET}"))
    async with await serve(rotating, redis_client) as client:
        body = orjson.dumps(HOT)
        for secret in (NEW_SECRET, SECRET):
            response = await client.post(CHANGES_PATH, data=body, headers=signed_with(secret, body, f"r-{secret[-6:]}"))
            assert response.status == 202
        response = await client.post(CHANGES_PATH, data=body, headers=signed_with(EU_SECRET, body, "r-eu"))
        assert response.status == 401
    assert len(await queue(redis_client)) == 2


def test_one_secret_for_two_accounts_is_a_config_error(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    shared = Settings(
        redis_url=redis_url,
        webhook_secret=Secret(SECRET),
        webhook_account_secrets={"eu": Secret(f"{EU_SECRET} {SECRET}")},
    )
    with pytest.raises(ConfigError, match="one webhook secret is configured for both") as error:
        create_app(shared, client)
    assert SECRET.removeprefix("whsec_") not in str(error.value)
    only_accounts = Settings(redis_url=redis_url, webhook_account_secrets={"eu": Secret(EU_SECRET)})
    assert create_app(only_accounts, client) is not None


def tamper_body(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
    return headers, body.replace(b"Hot", b"Hat")


def tamper_signature(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
    signature = base64.b64decode(headers["webhook-signature"].split(",")[1])
    forged = base64.b64encode(bytes([signature[0] ^ 1]) + signature[1:]).decode()
    return {**headers, "webhook-signature": "v1," + forged}, body


def tamper_id(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
    return {**headers, "webhook-id": headers["webhook-id"] + "x"}, body


def drop_signature(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
    return {k: v for k, v in headers.items() if k != "webhook-signature"}, body


def garble_signature(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
    return {**headers, "webhook-signature": "not-a-signature"}, body


def wrong_secret(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
    other = Webhook(base64.b64encode(b"another secret").decode())
    at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
    return {**headers, "webhook-signature": other.sign(headers["webhook-id"], at, body.decode())}, body


@pytest.mark.parametrize(
    "tamper", [tamper_body, tamper_signature, tamper_id, drop_signature, garble_signature, wrong_secret]
)
async def test_a_bad_signature_is_401(client: TestClient[Any, Any], redis_client: aioredis.Redis, tamper: Any) -> None:
    body = orjson.dumps(HOT)
    headers, sent = tamper(signed(body), body)
    response = await client.post(CHANGES_PATH, data=sent, headers=headers)
    assert response.status == 401
    assert response.content_type == PROBLEM
    assert await redis_client.dbsize() == 0


@pytest.mark.parametrize("offset", [timedelta(minutes=-6), timedelta(minutes=6)])
async def test_a_timestamp_outside_five_minutes_is_401(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, offset: timedelta
) -> None:
    status, problem = await post(client, HOT, at=datetime.now(UTC) + offset)
    assert status == 401
    assert "timestamp" in problem["detail"]
    assert await redis_client.dbsize() == 0


@pytest.mark.parametrize(
    ("payload", "errors"),
    [
        ({"name": "Hot"}, [{"field": "applyTo", "reason": "is required when id is absent (an add)"}]),
        (
            {"id": -1, "colour": "blue", "extra": 1},
            [
                {"field": "extra", "reason": "is not a known field (allowed: id, name, colour, applyTo)"},
                {"field": "id", "reason": "must be a positive integer, not -1"},
                {"field": "colour", "reason": 'must be a #rrggbb hex colour such as #7ee546, not "blue"'},
            ],
        ),
        ([HOT], [{"field": "change", "reason": "must be a JSON object"}]),
    ],
)
async def test_an_invalid_change_is_400_naming_each_field(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, payload: object, errors: list[dict[str, str]]
) -> None:
    status, problem = await post(client, payload)
    assert status == 400
    assert problem["status"] == 400
    assert problem["errors"] == errors
    assert await redis_client.dbsize() == 0


async def test_a_list_with_one_bad_item_enqueues_nothing(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    status, problem = await post(client, {"changes": [HOT, {"id": 5}, HOT]})
    assert status == 400
    assert [(e["index"], e["field"]) for e in problem["errors"]] == [(1, "change")]
    assert await redis_client.dbsize() == 0


@pytest.mark.parametrize(
    "payload",
    [{"changes": []}, {"changes": [HOT] * (MAX_BATCH + 1)}, {"changes": HOT}, {"changes": [HOT], "more": 1}],
)
async def test_a_bad_list_is_400(client: TestClient[Any, Any], redis_client: aioredis.Redis, payload: object) -> None:
    status, problem = await post(client, payload)
    assert status == 400
    assert problem["errors"]
    assert await redis_client.dbsize() == 0


@pytest.mark.parametrize("body", [b"{not json", b"[" * 2000 + b"]" * 2000, b'{"id": 1e999}', b""])
async def test_a_body_that_is_not_json_is_400(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, body: bytes
) -> None:
    response = await client.post(CHANGES_PATH, data=body, headers=signed(body))
    assert response.status == 400
    assert response.content_type == PROBLEM
    assert await redis_client.dbsize() == 0


async def test_a_body_that_is_not_utf8_cannot_be_signed(client: TestClient[Any, Any]) -> None:
    headers = signed(b"{}")
    response = await client.post(CHANGES_PATH, data=b'{"name": "\xff"}', headers=headers)
    assert response.status == 401


async def test_only_json_is_accepted(client: TestClient[Any, Any], redis_client: aioredis.Redis) -> None:
    body = orjson.dumps(HOT)
    response = await client.post(CHANGES_PATH, data=body, headers=signed(body, content_type="text/plain"))
    assert response.status == 415
    assert (await response.json(content_type=PROBLEM))["title"] == "Unsupported Media Type"
    assert await redis_client.dbsize() == 0


async def test_a_body_over_the_limit_is_413(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, settings: Settings
) -> None:
    body = orjson.dumps({"changes": [{"name": "x" * 200, "applyTo": 1}] * 400})
    assert len(body) > settings.webhook_max_body_bytes
    response = await client.post(CHANGES_PATH, data=body, headers=signed(body))
    assert response.status == 413
    assert response.content_type == PROBLEM

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut off while reading
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = await client.post(CHANGES_PATH, data=chunks(), headers=signed(body))
    assert response.status == 413
    assert await redis_client.dbsize() == 0


async def test_redis_down_is_503_and_not_ready(settings: Settings) -> None:
    down = aioredis.Redis.from_url("redis://127.0.0.1:1/0")
    try:
        async with await serve(settings, down) as client:
            body = orjson.dumps(HOT)
            response = await client.post(CHANGES_PATH, data=body, headers=signed(body))
            assert response.status == 503
            assert response.headers["Retry-After"].isdigit()
            assert response.content_type == PROBLEM
            ready = await client.get("/readyz")
            assert ready.status == 503
            assert "Retry-After" in ready.headers
            assert (await client.get("/healthz")).status == 200
    finally:
        await down.aclose()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "GZIP", "identity"])
async def test_a_compressed_body_is_decoded_before_it_is_verified(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, coding: str
) -> None:
    body = orjson.dumps(HOT)
    encoders: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "deflate": zlib.compress}
    sent = encoders.get(coding.lower(), bytes)(body)
    response = await client.post(
        CHANGES_PATH, data=sent, headers={**signed(body, msg_id="z"), "Content-Encoding": coding}
    )
    assert response.status == 202, await response.text()
    assert await queue(redis_client) == [b"default:z"]


@pytest.mark.parametrize(
    ("coding", "sent"),
    [
        ("gzip", b"this is not gzip"),
        ("deflate", b"nor is this deflate"),
        ("gzip", gzip.compress(orjson.dumps(HOT), mtime=0)[:10] + b"\x00" * 20),  # corrupt
    ],
)
async def test_a_body_that_does_not_decode_is_400(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, coding: str, sent: bytes, log_stream: io.StringIO
) -> None:
    response = await client.post(CHANGES_PATH, data=sent, headers={**signed(b"{}"), "Content-Encoding": coding})
    assert response.status == 400
    problem = await response.json(content_type=PROBLEM)
    assert problem["detail"] == f"the body cannot be decoded as {coding}"
    assert await redis_client.dbsize() == 0
    assert "Traceback" not in log_stream.getvalue()
    assert "webhook.error" not in log_stream.getvalue()


# br and zstd, which aiohttp's parser refuses itself: tests/test_hostile_input.py, on the served webhook.
@pytest.mark.parametrize("coding", ["compress", "x-gzip", "gzip, gzip", "gzip;q=1", "\u00e9"])
async def test_an_unknown_content_encoding_is_415(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, coding: str
) -> None:
    body = orjson.dumps(HOT)
    response = await client.post(
        CHANGES_PATH, data=body, headers={**signed(body), "Content-Encoding": coding.encode().decode("latin-1")}
    )
    assert response.status == 415
    assert response.headers["Accept-Encoding"] == "gzip, deflate"
    assert (await response.json(content_type=PROBLEM))["title"] == "Unsupported Media Type"
    assert await redis_client.dbsize() == 0


async def test_two_content_encoding_headers_are_415(client: TestClient[Any, Any]) -> None:
    body = orjson.dumps(HOT)
    headers = CIMultiDict(signed(body))
    headers.add("Content-Encoding", "identity")
    headers.add("Content-Encoding", "gzip")
    response = await client.post(CHANGES_PATH, data=body, headers=headers)
    assert response.status == 415


async def test_a_gzip_bomb_is_413(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, settings: Settings
) -> None:
    inflated = b'{"name": "' + b" " * (settings.webhook_max_body_bytes * 4) + b'x", "applyTo": 1}'
    sent = gzip.compress(inflated)
    assert len(sent) < settings.webhook_max_body_bytes
    response = await client.post(CHANGES_PATH, data=sent, headers={**signed(b"{}"), "Content-Encoding": "gzip"})
    assert response.status == 413
    assert await redis_client.dbsize() == 0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"name": "Hot", "applyTo": 1, "name": "Cold"}', "name"),
        ('{"changes": [{"name": "Hot", "applyTo": 1}], "changes": []}', "changes"),
        ('{"changes": [{"id": 5, "colour": "#ffffff", "colour": "#000000"}]}', "colour"),
        ('{"account": "eu", "name": "Hot", "applyTo": 1, "account": "us"}', "account"),
    ],
)
async def test_a_repeated_key_in_an_object_is_400(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, text: str, key: str
) -> None:
    body = text.encode()
    response = await client.post(CHANGES_PATH, data=body, headers=signed(body))
    assert response.status == 400
    assert (await response.json(content_type=PROBLEM))["detail"] == f"the body repeats the key {key!r} in an object"
    assert await redis_client.dbsize() == 0


async def test_a_repeated_webhook_header_is_401(client: TestClient[Any, Any], redis_client: aioredis.Redis) -> None:
    """The library verifies one value and the key would be read from another: refused."""
    body = orjson.dumps(HOT)
    headers = CIMultiDict(signed(body, msg_id="signed-id"))
    headers.add("webhook-id", "chosen-id")
    response = await client.post(CHANGES_PATH, data=body, headers=headers)
    assert response.status == 401
    assert "webhook-id is given twice" in (await response.json(content_type=PROBLEM))["detail"]
    assert await redis_client.dbsize() == 0


@pytest.mark.system  # starts a redis-server of its own (to SIGSTOP it)
async def test_a_hung_redis_is_503_in_bounded_time_and_the_retry_is_safe(settings: Settings, tmp_path: Path) -> None:
    """Redis stopped by SIGSTOP accepts connections and never answers: 503 after the webhook's
    Redis timeout, saying the outcome is unknown; the same delivery after it resumes is enqueued
    at most once."""
    with redis_servers(tmp_path, ()) as (server,):
        settings = dataclasses.replace(settings, redis_url=server.url, redis_timeout_s=0.3)
        hung = aioredis.Redis.from_url(server.url)  # no socket timeout: the webhook's own bound answers
        try:
            async with TestClient(
                TestServer(create_app(settings, hung), host="127.0.0.1"),
                timeout=ClientTimeout(total=60),
            ) as client:
                body = orjson.dumps(HOT)
                assert (
                    await client.post(CHANGES_PATH, data=body, headers=signed(body, msg_id="msg_hung"))
                ).status == 202
                server.pause()
                other = orjson.dumps({"name": "Cold", "applyTo": 1})
                other_headers = signed(other, msg_id="msg_during")
                response = await client.post(CHANGES_PATH, data=other, headers=other_headers)
                assert response.status == 503
                assert response.headers["Retry-After"].isdigit()
                problem = await response.json(content_type=PROBLEM)
                assert "unknown" in problem["detail"]
                assert "same webhook-id" in problem["detail"]
                server.resume()
                retried = await client.post(CHANGES_PATH, data=other, headers=other_headers)
                assert retried.status == 202
                assert (await retried.json())["receipts"][0]["status"] in ("queued", "duplicate")
                members = await hung.zrange(keys.queue_key("leadstage:queue", "default"), 0, -1)
                assert sorted(members) == [b"default:msg_during", b"default:msg_hung"]
        finally:
            server.resume()
            await hung.aclose()


async def test_health_readiness_metrics_and_method(client: TestClient[Any, Any]) -> None:
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    assert await (await client.get("/readyz")).json() == {"status": "ready"}
    await post(client, HOT)
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    assert 'leadstage_webhook_requests_total{status="202"}' in await metrics.text()
    wrong_method = await client.get(CHANGES_PATH)
    assert wrong_method.status == 405
    assert wrong_method.content_type == PROBLEM
    assert "POST" in wrong_method.headers["Allow"]


async def test_the_openapi_document_describes_the_endpoint(client: TestClient[Any, Any]) -> None:
    response = await client.get("/openapi.json")
    document = json.loads(await response.text())
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        CHANGES_PATH,
        CHANGES_PATH + "/{idempotency_key}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }
    post_operation = document["paths"][CHANGES_PATH]["post"]
    assert set(post_operation["responses"]) == {"202", "400", "401", "403", "408", "413", "415", "422", "503"}
    headers = {p["name"] for p in post_operation["parameters"] if p["in"] == "header"}
    # Only signed headers decide anything: Idempotency-Key and X-Leadstage-Account are not parameters.
    assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    change = document["components"]["schemas"]["LeadStageChange"]
    assert change["additionalProperties"] is False
    assert change["properties"]["colour"]["pattern"] == "^#[0-9a-fA-F]{6}$"
    assert change["properties"]["applyTo"]["enum"] == [1, 2, "opportunity", "lead"]
    assert change["properties"]["id"]["minimum"] == 1
    assert (change["properties"]["name"]["minLength"], change["properties"]["name"]["maxLength"]) == (1, 255)


@pytest.fixture
def log_stream(settings: Settings) -> Iterator[io.StringIO]:
    """The process's log lines, as JSON, for one test; logging is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(dataclasses.replace(settings, log_format="json"), stream=stream, level="info")
    try:
        yield stream
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        structlog.reset_defaults()


async def test_requests_are_logged_with_status_and_without_secrets(
    client: TestClient[Any, Any], log_stream: io.StringIO
) -> None:
    stream = log_stream
    body = orjson.dumps(HOT)
    headers = signed(body, msg_id="msg_logged")
    assert (await client.post(CHANGES_PATH, data=body, headers=headers)).status == 202
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    logged = [line for line in lines if line["event"] == "webhook.request"]
    assert logged
    assert logged[-1]["status"] == 202
    assert logged[-1]["webhook_id"] == "msg_logged"
    text = stream.getvalue()
    assert headers["webhook-signature"].split(",")[1] not in text
    assert SECRET.removeprefix("whsec_") not in text


def test_the_webhook_needs_its_secret(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET"):
        create_app(Settings(redis_url=redis_url), aioredis.Redis.from_url(redis_url))


async def test_a_queue_key_of_another_kind_is_503_and_enqueues_nothing(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    queue = keys.queue_key("leadstage:queue", "default")
    await redis_client.set(queue, "another program's")
    with capture_logs() as events:
        status, problem = await post(client, HOT)
    assert (status, problem["detail"]) == (503, "the service cannot use its Redis as configured; see the server log")
    logged = next(e["error"] for e in events if e["event"] == "http.redis_misconfigured")
    assert f"a string at '{queue}', where leadstage keeps a zset" in logged
    assert await redis_client.keys("leadstage:ledger:*") == []


async def test_a_redis_url_that_is_not_redis_is_503_not_a_500(settings: Settings, fake_ivvy: RunningFakeIvvy) -> None:
    """REDIS_URL at an HTTP server (the fake iVvy): the operator's mistake, not the client's; the
    enqueue, the status route and /readyz say 503 and the log says why."""
    settings = dataclasses.replace(settings, redis_url=fake_ivvy.url.replace("http://", "redis://") + "/0")
    not_redis = connect_redis_of(settings)
    try:
        with capture_logs() as events:
            async with await serve(settings, not_redis) as client:
                body = orjson.dumps(HOT)
                token = {"Authorization": f"Bearer {status_token(SECRET)}"}
                for response in (
                    await client.post(CHANGES_PATH, data=body, headers=signed(body)),
                    await client.get(CHANGES_PATH + "/some-key", headers=token),
                    await client.get("/readyz"),
                ):
                    assert response.status == 503, await response.text()
                    assert response.content_type == PROBLEM
                    assert "see the server log" in (await response.json(content_type=PROBLEM))["detail"]
        assert next(e["error"] for e in events if e["event"] == "http.redis_misconfigured").startswith("REDIS_URL")
    finally:
        await not_redis.aclose()
