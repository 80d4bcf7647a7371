"""SIGTERM lets the request in flight finish, then the worker exits."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import redis.asyncio as aioredis

from tests.harness import eventually, read_events, start_worker_process, worker_env, worker_settings
from worker.change import parse_change, parse_envelope
from worker.fake_ivvy import running_fake_ivvy
from worker.ledger import Ledger


async def test_sigterm_finishes_the_request_in_flight(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    async with running_fake_ivvy() as fake:
        settings = worker_settings(redis_url, fake.url, request_timeout_s=5.0)
        await Ledger(redis_client, settings).enqueue_many(
            [(parse_change({"name": "Slow", "applyTo": 1}), parse_envelope(idempotency_key="slow"))]
        )
        fake.fake.update_faults({"latency_ms": 1500})
        worker = start_worker_process(worker_env(settings, fake.url), tmp_path / "worker.log")

        async def request_arrived() -> bool:
            return len(fake.fake.requests) > 0

        await eventually(request_arrived, within_s=20)
        worker.send_signal(signal.SIGTERM)
        # The fake answers after its latency; the worker records the outcome, then exits by itself.
        status = await asyncio.to_thread(worker.wait, 20)
        events = await read_events(redis_client)
    assert status == 0
    assert [(e["event"], e["idempotency_key"]) for e in events] == [("succeeded", "slow")]
    assert [s.name for s in fake.fake.stages.values()].count("Slow") == 1
    assert len(fake.fake.requests) == 1
