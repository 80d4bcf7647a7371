"""Fuzzing the HTTP producer on a real socket: never a 5xx, nothing enqueued from bad input, and
every answer as its OpenAPI document says (schemathesis).

The app runs in a thread of its own (with its own event loop and Redis client), so these
synchronous Hypothesis and schemathesis tests talk to it over loopback like any client would.
Every request is signed with the Standard Webhooks reference library over the exact bytes sent.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import hypothesis
import orjson
import pytest
import redis
import redis.asyncio as aioredis
import schemathesis
from aiohttp import web
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from producers.openapi import CHANGES_PATH, openapi_document
from producers.webhook import create_app
from tests.webhook_signing import signed_headers
from worker.core import keys
from worker.core.change import ACCOUNT_PATTERN, parse_change
from worker.core.errors import InvalidChange
from worker.core.settings import Secret, Settings

SECRET = "whsec_" + base64.b64encode(b"leadstage fuzzing secret").decode()
MAX_BODY = 256 * 1024
FUZZ = hypothesis.settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture, hypothesis.HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Served:
    url: str
    host: str
    port: int
    redis: redis.Redis


@pytest.fixture(scope="module")
def served(redis_url: str) -> Iterator[Served]:
    """The webhook app on a free loopback port, served from a background thread until the module ends."""
    settings = Settings(redis_url=redis_url, webhook_secret=Secret(SECRET), webhook_max_body_bytes=MAX_BODY)
    loop = asyncio.new_event_loop()
    started: Future[tuple[web.AppRunner, aioredis.Redis, int]] = Future()

    async def start() -> tuple[web.AppRunner, aioredis.Redis, int]:
        client = aioredis.Redis.from_url(redis_url)
        runner = web.AppRunner(create_app(settings, client), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert runner.addresses
        return runner, client, int(runner.addresses[0][1])

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.set_result(loop.run_until_complete(start()))
        except Exception as exc:  # noqa: BLE001 - handed to the test thread, which raises it
            started.set_exception(exc)
            return
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    runner, client, port = started.result(timeout=10)
    sync_redis = redis.Redis.from_url(redis_url)
    try:
        yield Served(f"http://127.0.0.1:{port}", "127.0.0.1", port, sync_redis)
    finally:

        async def stop() -> None:
            await runner.cleanup()
            await client.aclose()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        sync_redis.flushdb()
        sync_redis.close()


def post(served: Served, body: bytes) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(served.host, served.port, timeout=10)
    try:
        headers = signed_headers(body, SECRET)
        connection.request("POST", CHANGES_PATH, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        connection.close()


def is_valid_change(value: object) -> bool:
    try:
        parse_change(value)
    except InvalidChange:
        return False
    return True


def valid_input(payload: object) -> bool:
    """Whether the server must accept this body: one valid change, or a list of 1..1000 valid ones,
    with a well-formed top-level account or none (no account list is configured)."""
    if isinstance(payload, dict) and "account" in payload:
        account = payload["account"]
        if not isinstance(account, str) or not re.fullmatch(ACCOUNT_PATTERN, account):
            return False
        payload = {key: value for key, value in payload.items() if key != "account"}
    if isinstance(payload, dict) and "changes" in payload:
        changes = payload["changes"]
        return (
            set(payload) == {"changes"}
            and isinstance(changes, list)
            and 1 <= len(changes) <= 1000
            and all(map(is_valid_change, changes))
        )
    return is_valid_change(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(
    st.integers(min_value=-3, max_value=2**70),
    st.sampled_from([1, 2, "lead", "Opportunity", " lead ", "1", "3", "#a1B2c3", "#12345", "", " ", "Hot", True]),
    st.text(max_size=300),
    json_values,
)
change_like = st.dictionaries(
    st.sampled_from(["id", "name", "colour", "color", "applyTo", "appliesTo", "other", "account"]),
    field_values,
    max_size=4,
)
payloads = st.one_of(
    json_values,
    change_like,
    st.fixed_dictionaries({"changes": st.lists(change_like, max_size=5)}),
    st.fixed_dictionaries({"changes": st.lists(change_like, max_size=3)}, optional={"extra": json_values}),
)


@FUZZ
@hypothesis.given(payload=payloads)
def test_any_signed_json_gets_an_answer_and_only_valid_input_is_enqueued(served: Served, payload: Any) -> None:
    served.redis.flushdb()
    status, body = post(served, json.dumps(payload).encode())  # stdlib: big integers too
    assert status < 500, body
    if valid_input(payload):
        assert status == 202, body
        assert served.redis.zcard(keys.queue_key("leadstage:queue", "default")) == sum(
            1 for r in body["receipts"] if r["status"] == "queued"
        )
    else:
        assert status == 400, body
        assert body["errors"]
        assert served.redis.dbsize() == 0


@FUZZ
@hypothesis.given(body=st.text(max_size=200))
def test_any_signed_text_body_gets_a_client_error_unless_it_is_a_valid_change(served: Served, body: str) -> None:
    served.redis.flushdb()
    status, answer = post(served, body.encode())
    assert status < 500, answer
    if status == 202:
        assert valid_input(orjson.loads(body))
    else:
        assert served.redis.dbsize() == 0


schema = schemathesis.openapi.from_dict(openapi_document(MAX_BODY))


def _float_ids(body: object) -> bool:
    items = body.get("changes", [body]) if isinstance(body, dict) else []
    if not isinstance(items, list):  # e.g. {"changes": null}: refused by the schema anyway
        return False
    return any(isinstance(item, dict) and isinstance(item.get("id"), float) for item in items)


@schema.hook
def filter_body(context: schemathesis.HookContext, body: Any) -> bool:
    """JSON Schema counts 1.0 as an integer; the server, like iVvy, wants an id written as one."""
    return not _float_ids(body)


def sign(request: Any) -> Any:
    """requests' auth hook: sign the prepared body, byte for byte, as a webhook sender does.

    A body that is not UTF-8 (a negative case) cannot be signed by the reference library, which
    signs text: it goes out with the generated headers and must be refused with 401.
    """
    body = request.body or b""
    body = body if isinstance(body, bytes) else body.encode()
    try:
        body.decode()
    except UnicodeDecodeError:
        return request
    request.headers.update(signed_headers(body, SECRET, content_type=None))
    return request


@hypothesis.settings(FUZZ, max_examples=40)
@schema.parametrize()
def test_the_server_keeps_its_openapi_document(served: Served, case: schemathesis.Case[Any]) -> None:
    served.redis.flushdb()
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        positive_data_acceptance,
    ]
    case.call_and_validate(base_url=served.url, auth=sign, checks=checks)
