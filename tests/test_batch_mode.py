"""Batch mode (docs/contract.md: Batches): an account's due updates, one per stage, go out as one
iVvy batch; each change ends by its job's answer as a single call's would. End to end: real Redis,
the fake iVvy over HTTP with its batch faults, the real worker (a real process when killed)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from pathlib import Path

import orjson
import prometheus_client
import pytest
import redis.asyncio as aioredis

from tests import harness
from tests.harness import eventually, read_events, wait_for_terminal, worker_settings
from worker.batch import BatchCalls, lead_stage_job
from worker.batching import run_batch
from worker.core import batch_claim, keys, readers
from worker.core.batch_claim import claim_batch, end_batch, record_sent, take_rate_slot, take_run_slot
from worker.core.change import parse_change, parse_envelope
from worker.core.errors import IvvyNoAnswer
from worker.core.ledger import Ledger, Start
from worker.core.redis_connection import RedisClient
from worker.core.scripts import RATE_WINDOW_US, rate_interval_us
from worker.core.settings import Account, Settings
from worker.devtools.fake_ivvy import FakeIvvy, RunningFakeIvvy
from worker.ivvy import AiohttpTransport, IvvyClient
from worker.runner import running_worker
from worker.runtime import Lease, Runtime


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


async def batch_record(redis_client: RedisClient, entry: dict[str, str]) -> dict[str, str]:
    """The record of the batch a change's ledger entry names (empty when there is none)."""
    raw = await redis_client.hgetall(entry["batch_key"])  # type: ignore[misc]  # redis-py's async stubs
    return {k.decode(): v.decode() for k, v in raw.items()}


async def kill_while_the_run_hangs(
    fake: FakeIvvy, settings: Settings, ledger: Ledger, tmp_path: Path, key: str
) -> dict[str, str]:
    """A worker process SIGKILLed while its batch's run hangs at the fake (not applied); the fake
    answers again afterwards. Returns the record of ``key``'s batch then (its run sent, unanswered)."""
    fake.update_faults({"hang_rate": 1.0, "hang_s": 60})
    first = harness.start_worker_process(harness.worker_env(settings), tmp_path / "first.log")
    try:

        async def run_hangs() -> bool:
            return calls(fake, "batch", "run") > 0

        await eventually(run_hangs, within_s=20)
    finally:
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
    entry = await ledger.entry(keys.job_id("default", key))
    assert entry is not None
    record = await batch_record(ledger.client, entry)
    assert "async_id" not in record
    assert keys.job_id("default", key) in record["jobs"].split("\n")
    fake.update_faults({"hang_rate": 0.0})
    return record


async def through_a_fault(
    redis_client: aioredis.Redis,
    settings: Settings,
    fake: FakeIvvy,
    changes: list[tuple[str, dict[str, object]]],
    fault: str,
) -> dict[str, list[dict[str, str]]]:
    """The changes through a worker (a 0.2 s batch wait, a 0.3 s request timeout: the holds of an
    unknown outcome) while the batch ``fault`` hits every batch, until each was retried; then
    without it until each is terminal. Their terminal events."""
    fake.update_faults({fault: 1.0})
    await enqueue(redis_client, settings, changes)
    async with running_worker(dataclasses.replace(harness.reconciling_soon(settings), batch_wait_s=0.2)):

        async def all_retried() -> bool:
            retrying = [e for e in await read_events(redis_client) if e["event"] == "retrying"]
            return {e["idempotency_key"] for e in retrying} == {key for key, _ in changes}

        await eventually(all_retried, within_s=20)
        fake.update_faults({fault: 0.0})
        return await wait_for_terminal(redis_client, [key for key, _ in changes], within_s=40)


async def test_an_accounts_due_updates_go_as_one_batch_each_with_its_own_event(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    changes = one_per_stage(fake, 30)
    first, second = (int(str(changes[i][1]["id"])) for i in (0, 1))
    # A second change of the first stage, of another field: carried by u0's job (coalesced into it, one
    # job per stage). One of the second stage that overtakes u1's only field: u1 sends nothing
    # (superseded), the newer one is its stage's job.
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
    carriers = {key: (terminal[key][0]["sent_as"], terminal[key][0]["carried_by"]) for key in ("z-later", "z-newer")}
    assert carriers == {"z-later": ("batch", "u0"), "z-newer": ("batch", "z-newer")}
    assert calls(fake, "crm", "addOrUpdateLeadStage") == 0
    assert (fake.stages[first].colour, names(fake)[second]) == ("#00000b", "Newest")
    # Each change's entry names the batch that carried it, whose record went when it ended.
    entry = await Ledger(redis_client, settings).entry(keys.job_id("default", "u3"))
    assert entry is not None
    assert entry["batch_key"].startswith(keys.batch_key("default", ""))
    assert not await redis_client.exists(entry["batch_key"], keys.batches_key("default"))
    assert sent_as("batch") - before == 31
    recent = (await readers.stats(redis_client, settings))["recent"]
    assert isinstance(recent, dict)
    assert (recent["1m"]["sent_batch"], recent["1m"]["sent_alone"], recent["1m"]["superseded"]) == (31, 0, 1)


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
    """batch.lua's claim sees a slot free and takes none; 'go' takes the run's just before it is sent
    (and its in-flight guard counts from then); 'slot' takes one per poll, never two within one
    interval, and takes nothing while none is free (by the server's clock, no timing)."""
    await enqueue(redis_client, settings, one_per_stage(fake, 8))
    ledger = Ledger(redis_client, settings)
    rate = 10.0  # one slot per 100 ms (and the headroom)
    interval_ms = rate_interval_us(rate) / 1000
    claim = await claim_batch(ledger, "default", "w", rate)
    assert (len(claim.starts), claim.refused) == (8, "")
    assert await redis_client.hget(keys.rate_key("default"), "tat") is None  # type: ignore[misc]  # redis-py's async stubs; nothing taken
    ledger_key = keys.ledger_key(claim.starts[0].job_id)
    claimed_at = int(await redis_client.hget(ledger_key, "posted_at"))  # type: ignore[misc]  # redis-py's async stubs
    assert await take_run_slot(ledger, "default", rate, claim, claim.starts) == 0
    assert int(await redis_client.hget(claim.record, "posted_at")) >= claimed_at  # type: ignore[misc]  # redis-py's async stubs
    first_wait = await take_rate_slot(ledger, "default", rate)
    assert 0 < first_wait <= interval_ms  # the run took the slot
    record = await redis_client.hgetall(claim.record)  # type: ignore[misc]  # redis-py's async stubs
    assert await take_run_slot(ledger, "default", rate, claim, claim.starts) > 0  # none free: nothing taken
    assert await redis_client.hgetall(claim.record) == record  # type: ignore[misc]  # nothing written
    rate_state = await redis_client.hgetall(keys.rate_key("default"))  # type: ignore[misc]  # redis-py's async stubs
    assert await take_rate_slot(ledger, "default", rate) > 0
    assert await redis_client.hgetall(keys.rate_key("default")) == rate_state  # type: ignore[misc]  # nothing taken
    await redis_client.hset(keys.rate_key("default"), "tat", "0")  # type: ignore[misc]  # redis-py's async stubs; as after a quiet while
    assert await take_rate_slot(ledger, "default", rate) == 0
    assert 0 < await take_rate_slot(ledger, "default", rate) <= interval_ms
    # With no free slot, a claim takes nothing (and says so).
    await enqueue(redis_client, settings, one_per_stage(fake, 8, prefix="v"))
    refused = await claim_batch(ledger, "default", "w", rate)
    assert (refused.starts, refused.refused) == ([], "rate")


async def test_what_a_batchs_changes_share_is_written_once_in_its_record_and_collected_from_it(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """A batch's run sent and answered: its asyncId and send time are in its record, once, and each
    change's entry only names that record (and its run). Its worker gone (the leases lapsed), the next
    claim collects it from the record: every change on a new run, by its index in the run's job order,
    no attempt counted. Once the batch ends, neither its record nor its listing is left."""
    await enqueue(redis_client, settings, one_per_stage(fake, 8))
    ledger = Ledger(redis_client, settings)
    claim = await claim_batch(ledger, "default", "w1", 100.0)
    assert (len(claim.starts), claim.refused) == (8, "")
    in_job_order = list(reversed(claim.starts))  # as after a gathering: the run's order is its own
    assert await take_run_slot(ledger, "default", 100.0, claim, in_job_order) == 0
    await record_sent(ledger, "default", claim, "A-1")
    record = await redis_client.hgetall(claim.record)  # type: ignore[misc]  # redis-py's async stubs
    assert record[b"async_id"] == b"A-1"
    assert record[b"jobs"].decode().split("\n") == [s.job_id for s in in_job_order]
    for start in claim.starts:
        entry = await ledger.entry(start.job_id)
        assert entry is not None
        assert (entry["batch_key"], entry["batch_run"]) == (claim.record, str(start.run))
        assert "A-1" not in entry.values()
    # The worker dies: its leases lapse.
    queue = keys.queue_key(settings.queue_name, "default")
    await redis_client.zadd(queue, {start.job_id: 0 for start in claim.starts})
    collected = await claim_batch(ledger, "default", "w2", 100.0)
    assert (collected.refused, collected.async_id, collected.record) == ("collect", "A-1", claim.record)
    by_job = {s.job_id: s for s in claim.starts}
    assert {s.job_id: (s.run, s.attempt) for s in collected.starts} == {
        job: (start.run + 1, start.attempt) for job, start in by_job.items()
    }
    assert [in_job_order[i].job_id for i in collected.indexes] == [s.job_id for s in collected.starts]
    await end_batch(ledger, "default", collected)
    assert not await redis_client.exists(claim.record, keys.batches_key("default"))


async def test_a_claim_below_the_threshold_leaves_every_stage_as_it_found_it(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """The scan takes each free stage's lock as it goes (SET NX): below the threshold it gives them
    back, and a lock held by another change stays that change's."""
    changes = one_per_stage(fake, settings.batch_threshold + 1)
    await enqueue(redis_client, settings, changes)
    held = keys.stage_lock_key("default", str(changes[0][1]["id"]))
    await redis_client.set(held, "default:other#1#99999999999999", px=60_000)
    ledger = Ledger(redis_client, settings)
    refused = await claim_batch(ledger, "default", "w", 100.0)
    assert (refused.starts, refused.refused, refused.candidates) == ([], "below", settings.batch_threshold)
    locks = [key async for key in redis_client.scan_iter(match=keys.STAGE_LOCK_PREFIX + "*")]
    assert locks == [held.encode()]
    assert await redis_client.get(held) == b"default:other#1#99999999999999"


async def test_a_batch_is_claimed_for_a_slot_that_opens_within_the_lead_and_its_run_waits_for_it(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """The account is picked the lead before its next slot (start.lua's claim may take it that
    early): a batch claim that wanted a free slot would leave every such turn to single calls."""
    await enqueue(redis_client, settings, one_per_stage(fake, 8))
    ledger = Ledger(redis_client, dataclasses.replace(settings, rate_lead_s=0.2))
    rate = 10.0
    seconds, micros = await redis_client.time()
    opens_us = int(seconds) * 1_000_000 + int(micros) + 150_000  # the next slot, within the lead
    await redis_client.hset(keys.rate_key("default"), "tat", str(opens_us + RATE_WINDOW_US))  # type: ignore[misc]  # redis-py's async stubs
    claim = await claim_batch(ledger, "default", "w", rate)
    assert (len(claim.starts), claim.refused) == (8, "")
    # Not open yet: the run's 'go' takes nothing and says how long to wait (its pace waits for it).
    assert 0 < await take_run_slot(ledger, "default", rate, claim, claim.starts) <= 150


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
    terminal = await through_a_fault(redis_client, settings, fake, changes, fault)
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


@pytest.mark.system  # starts worker processes of its own (to SIGKILL one)
async def test_a_worker_killed_mid_batch_has_its_batch_collected_within_15_s(
    redis_url: str, redis_client: aioredis.Redis, fake: FakeIvvy, fake_ivvy: RunningFakeIvvy, tmp_path: Path
) -> None:
    """With the default lease, request timeout, batch wait and threshold: a worker SIGKILLed once its
    batch was accepted (its asyncId recorded) and while iVvy still applies it. Another worker
    collects that batch's results once the leases lapse, and finishes each change by its own job's
    answer: no second run, the killed run's attempt is the only one. A change its job carried
    (coalesced into it) is not in the batch's list: it is sent again alone, after the in-flight
    guard, once the collector has released its stage."""
    defaults = Settings()
    settings = worker_settings(
        redis_url, fake_ivvy.url, request_timeout_s=10.0, lease_s=8.0, job_timeout_s=120.0,
        batch_wait_s=defaults.batch_wait_s,
    )  # fmt: skip
    assert (settings.batch_mode, settings.batch_threshold) == (defaults.batch_mode, defaults.batch_threshold)
    changes = one_per_stage(fake, settings.batch_threshold + 5)
    carried = ("z-carried", {"id": changes[0][1]["id"], "colour": "#00000c"})
    changes.append(carried)
    fake.update_faults({"batch_delay_s": 4.0})
    await enqueue(redis_client, settings, changes)
    ledger = Ledger(redis_client, settings)
    env = harness.worker_env(settings)
    first = harness.start_worker_process(env, tmp_path / "first.log")
    try:

        async def batch_recorded() -> bool:
            entry = await ledger.entry(keys.job_id("default", "u0"))
            return entry is not None and "batch_key" in entry and "async_id" in await batch_record(redis_client, entry)

        await eventually(batch_recorded, within_s=20)
    finally:
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
    killed_at = time.monotonic()
    seen_at_kill = len(fake.requests)
    assert not [e for e in await read_events(redis_client) if e["event"] != "retrying"]
    second = harness.start_worker_process(env, tmp_path / "second.log")
    try:
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes], within_s=40)
        taken_up_after = time.monotonic() - killed_at

        async def nothing_left() -> bool:  # the collected batch's record and listing, once it ended
            records = [key async for key in redis_client.scan_iter(match=keys.BATCH_PREFIX + "*")]
            return not records and not await redis_client.exists(keys.batches_key("default"))

        await eventually(nothing_left, within_s=5)
    finally:
        harness.stop_process(second)
    ends = {key: [(e["event"], e["sent_as"], e["attempt"]) for e in events] for key, events in terminal.items()}
    assert ends == {key: [("succeeded", "batch", "1")] for key, _ in changes[:-1]} | {
        "z-carried": [("succeeded", "alone", "2")]
    }
    # After the kill: polls of the one batch (the collection: its results, asked for first, a
    # progress poll only if they were not ready), and the carried change alone.
    after = [(r.namespace, r.action) for r in list(fake.requests)[seen_at_kill:]]
    assert set(after) - {("batch", "progress")} == {("batch", "results"), ("crm", "addOrUpdateLeadStage")}
    assert after.count(("crm", "addOrUpdateLeadStage")) == 1
    assert calls(fake, "batch", "run") == 1
    assert all(names(fake)[int(str(raw["id"]))] == raw["name"] for _, raw in changes[:-1])
    assert fake.stages[int(str(carried[1]["id"]))].colour == "#00000c"
    assert "batch.collecting" in (tmp_path / "second.log").read_text()
    assert taken_up_after <= 15.0, f"taken up {taken_up_after:.1f}s after the kill"


@pytest.mark.system  # starts a worker process of its own (kill_while_the_run_hangs)
async def test_a_worker_killed_before_its_batchs_run_was_answered_leaves_it_resent_its_stages_held(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy, tmp_path: Path
) -> None:
    """SIGKILLed while its run hangs (recovery point ``pending``: nobody can ask about that batch).
    After the in-flight guard the changes are claimed again and resent, each stage staying locked
    until that batch's wait is over (it could still have been accepted and be applied late)."""
    changes = one_per_stage(fake, 8)
    await enqueue(redis_client, settings, changes)
    ledger = Ledger(redis_client, settings)
    pending = await kill_while_the_run_hangs(fake, settings, ledger, tmp_path, "u0")
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes], within_s=40)
    assert {key: [(e["event"], e["attempt"]) for e in events] for key, events in terminal.items()} == {
        key: [("succeeded", "2")] for key, _ in changes
    }
    assert all(names(fake)[int(str(raw["id"]))] == raw["name"] for _, raw in changes)
    entry = await ledger.entry(keys.job_id("default", "u0"))
    assert entry is not None
    guard_ms, wait_ms = ledger.in_flight_guard_ms, int(settings.batch_wait_s * 1000)
    assert int(entry["unknown_until"]) == int(pending["posted_at"]) + guard_ms + wait_ms


@pytest.mark.system  # waits out a batch's wait in real time
async def test_a_batch_not_ready_within_its_wait_keeps_its_stages_locked_for_another_wait(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """It may still be applied: a newer change of its stages must not go before that hold is over
    (longer than the single call's late-commit hold, the request timeout)."""
    changes = one_per_stage(fake, 8)
    fake.update_faults({"batch_never_ready_rate": 1.0})
    # The hold (the batch's wait) outlasts the late-commit hold (the request timeout) and a backoff
    # (0.05 s at most) by a fifth of a second at least.
    settings = dataclasses.replace(settings, batch_wait_s=0.45, request_timeout_s=0.2, backoff_max_s=0.05)
    ledger = Ledger(redis_client, settings)
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):

        async def retried() -> bool:
            return any(e["event"] == "retrying" for e in await read_events(redis_client))

        await eventually(retried, within_s=20)
        [event, *_] = [e for e in await read_events(redis_client) if e["event"] == "retrying"]
        entry = await ledger.entry(keys.job_id("default", event["idempotency_key"]))
        assert entry is not None
        # By the server's clock: the single call's hold would end at most the late-commit hold after
        # the retry is due (finish.lua: unknown_until = its now + the hold, next_at = its now + a delay).
        assert int(entry["unknown_until"]) - int(entry["next_at"]) > ledger.late_commit_ms
        fake.update_faults({"batch_never_ready_rate": 0.0})
        await wait_for_terminal(redis_client, [key for key, _ in changes])


def adds(count: int, prefix: str = "a") -> list[tuple[str, dict[str, object]]]:
    return [(f"{prefix}{i}", {"name": f"New {prefix}{i}", "applyTo": 1}) for i in range(count)]


def stage_count(fake: FakeIvvy, name: str) -> int:
    return sum(1 for stage in fake.stages.values() if stage.name == name)


async def test_due_adds_go_as_one_batch_each_creating_one_stage(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    changes = adds(12) + one_per_stage(fake, 4)
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert (calls(fake, "batch", "run"), calls(fake, "crm", "addOrUpdateLeadStage")) == (1, 0)
    for key, raw in changes:
        [event] = terminal[key]
        assert (event["event"], event["sent_as"]) == ("succeeded", "batch")
        if "id" not in raw:
            [stage] = [s for s in fake.stages.values() if s.name == raw["name"]]
            assert event["stage_id"] == str(stage.id)
    # Each created stage is claimed by its add: a later reconcile of another add never adopts it.
    claims = await redis_client.hgetall(keys.claims_key("default"))  # type: ignore[misc]  # redis-py's async stubs
    assert sorted(v.decode() for v in claims.values()) == sorted(keys.job_id("default", k) for k, _ in adds(12))


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("batch_run_drop_rate", id="the run's answer dropped after its adds were applied"),
        pytest.param("batch_job_24322_rate", id="every add answered 24322, not applied"),
        pytest.param("batch_never_ready_rate", id="results never ready within the wait"),
    ],
)
async def test_batched_adds_of_unknown_outcome_are_reconciled_before_any_resend(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy, fault: str
) -> None:
    """At most one stage per add: each is reconciled with getLeadStageList (an applied one adopted,
    a missing one sent again), exactly as a single call of unknown outcome."""
    changes = adds(8)
    terminal = await through_a_fault(redis_client, settings, fake, changes, fault)
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {
        key: ["succeeded"] for key, _ in changes
    }
    assert all(stage_count(fake, str(raw["name"])) == 1 for _, raw in changes)
    assert calls(fake, "crm", "getLeadStageList") >= 1


@pytest.mark.system  # starts a worker process of its own (kill_while_the_run_hangs)
async def test_adds_of_a_killed_workers_unanswered_batch_are_reconciled_after_its_wait(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy, tmp_path: Path
) -> None:
    """The run hangs (not applied) and its worker is SIGKILLed: nobody can ask about that batch, which
    could still create its stages until its wait is over. Each add is reconciled only after that
    (its in-flight guard plus the batch's wait, by the server's clock), then sent: one stage each."""
    changes = adds(8)
    await enqueue(redis_client, settings, changes)
    ledger = Ledger(redis_client, settings)
    pending = await kill_while_the_run_hangs(fake, settings, ledger, tmp_path, "a0")
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes], within_s=40)
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {
        key: ["succeeded"] for key, _ in changes
    }
    assert all(stage_count(fake, str(raw["name"])) == 1 for _, raw in changes)
    # The reconcile came after the batch's wait: no listing before it (server ms in the ledger).
    entry = await ledger.entry(keys.job_id("default", "a0"))
    assert entry is not None
    wait_ms = int(settings.batch_wait_s * 1000)
    assert int(entry["posted_at"]) >= int(pending["posted_at"]) + ledger.in_flight_guard_ms + wait_ms


@pytest.mark.system  # waits out a batch's hold in real time (about 1.5 s)
@pytest.mark.parametrize(
    ("worker_died", "count"),
    [
        pytest.param(False, 8, id="the run's answer lost, its worker ended each change as unknown"),
        pytest.param(True, 8, id="its worker gone before the answer, the changes resent as a batch"),
        pytest.param(True, 2, id="its worker gone before the answer, the changes resent alone"),
    ],
)
async def test_a_resend_after_a_batch_of_unknown_outcome_waits_out_its_late_application(
    settings: Settings,
    redis_client: aioredis.Redis,
    fake: FakeIvvy,
    transport: AiohttpTransport,
    ivvy_account: Account,
    worker_died: bool,
    count: int,
) -> None:
    """A batch's run is accepted, its answer lost (no asyncId: nobody can ask about it), and iVvy
    applies it late, well within the batch's wait. "older" (a stage's name and colour) was in it;
    "newer" (that stage's name) is enqueued meanwhile. Older's resend carries newer's name: sent
    before the late application, that name would be overwritten by older's. Whether the batch's
    worker ended its changes as unknown (phase unknown, held) or died first (taken over after the
    in-flight guard), and whether they are resent as a batch (batch.lua) or alone (start.lua), the
    resend waits out the batch's wait: the stage ends at newer's name and older's colour."""
    changes = one_per_stage(fake, count)
    stage = int(str(changes[0][1]["id"]))
    changes[0] = ("older", {"id": stage, "name": "Older", "colour": "#111111"})
    # The in-flight guard: 0.32 s; the batch's wait: 1 s (the hold ends 1.32 s after the run's send).
    settings = dataclasses.replace(settings, request_timeout_s=0.3, batch_wait_s=1.0)
    await enqueue(redis_client, settings, changes)
    # The first worker, by hand: its claim (whatever the threshold), its run's slot and send.
    ledger = Ledger(redis_client, settings)
    claim = await claim_batch(
        Ledger(redis_client, dataclasses.replace(settings, batch_threshold=1)), "default", "w1", 1000.0
    )
    assert len(claim.starts) == count
    run = sorted(claim.starts, key=lambda s: s.job_id == keys.job_id("default", "older"))  # older's job last
    assert await take_run_slot(ledger, "default", 1000.0, claim, run) == 0
    # Applied over 0.7 s (older's job at its end): after the guard, within the hold; later batches at once.
    fake.update_faults({"batch_run_drop_rate": 1.0, "batch_delay_s": 0.7})
    sent = {s.job_id: parse_change(orjson.loads(s.change_json)).without(set(s.dropped)) for s in run}
    with pytest.raises(IvvyNoAnswer):
        await BatchCalls(IvvyClient(ivvy_account, transport, timeout=2.0)).run(
            [lead_stage_job(sent[s.job_id]) for s in run]
        )
    fake.update_faults({"batch_run_drop_rate": 0.0, "batch_delay_s": 0.05})
    if worker_died:
        # Its leases lapse: the changes are due again, still on that batch's run.
        await redis_client.zadd(keys.queue_key(settings.queue_name, "default"), {s.job_id: 0 for s in run})
    else:
        # As run_batch on an unanswered run: the stages held, each change retried as unknown.
        await batch_claim.hold_unresolved(ledger, run)
        for s in run:
            event = {"event": "retrying", "idempotency_key": keys.split_job_id(s.job_id)[1], "job_id": s.job_id}
            finished = await ledger.finish(
                s.job_id, s.run, sent[s.job_id], event=event, history={}, outcome_unknown=True
            )
            assert finished.recorded
    await enqueue(redis_client, settings, [("newer", {"id": stage, "name": "Newer"})])
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, ["newer", *(key for key, _ in changes)], within_s=20)

        async def first_batch_applied() -> bool:
            return all(batch.done for batch in fake.batches.batches.values())

        await eventually(first_batch_applied)
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {
        key: ["succeeded"] for key in terminal
    }
    assert (fake.stages[stage].name, fake.stages[stage].colour) == ("Newer", "#111111")
    assert all(names(fake)[int(str(raw["id"]))] == raw["name"] for _, raw in changes[1:])


async def sent_batch(
    redis_client: aioredis.Redis, settings: Settings, fake: FakeIvvy
) -> tuple[Ledger, list[tuple[str, dict[str, object]]], list[Start]]:
    """Eight changes, one per stage, claimed for a batch whose run was sent (nothing recorded since)."""
    changes = one_per_stage(fake, 8)
    await enqueue(redis_client, settings, changes)
    ledger = Ledger(redis_client, settings)
    claim = await claim_batch(ledger, "default", "w1", 1000.0)
    assert len(claim.starts) == 8
    assert await take_run_slot(ledger, "default", 1000.0, claim, claim.starts) == 0
    return ledger, changes, claim.starts


async def test_while_a_batch_of_unknown_outcome_may_land_its_changes_wait_unless_they_send_nothing(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """By the scripts alone (no clock but the server's): after an unanswered run (its stages held for
    the batch's wait, each change retried as unknown) a batch claim leaves every one of them out,
    and start.lua makes one that would send wait for the hold; one whose every field was overtaken,
    or one out of attempts, sends nothing and is decided at once. A newer change of a held stage
    waits too, also when the lock of the held change's last send ended first."""
    ledger, changes, starts = await sent_batch(redis_client, settings, fake)
    await batch_claim.hold_unresolved(ledger, starts)
    by_key = {keys.split_job_id(s.job_id)[1]: s for s in starts}
    for key, raw in changes:
        s = by_key[key]
        event = {"event": "retrying", "idempotency_key": key, "job_id": s.job_id}
        assert (
            await ledger.finish(s.job_id, s.run, parse_change(raw), event=event, history={}, outcome_unknown=True)
        ).recorded
    # Each is due again (no backoff), on a stage its own earlier run holds.
    refused = await claim_batch(ledger, "default", "w2", 1000.0)
    assert (refused.starts, refused.refused, refused.candidates) == ([], "below", 0)
    # Its stage stays locked while it waits, also when the lock its last send left ended first.
    lock = keys.stage_lock_key("default", str(changes[0][1]["id"]))
    await redis_client.delete(lock)
    await enqueue(redis_client, settings, [("newer", {"id": changes[0][1]["id"], "colour": "#222222"})])
    waits = await ledger.start(keys.job_id("default", "u0"), "w2", 1000.0, 0)
    assert (waits.decision, waits.reason) == ("wait", "in_flight")
    assert (await redis_client.get(lock) or b"").startswith(keys.job_id("default", "u0#").encode())
    locked = await ledger.start(keys.job_id("default", "newer"), "w2", 1000.0, 0)
    assert (locked.decision, locked.reason) == ("wait", "locked")
    await enqueue(redis_client, settings, [("over", {"id": changes[1][1]["id"], "name": "Overtaken"})])
    superseded = await ledger.start(keys.job_id("default", "u1"), "w2", 1000.0, 0)
    assert superseded.decision == "superseded"
    exhausted = await Ledger(redis_client, dataclasses.replace(settings, max_attempts=1)).start(
        keys.job_id("default", "u2"), "w2", 1000.0, 0
    )
    assert exhausted.decision == "exhausted"


async def test_a_batch_given_up_on_keeps_its_stages_locked_for_its_hold_though_the_claims_lock_ends_first(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """The worker gives up on its batch's unknown outcome ('unresolved': held for another wait) and
    dies before it finishes the changes: each stage stays locked for that hold, though the lock its
    claim took (counted from the claim, not the send) ends first. A newer change of the stage,
    however early in the queue, waits; on the scripts before, the lock ended and it was sent."""
    ledger, changes, run = await sent_batch(redis_client, settings, fake)
    lock = keys.stage_lock_key("default", str(changes[0][1]["id"]))
    await redis_client.pexpire(lock, 300)  # the claim's lock (counted from the claim, long ago) about to end
    await batch_claim.hold_unresolved(ledger, run)
    assert await redis_client.pttl(lock) > 2_000  # the hold: another batch wait (3 s)
    await asyncio.sleep(0.35)  # the claim's lock would have ended by now
    await enqueue(redis_client, settings, [("newer", {"id": changes[0][1]["id"], "colour": "#222222"})])
    locked = await ledger.start(keys.job_id("default", "newer"), "w2", 1000.0, 0)
    assert (locked.decision, locked.reason) == ("wait", "locked")


async def test_a_change_superseded_while_its_batch_may_land_keeps_the_stage_locked_though_its_claims_lock_ends_first(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """The batch's worker died before any answer; past the in-flight guard another worker decides a
    change overtaken meanwhile superseded (it sends nothing) and finishes it: its stage stays locked
    until the batch's wait is over, though the lock still names the claim's run and was about to
    end. On the scripts before, only the finishing run's own lock was kept, and the newer change
    that overtook it was sent while the batch could still be applied."""
    settings = dataclasses.replace(settings, request_timeout_s=0.1)  # the in-flight guard: 0.12 s
    ledger, changes, _ = await sent_batch(redis_client, settings, fake)  # its worker dies: no answer
    stage = changes[0][1]["id"]
    lock = keys.stage_lock_key("default", str(stage))
    await redis_client.pexpire(lock, 300)  # the claim's lock (counted from the claim, long ago) about to end
    await enqueue(redis_client, settings, [("newer", {"id": stage, "name": "Newer"})])
    await asyncio.sleep(0.15)  # past the guard; the leases are lapsed by hand
    u0 = keys.job_id("default", "u0")
    await redis_client.zadd(keys.queue_key(settings.queue_name, "default"), {u0: 0})
    superseded = await ledger.start(u0, "w2", 1000.0, 0)
    assert superseded.decision == "superseded"
    event = {"event": "superseded", "idempotency_key": "u0", "job_id": u0}
    assert (await ledger.finish(u0, superseded.run, parse_change(changes[0][1]), event=event, history={})).recorded
    assert await redis_client.pttl(lock) > 2_000  # until the batch's wait (3 s) is over
    await asyncio.sleep(0.2)  # the claim's lock would have ended by now
    locked = await ledger.start(keys.job_id("default", "newer"), "w2", 1000.0, 0)
    assert (locked.decision, locked.reason) == ("wait", "locked")


@pytest.mark.system  # waits out a batch's hold in real time (about 1.5 s)
async def test_a_resend_after_results_not_ready_within_the_wait_waits_out_the_batchs_late_application(
    settings: Settings, redis_client: aioredis.Redis, fake: FakeIvvy
) -> None:
    """The worker's own path: its batch is still being applied when its wait (0.8 s) is over, and
    its last job, "z-older" (a stage's name and colour), is applied at 1.2 s. "newer" (that stage's
    name) is enqueued meanwhile; z-older's resend carries it, and must come after that late
    application (the stage held for another wait): the stage ends at newer's name."""
    changes = one_per_stage(fake, 8)
    stage = int(str(changes[-1][1]["id"]))
    changes[-1] = ("z-older", {"id": stage, "name": "Older", "colour": "#111111"})  # last in the job order
    settings = dataclasses.replace(settings, batch_wait_s=0.8, backoff_max_s=0.000_001)  # every retry due at once
    fake.update_faults({"batch_delay_s": 1.2})
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):

        async def run_sent() -> bool:
            return calls(fake, "batch", "run") > 0

        await eventually(run_sent)
        fake.update_faults({"batch_delay_s": 0.05})  # later batches are applied at once
        await enqueue(redis_client, settings, [("newer", {"id": stage, "name": "Newer"})])
        terminal = await wait_for_terminal(redis_client, ["newer", *(key for key, _ in changes)], within_s=20)

        async def all_applied() -> bool:
            return all(batch.done for batch in fake.batches.batches.values())

        await eventually(all_applied)
    retried = {e["idempotency_key"] for e in await read_events(redis_client) if e["event"] == "retrying"}
    assert retried == {key for key, _ in changes}  # the first batch's results were not ready within its wait
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {
        key: ["succeeded"] for key in terminal
    }
    assert (fake.stages[stage].name, fake.stages[stage].colour) == ("Newer", "#111111")


@pytest.mark.parametrize(
    ("faults", "cleared"),
    [
        pytest.param({"batch_run_drop_rate": 1.0, "batch_delay_s": 0.4}, {"batch_run_drop_rate": 0.0},
                     id="the run's answer lost"),
        pytest.param({"batch_delay_s": 1.2}, {}, id="results not ready within the wait, the batch still being applied"),
    ],
)  # fmt: skip
@pytest.mark.system  # waits out a batch's hold in real time (about 1.5 s)
async def test_the_changes_a_batchs_job_carried_wait_out_its_late_application(
    settings: Settings,
    redis_client: aioredis.Redis,
    fake: FakeIvvy,
    transport: AiohttpTransport,
    ivvy_account: Account,
    faults: dict[str, float],
    cleared: dict[str, float],
) -> None:
    """A batch's job for "b-leader" (a stage's colour) carries "c-carried" (its name, coalesced). The
    batch's outcome is unknown (a 0.8 s wait) and iVvy applies it late (the leader's job last, at
    its ``batch_delay_s``: within the batch's hold). "newer" (the stage's name), enqueued meanwhile,
    must not go before, nor may a retry of either that carries it: the stage ends at newer's name."""
    other = one_per_stage(fake, 1, "a")  # a batch takes more than one change: its first job, another stage's
    stage = fake.add_stage("Before", apply_to=1)
    changes = [*other, ("b-leader", {"id": stage.id, "colour": "#111111"})]
    changes.append(("c-carried", {"id": stage.id, "name": "Carried"}))
    settings = dataclasses.replace(settings, batch_wait_s=0.8, request_timeout_s=0.3)
    await enqueue(redis_client, settings, changes)
    # The first worker, by hand: its claim (whatever the threshold), and its batch's run.
    ledger = Ledger(redis_client, settings)
    claim = await claim_batch(
        Ledger(redis_client, dataclasses.replace(settings, batch_threshold=1)), "default", "w1", 1000.0
    )
    assert [keys.split_job_id(s.job_id)[1] for s in claim.starts] == ["a0", "b-leader"]
    fake.update_faults(faults)
    runtime = Runtime(settings, ledger, {"default": IvvyClient(ivvy_account, transport, timeout=0.2)}, "w1")
    for start in claim.starts:
        runtime.running[start.job_id] = Lease(start.run, time.monotonic() + settings.lease_s)
    first = asyncio.create_task(run_batch(runtime, runtime.clients["default"], claim))

    async def run_sent() -> bool:
        return calls(fake, "batch", "run") > 0

    await eventually(run_sent)
    fake.update_faults({**cleared, "batch_delay_s": 0.05})  # later batches are applied at once
    await enqueue(redis_client, settings, [("newer", {"id": stage.id, "name": "Newer"})])
    async with running_worker(settings):
        await first
        terminal = await wait_for_terminal(redis_client, ["newer", *(key for key, _ in changes)], within_s=20)

        async def first_batch_applied() -> bool:
            return all(batch.done for batch in fake.batches.batches.values())

        await eventually(first_batch_applied)
    [batch, *_] = fake.batches.batches.values()
    assert batch.jobs[1]["params"] == {"id": stage.id, "colour": "#111111", "name": "Carried"}
    retried = {e["idempotency_key"] for e in await read_events(redis_client) if e["event"] == "retrying"}
    assert retried == {"a0", "b-leader", "c-carried"}  # the batch's outcome was unknown
    assert terminal["newer"][0]["event"] == "succeeded"
    assert (stage.name, stage.colour) == ("Newer", "#111111")
