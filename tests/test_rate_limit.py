"""The per-account rate limit holds across worker processes, and a 429 slows the whole account."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests import harness
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.core.redis_connection import RedisClient
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.runner import running_worker

RATE = 10.0


@pytest.fixture
async def fake() -> AsyncIterator[RunningFakeIvvy]:
    async with running_fake_ivvy(seed=3) as running:
        yield running


async def enqueue_adds(ledger: Ledger, count: int) -> list[str]:
    keys = [f"rate-{i}" for i in range(count)]
    await ledger.enqueue_many(
        [
            (parse_change({"name": f"Rated {i}", "applyTo": 1}), parse_envelope(idempotency_key=k))
            for i, k in enumerate(keys)
        ]
    )
    return keys


def arrivals(fake: RunningFakeIvvy, fault: str | None = None) -> list[float]:
    return sorted(r.at for r in fake.fake.requests if r.action == "addOrUpdateLeadStage" and r.fault == fault)


async def test_three_worker_processes_keep_to_the_account_rate_limit(
    fake: RunningFakeIvvy, any_redis: tuple[str, RedisClient], tmp_path: Path
) -> None:
    """On a single Redis and on a Redis Cluster (where the account's limiter is in its slot)."""
    redis_url, redis_client = any_redis
    # Batch mode off: each add its own request, 40 requests to space (a batch would be one).
    settings = harness.worker_settings(redis_url, fake.url, rate_limit=RATE, batch_mode="off")
    keys = await enqueue_adds(Ledger(redis_client, settings), 40)
    workers = [harness.start_worker_process(harness.worker_env(settings), tmp_path / "w.log") for _ in range(3)]
    try:
        await harness.wait_for_terminal(redis_client, keys, within_s=60)
    finally:
        harness.stop_processes(workers)
    times = arrivals(fake)
    assert len(times) == 40
    # GCRA with a burst of one: at most RATE requests start in any one-second window (+1 for the
    # window's edge, +1 for the stamp: the fake stamps arrivals in this test's event loop, which a
    # busy machine can hold up long enough to move one request into the next window), and the whole
    # run cannot be faster than the limit allows.
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= RATE + 2, f"{busiest} requests within one second"
    assert times[-1] - times[0] >= (len(times) - 1) / RATE * 0.95


async def test_a_429_pauses_every_job_of_the_account(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings: Settings = harness.worker_settings(redis_url, fake.url, rate_limit=1000.0)
    fake.fake.update_faults({"rate_limit_rate": 1.0, "retry_after_s": 1})
    keys = await enqueue_adds(Ledger(redis_client, settings), 10)
    async with running_worker(settings):

        async def a_429_was_seen() -> bool:
            return any(e["error_code"] == "rate_limited" for e in await harness.read_events(redis_client))

        # Once a worker has seen the 429, no request of the account may leave before Retry-After.
        await harness.eventually(a_429_was_seen)
        await asyncio.sleep(0.05)  # requests already on the wire then still meet the 429 fault
        fake.fake.update_faults({"rate_limit_rate": 0.0})
        await harness.wait_for_terminal(redis_client, keys, within_s=30)
    limited, served = arrivals(fake, "429"), arrivals(fake)
    assert len(served) == 10
    assert served[0] - min(limited) >= 0.95
