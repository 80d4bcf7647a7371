"""The per-account rate limit holds across worker processes, and a 429 slows the whole account."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog

from tests import harness
from worker.core import keys
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger, Start
from worker.core.redis_connection import RedisClient
from worker.core.scripts import RATE_WINDOW_US, rate_interval_us
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret, Settings
from worker.core.states import Decision
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.ivvy import AiohttpTransport, IvvyClient
from worker.job import apply_lead_stage_change
from worker.runner import running_worker
from worker.runtime import Lease, Runtime

RATE = 10.0
#: A lead ten times the default's 20 ms, so that a claim within it is no race with the clock.
LEAD_S = 0.2


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


async def server_us(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


async def next_slot_opens_in(client: aioredis.Redis, delay_us: int) -> int:
    """Make the account's next rate-limit slot open ``delay_us`` from now (server µs); its opening."""
    opens_us = await server_us(client) + delay_us
    await client.hset(keys.rate_key("default"), "tat", str(opens_us + RATE_WINDOW_US))  # type: ignore[misc]  # redis-py's async stubs
    return opens_us


async def test_a_slot_that_opens_within_the_lead_is_taken_at_its_opening_and_the_next_is_one_interval_later(
    redis_client: aioredis.Redis,
) -> None:
    ledger = Ledger(redis_client, Settings(rate_lead_s=LEAD_S))
    await enqueue_adds(ledger, 2)
    opens_us = await next_slot_opens_in(redis_client, 150_000)
    claim = await ledger.claim("default", "w", RATE, 0, 2)
    answered_us = await server_us(redis_client)
    [start] = claim.starts
    assert (start.decision, start.job_id) == (Decision.GO, "default:rate-0")
    # Sent at its slot: the wait is counted from the claim, by the server's clock.
    assert opens_us - answered_us <= start.send_in_us <= opens_us - (answered_us - 150_000)
    assert 0 < start.send_in_us <= 150_000
    rate_key = keys.rate_key("default")
    # However early the claim, the next slot is exactly one interval after the reserved one.
    tat = int(await redis_client.hget(rate_key, "tat"))  # type: ignore[misc]  # redis-py's async stubs
    assert tat == opens_us + RATE_WINDOW_US + rate_interval_us(RATE)
    # The recovery point is the send's moment: the in-flight guard counts from the POST.
    posted_at = int(await redis_client.hget(keys.ledger_key(start.job_id), "posted_at"))  # type: ignore[misc]  # redis-py's async stubs
    assert opens_us // 1000 <= posted_at <= opens_us // 1000 + 1
    # That next slot opens beyond the lead: the second change is not touched, and the account is
    # due again the lead before its slot.
    assert claim.rate_reason == "rate"
    assert await redis_client.hget(keys.ledger_key("default:rate-1"), "worker") is None  # type: ignore[misc]  # redis-py's async stubs
    assert claim.account_next_ms == math.ceil((tat - RATE_WINDOW_US - LEAD_S * 1_000_000) / 1000)


async def test_a_run_whose_lease_is_lost_while_it_waits_for_its_slot_sends_nothing(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Both changes claimed within the lead, each run waiting for its slot as the worker runs it;
    one lease is not renewed (as when the heartbeat cannot reach Redis): that run is given up
    before its slot opens and posts nothing, the other posts."""
    settings = harness.worker_settings(redis_url, fake.url, rate_limit=RATE, rate_lead_s=LEAD_S, batch_mode="off")
    ledger = Ledger(redis_client, settings)
    await enqueue_adds(ledger, 2)
    await next_slot_opens_in(redis_client, 50_000)  # the second slot one interval later, within the lead
    starts = (await ledger.claim("default", "w", RATE, 0, 2)).starts
    answered_at = time.monotonic()
    assert [s.decision for s in starts] == [Decision.GO, Decision.GO]
    assert starts[1].send_in_us > 100_000
    transport = AiohttpTransport()
    runtime = Runtime(
        settings, ledger, {"default": IvvyClient(settings.accounts["default"], transport, timeout=1.0)}, "w"
    )

    def launch(start: Start, holds_s: float) -> Lease:
        lease = Lease(start.run, answered_at, answered_at + start.send_in_us / 1_000_000)
        runtime.running[start.job_id] = lease
        work = apply_lead_stage_change({"runtime": runtime}, start.job_id, start)
        lease.task = asyncio.create_task(runtime.guarded(work, {start.job_id: lease}, 30.0, log, "job"))
        lease.confirm(time.monotonic() + holds_s, settings.lease_margin_s)
        return lease

    try:
        kept = launch(starts[0], settings.lease_s)
        # Known to hold for 50 ms more than the margin: given up 50 ms from now, well before its slot.
        lost = launch(starts[1], settings.lease_margin_s + 0.05)
        await asyncio.gather(kept.task or asyncio.sleep(0), lost.task or asyncio.sleep(0))
    finally:
        await transport.close()
    assert (kept.lost, lost.lost) == (False, True)
    assert [r.body["name"] for r in fake.fake.requests if r.action == "addOrUpdateLeadStage"] == ["Rated 0"]


async def test_slots_taken_ahead_are_one_interval_apart_and_no_request_leaves_before_its_slot(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Every claim but the first takes its slot the lead ahead: a run that did not wait for it would
    reach the fake up to the lead before its slot."""
    account = Account("default", fake.url, DEMO_API_KEY, Secret(DEMO_API_SECRET), RATE)
    settings = harness.worker_settings(
        redis_url, fake.url, accounts={"default": account}, rate_lead_s=LEAD_S / 2, batch_mode="off"
    )
    keys_ = await enqueue_adds(Ledger(redis_client, settings), 20)
    async with running_worker(settings):
        await harness.wait_for_terminal(redis_client, keys_, within_s=30)
    # Each send's moment by the server's clock (the recovery point), and when the fake read the
    # request (this host's clock, which the local Redis server reads too): a stamp can only be late.
    slots_ms = {
        f"Rated {key.split('-')[1]}": int(await redis_client.hget(keys.ledger_key(f"default:{key}"), "posted_at"))  # type: ignore[misc]  # redis-py's async stubs
        for key in keys_
    }
    arrived_ms = {r.body["name"]: r.at * 1000 for r in fake.fake.requests if r.action == "addOrUpdateLeadStage"}
    assert arrived_ms.keys() == slots_ms.keys()
    # posted_at is the slot rounded up to the ms: a request may be stamped up to 1 ms before it.
    early = {name: slots_ms[name] - at for name, at in arrived_ms.items() if at < slots_ms[name] - 1}
    assert not early, f"sent before their slots (ms): {early}"
    gaps = [b - a for a, b in itertools.pairwise(sorted(slots_ms.values()))]
    assert min(gaps) >= rate_interval_us(RATE) / 1000 - 1, gaps


log = structlog.get_logger("tests.rate_limit")
