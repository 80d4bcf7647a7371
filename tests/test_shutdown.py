"""Stopping workers: SIGTERM finishes what is in flight; a SIGKILLed worker's change is taken up within 15 s."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis

from tests import harness
from worker.core import keys
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy


async def test_sigterm_finishes_the_request_in_flight(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    async with running_fake_ivvy() as fake:
        settings = harness.worker_settings(redis_url, fake.url, request_timeout_s=5.0)
        await Ledger(redis_client, settings).enqueue_many(
            [(parse_change({"name": "Slow", "applyTo": 1}), parse_envelope(idempotency_key="slow"))]
        )
        fake.fake.update_faults({"latency_ms": 1500})
        worker = harness.start_worker_process(harness.worker_env(settings), tmp_path / "worker.log")

        async def request_arrived() -> bool:
            return len(fake.fake.requests) > 0

        async def registered() -> bool:
            return bool(await redis_client.hlen(keys.WORKERS))  # type: ignore[misc]  # redis-py's async stubs

        await harness.eventually(request_arrived, within_s=20)
        await harness.eventually(registered)
        worker.send_signal(signal.SIGTERM)
        # The fake answers after its latency; the worker records the outcome, then exits by itself.
        status = await asyncio.to_thread(worker.wait, 20)
        events = await harness.read_events(redis_client)
    assert status == 0
    assert await redis_client.hlen(keys.WORKERS) == 0  # type: ignore[misc]  # redis-py's async stubs: it left the workers hash
    assert [(e["event"], e["idempotency_key"]) for e in events] == [("succeeded", "slow")]
    assert [s.name for s in fake.fake.stages.values()].count("Slow") == 1
    assert len(fake.fake.requests) == 1


async def kill_while_its_request_hangs(fake: RunningFakeIvvy, env: dict[str, str], tmp_path: Path) -> None:
    """Start a worker, SIGKILL it once its first request has reached the fake (which hangs it)."""
    fake.fake.update_faults({"hang_rate": 1.0, "hang_s": 60})
    first = harness.start_worker_process(env, tmp_path / "first.log")

    async def request_arrived() -> bool:
        return len(fake.fake.requests) > 0

    await harness.eventually(request_arrived, within_s=20)
    first.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.wait, 10)


async def test_a_killed_workers_change_is_taken_up_within_15_s(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """With the default lease and request timeout, as docs/contract.md promises (Idempotency)."""
    async with running_fake_ivvy() as fake:
        settings = harness.worker_settings(
            redis_url, fake.url, request_timeout_s=10.0, lease_s=8.0, job_timeout_s=120.0
        )
        await Ledger(redis_client, settings).enqueue_many(
            [(parse_change({"name": "Orphan", "applyTo": 1}), parse_envelope(idempotency_key="orphan"))]
        )
        env = harness.worker_env(settings)
        await kill_while_its_request_hangs(fake, env, tmp_path)
        killed_at = time.monotonic()
        fake.fake.update_faults({"hang_rate": 0.0})
        second = harness.start_worker_process(env, tmp_path / "second.log")
        try:
            terminal = await harness.wait_for_terminal(redis_client, ["orphan"], within_s=30)
            taken_up_after = time.monotonic() - killed_at
        finally:
            harness.stop_process(second)
    assert terminal["orphan"][0]["event"] == "succeeded"
    assert [s.name for s in fake.fake.stages.values()].count("Orphan") == 1
    assert taken_up_after <= 15.0, f"taken up {taken_up_after:.1f}s after the kill"


async def test_a_killed_workers_coalesced_changes_are_each_sent_again(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """A worker SIGKILLed while its coalesced request hangs: every change it carried comes back
    (its own recovery point), the stage ends at the newest values, one terminal event per key."""
    async with running_fake_ivvy() as fake:
        stage = fake.fake.add_stage("Start", apply_to=1)
        settings = harness.worker_settings(redis_url, fake.url, request_timeout_s=3.0)
        changes = {"n": {"id": stage.id, "name": "Named"}, "c": {"id": stage.id, "colour": "#0000cc"}}
        await Ledger(redis_client, settings).enqueue_many(
            [(parse_change(raw), parse_envelope(idempotency_key=key)) for key, raw in changes.items()]
        )
        env = harness.worker_env(settings)
        await kill_while_its_request_hangs(fake, env, tmp_path)
        [hung] = [r.body for r in fake.fake.requests]
        assert hung == {"id": stage.id, "name": "Named", "colour": "#0000cc"}
        fake.fake.update_faults({"hang_rate": 0.0})
        second = harness.start_worker_process(env, tmp_path / "second.log")
        try:
            terminal = await harness.wait_for_terminal(redis_client, list(changes), within_s=30)
        finally:
            harness.stop_process(second)
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {
        "n": ["succeeded"],
        "c": ["succeeded"],
    }
    assert {events[0]["attempt"] for events in terminal.values()} == {"2"}
    assert (stage.name, stage.colour) == ("Named", "#0000cc")


async def test_a_request_that_outlasts_the_grace_is_cut_and_the_worker_still_shuts_down(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGTERM while a request hangs past LEADSTAGE_SHUTDOWN_GRACE: arq cancels the job, and the
    worker still ends cleanly (status 0, out of the workers hash, the job logged as stopped); the
    change is left to the next worker (its lease lapses), never reported as done."""
    async with running_fake_ivvy() as fake:
        settings = harness.worker_settings(redis_url, fake.url, request_timeout_s=10.0, shutdown_grace_s=0.3)
        await Ledger(redis_client, settings).enqueue_many(
            [(parse_change({"name": "Hung", "applyTo": 1}), parse_envelope(idempotency_key="hung"))]
        )
        fake.fake.update_faults({"hang_rate": 1.0, "hang_s": 30})
        log_path = tmp_path / "worker.log"
        worker = harness.start_worker_process(harness.worker_env(settings), log_path)
        try:

            async def request_arrived() -> bool:
                return len(fake.fake.requests) > 0

            await harness.eventually(request_arrived, within_s=20)
            worker.send_signal(signal.SIGTERM)
            status = await asyncio.to_thread(worker.wait, 20)
        finally:
            worker.kill()
            worker.wait()
        events = await harness.read_events(redis_client)
        state = await redis_client.hget(keys.ledger_key(keys.job_id("default", "hung")), "state")  # type: ignore[misc]  # redis-py's async stubs
    log = log_path.read_text()
    assert status == 0, log[-2000:]
    assert "Traceback" not in log
    assert '"job.stopped"' in log
    assert await redis_client.hlen(keys.WORKERS) == 0  # type: ignore[misc]  # redis-py's async stubs: its shutdown ran
    assert events == []
    assert state == b"running"  # its lease lapses: the next worker takes it over
