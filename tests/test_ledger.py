"""The ledger's Lua scripts against a real Redis: idempotency, ordering, locks, rate limit, exactly-once."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import pytest
import redis.asyncio as aioredis

from worker.core import keys
from worker.core.bulk import ENQUEUE_CHUNK
from worker.core.change import Envelope, LeadStageChange, parse_change
from worker.core.errors import ConfigError, IdempotencyConflict
from worker.core.ledger import Ledger, Start, now_ms
from worker.core.redis_connection import RedisClient
from worker.core.scripts import RATE_WINDOW_US
from worker.core.settings import Settings

WORKER = "test-worker"
#: A rate limit high enough never to make these tests wait.
RATE = 1e6
QUEUE = keys.queue_key("leadstage:queue", "default")


@pytest.fixture
def settings() -> Settings:
    return Settings(max_attempts=3)


@pytest.fixture
def ledger(redis_client: aioredis.Redis, settings: Settings) -> Ledger:
    return Ledger(redis_client, settings)


def envelope(key: str) -> Envelope:
    return Envelope(idempotency_key=key, account="default", source="test")


async def enqueue(ledger: Ledger, key: str, raw: dict[str, object]) -> LeadStageChange:
    change = parse_change(raw)
    await ledger.enqueue_many([(change, envelope(key))])
    return change


async def start(ledger: Ledger, key: str, rate: float = RATE) -> Start:
    """start.lua for a job made due now (as when its wait or its lease ran out)."""
    await ledger.client.zadd(QUEUE, {f"default:{key}": 0}, xx=True)
    return await ledger.start(f"default:{key}", WORKER, rate, 0)


async def finish(
    ledger: Ledger, key: str, change: LeadStageChange, started: Start, outcome: str, **options: Any
) -> bool:
    """finish.lua for the run ``started`` began; whether it was recorded."""
    finished = await ledger.finish(
        f"default:{key}", started.run, change, event=event(outcome, key), history={}, **options
    )
    return finished.recorded


def event(outcome: str, key: str) -> dict[str, str]:
    return {"event": outcome, "idempotency_key": key, "job_id": keys.job_id("default", key), "stage_id": ""}


async def test_enqueue_is_idempotent_and_refuses_a_changed_payload(
    ledger: Ledger, redis_client: aioredis.Redis
) -> None:
    change = parse_change({"name": "Hot", "applyTo": 2})
    first = await ledger.enqueue_many([(change, envelope("k1"))])
    await redis_client.zrem(QUEUE, "default:k1")  # the queue forgot the job; the ledger did not
    second = await ledger.enqueue_many([(change, envelope("k1"))])
    assert [r.status for r in first + second] == ["queued", "duplicate"]
    with pytest.raises(IdempotencyConflict, match="k1"):
        await ledger.enqueue_many([(parse_change({"name": "Cold", "applyTo": 2}), envelope("k1"))])
    assert await redis_client.zcard(QUEUE) == 0


async def test_a_batch_with_a_conflict_enqueues_nothing(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    await enqueue(ledger, "k1", {"name": "Hot", "applyTo": 2})
    batch = [
        (parse_change({"name": "New", "applyTo": 1}), envelope("k2")),
        (parse_change({"name": "Other", "applyTo": 1}), envelope("k1")),
    ]
    with pytest.raises(IdempotencyConflict):
        await ledger.enqueue_many(batch)
    assert await redis_client.exists(keys.ledger_key("default:k2")) == 0


@pytest.mark.parametrize(
    ("foreign", "kind"),
    [
        (QUEUE, "zset"),  # refused by the last writes, after every ledger entry
        (keys.stage_key("default", 8), "hash"),  # the second change's: the first was written already
        (keys.PENDING, "hash"),
        (keys.ledger_key("default:k2"), "hash"),
    ],
)
async def test_a_key_holding_another_kind_of_value_enqueues_nothing(
    ledger: Ledger, redis_client: aioredis.Redis, foreign: str, kind: str
) -> None:
    """Another program's value at one of the keys: a clear error naming it, and nothing half-written
    (Redis does not undo a script's writes before a refused one: a ledger entry no queue holds
    would answer 'duplicate' to the retry, and never be sent)."""
    await redis_client.set(foreign, "another program's")
    batch = [
        (parse_change({"id": 7, "name": "A"}), envelope("k1")),
        (parse_change({"id": 8, "name": "B"}), envelope("k2")),
    ]
    with pytest.raises(ConfigError, match=rf"a string at '{re.escape(foreign)}', where leadstage keeps a {kind}"):
        await ledger.enqueue_many(batch)
    # Only the schedule's notice, sent in the same round trip, is left: a wake-up that finds nothing.
    notice = {keys.ready_key("leadstage:queue"), keys.wake_key("leadstage:queue"), keys.epoch_key("leadstage:queue")}
    assert {key.decode() for key in await redis_client.keys("*")} - notice == {foreign}
    await redis_client.delete(foreign)
    assert [receipt.status for receipt in await ledger.enqueue_many(batch)] == ["queued", "queued"]
    assert await redis_client.zcard(QUEUE) == 2


async def test_a_bulk_checks_every_key_for_its_kind_before_its_first_chunk(
    ledger: Ledger, redis_client: aioredis.Redis
) -> None:
    """More than one chunk: a foreign value at a stage key of the last chunk stops the first chunk too."""
    count = ENQUEUE_CHUNK + 1
    batch = [(parse_change({"id": 1000 + i, "colour": "#000000"}), envelope(f"bulk-{i}")) for i in range(count)]
    await redis_client.set(keys.stage_key("default", 1000 + count - 1), "another program's")
    with pytest.raises(ConfigError, match="where leadstage keeps a hash"):
        await ledger.enqueue_many(batch)
    assert await redis_client.keys("leadstage:ledger:*") == []
    assert await redis_client.zcard(QUEUE) == 0


async def test_several_accounts_enqueue_all_or_nothing_on_a_single_redis_and_a_cluster(
    any_redis: tuple[str, RedisClient],
) -> None:
    """On a Redis Cluster one chunk is a call per account: a foreign value in the second account's
    queue must stop the first account's changes too."""
    _, client = any_redis
    ledger = Ledger(client, Settings())
    foreign = keys.queue_key("leadstage:queue", "beta")
    batch = [
        (parse_change({"id": 7, "name": "A"}), Envelope(idempotency_key="k1", account="alpha", source="test")),
        (parse_change({"id": 8, "name": "B"}), Envelope(idempotency_key="k2", account="beta", source="test")),
    ]
    await client.set(foreign, "another program's")
    with pytest.raises(ConfigError, match="where leadstage keeps a zset"):
        await ledger.enqueue_many(batch)
    assert await client.exists(keys.ledger_key("alpha:k1"), keys.queue_key("leadstage:queue", "alpha")) == 0
    await client.delete(foreign)
    assert [receipt.status for receipt in await ledger.enqueue_many(batch)] == ["queued", "queued"]


async def test_a_replay_into_a_dead_letter_stream_of_another_kind_is_refused_whole(
    ledger: Ledger, redis_client: aioredis.Redis
) -> None:
    change = await enqueue(ledger, "k", {"id": 1, "name": "Won!"})
    assert await finish(ledger, "k", change, await start(ledger, "k"), "failed")
    [(entry_id, _)] = await redis_client.xrange("leadstage:dlq")
    await redis_client.delete("leadstage:dlq")
    await redis_client.set("leadstage:dlq", "another program's")
    with pytest.raises(ConfigError, match="a string at 'leadstage:dlq', where leadstage keeps a stream"):
        await ledger.replay(change, envelope("k"), dlq_entry_id=entry_id.decode(), generation="0")
    entry = await ledger.entry("default:k")
    assert entry is not None
    assert (entry["state"], await redis_client.zcard(QUEUE)) == ("failed", 0)
    # A replay that deletes no dead letter does not touch the stream.
    assert await ledger.replay(change, envelope("k"), dlq_entry_id="", generation="0") == ("queued", 1)


async def test_the_job_record_is_the_ledger_entry_in_json(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    change = await enqueue(ledger, "k1", {"id": 7, "colour": "#ABCDEF"})
    entry = await ledger.entry("default:k1")
    assert entry is not None
    assert entry["change"] == '{"id":7,"colour":"#abcdef"}' == change.canonical_json().decode()
    assert (entry["state"], entry["op"], entry["account"], entry["stage_id"]) == ("queued", "update", "default", "7")
    assert await redis_client.zscore(QUEUE, "default:k1") is not None


async def test_a_started_job_is_hidden_for_one_lease(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    await enqueue(ledger, "k", {"name": "A", "applyTo": 1})
    before = now_ms()
    assert (await ledger.start("default:k", WORKER, RATE, 0)).decision == "go"
    hidden_until = await redis_client.zscore(QUEUE, "default:k")
    assert hidden_until is not None
    assert hidden_until >= before + ledger.lease_ms
    assert (await ledger.start("default:k", "other", RATE, 0)).decision == "skip"


async def test_an_older_update_drops_fields_a_newer_one_sets(ledger: Ledger) -> None:
    older = await enqueue(ledger, "old", {"id": 5, "name": "A", "colour": "#000000"})
    await enqueue(ledger, "new", {"id": 5, "colour": "#ffffff"})
    started_older = await start(ledger, "old")
    assert started_older.decision == "go"
    assert started_older.dropped == {"colour"}
    assert await finish(ledger, "old", older, started_older, "succeeded")
    started_newer = await start(ledger, "new")
    assert (started_newer.decision, started_newer.dropped) == ("go", frozenset())


async def test_an_update_overtaken_in_every_field_is_superseded(ledger: Ledger) -> None:
    await enqueue(ledger, "old", {"id": 5, "colour": "#000000"})
    await enqueue(ledger, "new", {"id": 5, "colour": "#ffffff", "name": "B"})
    started = await start(ledger, "old")
    assert (started.decision, started.dropped) == ("superseded", frozenset({"colour"}))


async def test_one_job_at_a_time_per_stage(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    first = await enqueue(ledger, "a", {"id": 5, "name": "A"})
    await enqueue(ledger, "b", {"id": 5, "colour": "#123456"})
    started = await start(ledger, "a")
    assert started.decision == "go"
    blocked = await start(ledger, "b")
    assert (blocked.decision, blocked.reason) == ("wait", "locked")
    rescheduled = await redis_client.zscore(QUEUE, "default:b")
    assert rescheduled is not None
    assert rescheduled > now_ms() - 5
    assert await finish(ledger, "a", first, started, "succeeded")
    assert (await start(ledger, "b")).decision == "go"


async def test_adds_of_the_same_name_share_a_lock(ledger: Ledger) -> None:
    await enqueue(ledger, "a", {"name": "Hot", "applyTo": 1})
    await enqueue(ledger, "b", {"name": "HOT", "applyTo": 2})
    assert (await start(ledger, "a")).decision == "go"
    assert (await start(ledger, "b")).reason == "locked"


async def test_terminal_event_is_written_exactly_once(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    change = await enqueue(ledger, "k", {"name": "Hot", "applyTo": 1})
    started = await start(ledger, "k")
    written = [await finish(ledger, "k", change, started, "succeeded") for _ in range(3)]
    assert written == [True, False, False]
    assert await redis_client.xlen("leadstage:results") == 1
    assert await redis_client.zcard(QUEUE) == 0
    await redis_client.zadd(QUEUE, {"default:k": 0})  # a stray queue entry of a finished job
    done = await ledger.start("default:k", WORKER, RATE, 0)
    assert (done.decision, done.state) == ("done", "succeeded")
    assert await redis_client.zcard(QUEUE) == 0


async def test_failure_dead_letters_and_replay_keeps_the_key(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    change = await enqueue(ledger, "k", {"id": 1, "name": "Won!"})
    started = await start(ledger, "k")
    assert await finish(ledger, "k", change, started, "failed")
    [(entry_id, fields)] = await redis_client.xrange("leadstage:dlq")
    assert fields[b"original_change"] == change.canonical_json()
    assert await redis_client.zcard(QUEUE) == 0

    status, generation = await ledger.replay(change, envelope("k"), dlq_entry_id=entry_id.decode(), generation="0")
    assert (status, generation) == ("queued", 1)
    assert await redis_client.xlen("leadstage:dlq") == 0
    assert (await start(ledger, "k")).decision == "go"
    again = await ledger.replay(change, envelope("k"), dlq_entry_id="", generation="0")
    assert again == ("not_failed", 0)


async def test_rate_limit_is_shared_by_jobs_of_one_account(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    await enqueue(ledger, "a", {"name": "A", "applyTo": 1})
    await enqueue(ledger, "b", {"name": "B", "applyTo": 1})
    assert (await start(ledger, "a", rate=5.0)).decision == "go"
    waiting = await start(ledger, "b", rate=5.0)
    assert (waiting.decision, waiting.reason) == ("wait", "rate")
    assert 100 <= waiting.wait_ms <= 200
    # Nothing was reserved: at the free slot the job goes.
    await asyncio.sleep(waiting.wait_ms / 1000)
    assert (await ledger.start("default:b", WORKER, 5.0, 0)).decision == "go"


@pytest.mark.parametrize("late_by", [0.0, 0.25, 0.45, 3.0])
async def test_the_next_slot_is_a_whole_interval_after_a_send_however_late_its_claim(
    ledger: Ledger, redis_client: aioredis.Redis, late_by: float
) -> None:
    """A server that counts requests over any sliding second (iVvy's limit, the fake's) sees at
    most the limit only if no two sends are closer than one interval: a claim late for its slot
    (``late_by`` intervals) must not leave the account's next slot on the old grid."""
    interval_us = 100_000  # 10/s
    await enqueue(ledger, "a", {"name": "A", "applyTo": 1})
    seconds, micros = await redis_client.time()
    before_us = seconds * 1_000_000 + micros
    await redis_client.hset(keys.rate_key("default"), "tat", str(before_us - int(late_by * interval_us)))  # type: ignore[misc]  # redis-py's async stubs
    assert (await start(ledger, "a", rate=10.0)).decision == "go"
    tat = int(await redis_client.hget(keys.rate_key("default"), "tat"))  # type: ignore[misc]  # redis-py's async stubs
    # The earliest next send: its slot less the window within which slots are taken early.
    assert tat - RATE_WINDOW_US >= before_us + interval_us


async def test_a_429_pauses_the_whole_account(ledger: Ledger) -> None:
    first = await enqueue(ledger, "a", {"name": "A", "applyTo": 1})
    await enqueue(ledger, "b", {"name": "B", "applyTo": 1})
    started = await start(ledger, "a")
    assert await finish(ledger, "a", first, started, "retrying", delay_ms=5000, pause_ms=5000)
    paused = await start(ledger, "b")
    assert (paused.decision, paused.reason) == ("wait", "paused")
    assert 4000 <= paused.wait_ms <= 5000
    backoff = await start(ledger, "a")
    assert (backoff.decision, backoff.reason) == ("wait", "backoff")


async def test_a_crashed_attempt_is_guarded_then_resumed(ledger: Ledger, settings: Settings) -> None:
    await enqueue(ledger, "k", {"name": "A", "applyTo": 1})
    assert (await start(ledger, "k")).decision == "go"
    # The worker died mid-POST and its lease ran out: its request may still be in flight.
    guarded = await start(ledger, "k")
    assert (guarded.decision, guarded.reason) == ("wait", "in_flight")
    quick = Ledger(ledger.client, dataclasses.replace(settings, request_timeout_s=0.001, in_flight_margin_s=0.05))
    await asyncio.sleep(quick.in_flight_guard_ms / 1000)
    await ledger.client.zadd(QUEUE, {"default:k": 0})
    resumed = await quick.start("default:k", WORKER, RATE, 0)
    assert (resumed.decision, resumed.previous_phase, resumed.attempt) == ("go", "posting", 2)


async def test_out_of_attempts_is_exhausted(ledger: Ledger, settings: Settings) -> None:
    change = await enqueue(ledger, "k", {"name": "A", "applyTo": 1})
    for attempt in range(1, settings.max_attempts + 1):
        started = await start(ledger, "k")
        assert (started.decision, started.attempt) == ("go", attempt)
        assert await finish(ledger, "k", change, started, "retrying")
    exhausted = await start(ledger, "k")
    assert (exhausted.decision, exhausted.attempt) == ("exhausted", settings.max_attempts)


async def test_adopt_gives_each_stage_to_one_add(ledger: Ledger) -> None:
    runs = {}
    for key in ("a", "b", "c"):
        await enqueue(ledger, key, {"name": f"Hot {key}", "applyTo": 1})
        runs[key] = (await start(ledger, key)).run
    assert await ledger.adopt("default", "default:a", runs["a"], [10, 11]) == 10
    assert await ledger.adopt("default", "default:b", runs["b"], [10, 11]) == 11
    assert await ledger.adopt("default", "default:a", runs["a"], [10, 11]) == 10
    assert await ledger.adopt("default", "default:c", runs["c"], [10, 11]) is None


async def test_a_claim_takes_as_many_due_changes_as_free_slots(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    for i in range(5):
        await enqueue(ledger, f"c{i}", {"name": f"Claimed {i}", "applyTo": 1})
    claim = await ledger.claim("default", WORKER, RATE, 0, 3)
    assert [(s.decision, s.job_id, s.run) for s in claim.starts] == [("go", f"default:c{i}", 1) for i in range(3)]
    head = await redis_client.zrange(QUEUE, 0, 0, withscores=True)
    # The fourth change is still due: from its due time, or the rate limiter's next slot if later.
    assert int(head[0][1]) <= claim.account_next_ms <= now_ms() + 1
    slow = await ledger.claim("default", WORKER, 10.0, 0, 2)  # 10/s: one slot now, the next in 100 ms
    assert [s.job_id for s in slow.starts] == ["default:c3"]
    assert (slow.rate_reason, 0 < slow.rate_wait_ms <= 100) == ("rate", True)


async def test_runs_that_end_together_are_recorded_in_one_call_each_fenced_on_its_own(
    ledger: Ledger, redis_client: aioredis.Redis
) -> None:
    changes = [await enqueue(ledger, f"e{i}", {"name": f"Ended {i}", "applyTo": 1}) for i in range(3)]
    claim = await ledger.claim("default", WORKER, RATE, 0, 3)
    runs = [start.run for start in claim.starts]
    runs[1] += 1  # a run that is not the change's current one any more
    finished = await asyncio.gather(
        *(
            ledger.finish(f"default:e{i}", runs[i], changes[i], event=event("succeeded", f"e{i}"), history={})
            for i in range(3)
        )
    )
    assert [(f.recorded, f.refused_because) for f in finished] == [(True, ""), (False, "fenced"), (True, "")]
    assert await redis_client.zrange(QUEUE, 0, -1) == [b"default:e1"]
    assert await redis_client.xlen(ledger.settings.results_stream) == 2


async def test_a_change_does_not_expire_until_it_is_done(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    change = await enqueue(ledger, "kept", {"name": "Kept", "applyTo": 1})
    assert await redis_client.pttl(keys.ledger_key("default:kept")) == -1
    started = await start(ledger, "kept")
    assert await finish(ledger, "kept", change, started, "succeeded")
    retention_ms = ledger.settings.ledger_retention_s * 1000
    assert retention_ms - 60_000 < await redis_client.pttl(keys.ledger_key("default:kept")) <= retention_ms


async def test_a_lock_taken_over_after_it_expired_is_put_back_by_the_run_that_lost_it(
    ledger: Ledger, redis_client: aioredis.Redis
) -> None:
    old = await enqueue(ledger, "old", {"id": 9, "colour": "#111111"})
    first = await start(ledger, "old")
    lock = keys.stage_lock_key("default", "9")
    await redis_client.delete(lock)  # as if it expired while the old run went on
    await enqueue(ledger, "new", {"id": 9, "applyTo": 2})
    newer = await start(ledger, "new")
    assert newer.decision == "go"
    taken = await redis_client.get(lock)
    assert await finish(ledger, "old", old, first, "succeeded")
    assert await redis_client.get(lock) == taken  # the newer change's lock, as it was
    assert 0 < await redis_client.pttl(lock) <= ledger.lock_ms
