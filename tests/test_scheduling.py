"""Per-account queues: accounts served in turn, only sendable changes claimed, idle workers that
block until woken, and the single-queue layout migrated at start-up."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from tests.harness import eventually, read_events, wait_for_terminal, worker_settings
from tests.redis_servers import start_redis
from worker.core import keys
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret, Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.runner import running_worker

QUEUE = "leadstage:queue"


@pytest.fixture
async def fake() -> AsyncIterator[RunningFakeIvvy]:
    async with running_fake_ivvy(seed=13) as running:
        yield running


def two_accounts(redis_url: str, fake: RunningFakeIvvy, rate: float, **overrides: object) -> Settings:
    accounts = {
        name: Account(name, fake.url, DEMO_API_KEY, Secret(DEMO_API_SECRET), rate) for name in ("busy", "quiet")
    }
    return worker_settings(redis_url, fake.url, accounts=accounts, rate_limit=rate, **overrides)


async def enqueue_adds(ledger: Ledger, account: str, count: int, prefix: str = "add") -> list[str]:
    names = [f"{prefix}-{i}" for i in range(count)]
    await ledger.enqueue_many(
        [
            (
                parse_change({"name": f"{account} {name}", "applyTo": 1}),
                parse_envelope(idempotency_key=name, account=account),
            )
            for name in names
        ]
    )
    return names


async def test_a_backlog_on_one_account_does_not_hold_back_another(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    # Batch mode off: the turns are counted in changes, one per request (a batch would end 200 at once).
    settings = dataclasses.replace(two_accounts(redis_url, fake, rate=40.0), batch_mode="off")
    ledger = Ledger(redis_client, settings)
    await enqueue_adds(ledger, "busy", 400)  # 10 s of the busy account's rate limit
    async with running_worker(settings):

        async def busy_served() -> bool:
            return len(await read_events(redis_client)) >= 10

        await eventually(busy_served)
        await enqueue_adds(ledger, "quiet", 1, prefix="trickle")
        terminal = await wait_for_terminal(redis_client, ["trickle-0"], within_s=10)
    events = await read_events(redis_client)
    quiet_at = next(i for i, e in enumerate(events) if e["idempotency_key"] == "trickle-0")
    assert terminal["trickle-0"][0]["event"] == "succeeded"
    # Served at its turn: within a few of the busy account's rate-limit intervals (each one busy
    # event), not behind the rest of its 400-change backlog.
    assert quiet_at - 10 <= 5, f"{quiet_at - 10} busy changes finished before the quiet one"


async def test_changes_behind_the_head_are_not_touched_while_the_rate_limit_has_no_slot(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    account = Account("default", fake.url, DEMO_API_KEY, Secret(DEMO_API_SECRET), 20.0)
    settings = worker_settings(redis_url, fake.url, rate_limit=20.0, accounts={"default": account})
    ledger = Ledger(redis_client, settings)
    names = await enqueue_adds(ledger, "default", 100)
    queue = keys.queue_key(QUEUE, "default")
    enqueued = dict(await redis_client.zrange(queue, 0, -1, withscores=True))
    async with running_worker(settings):

        async def some_done() -> bool:
            return len(await read_events(redis_client)) >= 5

        await eventually(some_done)
    done = len(await read_events(redis_client))
    touched = [
        name
        for name in names
        if await redis_client.hget(keys.ledger_key(f"default:{name}"), "worker")  # type: ignore[misc]  # redis-py's async stubs
    ]
    rescheduled = [m for m, score in await redis_client.zrange(queue, 0, -1, withscores=True) if enqueued[m] != score]
    # Only the changes that were sent (and one a worker may be about to send) were ever claimed.
    assert len(touched) <= done + 1, (len(touched), done)
    assert len(rescheduled) <= 1


@pytest.mark.system  # starts a redis-server of its own
async def test_an_idle_worker_blocks_until_an_enqueue_wakes_it(fake: RunningFakeIvvy, tmp_path: Path) -> None:
    # A Redis of this test's own, so that its command counts are this worker's alone.
    server = start_redis(tmp_path / "redis", "--appendonly", "no")
    settings = worker_settings(server.url, fake.url)
    client = aioredis.Redis.from_url(server.url)
    admin = server.client()
    try:
        async with running_worker(settings):

            async def blocked() -> bool:
                return any(c["cmd"] == "blpop" for c in admin.client_list())  # type: ignore[union-attr]  # redis-py sync stubs

            await eventually(blocked)
            before: dict[str, object] = admin.info("commandstats")  # type: ignore[assignment]  # redis-py's sync stubs
            await asyncio.sleep(2.0)
            after: dict[str, object] = admin.info("commandstats")  # type: ignore[assignment]  # redis-py's sync stubs
            assert after.get("cmdstat_blpop") == before.get("cmdstat_blpop")  # still the one wait
            assert "cmdstat_zrangebyscore" not in after  # nothing polled a queue
            await enqueue_adds(Ledger(client, settings), "default", 1, prefix="wake")
            terminal = await wait_for_terminal(client, ["wake-0"], within_s=10)
    finally:
        await client.aclose()
        server.kill()
    assert terminal["wake-0"][0]["event"] == "succeeded"


async def test_a_queue_of_the_single_queue_layout_is_migrated_on_start_up(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = worker_settings(redis_url, fake.url)
    await redis_client.delete(keys.LAYOUT)
    queued, finished = (
        parse_change({"name": "Old queued", "applyTo": 1}),
        parse_change({"name": "Old done", "applyTo": 1}),
    )
    (seconds, _) = await redis_client.time()
    # What the previous layout wrote: untagged keys and one queue of job ids.
    old = {
        "leadstage:ledger:default:old-queued": {"change": queued.canonical_json(), "state": "queued"},
        "leadstage:ledger:default:old-done": {"change": finished.canonical_json(), "state": "succeeded"},
    }
    for name, (key, fields) in zip(("Old queued", "Old done"), old.items(), strict=True):
        entry = {"op": "add", "account": "default", "enqueued_at": seconds * 1000, "lock": "add:" + name.casefold()}
        await redis_client.hset(key, mapping={**entry, **fields})  # type: ignore[misc]  # redis-py's async stubs
    await redis_client.zadd(QUEUE, {"default:old-queued": seconds * 1000})
    await redis_client.hset("leadstage:rate:default", "tat", "0")  # type: ignore[misc]  # redis-py's async stubs
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, ["old-queued"], within_s=10)
    assert terminal["old-queued"][0]["event"] == "succeeded"
    assert await redis_client.exists(QUEUE, *old, "leadstage:rate:default") == 0
    assert await redis_client.get(keys.LAYOUT) == keys.LAYOUT_VERSION.encode()
    # The finished change kept its idempotency under its new name.
    [receipt] = await Ledger(redis_client, settings).enqueue_many(
        [(finished, parse_envelope(idempotency_key="old-done"))]
    )
    assert receipt.status == "duplicate"
    assert orjson.loads(await redis_client.hget(keys.ledger_key("default:old-done"), "change")) == {  # type: ignore[misc]  # redis-py's async stubs
        "name": "Old done",
        "applyTo": 1,
    }
