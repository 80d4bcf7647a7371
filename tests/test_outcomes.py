"""Learning outcomes in Python: ``wait`` and the consumer groups, against real Redis, the worker and the fake."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from producers import DeadLetter, DeadLetterConsumer, LeadStageProducer, ResultEvent, ResultsConsumer
from tests.harness import eventually, stream_order, wait_for_terminal, worker_settings
from tests.redis_servers import RedisServer
from worker.core import readers
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.errors import (
    ConfigError,
    InvalidChange,
    InvalidEvent,
    InvalidOption,
    OutcomeUnavailable,
    RedisUnavailable,
    StreamRefused,
    UnknownChange,
    WaitTimeout,
)
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker

HOT = {"name": "Hot", "applyTo": "lead"}


@pytest.fixture
def settings(redis_url: str, fake_ivvy: RunningFakeIvvy) -> Settings:
    return worker_settings(redis_url, fake_ivvy.url)


@pytest.fixture
async def producer(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[LeadStageProducer]:
    async with LeadStageProducer(settings, redis=redis_client) as running:
        yield running


async def blocked_readers(client: aioredis.Redis) -> int:
    """Connections of this database blocked in XREAD right now."""
    db = client.connection_pool.connection_kwargs.get("db", 0)
    clients = await client.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xread" and str(c.get("db")) == str(db))


# -- wait ----------------------------------------------------------------------------------------


async def test_wait_returns_the_terminal_event_then_again_at_once(
    settings: Settings, producer: LeadStageProducer, fake_ivvy: RunningFakeIvvy
) -> None:
    receipt = await producer.enqueue(HOT, idempotency_key="w1")
    async with running_worker(settings):
        event = await producer.wait(receipt, timeout=30)
    assert isinstance(event, ResultEvent)
    assert (event.event, event.idempotency_key, event.account, event.operation) == ("succeeded", "w1", "default", "add")
    assert event.terminal
    assert event.stage_id is not None
    assert fake_ivvy.fake.stages[event.stage_id].name == "Hot"
    assert event.change == {"name": "Hot", "applyTo": 2}
    # Finished already: the same event (found through the ledger), by key too, without waiting.
    again = await producer.wait("w1", timeout=0)
    assert again == event
    assert again.as_dict()["stage_id"] == event.stage_id


async def test_a_wait_that_times_out_says_where_the_change_stands(
    settings: Settings, producer: LeadStageProducer, fake_ivvy: RunningFakeIvvy, redis_client: aioredis.Redis
) -> None:
    await producer.enqueue(HOT, idempotency_key="queued-only")
    with pytest.raises(WaitTimeout) as queued:
        await producer.wait("queued-only", timeout=0.1)
    assert queued.value.status["state"] == "queued"
    assert "'queued-only'" in str(queued.value)
    assert "it is queued after 0 attempt(s)" in str(queued.value)
    assert queued.value.retryable

    fake_ivvy.fake.update_faults({"error_rate": 1})  # every POST answers 500: the change keeps retrying
    await producer.enqueue({"name": "Warm", "applyTo": "lead"}, idempotency_key="retrying")
    async with running_worker(dataclasses.replace(settings, backoff_base_s=2.0, backoff_max_s=2.0)):

        async def attempted() -> bool:
            status = await readers.change_status(redis_client, settings, DEFAULT_ACCOUNT, "retrying")
            return status is not None and bool(status["history"])

        await eventually(attempted)  # the first attempt has failed: the next is 2 s away
        with pytest.raises(WaitTimeout) as retrying:
            await producer.wait("retrying", timeout=0.1)
    status = retrying.value.status
    assert status["state"] in ("retrying", "running")
    assert status["attempts"] >= 1  # type: ignore[operator]  # an int in change_status
    assert "last error" in str(retrying.value)


async def test_concurrent_waits_share_one_reader(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    receipts = await producer.enqueue_many([{"name": f"Stage {i}", "applyTo": "lead"} for i in range(20)])
    waits = [asyncio.create_task(producer.wait(r, timeout=60)) for r in receipts]
    await eventually(lambda: _blocked_at_least_one(redis_client))
    assert await blocked_readers(redis_client) == 1  # 20 waits, one XREAD
    async with running_worker(settings):
        events = await asyncio.gather(*waits)
    assert [e.idempotency_key for e in events] == [r.idempotency_key for r in receipts]
    assert {e.event for e in events} == {"succeeded"}
    assert producer.reader.starts == 1
    # The reader stops with the last wait.
    await eventually(lambda: _no_blocked(redis_client))


async def test_a_wait_survives_its_reader_losing_the_connection(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    receipt = await producer.enqueue(HOT, idempotency_key="reconnect")
    wait = asyncio.create_task(producer.wait(receipt, timeout=60))
    await eventually(lambda: _blocked_at_least_one(redis_client))
    db = str(redis_client.connection_pool.connection_kwargs.get("db", 0))
    [reader] = [c for c in await redis_client.client_list() if c.get("cmd") == "xread" and str(c.get("db")) == db]
    await redis_client.client_kill_filter(_id=reader["id"])  # only this session's reader
    await eventually(lambda: _blocked_at_least_one(redis_client))  # it came back, from where it was
    async with running_worker(settings):
        event = await wait
    assert (event.idempotency_key, event.event) == ("reconnect", "succeeded")
    assert producer.reader.starts == 1


async def _blocked_at_least_one(client: aioredis.Redis) -> bool:
    return await blocked_readers(client) >= 1


async def _no_blocked(client: aioredis.Redis) -> bool:
    return await blocked_readers(client) == 0


async def test_wait_for_a_replayed_change_returns_the_new_generation(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    await producer.enqueue({"id": 1, "name": "Quoted!"}, idempotency_key="refused")  # the fake refuses stage 1
    async with running_worker(settings):
        first = await producer.wait("refused", timeout=30)
        assert (first.event, first.generation) == ("failed", 0)
        [dead] = [e async for e in readers.dead_letters(redis_client, settings)]
        await readers.replay(redis_client, settings, dead)
        second = await producer.wait("refused", timeout=30)
    assert (second.event, second.generation) == ("failed", 1)
    assert second.id != first.id


async def test_a_finished_change_whose_event_was_trimmed_says_so(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    await producer.enqueue(HOT, idempotency_key="old")
    async with running_worker(settings):
        await producer.wait("old", timeout=30)
    await redis_client.xtrim("leadstage:results", maxlen=0)  # as LEADSTAGE_RESULTS_MAXLEN does, much later
    with pytest.raises(OutcomeUnavailable, match="'old' of account 'default' is succeeded") as caught:
        await producer.wait("old", timeout=1)
    assert caught.value.status["stage_id"] is not None


async def test_wait_refuses_what_it_cannot_wait_for(producer: LeadStageProducer) -> None:
    with pytest.raises(UnknownChange, match="'never'"):
        await producer.wait("never", timeout=5)
    with pytest.raises(InvalidChange, match="account"):
        await producer.wait("k", account="not an account!", timeout=1)
    for timeout in (-1, float("nan"), float("inf")):
        with pytest.raises(InvalidOption, match="timeout"):
            await producer.wait("k", timeout=timeout)
    assert producer.reader.starts == 1  # only the unknown key got as far as the reader


# -- consumer groups -----------------------------------------------------------------------------


async def finished(settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis, count: int) -> None:
    """``count`` changes enqueued and applied: ``count`` terminal events in the results stream."""
    receipts = await producer.enqueue_many([{"name": f"S{i}", "applyTo": "lead"} for i in range(count)])
    async with running_worker(settings):
        await wait_for_terminal(redis_client, [r.idempotency_key for r in receipts])


async def stream_ids(client: aioredis.Redis, stream: str = "leadstage:results") -> list[str]:
    return [entry_id.decode() for entry_id, _ in await client.xrange(stream)]


async def test_two_groups_each_see_every_event(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    await finished(settings, producer, redis_client, 10)
    expected = await stream_ids(redis_client)
    seen: dict[str, list[str]] = {}
    for group in ("billing", "audit"):
        consumer = ResultsConsumer(group, "c1", settings=settings, redis=redis_client, start="all", follow=False)
        seen[group] = []
        async for event in consumer:
            seen[group].append(event.id)
            await consumer.ack(event)
    assert seen["billing"] == expected
    assert seen["audit"] == expected


async def test_a_consumer_killed_mid_batch_is_taken_over_with_nothing_lost_or_skipped(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    await finished(settings, producer, redis_client, 15)
    expected = await stream_ids(redis_client)

    # A reads a batch of 10, handles (and acks) 3 of them, then dies: 7 stay pending for A.
    doomed = ResultsConsumer("g", "a", settings=settings, redis=redis_client, start="all", batch=10)
    handled_by_a: list[str] = []
    events = aiter(doomed)
    for _ in range(3):
        event = await anext(events)
        handled_by_a.append(event.id)
        await doomed.ack(event)
    del events  # never closed, never acked: as a SIGKILL leaves it
    pending = await redis_client.xpending("leadstage:results", "g")
    assert pending["pending"] == 7

    # B takes A's 7 over once they have been idle long enough, then reads the rest.
    taker = ResultsConsumer("g", "b", settings=settings, redis=redis_client, claim_idle_s=0.1, batch=10, follow=False)
    handled_by_b: list[str] = []
    await asyncio.sleep(0.1)  # A's entries must be idle for claim_idle_s before they may be claimed
    async for event in taker:
        handled_by_b.append(event.id)
        await taker.ack(event)
    assert (
        sorted(handled_by_a + handled_by_b, key=stream_order) == expected
    )  # nothing lost, nothing skipped, nothing twice
    assert handled_by_b[:7] == expected[3:10]  # A's unacked batch first
    assert (await redis_client.xpending("leadstage:results", "g"))["pending"] == 0


async def test_an_unacked_event_comes_back_to_its_consumer_and_a_new_group_starts_where_told(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    await finished(settings, producer, redis_client, 3)
    old = await stream_ids(redis_client)
    first = ResultsConsumer("g", "same", settings=settings, redis=redis_client, start="all", follow=False)
    assert [e.id async for e in first] == old  # read, never acked
    restarted = ResultsConsumer("g", "same", settings=settings, redis=redis_client, follow=False)
    assert [e.id async for e in restarted] == old  # its own pending entries, delivered again

    after_first = ResultsConsumer("mid", "c", settings=settings, redis=redis_client, start=old[0], follow=False)
    assert [e.id async for e in after_first] == old[1:]

    fresh = ResultsConsumer("late", "c", settings=settings, redis=redis_client, start="new", follow=False)
    assert [e async for e in fresh] == []
    await finished(settings, producer, redis_client, 2)
    new = [e.id async for e in fresh]
    assert len(new) == 2
    assert set(new).isdisjoint(old)


async def dead_lettered(settings: Settings, producer: LeadStageProducer) -> None:
    """A change the fake refuses (its built-in stage 1 is not editable), applied: one dead letter."""
    await producer.enqueue({"id": 1, "name": "Quoted!"}, idempotency_key="refused")
    async with running_worker(settings):
        await producer.wait("refused", timeout=30)


async def test_dead_letters_through_a_group_are_typed(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    await dead_lettered(settings, producer)
    consumer = DeadLetterConsumer("ops", "c", settings=settings, redis=redis_client, start="all", follow=False)
    [dead] = [e async for e in consumer]
    assert isinstance(dead, DeadLetter)
    assert (dead.event, dead.idempotency_key, dead.error_code, dead.retryable) == ("failed", "refused", "24321", False)
    assert dead.original_change == {"id": 1, "name": "Quoted!"}
    assert await consumer.ack(dead) == 1


async def test_a_foreign_entry_is_named_and_can_be_skipped(settings: Settings, redis_client: aioredis.Redis) -> None:
    await redis_client.xadd("leadstage:results", {"event": "exploded", "job_id": "x"})
    consumer = ResultsConsumer("g", "c", settings=settings, redis=redis_client, start="all", follow=False)
    with pytest.raises(InvalidEvent, match="event is not one of") as caught:
        [e async for e in consumer]
    await consumer.ack(caught.value.entry_id)
    assert [e async for e in consumer] == []


async def test_a_results_stream_key_that_is_not_a_stream_is_refused_by_name(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    await redis_client.set("leadstage:results", "not a stream")
    consumer = ResultsConsumer("g", "c", settings=settings, redis=redis_client, start="all", follow=False)
    with pytest.raises(StreamRefused, match="'leadstage:results' as a stream: WRONGTYPE") as caught:
        [e async for e in consumer]
    assert caught.value.reply == "WRONGTYPE"
    assert isinstance(caught.value, ConfigError)


async def test_a_group_destroyed_under_its_consumer_is_created_again(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    await finished(settings, producer, redis_client, 3)
    expected = await stream_ids(redis_client)
    consumer = ResultsConsumer("g", "c", settings=settings, redis=redis_client, start="all", batch=1, follow=False)
    seen: list[str] = []
    async for event in consumer:
        seen.append(event.id)
        if len(seen) == 1:
            assert await redis_client.xgroup_destroy("leadstage:results", "g")
        else:
            await consumer.ack(event)
    # NOGROUP: the group is made again at its start, so every event comes (again), none is lost.
    assert seen == [expected[0], *expected]


@pytest.mark.parametrize(
    ("option", "value"),
    [("group", ""), ("consumer", "has space"), ("start", "yesterday"), ("claim_idle_s", 0), ("batch", 0)],
)
def test_consumer_options_are_checked(settings: Settings, option: str, value: object) -> None:
    arguments: dict[str, object] = {"group": "g", "consumer": "c", option: value}
    with pytest.raises(InvalidOption, match=option):
        ResultsConsumer(settings=settings, **arguments)  # type: ignore[arg-type]  # the bad values on purpose


async def test_a_dead_letter_replayed_while_pending_is_not_delivered_again(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    await dead_lettered(settings, producer)
    first = DeadLetterConsumer("ops", "c", settings=settings, redis=redis_client, start="all", follow=False)
    [dead] = [e async for e in first]  # delivered, not acked
    [entry] = [e async for e in readers.dead_letters(redis_client, settings)]
    await readers.replay(redis_client, settings, entry)  # the dead letter leaves the stream
    again = DeadLetterConsumer("ops", "c", settings=settings, redis=redis_client, follow=False)
    assert [e async for e in again] == []
    assert (await redis_client.xpending("leadstage:dlq", "ops"))["pending"] == 0
    assert dead.idempotency_key == "refused"


# -- Redis timeouts ------------------------------------------------------------------------------


async def test_a_consumer_over_a_hung_redis_fails_within_its_redis_timeout(private_redis: RedisServer) -> None:
    """Redis stopped by SIGSTOP accepts connections and never answers: the consumer's own client
    has LEADSTAGE_REDIS_TIMEOUT and LEADSTAGE_REDIS_CONNECT_TIMEOUT, so the read is an error, not a hang."""
    hung = Settings(redis_url=private_redis.url, redis_timeout_s=0.3, redis_connect_timeout_s=0.3)
    private_redis.pause()
    try:
        async with ResultsConsumer("g", "c1", settings=hung) as consumer:
            # Far above the timeout, far below the 5 s a client without the settings waits.
            with pytest.raises(RedisUnavailable):
                await asyncio.wait_for(anext(aiter(consumer)), 3)
    finally:
        private_redis.resume()


async def test_a_consumer_blocks_for_less_than_a_short_redis_timeout_and_gets_later_events(
    settings: Settings, producer: LeadStageProducer, redis_client: aioredis.Redis
) -> None:
    """A blocking read longer than the socket timeout would end as "Redis does not answer": each
    read blocks half of LEADSTAGE_REDIS_TIMEOUT at most."""
    short = dataclasses.replace(settings, redis_timeout_s=0.5)
    async with ResultsConsumer("short", "c1", settings=short) as consumer:  # its own client: the short timeout
        assert consumer.block_ms == 250  # not block_s: 2 s
        first = asyncio.ensure_future(anext(aiter(consumer)))
        await asyncio.sleep(0.75)  # several blocking reads end with nothing: none may fail
        assert not first.done()
        await finished(settings, producer, redis_client, 1)
        event = await asyncio.wait_for(first, 30)
    assert event.event == "succeeded"
