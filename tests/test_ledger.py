"""The ledger's Lua scripts against a real Redis: idempotency, ordering, locks, rate limit, exactly-once."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest
import redis.asyncio as aioredis

from worker import keys
from worker.change import Envelope, LeadStageChange, parse_change
from worker.errors import IdempotencyConflict
from worker.ledger import Ledger, now_ms
from worker.settings import Settings

WORKER = "test-worker"
#: A rate limit high enough never to make these tests wait.
RATE = 1e6


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


def event(outcome: str, key: str) -> dict[str, str]:
    return {"event": outcome, "idempotency_key": key, "job_id": keys.job_id("default", key), "stage_id": ""}


async def test_enqueue_is_idempotent_and_refuses_a_changed_payload(
    ledger: Ledger, redis_client: aioredis.Redis
) -> None:
    change = parse_change({"name": "Hot", "applyTo": 2})
    first = await ledger.enqueue_many([(change, envelope("k1"))])
    await redis_client.delete(keys.arq_job_key("default:k1"))  # arq forgot the job; the ledger did not
    second = await ledger.enqueue_many([(change, envelope("k1"))])
    assert [r.status for r in first + second] == ["queued", "duplicate"]
    with pytest.raises(IdempotencyConflict, match="k1"):
        await ledger.enqueue_many([(parse_change({"name": "Cold", "applyTo": 2}), envelope("k1"))])
    assert await redis_client.zcard("leadstage:queue") == 1


async def test_a_batch_with_a_conflict_enqueues_nothing(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    await enqueue(ledger, "k1", {"name": "Hot", "applyTo": 2})
    batch = [
        (parse_change({"name": "New", "applyTo": 1}), envelope("k2")),
        (parse_change({"name": "Other", "applyTo": 1}), envelope("k1")),
    ]
    with pytest.raises(IdempotencyConflict):
        await ledger.enqueue_many(batch)
    assert await redis_client.exists(keys.ledger_key("default:k2")) == 0


async def test_job_payload_is_json_not_pickle(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    change = await enqueue(ledger, "k1", {"id": 7, "colour": "#ABCDEF"})
    raw = await redis_client.get(keys.arq_job_key("default:k1"))
    assert raw is not None
    assert not raw.startswith(b"\x80")
    payload = orjson.loads(raw)
    assert payload["f"] == keys.JOB_FUNCTION
    assert payload["a"] == ["default:k1", "default", change.canonical_json().decode()]


async def test_an_older_update_drops_fields_a_newer_one_sets(ledger: Ledger) -> None:
    older = await enqueue(ledger, "old", {"id": 5, "name": "A", "colour": "#000000"})
    newer = await enqueue(ledger, "new", {"id": 5, "colour": "#ffffff"})
    begin_older = await ledger.begin("default:old", "default", older, WORKER, RATE)
    assert begin_older.decision == "go"
    assert begin_older.dropped == {"colour"}
    await ledger.finish("default:old", "default", older, event=event("succeeded", "old"), history={})
    begin_newer = await ledger.begin("default:new", "default", newer, WORKER, RATE)
    assert (begin_newer.decision, begin_newer.dropped) == ("go", frozenset())


async def test_an_update_overtaken_in_every_field_is_superseded(ledger: Ledger) -> None:
    older = await enqueue(ledger, "old", {"id": 5, "colour": "#000000"})
    await enqueue(ledger, "new", {"id": 5, "colour": "#ffffff", "name": "B"})
    begin = await ledger.begin("default:old", "default", older, WORKER, RATE)
    assert (begin.decision, begin.dropped) == ("superseded", frozenset({"colour"}))


async def test_one_job_at_a_time_per_stage(ledger: Ledger) -> None:
    first = await enqueue(ledger, "a", {"id": 5, "name": "A"})
    second = await enqueue(ledger, "b", {"id": 5, "colour": "#123456"})
    assert (await ledger.begin("default:a", "default", first, WORKER, RATE)).decision == "go"
    blocked = await ledger.begin("default:b", "default", second, WORKER, RATE)
    assert (blocked.decision, blocked.reason) == ("wait", "locked")
    await ledger.finish("default:a", "default", first, event=event("succeeded", "a"), history={})
    assert (await ledger.begin("default:b", "default", second, WORKER, RATE)).decision == "go"


async def test_adds_of_the_same_name_share_a_lock(ledger: Ledger) -> None:
    first = await enqueue(ledger, "a", {"name": "Hot", "applyTo": 1})
    second = await enqueue(ledger, "b", {"name": "HOT", "applyTo": 2})
    assert (await ledger.begin("default:a", "default", first, WORKER, RATE)).decision == "go"
    assert (await ledger.begin("default:b", "default", second, WORKER, RATE)).reason == "locked"


async def test_terminal_event_is_written_exactly_once(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    change = await enqueue(ledger, "k", {"name": "Hot", "applyTo": 1})
    await ledger.begin("default:k", "default", change, WORKER, RATE)
    written = [
        await ledger.finish("default:k", "default", change, event=event("succeeded", "k"), history={}) for _ in range(3)
    ]
    assert written == [True, False, False]
    assert await redis_client.xlen("leadstage:results") == 1
    assert (await ledger.begin("default:k", "default", change, WORKER, RATE)).decision == "done"


async def test_failure_dead_letters_and_replay_keeps_the_key(ledger: Ledger, redis_client: aioredis.Redis) -> None:
    change = await enqueue(ledger, "k", {"id": 1, "name": "Won!"})
    await ledger.begin("default:k", "default", change, WORKER, RATE)
    await ledger.finish("default:k", "default", change, event=event("failed", "k"), history={})
    [(entry_id, fields)] = await redis_client.xrange("leadstage:dlq")
    assert fields[b"original_change"] == change.canonical_json()
    await redis_client.delete(keys.arq_job_key("default:k"))
    await redis_client.zrem("leadstage:queue", "default:k")

    status, generation = await ledger.replay(change, envelope("k"), dlq_entry_id=entry_id.decode(), generation="0")
    assert (status, generation) == ("queued", 1)
    assert await redis_client.xlen("leadstage:dlq") == 0
    assert await redis_client.zscore("leadstage:queue", "default:k") is not None
    assert (await ledger.begin("default:k", "default", change, WORKER, RATE)).decision == "go"
    again = await ledger.replay(change, envelope("k"), dlq_entry_id="", generation="0")
    assert again == ("not_failed", 0)


async def test_rate_limit_is_shared_by_jobs_of_one_account(ledger: Ledger) -> None:
    first = await enqueue(ledger, "a", {"name": "A", "applyTo": 1})
    second = await enqueue(ledger, "b", {"name": "B", "applyTo": 1})
    assert (await ledger.begin("default:a", "default", first, WORKER, 2.0)).decision == "go"
    waiting = await ledger.begin("default:b", "default", second, WORKER, 2.0)
    assert (waiting.decision, waiting.reason) == ("wait", "rate")
    assert 400 <= waiting.wait_ms <= 500


async def test_a_429_pauses_the_whole_account(ledger: Ledger) -> None:
    first = await enqueue(ledger, "a", {"name": "A", "applyTo": 1})
    second = await enqueue(ledger, "b", {"name": "B", "applyTo": 1})
    await ledger.begin("default:a", "default", first, WORKER, RATE)
    await ledger.finish(
        "default:a",
        "default",
        first,
        event=event("retrying", "a"),
        history={},
        next_at_ms=now_ms() + 5000,
        pause_until_ms=now_ms() + 5000,
    )
    paused = await ledger.begin("default:b", "default", second, WORKER, RATE)
    assert (paused.decision, paused.reason) == ("wait", "paused")
    assert 4000 <= paused.wait_ms <= 5000
    backoff = await ledger.begin("default:a", "default", first, WORKER, RATE)
    assert (backoff.decision, backoff.reason) == ("wait", "backoff")


async def test_a_crashed_attempt_is_guarded_then_resumed(ledger: Ledger, settings: Settings) -> None:
    change = await enqueue(ledger, "k", {"name": "A", "applyTo": 1})
    assert (await ledger.begin("default:k", "default", change, WORKER, RATE)).decision == "go"
    # The worker died mid-POST: its request may still be in flight until the request timeout.
    guarded = await ledger.begin("default:k", "default", change, "other", RATE)
    assert (guarded.decision, guarded.reason) == ("wait", "in_flight")
    quick = Ledger(ledger.client, dataclasses.replace(settings, request_timeout_s=0.001))
    await asyncio.sleep(quick.in_flight_guard_ms / 1000)
    resumed = await quick.begin("default:k", "default", change, "other", RATE)
    assert (resumed.decision, resumed.previous_phase, resumed.attempt) == ("go", "posting", 2)


async def test_out_of_attempts_is_exhausted(ledger: Ledger, settings: Settings) -> None:
    change = await enqueue(ledger, "k", {"name": "A", "applyTo": 1})
    for attempt in range(1, settings.max_attempts + 1):
        begin = await ledger.begin("default:k", "default", change, WORKER, RATE)
        assert (begin.decision, begin.attempt) == ("go", attempt)
        await ledger.finish("default:k", "default", change, event=event("retrying", "k"), history={})
    exhausted = await ledger.begin("default:k", "default", change, WORKER, RATE)
    assert (exhausted.decision, exhausted.attempt) == ("exhausted", settings.max_attempts)


async def test_claims_give_each_stage_to_one_add(ledger: Ledger) -> None:
    assert await ledger.claim("default", "default:a", [10, 11]) == 10
    assert await ledger.claim("default", "default:b", [10, 11]) == 11
    assert await ledger.claim("default", "default:a", [10, 11]) == 10
    assert await ledger.claim("default", "default:c", [10, 11]) is None
