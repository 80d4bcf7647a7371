"""The HTTP producer on a real loopback socket, signed by the Standard Webhooks reference library."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import orjson
import pytest
import redis.asyncio as aioredis
import structlog
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks.webhooks import Webhook

from producers.openapi import CHANGES_PATH, MAX_BATCH
from producers.webhook import create_app
from worker import keys
from worker.errors import ConfigError
from worker.logs import configure_logging
from worker.settings import Account, Secret, Settings

SECRET = "whsec_" + base64.b64encode(b"leadstage webhook test secret!!!").decode()
HOT = {"name": "Hot", "applyTo": "lead"}
PROBLEM = "application/problem+json"


def signed(
    body: bytes, *, msg_id: str | None = None, at: datetime | None = None, content_type: str = "application/json"
) -> dict[str, str]:
    """Headers of a webhook signed with ``SECRET`` by the reference library."""
    msg_id = msg_id or f"msg_{uuid4().hex}"
    at = at or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(msg_id, at, body.decode()),
        "Content-Type": content_type,
    }


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
    members: list[bytes] = await redis_client.zrange("leadstage:queue", 0, -1)
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


@pytest.mark.parametrize("header", ["order-7", '"order-7"'])
async def test_the_idempotency_key_header_wins_over_the_webhook_id(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, header: str
) -> None:
    status, body = await post(client, HOT, extra={"Idempotency-Key": header})
    assert status == 202
    assert body["receipts"][0]["job_id"] == "default:order-7"
    # Another delivery (another webhook-id) with the same key and a different change: refused.
    status, problem = await post(client, {"name": "Cold", "applyTo": 2}, extra={"Idempotency-Key": "order-7"})
    assert status == 422
    assert problem["status"] == 422
    assert "order-7" in problem["detail"]
    assert await queue(redis_client) == [b"default:order-7"]


async def test_the_account_comes_from_the_header_or_the_query(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    status, body = await post(client, HOT, msg_id="m", extra={"X-Leadstage-Account": "eu"})
    assert (status, body["receipts"][0]["job_id"]) == (202, "eu:m")
    payload = orjson.dumps(HOT)
    response = await client.post(CHANGES_PATH + "?account=us", data=payload, headers=signed(payload, msg_id="m"))
    assert (await response.json())["receipts"][0]["job_id"] == "us:m"
    status, problem = await post(client, HOT, extra={"X-Leadstage-Account": "not valid"})
    assert status == 400
    assert problem["errors"][0]["field"] == "X-Leadstage-Account"


async def test_an_unknown_account_is_refused_when_accounts_are_configured(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    account = Account("default", "https://ivvy.example", "key", Secret("s"), 5.0)
    async with await serve(dataclasses.replace(settings, accounts={"default": account}), redis_client) as client:
        status, problem = await post(client, HOT, extra={"X-Leadstage-Account": "other"})
        assert status == 400
        assert problem["errors"] == [
            {"field": "X-Leadstage-Account", "reason": "is not configured (see LEADSTAGE_ACCOUNTS_FILE)"}
        ]
        assert (await post(client, HOT))[0] == 202


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
    assert set(post_operation["responses"]) == {"202", "400", "401", "408", "413", "415", "422", "503"}
    headers = {p["name"] for p in post_operation["parameters"] if p["in"] == "header"}
    assert {"webhook-id", "webhook-timestamp", "webhook-signature", "Idempotency-Key"} <= headers
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
