"""Batch mode (docs/contract.md: Batches): an account's due updates, one per stage, go out as one
iVvy batch; each change ends by its job's answer as a single call's would. End to end: real Redis,
the fake iVvy over HTTP with its batch faults, the real worker (a real process when killed)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path

import prometheus_client
import pytest
import redis.asyncio as aioredis

from tests import harness
from tests.harness import eventually, read_events, wait_for_terminal, worker_settings
from worker.core import keys, readers
from worker.core.batch_claim import claim_batch, take_rate_slot
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import FakeIvvy, RunningFakeIvvy
from worker.runner import running_worker


@pytest.fixture
def fake(fake_ivvy: RunningFakeIvvy) -> FakeIvvy:
    fake_ivvy.fake.update_faults({"batch_delay_s": 0.05})
    return fake_ivvy.fake


@pytest.fixture
def settings(redis_url: str, fake_ivvy: RunningFakeIvvy) -> Settings:
    return worker_settings(redis_url, fake_ivvy.url, batch_mode="auto", batch_threshold=5, batch_wait_s=3.0)


async def enqueue(
    redis_client: aioredis.Redis, settings: Settings, changes: list[tuple[str, dict[str, object]]]
) -> None:
    await Ledger(redis_client, settings).enqueue_many(
        [(parse_change(raw), parse_envelope(idempotency_key=key)) for key, raw in changes]
    )


def one_per_stage(fake: FakeIvvy, count: int, prefix: str = "u") -> list[tuple[str, dict[str, object]]]:
    stages = [fake.add_stage(f"Stage {i}", apply_to=1) for i in range(count)]
    return [(f"{prefix}{i}", {"id": stage.id, "name": f"Renamed {i}"}) for i, stage in enumerate(stages)]


def calls(fake: FakeIvvy, namespace: str, action: str) -> int:
    return sum(1 for r in fake.requests if (r.namespace, r.action) == (namespace, action))


def sent_as(how: str) -> float:
    labels = {"account": "default", "sent_as": how}
    return prometheus_client.REGISTRY.get_sample_value("leadstage_changes_sent_total", labels) or 0.0


def names(fake: FakeIvvy) -> dict[int, str]:
    return {stage.id: stage.name for stage in fake.stages.values()}


async def test_an_accounts_due_updates_go_as_one_batch_each_with_its_own_event(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    changes = one_per_stage(fake, 30)
    first, second = (int(str(changes[i][1]["id"])) for i in (0, 1))
    # A second change of the first stage, of another field: not in the same batch (one per stage),
    # sent alone after it. One of the second stage that overtakes u1's only field: u1 sends nothing.
    changes += [("z-later", {"id": first, "colour": "#00000b"}), ("z-newer", {"id": second, "name": "Newest"})]
    before = sent_as("batch")
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert calls(fake, "batch", "run") == 1
    events = {key: [e["event"] for e in events] for key, events in terminal.items()}
    assert events == {key: ["superseded" if key == "u1" else "succeeded"] for key, _ in changes}
    for key, raw in [changes[0], *changes[2:30]]:
        [event] = terminal[key]
        assert (event["sent_as"], event["carried_by"], event["stage_id"]) == ("batch", key, str(raw["id"]))
        assert names(fake)[int(str(raw["id"]))] == raw["name"]
    assert (terminal["z-later"][0]["sent_as"], terminal["z-newer"][0]["sent_as"]) == ("alone", "batch")
    assert (fake.stages[first].colour, names(fake)[second]) == ("#00000b", "Newest")
    # Each change's recovery point names the batch that carried it.
    [batch] = fake.batches.batches.values()
    entry = await Ledger(redis_client, settings).entry(keys.job_id("default", "u3"))
    assert entry is not None
    assert entry["batch"] == batch.async_id
    assert sent_as("batch") - before == 30
    recent = (await readers.stats(redis_client, settings))["recent"]
    assert isinstance(recent, dict)
    assert (recent["1m"]["sent_batch"], recent["1m"]["sent_alone"], recent["1m"]["superseded"]) == (30, 1, 1)


async def test_at_or_below_the_threshold_each_update_is_a_single_call(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    changes = one_per_stage(fake, 5)
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert calls(fake, "batch", "run") == 0
    assert calls(fake, "crm", "addOrUpdateLeadStage") == 5
    assert {events[0]["sent_as"] for events in terminal.values()} == {"alone"}


async def test_many_due_updates_of_few_stages_are_coalesced_not_batched(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """More due jobs than the threshold, but only one stage: a batch takes one update per stage."""
    stage = fake.add_stage("Busy", apply_to=1)
    changes: list[tuple[str, dict[str, object]]] = [
        (f"c{i}", {"id": stage.id, "colour": f"#0000{i:02x}"} if i % 2 else {"id": stage.id, "name": f"N{i}"})
        for i in range(12)
    ]
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert calls(fake, "batch", "run") == 0
    assert {events[0]["sent_as"] for events in terminal.values()} <= {"coalesced", "alone", ""}
    assert (stage.name, stage.colour) == ("N10", "#00000b")


async def test_a_batch_and_each_of_its_polls_take_a_slot_of_the_accounts_rate_limit(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """batch.lua's claim takes one slot for the run; its 'slot' takes one per poll, never two within
    one interval, and takes nothing while none is free (by the server's clock, no timing)."""
    await enqueue(redis_client, settings, one_per_stage(fake, 8))
    ledger = Ledger(redis_client, settings)
    rate = 10.0  # one slot per 100 ms
    claim = await claim_batch(ledger, "default", "w", rate)
    assert (len(claim.starts), claim.refused) == (8, "")
    first_wait = await take_rate_slot(ledger, "default", rate)
    assert 0 < first_wait <= 100  # the run took the slot
    rate_state = await redis_client.hgetall(keys.rate_key("default"))  # type: ignore[misc]  # redis-py's async stubs
    assert await take_rate_slot(ledger, "default", rate) > 0
    assert await redis_client.hgetall(keys.rate_key("default")) == rate_state  # type: ignore[misc]  # nothing taken
    await redis_client.hset(keys.rate_key("default"), "tat", "0")  # type: ignore[misc]  # redis-py's async stubs; as after a quiet while
    assert await take_rate_slot(ledger, "default", rate) == 0
    assert 0 < await take_rate_slot(ledger, "default", rate) <= 100
    # With no free slot, a claim takes nothing (and says so).
    await enqueue(redis_client, settings, one_per_stage(fake, 8, prefix="v"))
    refused = await claim_batch(ledger, "default", "w", rate)
    assert (refused.starts, refused.refused) == ([], "rate")


async def test_batch_mode_off_sends_no_batch(settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy) -> None:
    changes = one_per_stage(fake, 12)
    await enqueue(redis_client, settings, changes)
    async with running_worker(dataclasses.replace(settings, batch_mode="off")):
        await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert calls(fake, "batch", "run") == 0


@pytest.mark.parametrize(
    ("fault", "retried_because"),
    [
        pytest.param("batch_run_drop_rate", "connection", id="the run's answer dropped after it was accepted"),
        pytest.param("batch_never_ready_rate", "batch_not_ready", id="results never ready within the wait"),
        pytest.param("batch_job_24322_rate", "24322", id="every job answered 24322"),
    ],
)
async def test_a_batch_whose_outcome_is_unknown_or_retryable_is_resent(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy, fault: str, retried_because: str
) -> None:
    changes = one_per_stage(fake, 8)
    fake.update_faults({fault: 1.0})
    await enqueue(redis_client, settings, changes)
    async with running_worker(dataclasses.replace(settings, batch_wait_s=0.5)):

        async def all_retried() -> bool:
            retrying = [e for e in await read_events(redis_client) if e["event"] == "retrying"]
            return {e["idempotency_key"] for e in retrying} == {key for key, _ in changes}

        await eventually(all_retried, within_s=20)
        fake.update_faults({fault: 0.0})
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    retrying = [e for e in await read_events(redis_client) if e["event"] == "retrying"]
    assert {(e["sent_as"], e["error_code"]) for e in retrying} == {("batch", retried_because)}
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {
        key: ["succeeded"] for key, _ in changes
    }
    assert all(names(fake)[int(str(raw["id"]))] == raw["name"] for _, raw in changes)


async def test_a_job_refused_for_good_is_dead_lettered_and_the_others_succeed(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    changes = one_per_stage(fake, 7)
    changes.append(("nowhere", {"id": 424242, "name": "No such stage"}))
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert calls(fake, "batch", "run") == 1
    [refused] = terminal.pop("nowhere")
    assert (refused["event"], refused["error_code"], refused["sent_as"]) == ("failed", "24320", "batch")
    assert {events[0]["event"] for events in terminal.values()} == {"succeeded"}
    assert [e["idempotency_key"] for e in await read_events(redis_client, "leadstage:dlq")] == ["nowhere"]


@pytest.mark.system  # starts a worker process of its own (to SIGKILL it)
async def test_a_worker_killed_mid_batch_leaves_its_changes_to_be_resent(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy, tmp_path: Path
) -> None:
    """SIGKILLed once its batch was accepted (its asyncId recorded) and while iVvy still applies it:
    the leases lapse, the batch's wait passes, and another worker claims the changes and resends
    them. Nobody collects the dead worker's results."""
    # The dead worker's short lease lapses first: the second worker's claim then finds the changes
    # still guarded (batch.lua: 'below') and asks for no batch for a second (QUIET_S); their wait and
    # in-flight guard end about a second after that, so that they are claimed as a batch again.
    settings = dataclasses.replace(settings, batch_wait_s=1.5)
    changes = one_per_stage(fake, 10)
    fake.update_faults({"batch_delay_s": 1.0})
    await enqueue(redis_client, settings, changes)
    ledger = Ledger(redis_client, settings)
    dying = dataclasses.replace(settings, lease_s=0.5)
    first = harness.start_worker_process(harness.worker_env(dying), tmp_path / "first.log")
    try:

        async def batch_recorded() -> bool:
            entry = await ledger.entry(keys.job_id("default", "u0"))
            return entry is not None and entry.get("batch") not in (None, "pending")

        await eventually(batch_recorded, within_s=20)
    finally:
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
    fake.update_faults({"batch_delay_s": 0.05})  # the batch that resends them is applied at once
    assert not [e for e in await read_events(redis_client) if e["event"] != "retrying"]
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes], within_s=40)
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {
        key: ["succeeded"] for key, _ in changes
    }
    assert calls(fake, "batch", "run") >= 2  # the killed worker's, and the one that resent them
    assert all(names(fake)[int(str(raw["id"]))] == raw["name"] for _, raw in changes)
    # Each change was attempted again, by a new run: the killed run's attempt counts.
    assert {events[0]["attempt"] for events in terminal.values()} == {"2"}
