"""The worker end to end, in-process: real Redis, the fake iVvy over loopback, the real arq worker."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from arq.constants import health_check_key_suffix
from structlog.testing import capture_logs

from tests.harness import eventually, read_events, reconciling_soon, wait_for_terminal, worker_settings
from worker.core import keys
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.runner import running_worker


class Producer:
    """Enqueues through the ledger, as every producer does."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def enqueue(self, raw: dict[str, object], *, idempotency_key: str) -> None:
        await self.ledger.enqueue_many([(parse_change(raw), parse_envelope(idempotency_key=idempotency_key))])


@pytest.fixture
async def fake() -> AsyncIterator[RunningFakeIvvy]:
    async with running_fake_ivvy(seed=7) as running:
        yield running


@pytest.fixture
def settings(redis_url: str, fake: RunningFakeIvvy) -> Settings:
    return worker_settings(redis_url, fake.url)


@pytest.fixture
def producer(settings: Settings, redis_client: aioredis.Redis) -> Producer:
    return Producer(Ledger(redis_client, settings))


async def test_add_update_and_rejection(
    settings: Settings, producer: Producer, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    await producer.enqueue({"name": " Referral ", "applyTo": "lead", "colour": "#ABCDEF"}, idempotency_key="add")
    await producer.enqueue({"id": 1, "name": "Quoted!"}, idempotency_key="builtin")
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, ["add", "builtin"])
    [added], [refused] = terminal["add"], terminal["builtin"]
    assert added["event"] == "succeeded"
    assert added["operation"] == "add"
    stage = fake.fake.stages[int(added["stage_id"])]
    assert (stage.name, stage.colour, stage.apply_to) == ("Referral", "#abcdef", 2)
    assert (refused["event"], refused["error_code"], refused["retryable"]) == ("failed", "24321", "false")
    [dead] = await read_events(redis_client, "leadstage:dlq")
    assert dead["idempotency_key"] == "builtin"
    assert dead["original_change"] == '{"id":1,"name":"Quoted!"}'


async def test_transient_errors_are_retried_then_succeed(
    settings: Settings, producer: Producer, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    # A 5xx (or a 24322) leaves an add's outcome unknown: its retry waits out the request timeout,
    # then reconciles, so the run lasts as many of those waits as the longest run of such answers
    # to one key. A 429 is retried at once: more of those, fewer keys.
    fake.fake.update_faults({"error_rate": 0.15, "error_24322_rate": 0.05, "rate_limit_rate": 0.2, "retry_after_s": 0})
    keys = [f"k{i}" for i in range(10)]
    for i, key in enumerate(keys):
        await producer.enqueue({"name": f"Stage {i}", "applyTo": 1}, idempotency_key=key)
    async with running_worker(reconciling_soon(dataclasses.replace(settings, max_attempts=30))):
        terminal = await wait_for_terminal(redis_client, keys)
    assert all(events[0]["event"] == "succeeded" for events in terminal.values())
    retrying = [e for e in await read_events(redis_client) if e["event"] == "retrying"]
    assert retrying, "the faults should have caused retries"
    assert {e["error_code"] for e in retrying} <= {"unavailable", "24322", "rate_limited"}
    assert len([s for s in fake.fake.stages.values() if s.name.startswith("Stage ")]) == len(keys)


async def test_an_add_whose_answer_was_lost_is_not_created_twice(
    settings: Settings, producer: Producer, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    fake.fake.update_faults({"drop_rate": 1.0})
    await producer.enqueue({"name": "Once", "applyTo": 2}, idempotency_key="once")
    async with running_worker(reconciling_soon(settings)):

        async def dropped() -> bool:
            return any(r.fault == "drop" for r in fake.fake.requests)

        await eventually(dropped)
        fake.fake.update_faults({"drop_rate": 0.0})
        terminal = await wait_for_terminal(redis_client, ["once"])
    [done] = terminal["once"]
    retrying = [e for e in await read_events(redis_client) if e["event"] == "retrying"]
    assert retrying[0]["error_code"] == "connection"
    created = [s for s in fake.fake.stages.values() if s.name == "Once"]
    assert len(created) == 1
    assert done["event"] == "succeeded"
    assert done["stage_id"] == str(created[0].id)


async def test_the_last_enqueued_value_wins(
    settings: Settings, producer: Producer, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    stage = fake.fake.add_stage("Start", apply_to=1)
    fake.fake.update_faults({"error_rate": 0.3, "latency_ms": 2})
    keys = []
    for i in range(30):
        key = f"u{i}"
        change: dict[str, object] = {"id": stage.id, "colour": f"#0000{i:02d}"}
        if i % 3 == 0:
            change["name"] = f"Name {i}"
        await producer.enqueue(change, idempotency_key=key)
        keys.append(key)
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, keys)
    assert (stage.name, stage.colour) == ("Name 27", "#000029")
    assert {events[0]["event"] for events in terminal.values()} <= {"succeeded", "superseded"}
    assert all(len(events) == 1 for events in terminal.values())


@pytest.mark.system  # waits out a real lease (2 s)
async def test_another_programs_value_at_the_dead_letter_stream_holds_a_failed_change_back_until_it_is_gone(
    settings: Settings, producer: Producer, redis_client: aioredis.Redis
) -> None:
    # The failed end is refused whole (finish.lua writes nothing): the run is interrupted with an
    # error naming the key, its lease brings the change back, and once the key is gone it fails
    # with its dead letter (it used to be recorded failed without one: nothing to replay).
    await redis_client.set("leadstage:dlq", "another program's")
    await producer.enqueue({"id": 1, "name": "Quoted!"}, idempotency_key="builtin")
    with capture_logs() as logged:
        async with running_worker(dataclasses.replace(settings, batch_mode="off")):

            async def interrupted() -> bool:
                return any(line["event"] == "job.interrupted" for line in logged)

            await eventually(interrupted)
            assert await redis_client.hget(keys.ledger_key("default:builtin"), "state") == b"running"  # type: ignore[misc]  # redis-py's async stubs
            assert await redis_client.xlen(settings.results_stream) == 0
            await redis_client.delete("leadstage:dlq")
            terminal = await wait_for_terminal(redis_client, ["builtin"])
    [line, *_] = [line for line in logged if line["event"] == "job.interrupted"]
    assert "Redis holds a string at 'leadstage:dlq', where leadstage keeps a stream" in line["error"]
    assert [event["event"] for event in terminal["builtin"]] == ["failed"]
    [dead] = await read_events(redis_client, "leadstage:dlq")
    assert dead["original_change"] == '{"id":1,"name":"Quoted!"}'


@pytest.mark.system  # waits out a real lease (2 s)
async def test_another_programs_value_at_one_accounts_key_stalls_that_account_only(
    redis_url: str, fake: RunningFakeIvvy, redis_client: aioredis.Redis
) -> None:
    # The claim meets it before writing anything: the worker says which key, leaves that account
    # for a lease and serves the others; once the key is gone the account's change goes too.
    settings = worker_settings(redis_url, fake.url, batch_mode="off")
    settings = dataclasses.replace(settings, accounts={**settings.accounts, "other": settings.accounts["default"]})
    ledger = Ledger(redis_client, settings)
    stage_id = fake.fake.add_stage("Held", apply_to=1).id
    stage = keys.stage_key("default", stage_id)
    for account, key in (("default", "blocked"), ("other", "served")):
        change = parse_change({"id": stage_id, "colour": "#123456"})
        await ledger.enqueue_many([(change, parse_envelope(idempotency_key=key, account=account))])
    await redis_client.delete(stage)
    await redis_client.set(stage, "another program's")
    with capture_logs() as logged:
        async with running_worker(settings):
            await wait_for_terminal(redis_client, ["served"])

            async def refused() -> bool:
                return any(line["event"] == "worker.account_refused" for line in logged)

            await eventually(refused)
            assert await redis_client.hget(keys.ledger_key("default:blocked"), "state") == b"queued"  # type: ignore[misc]  # redis-py's async stubs
            await redis_client.delete(stage)
            terminal = await wait_for_terminal(redis_client, ["blocked", "served"])
    [line, *_] = [line for line in logged if line["event"] == "worker.account_refused"]
    assert (line["account"], line["log_level"]) == ("default", "error")
    assert f"Redis holds a string at '{stage}', where leadstage keeps a hash" in line["error"]
    assert [event["event"] for event in terminal["blocked"] + terminal["served"]] == ["succeeded", "succeeded"]


async def test_an_idle_worker_keeps_arqs_health_check_key(settings: Settings, redis_client: aioredis.Redis) -> None:
    # The wait for work blocks while idle: the health check (what `arq --check` and the bench read)
    # is written before it, not only once work arrives.
    async with running_worker(settings):

        async def healthy() -> bool:
            return bool(await redis_client.exists(settings.queue_name + health_check_key_suffix))

        await eventually(healthy, within_s=5)
