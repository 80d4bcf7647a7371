"""A worker whose clock is off by more than iVvy's tolerance (23005): its fault, not the changes'.

The fake iVvy's clock is moved instead of the worker's (``clock_offset_s``): to the signature
check that is the same skew. The account pauses, the changes are tried again after the pause
and succeed once the clocks agree; nothing is dead-lettered, and ``stats`` counts the pauses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.harness import eventually, read_events, wait_for_terminal, worker_settings
from worker.core import readers
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.runner import running_worker


@pytest.fixture
async def fake() -> AsyncIterator[RunningFakeIvvy]:
    async with running_fake_ivvy(seed=5) as running:
        yield running


async def test_a_stale_clock_pauses_the_account_and_its_changes_succeed_after(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    # The account's pause after a stale answer is the backoff's cap: a short one.
    settings = worker_settings(redis_url, fake.url, max_attempts=3, backoff_max_s=0.2)
    fake.fake.update_faults({"clock_offset_s": -400})
    keys = [f"skew-{i}" for i in range(5)]
    await Ledger(redis_client, settings).enqueue_many(
        [
            (parse_change({"name": f"Skewed {i}", "applyTo": 1}), parse_envelope(idempotency_key=k))
            for i, k in enumerate(keys)
        ]
    )
    async with running_worker(settings):

        async def refused_as_stale() -> bool:
            return any(e["error_code"] == "23005" for e in await read_events(redis_client))

        await eventually(refused_as_stale)
        stale = [e for e in await read_events(redis_client) if e["error_code"] == "23005"]
        assert {e["event"] for e in stale} == {"retrying"}, "a stale clock never fails a change"
        assert all(e["retryable"] == "true" for e in stale)
        assert "behind" in stale[0]["error_message"] or "ahead of" in stale[0]["error_message"]
        fake.fake.update_faults({"clock_offset_s": 0})
        terminal = await wait_for_terminal(redis_client, keys, within_s=30)
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {k: ["succeeded"] for k in keys}
    assert await redis_client.xlen("leadstage:dlq") == 0
    stats = await readers.stats(redis_client, settings)
    recent = stats["recent"]
    assert isinstance(recent, dict)
    all_stale = [e for e in await read_events(redis_client) if e["error_code"] == "23005"]
    assert recent["1m"]["clock_skew_pauses"] == len(all_stale) >= 1
