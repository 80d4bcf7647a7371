"""Review: the ends of runs that share one finish.lua call, the stage lock after an unknown outcome,
a lock of a key that extends another, a script missing from Redis's cache, a missing ledger entry and
the expiry of a change not done yet, against a real Redis (no replica: a WAIT that asks for one lasts
its whole timeout, which keeps a finish call on the way until the test ends that WAIT with CLIENT
UNBLOCK). Each test is a defect found in the review of the cost-per-change rewrite, and fails on the
code before its fix."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from tests.redis_servers import RedisServer
from tests.test_ledger import enqueue, envelope
from worker.core import keys
from worker.core.change import LeadStageChange, parse_change
from worker.core.errors import RedisUnavailable
from worker.core.ledger import Finished, Ledger, Start
from worker.core.settings import Settings

WORKER = "test-worker"
RATE = 1e6
QUEUE = keys.queue_key("leadstage:queue", "default")


#: The WAIT's timeout: far longer than any test takes, so that each call stays on the way until
#: ``_release`` ends its WAIT (a bound only if a test fails before it does).
WAIT_S = 60.0


def _ledgers(redis_client: aioredis.Redis) -> tuple[Ledger, Ledger]:
    """One that enqueues and claims without asking for replicas, one whose terminal finishes WAIT
    for a replica that is not there (each such call is on the way until ``_release``)."""
    plain = Ledger(redis_client, Settings(max_attempts=3))
    waiting = Ledger(redis_client, Settings(max_attempts=3, redis_min_replicas=1, redis_replica_timeout_s=WAIT_S))
    return plain, waiting


async def _release(redis_client: aioredis.Redis) -> None:
    """End the finish call's WAIT (blocked in this test's database) as its timeout would: it
    answers the replicas it reached, none. Waits until the WAIT is blocked (the call may be on its
    way to it)."""
    database = int(redis_client.connection_pool.connection_kwargs.get("db", 0))

    async def blocked() -> list[int]:
        clients = await redis_client.client_list()
        return [int(c["id"]) for c in clients if c["cmd"] == "wait" and "b" in c["flags"] and int(c["db"]) == database]

    while not (waiting := await blocked()):  # noqa: ASYNC110  # polled state of Redis (no event to await)
        await asyncio.sleep(0.005)
    [client_id] = waiting  # one finish call at a time per account
    assert await redis_client.client_unblock(client_id)


async def _loaded(ledger: Ledger) -> None:
    """finish.lua in Redis's script cache: on a fresh Redis the first call's EVALSHA would be
    refused (NOSCRIPT) and its WAIT, in the same round trip, would block until ``WAIT_S``."""
    await ledger.client.script_load(ledger._finish.script)


async def _claimed(ledger: Ledger, key: str, raw: dict[str, object]) -> tuple[LeadStageChange, Start]:
    change = await enqueue(ledger, key, raw)
    started = await ledger.start(f"default:{key}", WORKER, RATE, 0)
    assert started.decision == "go"
    return change, started


async def _finish(
    ledger: Ledger, key: str, change: LeadStageChange, started: Start, outcome: str, **options: Any
) -> Finished:
    event = {"event": outcome, "idempotency_key": key, "job_id": f"default:{key}", "stage_id": ""}
    return await ledger.finish(f"default:{key}", started.run, change, event=event, history={}, **options)


async def _state(redis_client: aioredis.Redis, key: str) -> bytes | None:
    state: bytes | None = await redis_client.hget(keys.ledger_key(f"default:{key}"), "state")  # type: ignore[misc]  # redis-py's async stubs
    return state


async def _until(ready: Callable[[], Awaitable[bool]]) -> None:
    """Until ``ready``: what it looks at is in Redis or in the ledger's batch, nothing to wait on."""
    while not await ready():  # noqa: ASYNC110  # polled state of Redis and the batch (no event to await)
        await asyncio.sleep(0.005)


async def _until_state(redis_client: aioredis.Redis, key: str, state: bytes) -> None:
    async def reached() -> bool:
        return await _state(redis_client, key) == state

    await _until(reached)


async def _until_waiting(ledger: Ledger, count: int) -> None:
    """Until ``count`` runs' ends wait for the account's next finish call."""

    async def waiting() -> bool:
        return len(ledger._endings.get("default", [])) >= count  # the batch is what is under test

    await _until(waiting)


async def test_a_run_recorded_by_a_shared_finish_hears_its_result_when_the_sender_is_cancelled(
    redis_client: aioredis.Redis,
) -> None:
    plain, waiting = _ledgers(redis_client)
    runs = {key: await _claimed(plain, key, {"id": i + 1, "name": key}) for i, key in enumerate(["c", "a", "b"])}
    await _loaded(waiting)
    first = asyncio.create_task(_finish(waiting, "c", *runs["c"], "succeeded"))
    await _until_state(redis_client, "c", b"succeeded")  # c's call ran and waits for its replica
    sender = asyncio.create_task(_finish(waiting, "a", *runs["a"], "succeeded"))
    other = asyncio.create_task(_finish(waiting, "b", *runs["b"], "succeeded"))
    await _until_waiting(waiting, 2)
    assert not first.done()  # a and b end while c's call is on the way: they go in the next call together
    await _release(redis_client)
    await first
    await _until_state(redis_client, "b", b"succeeded")  # the next call (a's) ran: b's end is recorded
    sender.cancel()  # a's lease is lost while its call waits for the replica (Lease.give_up)
    await asyncio.wait([sender])
    await _release(redis_client)
    finished = await other
    assert (finished.recorded, finished.replicated) == (True, False)


def _unhandled() -> list[str]:
    """The messages asyncio gives the loop's exception handler from now on."""
    errors: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(str(context.get("message"))))
    return errors


async def _collected() -> None:
    """Until what nothing refers to is collected (the callbacks scheduled as tasks end hold them)."""
    for _ in range(2):
        await asyncio.sleep(0)
        gc.collect()


async def _a_gone_run_behind_a_call(
    redis_client: aioredis.Redis,
) -> tuple[asyncio.Task[Finished], asyncio.Task[Finished], asyncio.Task[Finished]]:
    """Runs c, d and a: c's finish call on the way, d's end waiting for the next call and its task
    cancelled (its lease lost), a's end waiting too, so that a's call sends d's end with its own.
    Returns the tasks (c's, d's, a's)."""
    plain, waiting = _ledgers(redis_client)
    runs = {key: await _claimed(plain, key, {"id": i + 1, "name": key}) for i, key in enumerate(["c", "d", "a"])}
    await _loaded(waiting)
    first = asyncio.create_task(_finish(waiting, "c", *runs["c"], "succeeded"))
    await _until_state(redis_client, "c", b"succeeded")
    gone = asyncio.create_task(_finish(waiting, "d", *runs["d"], "succeeded"))
    await _until_waiting(waiting, 1)
    gone.cancel()
    sender = asyncio.create_task(_finish(waiting, "a", *runs["a"], "succeeded"))
    await _until_waiting(waiting, 2)
    return first, gone, sender


async def test_a_cancelled_runs_end_sent_by_another_leaves_no_unretrieved_error(
    redis_client: aioredis.Redis,
) -> None:
    errors = _unhandled()
    first, gone, sender = await _a_gone_run_behind_a_call(redis_client)
    await _release(redis_client)
    await first
    await _until_state(redis_client, "a", b"succeeded")
    sender.cancel()
    await asyncio.wait([sender])
    await _release(redis_client)
    await asyncio.gather(gone, sender, return_exceptions=True)
    del gone, sender
    await _collected()
    assert "Future exception was never retrieved" not in errors


async def test_a_cancelled_runs_end_in_a_call_that_fails_leaves_no_unretrieved_error(
    private_redis: RedisServer,
) -> None:
    errors = _unhandled()
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        first, gone, sender = await _a_gone_run_behind_a_call(client)
        await client.config_set("maxmemory", 1)  # the next call (a's, with d's end) is refused: OOM
        await _release(client)
        await first
        await _release(client)  # the refused script's WAIT, sent in the same round trip
        ended = await asyncio.gather(gone, sender, return_exceptions=True)
        assert isinstance(ended[1], RedisUnavailable)  # a hears of it; d's task is gone
        del gone, sender, ended  # the error's traceback holds the call's runs (d's end among them)
        await _collected()
        assert "Future exception was never retrieved" not in errors
    finally:
        await client.config_set("maxmemory", 0)
        await client.aclose()


async def test_an_unknown_outcome_holds_the_stage_even_when_the_lock_expired_during_the_run(
    redis_client: aioredis.Redis,
) -> None:
    ledger, _ = _ledgers(redis_client)
    older, first = await _claimed(ledger, "old", {"id": 9, "colour": "#111111"})
    await redis_client.delete(keys.stage_lock_key("default", "9"))  # its lock ran out while the POST hung
    finished = await _finish(ledger, "old", older, first, "retrying", delay_ms=60_000, outcome_unknown=True)
    assert finished.recorded
    await enqueue(ledger, "new", {"id": 9, "colour": "#222222"})
    # iVvy may still apply the older POST for LEADSTAGE_REQUEST_TIMEOUT: the newer must not go now.
    started = await ledger.start("default:new", WORKER, RATE, 0)
    assert (started.decision, started.reason) == ("wait", "locked")


async def test_an_enqueue_whose_notice_script_is_not_loaded_yet_is_queued_once(private_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        ledger = Ledger(client, Settings())
        # A fresh (or restarted) Redis where a bulk check (enqueue.lua alone) came first: ready.lua is not loaded.
        await client.script_load(ledger._enqueue.script)
        change = parse_change({"name": "Once", "applyTo": 1})
        [receipt] = await ledger.enqueue_many([(change, envelope("once"))])
        assert receipt.status == "queued"  # not "duplicate": the first send of the pipeline did queue it
    finally:
        await client.aclose()


async def test_a_replay_whose_notice_script_is_not_loaded_yet_is_replayed_once(private_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        ledger = Ledger(client, Settings(max_attempts=3))
        change, started = await _claimed(ledger, "dead", {"name": "Dead", "applyTo": 1})
        assert (await _finish(ledger, "dead", change, started, "failed")).recorded
        [(entry_id, _)] = await client.xrange(ledger.settings.dlq_stream)
        # Redis restarted: its script cache is empty, then a bulk check loaded enqueue.lua alone.
        await client.script_flush()
        await client.script_load(ledger._enqueue.script)
        replayed = await ledger.replay(change, envelope("dead"), dlq_entry_id=entry_id.decode(), generation="0")
        assert replayed == ("queued", 1)  # not "not_failed": the first send of the pipeline did replay it
    finally:
        await client.aclose()


async def test_a_missing_job_claimed_by_a_worker_that_dies_before_reporting_it_is_not_lost(
    redis_client: aioredis.Redis,
) -> None:
    ledger, _ = _ledgers(redis_client)
    await enqueue(ledger, "gone", {"name": "Gone", "applyTo": 1})
    await redis_client.delete(keys.ledger_key("default:gone"))  # expired, or deleted by hand
    claim = await ledger.claim("default", WORKER, RATE, 0, 4)
    assert [start.decision for start in claim.starts] == ["missing"]
    # The worker is SIGKILLed here, before its report_missing (lost.lua): nothing may vanish silently.
    reported = await redis_client.xlen(ledger.settings.results_stream)
    assert reported == 1 or await redis_client.zscore(QUEUE, "default:gone") is not None


async def test_a_missing_job_is_reported_once_and_not_for_a_change_enqueued_again_under_its_key(
    redis_client: aioredis.Redis,
) -> None:
    ledger, _ = _ledgers(redis_client)
    for key in ("gone", "back"):
        await enqueue(ledger, key, {"name": key, "applyTo": 1})
        await redis_client.delete(keys.ledger_key(f"default:{key}"))
    claim = await ledger.claim("default", WORKER, RATE, 0, 4)
    assert [start.decision for start in claim.starts] == ["missing", "missing"]
    event = {"event": "failed", "idempotency_key": "gone"}
    # Two workers report it (the first worker's lease ran out before its report): one event.
    assert [await ledger.report_missing("default:gone", event) for _ in range(2)] == [True, False]
    await enqueue(ledger, "back", {"name": "Back", "applyTo": 1})  # its key enqueued again before the report
    assert not await ledger.report_missing("default:back", event)
    assert await redis_client.xlen(ledger.settings.results_stream) == 1
    assert await redis_client.zscore(QUEUE, "default:back") is not None  # the new change stays queued


async def test_a_stage_locked_by_a_key_that_extends_another_key_stays_locked_to_that_other(
    redis_client: aioredis.Redis,
) -> None:
    ledger, _ = _ledgers(redis_client)
    await enqueue(ledger, "k", {"id": 5, "colour": "#111111"})
    await enqueue(ledger, "k#1", {"id": 5, "name": "Other"})  # '#' is printable ASCII: a valid key
    assert (await ledger.start("default:k#1", WORKER, RATE, 0)).decision == "go"  # its POST is on the way
    started = await ledger.start("default:k", WORKER, RATE, 0)
    assert (started.decision, started.reason) == ("wait", "locked")


async def test_a_lock_taken_over_by_a_key_that_extends_the_runs_key_is_put_back(redis_client: aioredis.Redis) -> None:
    ledger, _ = _ledgers(redis_client)
    older, first = await _claimed(ledger, "k", {"id": 9, "colour": "#111111"})
    lock = keys.stage_lock_key("default", "9")
    await redis_client.delete(lock)  # as if it expired while run 1 of 'k' went on
    await _claimed(ledger, "k#1", {"id": 9, "applyTo": 2})
    taken = await redis_client.get(lock)
    assert (await _finish(ledger, "k", older, first, "succeeded")).recorded
    assert await redis_client.get(lock) == taken  # the lock of 'k#1' (its POST on the way), as it was


async def test_a_retried_change_does_not_expire_until_it_is_done(redis_client: aioredis.Redis) -> None:
    ledger, _ = _ledgers(redis_client)
    change, started = await _claimed(ledger, "again", {"name": "Again", "applyTo": 1})
    assert (await _finish(ledger, "again", change, started, "retrying", delay_ms=1000)).recorded
    assert await redis_client.pttl(keys.ledger_key("default:again")) == -1


async def test_a_change_held_back_by_the_lock_does_not_expire_until_it_is_done(redis_client: aioredis.Redis) -> None:
    ledger, _ = _ledgers(redis_client)
    await _claimed(ledger, "first", {"id": 4, "colour": "#111111"})
    await enqueue(ledger, "second", {"id": 4, "colour": "#222222"})
    started = await ledger.start("default:second", WORKER, RATE, 0)
    assert (started.decision, started.reason) == ("wait", "locked")
    assert await redis_client.pttl(keys.ledger_key("default:second")) == -1
