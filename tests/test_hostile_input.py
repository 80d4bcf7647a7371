"""Hostile input against the real HTTP producer: ``leadstage webhook`` as its own process on a
loopback port, over real Redis, attacked with raw sockets where a well-behaved client would not do it.

Replays, stale and future timestamps, wrong secrets and garbled signatures, oversized bodies (also
behind a lying Content-Length and chunked without one), deeply nested JSON, wrong content types,
slow and stalled clients, and thousands of concurrent requests. After each: no 5xx, the server
still answers, and nothing invalid reached the queue or the ledger.

``tests/test_webhook.py`` checks the endpoint's contract in-process; this file checks that the
served process holds up, so it goes through ``python -m worker.cli webhook`` as deployed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from producers.openapi import CHANGES_PATH, MAX_BATCH
from producers.status import status_token
from producers.webhook_body import BODY_TIMEOUT_S
from tests.raw_http import (
    MALFORMED_REQUESTS,
    MARKER,
    assert_malformed_answered_as_problems,
    problem_of,
    raw,
    status_of,
)
from tests.redis_servers import RedisServer
from tests.webhook_signing import signed_headers
from worker.core import keys
from worker.core.processes import free_port, python_module, wait_for_port

SECRET = "whsec_" + base64.b64encode(b"hostile input: a 32-byte secret!").decode()
#: LEADSTAGE_WEBHOOK_MAX_BODY of the served process.
MAX_BODY = 64 * 1024
HOT = {"name": "Hot", "applyTo": "lead"}
LOOPBACK = "127.0.0.1"


def signed(
    body: bytes, *, secret: str | bytes = SECRET, msg_id: str | None = None, at: datetime | None = None
) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed by the reference library (JSON content type).

    ``secret`` is a ``whsec_`` secret, or raw key bytes.
    """
    return signed_headers(body, secret, msg_id=msg_id, at=at)


@dataclass(frozen=True)
class WebhookProcess:
    """``leadstage webhook`` running as a child process."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def rss_bytes(self) -> int:
        """Resident memory of the process now (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/PID/status")


@contextlib.contextmanager
def served_webhook(variables: dict[str, str], log_path: Path, command: str = "webhook") -> Iterator[WebhookProcess]:
    """``leadstage webhook`` (or another server ``command``: ``console``) as deployed, with these
    variables only (of ours), until the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IVVY_", "LEADSTAGE_", "WEBHOOK_", "REDIS_"))}
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our interpreter, fixed arguments
            python_module("worker.cli", command, "--host", LOOPBACK, "--port", str(port)),
            env=env | {"LEADSTAGE_LOG_FORMAT": "json", **variables},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, 30, process)
        yield WebhookProcess(port, process, log_path)
    finally:
        process.terminate()
        process.wait(15)


@pytest.fixture(scope="module")
def webhook(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookProcess]:
    """One served webhook for the module (it keeps no state of its own: Redis is flushed per test)."""
    log_path = tmp_path_factory.mktemp("webhook") / "webhook.log"
    variables = {"REDIS_URL": redis_url, "WEBHOOK_SECRET": SECRET, "LEADSTAGE_WEBHOOK_MAX_BODY": str(MAX_BODY)}
    with served_webhook(variables, log_path) as served:
        yield served
    assert "Traceback" not in log_path.read_text(), "the webhook logged a traceback"


@pytest.fixture
async def http(webhook: WebhookProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=webhook.url, timeout=aiohttp.ClientTimeout(total=30), skip_auto_headers=["Content-Type"]
    ) as session:
        yield session


async def post(http: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> int:
    async with http.post(CHANGES_PATH, data=body, headers=headers) as response:
        await response.read()
        return response.status


async def enqueued(redis_client: aioredis.Redis) -> tuple[set[str], set[str]]:
    """(job ids on the queue, job ids with a ledger entry): what producers put in Redis."""
    queue = {
        m.decode()
        async for q in redis_client.scan_iter(keys.queue_key("leadstage:queue", "*"))
        for m in await redis_client.zrange(q, 0, -1)
    }
    ledger = {keys.job_of_ledger_key(k.decode()) async for k in redis_client.scan_iter(keys.LEDGER_PREFIX + "*")}
    return queue, ledger


async def assert_enqueued(redis_client: aioredis.Redis, jobs: set[str] | None = None) -> None:
    """Exactly ``jobs`` (none by default) on the queue and in the ledger, nothing else."""
    assert await enqueued(redis_client) == (jobs or set(), jobs or set())


async def assert_still_serving(http: aiohttp.ClientSession) -> None:
    async with http.get("/healthz") as response:
        assert response.status == 200


def head(body_headers: dict[str, str], extra: Sequence[str]) -> bytes:
    lines = [f"POST {CHANGES_PATH} HTTP/1.1", f"Host: {LOOPBACK}"]
    lines += [f"{name}: {value}" for name, value in body_headers.items()]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


# -- replays -------------------------------------------------------------------------------------


async def test_a_replayed_delivery_is_a_duplicate_and_enqueues_nothing_new(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    body = orjson.dumps(HOT)
    headers = signed(body, msg_id="msg_replayed")

    async def deliver() -> str:
        async with http.post(CHANGES_PATH, data=body, headers=headers) as response:
            assert response.status == 202
            status: str = (await response.json())["receipts"][0]["status"]
            return status

    # The same delivery ten times at once, then again later: one change, however it races.
    statuses = await asyncio.gather(*(deliver() for _ in range(10)))
    statuses.append(await deliver())
    assert sorted(statuses) == ["duplicate"] * 10 + ["queued"]
    await assert_enqueued(redis_client, {"default:msg_replayed"})

    # The captured headers on another body: the signature no longer matches.
    assert await post(http, orjson.dumps({"name": "Evil", "applyTo": 1}), headers) == 401
    # A properly signed delivery reusing the id with another change: a conflict, not a new change.
    other = orjson.dumps({"name": "Evil", "applyTo": 1})
    assert await post(http, other, signed(other, msg_id="msg_replayed")) == 422
    await assert_enqueued(redis_client, {"default:msg_replayed"})
    change = await redis_client.hget(keys.ledger_key("default:msg_replayed"), "change")  # type: ignore[misc]  # redis-py's async stubs
    assert orjson.loads(change) == {"name": "Hot", "applyTo": 2}


async def test_a_captured_delivery_replayed_with_other_unsigned_routing_enqueues_nothing_new(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    """Idempotency-Key, X-Leadstage-Account and ?account= are not signed: a replay that changes
    them within the tolerance is refused instead of becoming new changes for new keys or accounts."""
    body = orjson.dumps(HOT)
    headers = signed(body, msg_id="msg_captured")
    assert await post(http, body, headers) == 202
    for key in ("k1", "k2", "k3"):
        assert await post(http, body, headers | {"Idempotency-Key": key}) == 400
    for account in ("eu", "us"):
        assert await post(http, body, headers | {"X-Leadstage-Account": account}) == 400
        async with http.post(f"{CHANGES_PATH}?account={account}", data=body, headers=headers) as response:
            assert response.status == 400
    await assert_enqueued(redis_client, {"default:msg_captured"})


@pytest.mark.parametrize(
    ("coding", "body", "status"),
    [
        ("gzip", b"not gzip at all", 400),
        ("deflate", b"\x78\x9c" + b"\xff" * 40, 400),
        ("gzip", b"\x1f\x8b\x08\x00" + b"\x00" * 40, 400),
        ("compress", orjson.dumps(HOT), 415),
        ("gzip, deflate", orjson.dumps(HOT), 415),
    ],
)
async def test_bodies_that_do_not_decode_are_client_errors_without_tracebacks(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, coding: str, body: bytes, status: int
) -> None:
    """Decoding is the client's problem: 400 (or 415 for an encoding we do not take), never a 500
    and never a traceback in the log (the module's fixture checks the log when it ends)."""
    async with http.post(CHANGES_PATH, data=body, headers=signed(b"{}") | {"Content-Encoding": coding}) as response:
        assert response.status == status
        assert response.content_type == "application/problem+json"
    await assert_enqueued(redis_client)
    await assert_still_serving(http)


@pytest.mark.parametrize(
    "request_bytes",
    [
        head(signed(b"{}"), ["Content-Encoding: gzip", "Content-Length: 15"]) + b"not gzip at all",
        head(signed(b"{}"), ["Content-Encoding: deflate", "Content-Length: 42"]) + b"\x78\x9c" + b"\xff" * 40,
        head(signed(b"{}"), ["Transfer-Encoding: chunked"]) + b"2\r\n{}\r\nzz\r\n",
    ],
    ids=["gzip", "deflate", "chunking"],
)
async def test_a_body_that_does_not_decode_is_answered_before_the_connection_is_closed_and_says_so(
    webhook: WebhookProcess, request_bytes: bytes
) -> None:
    """The server cannot go on reading a connection whose body did not decode: its 400 says
    ``Connection: close``, so a keep-alive client does not send its next request into a closed
    connection (aiohttp's own client failed its next POST with "Can not write request body")."""
    answer = await raw(webhook.port, request_bytes + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) == 400, answer[:300]
    first_head = answer.split(b"\r\n\r\n", 1)[0].lower()
    closing = b"\r\nconnection: close" in first_head or first_head.startswith(b"http/1.0")
    assert closing or answer.count(b"HTTP/1.1 200") == 1, answer[:600]


@pytest.mark.parametrize("coding", ["br", "zstd"])
async def test_codings_the_parser_cannot_decode_are_415_like_any_other_unknown_coding(
    webhook: WebhookProcess, redis_client: aioredis.Redis, coding: str
) -> None:
    """aiohttp knows br and zstd but refuses them with the headers when their libraries are not
    installed: the client is told what the service decodes, as for any coding it does not."""
    body = orjson.dumps(HOT)
    request = head(signed(body), [f"Content-Encoding: {coding}", f"Content-Length: {len(body)}"]) + body
    answer = await raw(webhook.port, request)
    assert status_of(answer) == 415, answer[:300]
    assert b"\r\nAccept-Encoding: gzip, deflate\r\n" in answer
    assert problem_of(answer)["title"] == "Unsupported Media Type"
    await assert_enqueued(redis_client)


# -- timestamps and signatures -------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset",
    [timedelta(minutes=-6), timedelta(minutes=6), timedelta(days=-3650), timedelta(days=3650)],
    ids=["6-min-old", "6-min-ahead", "10-years-old", "10-years-ahead"],
)
async def test_expired_and_future_timestamps_are_401_even_when_correctly_signed(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, offset: timedelta
) -> None:
    body = orjson.dumps(HOT)
    assert await post(http, body, signed(body, at=datetime.now(UTC) + offset)) == 401
    await assert_enqueued(redis_client)


@pytest.mark.parametrize(
    "timestamp", ["", "abc", "nan", "inf", "-inf", "1e400", "-1", "0x10", "\u0661\u0667" + "\u0660" * 8]
)
async def test_unreadable_timestamps_are_401(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, timestamp: str
) -> None:
    body = orjson.dumps(HOT)
    headers = signed(body) | {"webhook-timestamp": timestamp}
    assert await post(http, body, headers) == 401
    await assert_enqueued(redis_client)


def _garbled_signatures(valid: str) -> list[str]:
    _, signature = valid.split(",", 1)
    return [
        "",
        "v1",
        "v1,",
        "v1,!!!not base64!!!",
        "v1," + signature[:-4],
        "v2," + signature,  # a version nobody signs with
        "v1a," + signature,
        signature,
        "v1," + signature + ",extra",
        " ".join(["v1,AAAA"] * 1000),  # many signatures, none valid: every one is tried, none matches
        "v1," + "A" * 8000,
        "\u2603," + signature,
    ]


async def test_wrong_secrets_and_garbled_signatures_are_401(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    body = orjson.dumps(HOT)
    wrong_secrets: list[str | bytes] = [
        "whsec_" + base64.b64encode(b"another secret entirely").decode(),
        SECRET.encode(),  # the secret's text used as the key, not its base64-decoded bytes
        "whsec_" + base64.b64encode(base64.b64decode(SECRET.removeprefix("whsec_"))[:-1]).decode(),  # one byte short
    ]
    for secret in wrong_secrets:
        assert await post(http, body, signed(body, secret=secret)) == 401, secret
    valid = signed(body)
    for signature in _garbled_signatures(valid["webhook-signature"]):
        assert await post(http, body, valid | {"webhook-signature": signature}) == 401, signature[:40]
    # A header over aiohttp's 8 KiB field limit is refused by the HTTP parser itself.
    assert await post(http, body, valid | {"webhook-signature": " ".join(["v1,AAAA"] * 2000)}) == 400
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        headers = {k: v for k, v in valid.items() if k != missing}
        assert await post(http, body, headers) == 401, missing
    await assert_enqueued(redis_client)
    # Positive control: the valid signature among bogus ones is found (Standard Webhooks allows several).
    several = valid | {"webhook-signature": "v1,AAAA v2,BBBB " + valid["webhook-signature"]}
    assert await post(http, body, several) == 202
    await assert_enqueued(redis_client, {f"default:{valid['webhook-id']}"})


# -- sizes ---------------------------------------------------------------------------------------


async def test_an_oversized_body_is_413_however_its_size_is_declared(
    webhook: WebhookProcess, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    body = orjson.dumps({"changes": [{"name": "x" * 250, "applyTo": 1}] * MAX_BATCH})
    assert len(body) > MAX_BODY
    # An honest Content-Length over the limit.
    assert await post(http, body, signed(body)) == 413

    # Chunked, without Content-Length: cut off at the limit while reading.
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with http.post(CHANGES_PATH, data=chunks(), headers=signed(body)) as response:
        assert response.status == 413
        assert "Content-Length" not in response.request_info.headers

    # A Content-Length of 10 GB, and nothing sent: refused at once, before any body is awaited.
    started = time.monotonic()
    answer = await raw(webhook.port, head(signed(b"{}"), ["Content-Length: 10000000000"]), first=True)
    assert status_of(answer) == 413
    assert time.monotonic() - started < BODY_TIMEOUT_S
    # Content-Length values the HTTP parser must refuse outright.
    for length in ("-1", "1e3", "99999999999999999999999999", "12, 12"):
        assert status_of(await raw(webhook.port, head(signed(b"{}"), [f"Content-Length: {length}"]))) == 400, length

    # A lying Content-Length (small) followed by a large body: only the declared bytes are the
    # body, the rest is garbage the parser refuses (400) — or, if the declared bytes are handled
    # first, their signature does not match (401). Never a 5xx, never enqueued.
    small = orjson.dumps(HOT)
    answer = await raw(webhook.port, head(signed(small), [f"Content-Length: {len(small) // 2}"]) + body)
    assert status_of(answer) in (400, 401)
    assert b"HTTP/1.1 5" not in answer
    await assert_enqueued(redis_client)

    # Positive control: a chunked body under the limit, correctly signed, is accepted.
    async def one_chunk() -> AsyncIterator[bytes]:
        yield small

    async with http.post(CHANGES_PATH, data=one_chunk(), headers=signed(small, msg_id="msg_chunked")) as response:
        assert response.status == 202
    await assert_enqueued(redis_client, {"default:msg_chunked"})
    await assert_still_serving(http)


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@pytest.mark.parametrize(
    "text",
    [
        _nested(30_000),
        '{"a":' * 10_000 + "1" + "}" * 10_000,
        '{"name": ' + _nested(600) + ', "applyTo": 1}',
        '{"name": "Hot", "applyTo": 1, "colour": ' + '{"x":' * 300 + '"#ffffff"' + "}" * 300 + "}",
        '{"changes": [' + ",".join([_nested(200)] * 100) + "]}",
        '{"changes": ' + _nested(5_000, '{"name": "Hot", "applyTo": 1}') + "}",
        '{"id": ' + "9" * 5_000 + ', "name": "Hot"}',
    ],
    ids=["arrays-30k", "objects-10k", "nested-name", "nested-colour", "100-nested-changes", "nested-list", "huge-int"],
)
async def test_deeply_nested_or_absurd_json_is_400(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, text: str
) -> None:
    body = text.encode()
    assert len(body) <= MAX_BODY
    async with http.post(CHANGES_PATH, data=body, headers=signed(body)) as response:
        assert response.status == 400
        assert response.content_type == "application/problem+json"
        problem = await response.json(content_type=None)
    assert problem["status"] == 400
    await assert_enqueued(redis_client)
    await assert_still_serving(http)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/xml",
        "application/json-patch+json",
        "application/jsonx",
        "json",
        "application/octet-stream",
    ],
)
async def test_wrong_content_types_are_415(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, content_type: str | None
) -> None:
    body = orjson.dumps(HOT)
    headers = {k: v for k, v in signed(body).items() if k != "Content-Type"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    assert await post(http, body, headers) == 415
    await assert_enqueued(redis_client)


async def test_long_values_are_not_echoed_whole(http: aiohttp.ClientSession, redis_client: aioredis.Redis) -> None:
    """A 7 KB content type (within the header limit) and a 50 KB account in the body, contradicted
    by the unsigned account header: each problem names what is wrong with a short excerpt (the
    signed account is checked first, then the unsigned header against it)."""
    long_type = "application/" + "x" * 7000
    body = orjson.dumps(HOT)
    async with http.post(CHANGES_PATH, data=body, headers=signed(body) | {"Content-Type": long_type}) as response:
        assert response.status == 415
        assert len(await response.read()) < 1000
    body = orjson.dumps({**HOT, "account": "a" * 50_000})
    headers = signed(body) | {"X-Leadstage-Account": "other"}
    async with http.post(CHANGES_PATH, data=body, headers=headers) as response:
        assert response.status == 400
        problem = await response.read()
    assert orjson.loads(problem)["errors"][0]["field"] == "account"
    assert b"(50000 characters)" in problem
    assert len(problem) < 1000
    await assert_enqueued(redis_client)


# -- slow clients --------------------------------------------------------------------------------


async def test_slow_and_stalled_clients_are_cut_off_and_do_not_block_others(
    webhook: WebhookProcess, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    """Slowloris: bodies that stall or trickle end with 408 after the body timeout, and everybody
    else is served promptly meanwhile, also while connections sit on half-sent headers."""
    body = orjson.dumps(HOT)

    async def stalled_body() -> tuple[bytes, float]:
        """Headers and five bytes of the body, then nothing: the answer, and when it came."""
        started = time.monotonic()
        request = head(signed(body, msg_id="msg_stalled"), [f"Content-Length: {len(body)}"]) + body[:5]
        answer = await raw(webhook.port, request, read_s=BODY_TIMEOUT_S + 15, first=True)
        return answer, time.monotonic() - started

    async def trickled_body() -> tuple[bytes, float]:
        """Headers, then one byte every half second, never reaching Content-Length."""
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(LOOPBACK, webhook.port)
        answer = b""
        try:
            writer.write(head(signed(body, msg_id="msg_trickle"), [f"Content-Length: {len(body)}"]))
            for byte in body[:-1] * 10:
                with contextlib.suppress(ConnectionError):
                    writer.write(bytes([byte]))
                    await writer.drain()
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(4096), 0.5)
                if answer or reader.at_eof():
                    break
        finally:
            writer.close()
        return answer, time.monotonic() - started

    # Connections that never finish their headers: they must not hold up anybody else.
    half_headers = f"POST {CHANGES_PATH} HTTP/1.1\r\nHost: {LOOPBACK}\r\nwebhook-id: msg_".encode()
    idle = [await asyncio.open_connection(LOOPBACK, webhook.port) for _ in range(50)]
    for _, writer in idle:
        writer.write(half_headers)
    slow = [asyncio.create_task(trickled_body()), *(asyncio.create_task(stalled_body()) for _ in range(50))]

    await asyncio.sleep(1)
    for index in range(5):
        served = time.monotonic()
        assert await post(http, body, signed(body, msg_id=f"msg_ok_{index}")) == 202
        await assert_still_serving(http)
        assert time.monotonic() - served < 5, "a slow client held up another request"

    (trickle_answer, trickle_s), *stalled = await asyncio.gather(*slow)
    for _, writer in idle:
        writer.close()
    assert status_of(trickle_answer) == 408, trickle_answer[:100]
    assert BODY_TIMEOUT_S - 1 < trickle_s < BODY_TIMEOUT_S + 5, trickle_s
    for answer, seconds in stalled:
        assert status_of(answer) == 408, answer[:100]
        assert seconds < BODY_TIMEOUT_S + 5, seconds
    await assert_enqueued(redis_client, {f"default:msg_ok_{i}" for i in range(5)})


# -- volume --------------------------------------------------------------------------------------


async def test_thousands_of_concurrent_requests_are_all_answered_in_bounded_memory(
    webhook: WebhookProcess, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    """2,000 requests per round, 100 at a time, a quarter each valid, replayed, badly signed and
    invalid. All are answered, none with a 5xx, only the valid ones are enqueued, and the server's
    resident memory does not keep growing from round to round (a leak of 1 KiB per request would
    add 2 MiB per round). Memory, not time, is measured: nothing here depends on the machine's speed."""
    limit = asyncio.Semaphore(100)
    valid: set[str] = set()

    async def one(index: int, round_: int) -> int:
        kind = index % 4
        msg_id = f"msg_{round_}_{index}"
        change = {"name": f"Load {round_} {index}", "applyTo": 1 + index % 2}
        if kind == 3:
            change = {"id": -index, "colour": "red"}
        body = orjson.dumps(change)
        headers = signed(body, msg_id=msg_id)
        if kind == 1:  # a replay of this round's previous valid delivery
            body = orjson.dumps({"name": f"Load {round_} {index - 1}", "applyTo": 1 + (index - 1) % 2})
            headers = signed(body, msg_id=f"msg_{round_}_{index - 1}")
        elif kind == 2:
            headers["webhook-signature"] = signed(body, secret="whsec_" + base64.b64encode(b"x" * 24).decode())[
                "webhook-signature"
            ]
        async with limit:
            status = await post(http, body, headers)
        if kind == 0:
            valid.add(f"default:{msg_id}")
        return status

    async def round_(number: int, size: int) -> None:
        statuses = await asyncio.gather(*(one(index, number) for index in range(size)))
        assert len(statuses) == size
        counts = {status: statuses.count(status) for status in set(statuses)}
        assert counts == {202: size // 2, 401: size // 4, 400: size // 4}, counts

    await round_(0, 1000)  # warm-up: caches, connection pools, the allocator's arenas
    rss = [webhook.rss_bytes()]
    for number in (1, 2, 3):
        await round_(number, 2000)
        rss.append(webhook.rss_bytes())
    growth = [after - before for before, after in itertools.pairwise(rss)]
    # Bounded: the last round adds almost nothing (measured: tens of KiB), all three stay small.
    assert growth[-1] < 2 * 2**20, [g // 1024 for g in growth]
    assert rss[-1] - rss[0] < 8 * 2**20, [g // 1024 for g in growth]
    await assert_enqueued(redis_client, valid)
    await assert_still_serving(http)


# -- a hung Redis ---------------------------------------------------------------------------------

#: LEADSTAGE_REDIS_TIMEOUT and LEADSTAGE_REDIS_CONNECT_TIMEOUT of the servers over a hung Redis.
HUNG_TIMEOUT_S = 0.5
#: How long a client waits for their answer: far above the timeout, far below the 5 s default
#: that a server ignoring the settings would wait.
HUNG_CLIENT_WAIT_S = 3.0


@pytest.fixture
def hung_variables(private_redis: RedisServer) -> Iterator[dict[str, str]]:
    """The variables of a server over ``private_redis`` with short Redis timeouts; the Redis is
    stopped (SIGSTOP) once the server is up, by the test, and resumed at the end."""
    timeout = str(HUNG_TIMEOUT_S)
    yield {
        "REDIS_URL": private_redis.url,
        "LEADSTAGE_REDIS_TIMEOUT": timeout,
        "LEADSTAGE_REDIS_CONNECT_TIMEOUT": timeout,
        "WEBHOOK_SECRET": SECRET,
    }
    private_redis.resume()


async def answer_of(url: str, method: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, str, bytes]:
    """(status, content type, body) of one request, which must come within HUNG_CLIENT_WAIT_S."""
    timeout = aiohttp.ClientTimeout(total=HUNG_CLIENT_WAIT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout, skip_auto_headers=["Content-Type"]) as session,
        session.request(method, url, data=body, headers=headers) as response,
    ):
        return response.status, response.content_type, await response.read()


async def test_a_hung_redis_is_503_from_the_webhook_and_its_status_route_within_the_redis_timeout(
    private_redis: RedisServer, hung_variables: dict[str, str], tmp_path: Path
) -> None:
    with served_webhook(hung_variables, tmp_path / "webhook.log") as served:
        body = orjson.dumps(HOT)
        status, _, _ = await answer_of(served.url + CHANGES_PATH, "POST", signed(body, msg_id="msg_before"), body)
        assert status == 202  # the connection to Redis is made and pooled before Redis hangs
        private_redis.pause()
        changes = (served.url + CHANGES_PATH, "POST", signed(body, msg_id="msg_hung"), body)
        token = {"Authorization": f"Bearer {status_token(SECRET)}"}
        for url, method, headers, payload in (
            changes,
            (served.url + CHANGES_PATH + "/msg_before", "GET", token, b""),
            (served.url + "/readyz", "GET", {}, b""),
        ):
            status, content_type, answer = await answer_of(url, method, headers, payload)
            assert (status, content_type) == (503, "application/problem+json"), (url, answer)
            assert orjson.loads(answer)["status"] == 503
        private_redis.resume()
        status, _, answer = await answer_of(*changes)
        assert status == 202, answer  # the retry with the same webhook-id is safe
        assert orjson.loads(answer)["receipts"][0]["status"] in ("queued", "duplicate")


async def test_a_hung_redis_is_503_from_the_console_within_the_redis_timeout(
    private_redis: RedisServer, hung_variables: dict[str, str], tmp_path: Path
) -> None:
    token = "console-token-over-a-hung-redis"
    with served_webhook(
        hung_variables | {"LEADSTAGE_CONSOLE_TOKEN": token}, tmp_path / "console.log", "console"
    ) as served:
        headers = {"Authorization": f"Bearer {token}"}
        assert (await answer_of(served.url + "/api/v1/failures", "GET", headers))[0] == 200
        private_redis.pause()
        status, content_type, answer = await answer_of(served.url + "/api/v1/failures", "GET", headers)
        assert (status, content_type) == (503, "application/problem+json"), answer
        assert orjson.loads(answer)["status"] == 503


# -- what the HTTP parser refuses ----------------------------------------------------------------


async def requests_counted(http: aiohttp.ClientSession, status: int) -> float:
    """leadstage_webhook_requests_total{status} as the served process's /metrics says."""
    async with http.get("/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "leadstage_webhook_requests_total" and sample.labels == {"status": str(status)}:
                return float(sample.value)
    return 0.0


async def test_requests_the_parser_refuses_are_problems_without_echoes_and_are_counted(
    webhook: WebhookProcess, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    before = await requests_counted(http, 400), await requests_counted(http, 415)
    await assert_malformed_answered_as_problems(webhook.port)
    body = orjson.dumps(HOT)
    brotli = head(signed(body), ["Content-Encoding: br", f"Content-Length: {len(body)}"]) + body
    assert status_of(await raw(webhook.port, brotli)) == 415
    await assert_enqueued(redis_client)
    await assert_still_serving(http)
    assert MARKER not in webhook.log_path.read_text(errors="replace")
    # No handler sees them, but the webhook's request counter does (whatever path they named).
    after = await requests_counted(http, 400), await requests_counted(http, 415)
    assert (after[0] - before[0], after[1] - before[1]) == (len(MALFORMED_REQUESTS), 1)


# -- what is logged ------------------------------------------------------------------------------


async def test_a_request_the_parser_refuses_is_logged_as_one_line_without_its_headers_or_body(
    webhook: WebhookProcess, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    """The HTTP parser's message quotes the offending line: a signature header over the 8 KiB
    field limit, or a header line with a forbidden character next to a piece of the body."""
    marker = "v1,Zm9yZ2VkLXNpZ25hdHVyZS1tYXJrZXI"
    body = orjson.dumps({"name": "Body-marker-5e1f", "applyTo": 1})
    long_signature = signed(body) | {"webhook-signature": " ".join([marker] * 400)}
    assert status_of(await raw(webhook.port, head(long_signature, [f"Content-Length: {len(body)}"]) + body)) == 400
    bad_char = head(signed(body), [f"X-Note: {marker}\x01{body.decode()}", f"Content-Length: {len(body)}"]) + body
    assert status_of(await raw(webhook.port, bad_char)) == 400
    await assert_enqueued(redis_client)
    await assert_still_serving(http)
    for _ in range(100):  # the child process writes its log asynchronously
        if len(_malformed_lines(webhook.log_path)) >= 2:
            break
        await asyncio.sleep(0.1)
    text = webhook.log_path.read_text(errors="replace")
    assert marker not in text
    assert "Body-marker-5e1f" not in text
    assert len(_malformed_lines(webhook.log_path)) >= 2, text[-2000:]


def _malformed_lines(log_path: Path) -> list[str]:
    return [line for line in log_path.read_text(errors="replace").splitlines() if "malformed request from" in line]


# -- hostile text (issue 12 items 8 and 9: the change model's rules, as every producer applies them)


@pytest.mark.parametrize(
    "name",
    ["a\u001b[2Jb", "line\nbreak", "nul\u0000", "abc\u202edcba", "\u200b\u200b", "\ufeff", "x" * 256],
    ids=repr,
)
async def test_names_with_control_bidi_or_only_invisible_characters_are_refused_by_the_webhook(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, name: str
) -> None:
    body = orjson.dumps({"name": name, "applyTo": 1})
    async with http.post(CHANGES_PATH, data=body, headers=signed(body)) as response:
        assert response.status == 400  # an invalid change, as the webhook answers every one
        assert response.content_type == "application/problem+json"
        problem = await response.read()
    assert b"name" in problem
    assert b"\x1b" not in problem
    assert "\u202e".encode() not in problem
    await assert_enqueued(redis_client)


async def test_the_webhook_as_compose_deploys_it_refuses_an_account_outside_the_account_list(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Without credentials, the account list comes from LEADSTAGE_ACCOUNT_NAMES (docker-compose.yml
    shares it with the worker): another account is 400 here, as the CLI refuses it, instead of
    being queued for the worker to dead-letter."""
    variables = {"REDIS_URL": redis_url, "WEBHOOK_SECRET": SECRET, "LEADSTAGE_ACCOUNT_NAMES": "default acme"}
    with served_webhook(variables, tmp_path / "webhook.log") as served:
        # Spaces and tabs around the name are trimmed before the check, as the CLI trims --account.
        for msg_id, account, status in (
            ("o", "other", 400),
            ("a", "acme", 202),
            ("d", "default", 202),
            ("t", " acme\t", 202),
        ):
            body = orjson.dumps({**HOT, "account": account})
            answer, content_type, problem = await answer_of(
                served.url + CHANGES_PATH, "POST", signed(body, msg_id=msg_id), body
            )
            assert answer == status, problem
            if status == 400:
                assert content_type == "application/problem+json"
                assert orjson.loads(problem)["errors"][0]["field"] == "account"
    assert await enqueued(redis_client) == ({"acme:a", "default:d", "acme:t"},) * 2
