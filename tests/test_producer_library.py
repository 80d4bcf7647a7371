"""``LeadStageProducer`` against a real Redis: idempotency, validation before enqueue, bulk round trips."""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from producers import ChangeItem, InvalidBatch, LeadStageProducer
from tests.conftest import TEST_API_SECRET
from worker.core import keys
from worker.core.errors import (
    EnqueueOutcomeUnknown,
    IdempotencyConflict,
    InvalidChange,
    RedisUnavailable,
    UnknownAccount,
)
from worker.core.ledger import ENQUEUE_CHUNK
from worker.core.settings import Account, Secret, Settings

HOT = {"name": "Hot", "applyTo": "lead"}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url)


@pytest.fixture
async def producer(settings: Settings, redis_client: aioredis.Redis) -> LeadStageProducer:
    """A producer over the test database (flushed by ``redis_client``)."""
    return LeadStageProducer(settings, redis=redis_client)


def enqueued(producer: str, status: str) -> float:
    return REGISTRY.get_sample_value("leadstage_enqueued_total", {"producer": producer, "status": status}) or 0.0


async def test_same_key_and_change_is_a_duplicate_even_after_the_queue_forgot_it(
    producer: LeadStageProducer, redis_client: aioredis.Redis, settings: Settings
) -> None:
    queued_before = enqueued("library", "queued")
    first = await producer.enqueue(HOT, idempotency_key="k1")
    assert (first.job_id, first.idempotency_key, first.account, first.status) == (
        "default:k1",
        "k1",
        "default",
        "queued",
    )
    assert (await producer.enqueue(HOT, idempotency_key="k1")).status == "duplicate"

    # The job leaves the queue when it ends; the ledger still knows the key for its retention.
    await redis_client.zrem(keys.queue_key(settings.queue_name, "default"), "default:k1")
    again = await producer.enqueue({"applyTo": 2, "name": " Hot "}, idempotency_key="k1")  # same change, normalised
    assert again.status == "duplicate"
    assert await redis_client.zcard(keys.queue_key(settings.queue_name, "default")) == 0
    assert enqueued("library", "queued") == queued_before + 1


async def test_a_different_change_under_a_known_key_is_refused(
    producer: LeadStageProducer, redis_client: aioredis.Redis, settings: Settings
) -> None:
    await producer.enqueue(HOT, idempotency_key="k1")
    with pytest.raises(IdempotencyConflict) as caught:
        await producer.enqueue({"name": "Cold", "applyTo": "lead"}, idempotency_key="k1")
    assert (caught.value.account, caught.value.idempotency_key) == ("default", "k1")
    assert orjson.loads(await redis_client.hget(keys.ledger_key("default:k1"), "change")) == {  # type: ignore[misc]  # redis-py's async stubs
        "name": "Hot",
        "applyTo": 2,
    }


async def test_a_generated_key_is_returned(producer: LeadStageProducer) -> None:
    receipt = await producer.enqueue({"id": 1001, "color": "#ABCDEF"})
    assert receipt.idempotency_key
    assert receipt.job_id == f"default:{receipt.idempotency_key}"


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({}, {"name", "applyTo"}),
        ({"name": "", "applyTo": 3}, {"name", "applyTo"}),
        ({"id": 0, "colour": "red"}, {"id", "colour"}),
        ({"id": 5}, {"change"}),
        ({"name": "A", "applyTo": 1, "priority": 1}, {"priority"}),
        (["name"], {"change"}),
    ],
)
async def test_invalid_changes_name_every_bad_field_and_enqueue_nothing(
    producer: LeadStageProducer, redis_client: aioredis.Redis, change: Any, fields: set[str]
) -> None:
    with pytest.raises(InvalidChange) as caught:
        await producer.enqueue(change, idempotency_key="k1")
    assert {error.field for error in caught.value.errors} == fields
    assert await redis_client.dbsize() == 0


async def test_a_bad_envelope_is_reported_with_the_change(
    producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    with pytest.raises(InvalidChange) as caught:
        await producer.enqueue({"name": "A"}, idempotency_key="tab\there", account="no spaces")
    assert {error.field for error in caught.value.errors} == {"applyTo", "idempotency_key", "account"}
    assert await redis_client.dbsize() == 0


async def test_configured_accounts_refuse_others(redis_url: str, redis_client: aioredis.Redis) -> None:
    account = Account("eu", "https://eu.example", "key", Secret(TEST_API_SECRET), 5.0)
    producer = LeadStageProducer(Settings(redis_url=redis_url, accounts={"eu": account}), redis=redis_client)
    assert (await producer.enqueue(HOT, account="eu")).account == "eu"
    with pytest.raises(UnknownAccount):
        await producer.enqueue(HOT, account="default")
    assert await redis_client.zcard(keys.queue_key("leadstage:queue", "eu")) == 1


async def test_an_account_list_by_name_refuses_others_without_credentials(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """LEADSTAGE_ACCOUNT_NAMES: the account list of a producer host without iVvy credentials (one
    rule with the webhook's and the CLI's: a change for another account is refused, not queued
    for the worker to dead-letter); spaces around the name are trimmed before the check."""
    settings = Settings.from_env({"REDIS_URL": redis_url, "LEADSTAGE_ACCOUNT_NAMES": "eu"})
    producer = LeadStageProducer(settings, redis=redis_client)
    assert (await producer.enqueue(HOT, account=" eu\t")).account == "eu"
    for bad in ("default", "us"):
        with pytest.raises(UnknownAccount):
            await producer.enqueue(HOT, account=bad)
    with pytest.raises(InvalidBatch):
        await producer.enqueue_many([HOT, ChangeItem(HOT, account="us")])
    assert await redis_client.zcard(keys.queue_key("leadstage:queue", "eu")) == 1
    assert await redis_client.zcard(keys.queue_key("leadstage:queue", "us")) == 0


class CountingConnection(aioredis.Connection):
    """A real connection that counts how often it writes to the socket: one write per round trip."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


async def test_enqueue_many_pipelines_thousands_of_changes_as_json(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    count = 5000
    changes = [{"name": f"Stage {i}", "applyTo": 1 + i % 2} for i in range(count)]
    pool = aioredis.ConnectionPool.from_url(settings.redis_url, connection_class=CountingConnection)
    chunks: list[int] = []
    async with LeadStageProducer(settings, redis=aioredis.Redis(connection_pool=pool)) as producer:
        await producer.redis.ping()  # the connection's own handshake is not the batch's
        CountingConnection.writes = 0
        receipts = await producer.enqueue_many(changes, source="bulk-test", progress=chunks.append)
        writes = CountingConnection.writes
        await producer.redis.aclose()
        await pool.aclose()  # a pool passed in is not closed by its client

    assert [r.status for r in receipts] == ["queued"] * count
    assert len({r.job_id for r in receipts}) == count
    assert sum(chunks) == count
    # One conflict check, then per chunk at most a script check and the pipeline itself.
    chunk_count = -(-count // ENQUEUE_CHUNK)
    assert writes <= 1 + 2 * chunk_count, writes
    assert await redis_client.zcard(keys.queue_key(settings.queue_name, "default")) == count

    # Nothing is pickled: the queue holds job ids and each record is a hash with a JSON change.
    first = receipts[0].job_id
    assert await redis_client.type(keys.queue_key(settings.queue_name, "default")) == b"zset"
    assert await redis_client.zscore(keys.queue_key(settings.queue_name, "default"), first) is not None
    record = await redis_client.hgetall(keys.ledger_key(first))  # type: ignore[misc]  # redis-py's async stubs
    assert not record[b"change"].startswith(b"\x80")
    assert orjson.loads(record[b"change"]) == {"name": "Stage 0", "applyTo": 1}
    assert record[b"source"] == b"bulk-test"


async def test_enqueue_many_validates_everything_first(
    producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    changes: list[Any] = [HOT, {"name": "Cold"}, HOT, ChangeItem({"id": 7, "name": "x"}, account="bad account")]
    with pytest.raises(InvalidBatch) as caught:
        await producer.enqueue_many(changes)
    assert [(index, type(error).__name__) for index, error in caught.value.failures] == [
        (1, "InvalidChange"),
        (3, "InvalidChange"),
    ]
    assert {e.field for e in caught.value.errors} == {"changes[1].applyTo", "changes[3].account"}
    assert isinstance(caught.value, InvalidChange)
    assert await redis_client.dbsize() == 0


async def test_enqueue_many_with_a_conflict_enqueues_nothing(
    producer: LeadStageProducer, redis_client: aioredis.Redis, settings: Settings
) -> None:
    await producer.enqueue(HOT, idempotency_key="known")
    batch: list[Any] = [
        ChangeItem({"name": "New", "applyTo": 1}, idempotency_key="new"),
        ChangeItem({"name": "Other", "applyTo": 1}, idempotency_key="known"),
    ]
    with pytest.raises(IdempotencyConflict):
        await producer.enqueue_many(batch)
    assert await redis_client.zrange(keys.queue_key(settings.queue_name, "default"), 0, -1) == [b"default:known"]


async def test_enqueue_many_takes_per_item_envelopes(producer: LeadStageProducer, redis_client: aioredis.Redis) -> None:
    receipts = await producer.enqueue_many(
        [
            ChangeItem(HOT, idempotency_key="a", account="eu", source="crm"),
            ChangeItem(HOT, idempotency_key="a"),
            ChangeItem(HOT, idempotency_key="a"),
        ],
        account="us",
        source="batch",
    )
    assert [(r.job_id, r.status) for r in receipts] == [("eu:a", "queued"), ("us:a", "queued"), ("us:a", "duplicate")]
    assert await redis_client.hget(keys.ledger_key("eu:a"), "source") == b"crm"  # type: ignore[misc]  # redis-py's async stubs
    assert await redis_client.hget(keys.ledger_key("us:a"), "source") == b"batch"  # type: ignore[misc]  # redis-py's async stubs


async def test_a_producer_closes_only_the_client_it_opened(settings: Settings, redis_client: aioredis.Redis) -> None:
    async with LeadStageProducer(settings) as own:
        await own.enqueue(HOT, idempotency_key="own")
    async with LeadStageProducer(settings, redis=redis_client):
        pass
    assert await redis_client.exists(keys.ledger_key("default:own")) == 1


@pytest.mark.parametrize("first", [0, ENQUEUE_CHUNK - 1])
async def test_a_key_given_twice_with_different_changes_across_chunks_enqueues_nothing(
    producer: LeadStageProducer, redis_client: aioredis.Redis, settings: Settings, first: int
) -> None:
    """Issue 12 item 1: the conflict sits in the second chunk, its first use in the first one."""
    count = ENQUEUE_CHUNK + 1
    batch: list[Any] = [ChangeItem({"name": f"S{i}", "applyTo": 1}, idempotency_key=f"k{i}") for i in range(count)]
    batch[count - 1] = ChangeItem({"name": "Other", "applyTo": 2}, idempotency_key=f"k{first}")
    with pytest.raises(IdempotencyConflict) as caught:
        await producer.enqueue_many(batch)
    assert await redis_client.zcard(keys.queue_key(settings.queue_name, "default")) == 0
    assert await redis_client.dbsize() == 0  # no ledger entry, no staging hash left behind
    message = str(caught.value)
    assert message.startswith(f"changes[{count - 1}]: idempotency key 'k{first}' ")
    assert f"at changes[{first}] too" in message
    assert message.endswith("nothing enqueued")
    assert caught.value.enqueued_before == 0


async def test_a_key_given_twice_with_the_same_change_across_chunks_is_a_duplicate(
    producer: LeadStageProducer, settings: Settings, redis_client: aioredis.Redis
) -> None:
    batch: list[Any] = [
        ChangeItem({"name": f"S{i}", "applyTo": 1}, idempotency_key=f"k{i}") for i in range(ENQUEUE_CHUNK)
    ]
    batch.append(ChangeItem({"name": "S0", "applyTo": 1}, idempotency_key="k0"))
    receipts = await producer.enqueue_many(batch)
    assert [r.status for r in receipts] == ["queued"] * ENQUEUE_CHUNK + ["duplicate"]
    assert await redis_client.zcard(keys.queue_key(settings.queue_name, "default")) == ENQUEUE_CHUNK


async def test_a_conflict_with_the_ledger_in_a_late_chunk_enqueues_nothing(
    producer: LeadStageProducer, redis_client: aioredis.Redis, settings: Settings
) -> None:
    await producer.enqueue(HOT, idempotency_key="known")
    batch: list[Any] = [ChangeItem({"name": f"S{i}", "applyTo": 1}, idempotency_key=f"k{i}") for i in range(2500)]
    batch.append(ChangeItem({"name": "Other", "applyTo": 1}, idempotency_key="known"))
    with pytest.raises(IdempotencyConflict, match=r"^changes\[2500\]: .* is already used .*; nothing enqueued$"):
        await producer.enqueue_many(batch)
    assert await redis_client.zrange(keys.queue_key(settings.queue_name, "default"), 0, -1) == [b"default:known"]


async def test_a_conflict_written_between_the_check_and_the_write_stops_the_batch_and_says_what_was_enqueued(
    producer: LeadStageProducer, redis_client: aioredis.Redis, settings: Settings
) -> None:
    """What all or nothing cannot promise: another producer using a key of the batch, with another
    change, after the batch's check. The chunks before it stay written; the error says so."""
    items = [producer.validate({"name": f"S{i}", "applyTo": 1}, idempotency_key=f"k{i}") for i in range(2000)]
    ledger = producer.ledger
    chunks = [
        ledger.chunk(items[:1000], [f"changes[{i}]" for i in range(1000)]),
        ledger.chunk(items[1000:], [""] * 1000),
    ]
    async with producer.ledger.bulk_check() as check:
        for chunk in chunks:
            await check.send(chunk)
            await check.receive()
    await producer.enqueue({"name": "Other", "applyTo": 2}, idempotency_key="k1500")  # the other producer
    async with producer.ledger.bulk_write() as write:
        await write.send(chunks[0])
        assert len(await write.receive()) == 1000
        await write.send(chunks[1])
        with pytest.raises(IdempotencyConflict) as caught:
            await write.receive()
    assert caught.value.enqueued_before == 1000
    assert "1000 earlier change(s) of this batch were enqueued" in str(caught.value)
    assert (
        await redis_client.zcard(keys.queue_key(settings.queue_name, "default")) == 1001
    )  # the first chunk and the other producer's


async def test_a_redis_that_never_answers_is_unavailable_within_the_timeout(settings: Settings) -> None:
    """A Redis that accepts the connection, then answers nothing (a stopped process's backlog)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        hung = Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.15, redis_connect_timeout_s=0.15)
        async with LeadStageProducer(hung) as producer:
            with pytest.raises(RedisUnavailable) as caught:
                await producer.enqueue(HOT, idempotency_key="k-hung")
    # Its connection handshake went unanswered: nothing was sent, and the error does not claim otherwise.
    assert not isinstance(caught.value, EnqueueOutcomeUnknown)
