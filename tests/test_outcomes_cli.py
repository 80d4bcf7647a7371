"""``leadstage results --group``: real processes, one SIGKILLed mid-batch, another taking over."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
import redis.asyncio as aioredis

from producers import LeadStageProducer
from tests.harness import eventually, stream_order, wait_for_terminal, worker_settings
from tests.test_cli import ROOT, background, command, json_lines, one_error_line, read_line
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker

#: Enough events that their JSON lines (~500 bytes each) overflow a pipe (64 KiB): a consumer whose
#: output nobody reads blocks in the middle of a batch, with entries read but not acked.
EVENTS = 400


@pytest.fixture
def settings(redis_url: str, fake_ivvy: RunningFakeIvvy) -> Settings:
    return worker_settings(redis_url, fake_ivvy.url)


def env(settings: Settings) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LEADSTAGE_RESULTS_STREAM")}
    return {**base, "REDIS_URL": settings.redis_url, "LEADSTAGE_LOG_FORMAT": "json"}


async def test_a_group_consumer_killed_mid_batch_is_taken_over_by_another(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with LeadStageProducer(settings, redis=redis_client) as producer:
        receipts = await producer.enqueue_many([{"name": f"S{i}", "applyTo": "lead"} for i in range(EVENTS)])
    async with running_worker(settings):
        await wait_for_terminal(redis_client, [r.idempotency_key for r in receipts], within_s=60)
    every_id = [entry_id.decode() for entry_id, _ in await redis_client.xrange("leadstage:results")]

    # Its output is read into a small buffer only (``limit``): once that and the pipe are full it
    # blocks writing, in the middle of a batch.
    doomed = await asyncio.create_subprocess_exec(
        *command("results", "--follow", "--group", "g", "--consumer", "a", "--start", "all"),
        env=env(settings), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, limit=4096,
    )  # fmt: skip
    try:
        stalled_at = await stalled_with_pending(redis_client)
    finally:
        doomed.send_signal(signal.SIGKILL)
        printed_by_a, _ = await asyncio.wait_for(doomed.communicate(), timeout=10)
    left_pending = (await redis_client.xpending("leadstage:results", "g"))["pending"]
    assert left_pending == stalled_at

    taker = await asyncio.create_subprocess_exec(
        *command("results", "--group", "g", "--consumer", "b", "--claim-idle", "0.2"),
        env=env(settings), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    printed_by_b, errors = await asyncio.wait_for(taker.communicate(), timeout=60)
    assert taker.returncode == 0, errors.decode()
    seen_by_a = [line["id"] for line in json_lines(printed_by_a.decode())]
    seen_by_b = [line["id"] for line in json_lines(printed_by_b.decode())]
    assert sorted(set(seen_by_a) | set(seen_by_b), key=stream_order) == every_id  # nothing lost, nothing skipped
    assert len(seen_by_b) >= left_pending  # B delivered everything A had not acked
    assert (await redis_client.xpending("leadstage:results", "g"))["pending"] == 0


async def pending(client: aioredis.Redis) -> int:
    """Entries read through group g and not acked (0 before the group exists)."""
    groups = await client.xinfo_groups("leadstage:results")
    return sum(int(group["pending"]) for group in groups if group["name"] == b"g")


async def stalled_with_pending(client: aioredis.Redis, *, within_s: float = 30.0) -> int:
    """Wait until the consumer holds unacked entries and makes no progress for a while (it is blocked)."""
    deadline = time.monotonic() + within_s
    last, since = -1, time.monotonic()
    while True:
        now = await pending(client)
        if now != last:
            last, since = now, time.monotonic()
        elif now > 0 and time.monotonic() - since > 0.5:
            return now
        assert time.monotonic() < deadline, "the consumer never stalled with entries pending"
        await asyncio.sleep(0.05)


def test_group_options_need_a_group_and_exclude_filters(settings: Settings) -> None:
    for args, message in [
        (("--consumer", "a"), "--consumer and --start need --group"),
        (("--group", "g", "--key", "k"), "--key and --account cannot be used with --group"),
        (("--group", "g", "--start", "yesterday"), "start must be"),
    ]:
        result = subprocess.run(  # noqa: S603 - our own command, fixed arguments
            command("results", *args), env=env(settings), cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert result.returncode == 2
        assert message in one_error_line(result)


async def test_a_following_group_consumer_prints_new_events_and_ends_cleanly_on_sigterm(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    with background("results", "--follow", "--group", "live", "--consumer", "c", env=env(settings)) as follower:
        await _group_exists(redis_client, "live")
        async with LeadStageProducer(settings, redis=redis_client) as producer:
            receipt = await producer.enqueue({"name": "Live", "applyTo": "lead"})
            async with running_worker(settings):
                await producer.wait(receipt, timeout=30)
        printed = read_line(follower)
        assert (printed["idempotency_key"], printed["event"]) == (receipt.idempotency_key, "succeeded")
        await eventually(lambda: _nothing_pending(redis_client, "live"))  # acked once printed
    # background() asserted exit status 0 on SIGTERM.


async def _nothing_pending(client: aioredis.Redis, group: str) -> bool:
    return bool((await client.xpending("leadstage:results", group))["pending"] == 0)


async def _group_exists(client: aioredis.Redis, group: str, *, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not (
        await client.exists("leadstage:results")
        and any(g["name"] == group.encode() for g in await client.xinfo_groups("leadstage:results"))
    ):
        assert time.monotonic() < deadline, f"group {group} was never created"
        await asyncio.sleep(0.05)
