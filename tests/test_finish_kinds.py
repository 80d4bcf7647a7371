"""finish.lua, lost.lua, start.lua and batch.lua with another program's value at one of the keys they write after their
first write (a hash where a lock is kept, a string at the dead-letter stream's name...): Redis does
not undo a script's writes before a refused one, so each of these used to leave a half-recorded
end (a failed change's event and terminal entry without its dead letter, a terminal entry its
queue still holds, the first run of a call recorded and the second not, a missing job taken off
its queue unreported). Now nothing is written, the error names the key, and once it is gone the
same ends are recorded."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.test_ledger import QUEUE, RATE, WORKER, enqueue, event
from worker.core import keys
from worker.core.batch_claim import BatchClaim, claim_batch, hold_unresolved, record_sent
from worker.core.change import LeadStageChange
from worker.core.errors import ConfigError
from worker.core.ledger import Finished, Ledger, Start
from worker.core.settings import Settings


@dataclass(frozen=True)
class Case:
    """The second run of a call (the first: an update that succeeds) and the key another program holds."""

    foreign: str
    kind: str
    change: dict[str, object]
    outcome: str
    options: dict[str, Any]


UPDATE = {"id": 2, "name": "Won"}
ADD = {"name": "New", "applyTo": 1}
SUCCEEDS: dict[str, Any] = {}
CREATES: dict[str, Any] = {"created_stage_id": 99}
PAUSES: dict[str, Any] = {"delay_ms": 60_000, "pause_ms": 60_000}
CASES = {
    "dead-letter stream": Case("leadstage:dlq", "stream", UPDATE, "failed", SUCCEEDS),
    "stage lock": Case(
        keys.stage_lock_key("default", keys.lock_subject(2, None)), "string", UPDATE, "failed", SUCCEEDS
    ),
    "stage hash": Case(keys.stage_key("default", 2), "hash", UPDATE, "succeeded", SUCCEEDS),
    "queue": Case(QUEUE, "zset", UPDATE, "succeeded", SUCCEEDS),
    "pending hash": Case(keys.PENDING, "hash", UPDATE, "succeeded", SUCCEEDS),
    "rate hash (a pause)": Case(keys.rate_key("default"), "hash", UPDATE, "retrying", PAUSES),
    "claims hash": Case(keys.claims_key("default"), "hash", ADD, "succeeded", CREATES),
    "newest claim": Case(keys.newest_claim_key("default"), "string", ADD, "succeeded", CREATES),
    "second run's ledger": Case(keys.ledger_key("default:b"), "hash", UPDATE, "succeeded", SUCCEEDS),
}


async def _hold(redis_client: aioredis.Redis, key: str, kind: str) -> None:
    """Another program's value of another kind than ``kind`` at ``key``."""
    await redis_client.delete(key)
    if kind == "string":
        await redis_client.hset(key, "another", "program's")  # type: ignore[misc]  # redis-py's async stubs
    else:
        await redis_client.set(key, "another program's")


async def _value(redis_client: aioredis.Redis, key: str) -> object:
    """A key's value as read: a hash's DUMP follows its table's order, which a rehash changes."""
    kind = await redis_client.type(key)
    if kind == b"hash":
        return await redis_client.hgetall(key)  # type: ignore[misc]  # redis-py's async stubs
    if kind == b"zset":
        return await redis_client.zrange(key, 0, -1, withscores=True)
    if kind == b"list":
        return await redis_client.lrange(key, 0, -1)  # type: ignore[misc]  # redis-py's async stubs
    return await redis_client.dump(key)  # a string or a stream: in its own order


async def _snapshot(redis_client: aioredis.Redis) -> dict[bytes, tuple[object, int]]:
    """Every key's value and when it expires."""
    return {
        key: (await _value(redis_client, key.decode()), await redis_client.pexpiretime(key))  # type: ignore[misc]  # redis-py's async stubs
        for key in await redis_client.keys("*")
    }


async def _finish_together(ledger: Ledger, runs: list[tuple[str, LeadStageChange, Start, str, dict[str, Any]]]) -> Any:
    """The ends of ``runs`` in one finish.lua call (they wait while the account's turn is held);
    each run's result or error."""
    turn = ledger._finishing.setdefault("default", asyncio.Lock())  # the shared call is what is under test
    await turn.acquire()
    ends = [
        asyncio.create_task(
            ledger.finish(f"default:{key}", started.run, change, event=event(outcome, key), history={}, **options)
        )
        for key, change, started, outcome, options in runs
    ]
    while len(ledger._endings.get("default", [])) < len(runs):  # noqa: ASYNC110  # the batch has no event to await
        await asyncio.sleep(0)
    turn.release()
    return await asyncio.gather(*ends, return_exceptions=True)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_a_key_holding_another_kind_of_value_records_none_of_the_calls_ends(
    redis_client: aioredis.Redis, case: Case
) -> None:
    ledger = Ledger(redis_client, Settings(max_attempts=3))
    runs = []
    ends = [("a", {"id": 1, "name": "Hot"}, "succeeded", SUCCEEDS), ("b", case.change, case.outcome, case.options)]
    for key, raw, outcome, options in ends:
        change = await enqueue(ledger, key, raw)
        started = await ledger.start(f"default:{key}", WORKER, RATE, 0)
        assert started.decision == "go"
        runs.append((key, change, started, outcome, options))
    await _hold(redis_client, case.foreign, case.kind)
    before = await _snapshot(redis_client)

    errors = await _finish_together(ledger, runs)
    assert await _snapshot(redis_client) == before  # nothing of either end: the foreign key is left
    message = rf"a (string|hash) at '{re.escape(case.foreign)}', where leadstage keeps a {case.kind}: "
    for error in errors:
        assert isinstance(error, ConfigError), error
        assert re.search(message, str(error)), error

    await redis_client.delete(case.foreign)
    finished: list[Finished] = await _finish_together(ledger, runs)
    gone = case.foreign == keys.ledger_key("default:b")
    assert [(f.recorded, f.refused_because) for f in finished] == [
        (True, ""),
        (False, "missing") if gone else (True, ""),
    ]
    if case.outcome == "failed":
        [(_, letter)] = await redis_client.xrange("leadstage:dlq")
        assert letter[b"original_change"] == runs[1][1].canonical_json()


LOST = {"results stream": ("leadstage:results", "stream"), "dead-letter stream": ("leadstage:dlq", "stream")}
LOST["pending hash"] = (keys.PENDING, "hash")


@pytest.mark.parametrize(("foreign", "kind"), LOST.values(), ids=LOST.keys())
async def test_a_key_holding_another_kind_of_value_leaves_a_missing_job_to_report(
    redis_client: aioredis.Redis, foreign: str, kind: str
) -> None:
    """lost.lua used to take the job off its queue first: a refused event or dead letter then left
    it gone without a trace (never reported, as it is no longer due)."""
    ledger = Ledger(redis_client, Settings())
    await redis_client.zadd(QUEUE, {"default:gone": 0})
    await redis_client.hset(keys.PENDING, "default", "1")  # type: ignore[misc]  # redis-py's async stubs
    await _hold(redis_client, foreign, kind)
    before = await _snapshot(redis_client)
    with pytest.raises(ConfigError, match=rf"a string at '{re.escape(foreign)}', where leadstage keeps a {kind}: "):
        await ledger.report_missing("default:gone", event("failed", "gone"))
    assert await _snapshot(redis_client) == before

    await redis_client.delete(foreign)
    assert await ledger.report_missing("default:gone", event("failed", "gone"))
    assert await redis_client.zcard(QUEUE) == 0
    assert await redis_client.xlen("leadstage:dlq") == await redis_client.xlen("leadstage:results") == 1


STARTS = {
    "ledger": (keys.ledger_key("default:b"), "hash", UPDATE),
    "stage hash": (keys.stage_key("default", 2), "hash", UPDATE),
    "stage lock": (keys.stage_lock_key("default", "2"), "string", UPDATE),
    "newest claim": (keys.newest_claim_key("default"), "string", ADD),
}


async def _job(redis_client: aioredis.Redis, key: str) -> tuple[float | None, bytes | None]:
    """A job's place in its queue and its ledger entry."""
    return await redis_client.zscore(QUEUE, f"default:{key}"), await redis_client.dump(
        keys.ledger_key(f"default:{key}")
    )


@pytest.mark.parametrize(("foreign", "kind", "raw"), STARTS.values(), ids=STARTS.keys())
async def test_a_claim_stops_before_a_job_whose_key_holds_another_kind_of_value(
    redis_client: aioredis.Redis, foreign: str, kind: str, raw: dict[str, object]
) -> None:
    """start.lua used to fail the read of the second job's key after the first job's claim was written
    (its run and recovery point, but not its lease in the queue nor its rate-limit slot)."""
    ledger = Ledger(redis_client, Settings(max_attempts=3))
    await enqueue(ledger, "a", {"id": 1, "name": "Hot"})
    await enqueue(ledger, "b", raw)
    await _hold(redis_client, foreign, kind)
    b_before = await _job(redis_client, "b")
    first = await ledger.claim("default", WORKER, RATE, 0, 2)
    assert [(start.job_id, start.decision) for start in first.starts] == [("default:a", "go")]
    assert await _job(redis_client, "b") == b_before  # the claim stopped before b
    before = await _snapshot(redis_client)
    message = rf"a (string|hash) at '{re.escape(foreign)}', where leadstage keeps a {kind}: "
    with pytest.raises(ConfigError, match=message):
        await ledger.claim("default", WORKER, RATE, 0, 2)
    with pytest.raises(ConfigError, match=message):
        await ledger.start("default:b", WORKER, RATE, 0)
    assert await _snapshot(redis_client) == before  # b untouched, the foreign key left

    await redis_client.delete(foreign)
    [then] = (await ledger.claim("default", WORKER, RATE, 0, 2)).starts
    assert (then.job_id, then.decision) == ("default:b", "missing" if foreign == keys.ledger_key("default:b") else "go")


BATCHES = {
    "ledger": (keys.ledger_key("default:c"), "hash", []),
    "stage hash": (keys.stage_key("default", 3), "hash", ["default:c", "default:d"]),
    "stage lock": (keys.stage_lock_key("default", "3"), "string", ["default:c", "default:d"]),
}


@pytest.mark.parametrize(("foreign", "kind", "then"), BATCHES.values(), ids=BATCHES.keys())
async def test_a_batch_claims_the_jobs_before_a_key_holding_another_kind_of_value(
    redis_client: aioredis.Redis, foreign: str, kind: str, then: list[str]
) -> None:
    """batch.lua's scan used to fail the read of the third job's key after it had taken the first two
    jobs' stage locks (left taken until they expired, for no batch)."""
    ledger = Ledger(redis_client, Settings(max_attempts=3, batch_threshold=1))
    for i, key in enumerate("abcd"):
        await enqueue(ledger, key, {"id": i + 1, "name": key})
    await _hold(redis_client, foreign, kind)
    c_before = await _job(redis_client, "c")
    first = await claim_batch(ledger, "default", WORKER, RATE)
    assert [start.job_id for start in first.starts] == ["default:a", "default:b"]
    assert await _job(redis_client, "c") == c_before  # the scan stopped before c
    before = await _snapshot(redis_client)
    with pytest.raises(
        ConfigError, match=rf"a (string|hash) at '{re.escape(foreign)}', where leadstage keeps a {kind}"
    ):
        await claim_batch(ledger, "default", WORKER, RATE)
    assert await _snapshot(redis_client) == before

    await redis_client.delete(foreign)
    again = await claim_batch(ledger, "default", WORKER, RATE)
    assert [start.job_id for start in again.starts] == then  # c's ledger gone: d alone is no batch


async def test_a_batch_of_an_add_claims_nothing_while_the_newest_claim_holds_another_kind_of_value(
    redis_client: aioredis.Redis,
) -> None:
    """batch.lua used to read the newest claimed id after the ledger entries of the changes before the
    add were written (their runs and recovery points, without their leases)."""
    ledger = Ledger(redis_client, Settings(max_attempts=3, batch_threshold=1))
    await enqueue(ledger, "a", {"id": 1, "name": "a"})
    await enqueue(ledger, "b", ADD)
    await _hold(redis_client, keys.newest_claim_key("default"), "string")
    before = await _snapshot(redis_client)
    with pytest.raises(
        ConfigError, match=r"a hash at 'leadstage:newest-claim:\{default\}', where leadstage keeps a string"
    ):
        await claim_batch(ledger, "default", WORKER, RATE)
    assert await _snapshot(redis_client) == before

    await redis_client.delete(keys.newest_claim_key("default"))
    claimed = await claim_batch(ledger, "default", WORKER, RATE)
    assert [start.job_id for start in claimed.starts] == ["default:a", "default:b"]


async def _batch_of_a_and_b(redis_client: aioredis.Redis) -> tuple[Ledger, BatchClaim]:
    ledger = Ledger(redis_client, Settings(max_attempts=3, batch_threshold=1))
    for i, key in enumerate("ab"):
        await enqueue(ledger, key, {"id": i + 1, "name": key})
    claim = await claim_batch(ledger, "default", WORKER, RATE)
    assert len(claim.starts) == 2
    return ledger, claim


UNRESOLVED = {
    "second change's ledger": (keys.ledger_key("default:b"), "hash"),
    "second change's lock": (keys.stage_lock_key("default", "2"), "string"),
}


@pytest.mark.parametrize(("foreign", "kind"), UNRESOLVED.values(), ids=UNRESOLVED.keys())
async def test_a_batch_held_unresolved_holds_none_of_its_stages_while_a_key_holds_another_kind_of_value(
    redis_client: aioredis.Redis, foreign: str, kind: str
) -> None:
    """batch.lua 'unresolved' used to fail at the second change's key after the first change's hold
    was written."""
    ledger, claim = await _batch_of_a_and_b(redis_client)
    await _hold(redis_client, foreign, kind)
    before = await _snapshot(redis_client)
    with pytest.raises(
        ConfigError, match=rf"a (string|hash) at '{re.escape(foreign)}', where leadstage keeps a {kind}"
    ):
        await hold_unresolved(ledger, claim.starts)
    assert await _snapshot(redis_client) == before

    await redis_client.delete(foreign)
    await hold_unresolved(ledger, claim.starts)
    assert await redis_client.hget(keys.ledger_key("default:a"), "unknown_until")  # type: ignore[misc]  # redis-py's async stubs


async def test_a_batch_sent_is_not_recorded_while_the_batches_listing_holds_another_kind_of_value(
    redis_client: aioredis.Redis,
) -> None:
    """batch.lua 'sent' used to write the batch's asyncId into its record, then fail to list it for
    collection: a batch a dead worker's successor would never collect."""
    ledger, claim = await _batch_of_a_and_b(redis_client)
    listing = keys.batches_key("default")
    await _hold(redis_client, listing, "zset")
    before = await _snapshot(redis_client)
    with pytest.raises(ConfigError, match=rf"a string at '{re.escape(listing)}', where leadstage keeps a zset"):
        await record_sent(ledger, "default", claim, "async-1")
    assert await _snapshot(redis_client) == before

    await redis_client.delete(listing)
    await record_sent(ledger, "default", claim, "async-1")
    assert await redis_client.zrange(listing, 0, -1) == [claim.record.encode()]
    assert await redis_client.hget(claim.record, "async_id") == b"async-1"  # type: ignore[misc]  # redis-py's async stubs
