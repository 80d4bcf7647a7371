"""The central promise under real faults: skewed clocks, refused Redis writes, 5xx after commit, late
commits, expiry, a backlog past the maximum age. Each test breaks one assumption on purpose, with
the real worker, a real Redis and the fake iVvy over loopback."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import prometheus_client
import pytest
import redis.asyncio as aioredis

from tests.harness import eventually, read_events, wait_for_terminal, worker_settings
from tests.redis_servers import RedisServer
from worker.core import keys, readers
from worker.core.change import parse_change, parse_envelope
from worker.core.errors import ConfigError, StaleRun
from worker.core.ledger import Ledger, Start, backlog_warning
from worker.core.settings import Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.runner import running_worker


@pytest.fixture
async def fake() -> AsyncIterator[RunningFakeIvvy]:
    async with running_fake_ivvy(seed=3) as running:
        yield running


async def enqueue(ledger: Ledger, raw: dict[str, object], key: str) -> None:
    await ledger.enqueue_many([(parse_change(raw), parse_envelope(idempotency_key=key))])


def adds_named(fake: RunningFakeIvvy, prefix: str) -> list[str]:
    return [s.name for s in fake.fake.stages.values() if s.name.startswith(prefix)]


def add_posts(fake: RunningFakeIvvy, name: str | None = None) -> int:
    """How many adds were posted (of ``name``, when given)."""
    return sum(
        1
        for r in fake.fake.requests
        if r.action == "addOrUpdateLeadStage"
        and isinstance(r.body, dict)
        and "id" not in r.body
        and (name is None or r.body.get("name") == name)
    )


async def test_a_worker_whose_clock_runs_30s_ahead_never_takes_over_a_running_add(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    # Every request takes longer than a lease: a worker that read the lease by its own clock would
    # think the other worker's run long expired and post the same add again.
    settings = worker_settings(redis_url, fake.url, lease_s=0.4, request_timeout_s=3.0, concurrency=5)
    ahead = dataclasses.replace(settings, clock_offset_s=30.0)
    behind = dataclasses.replace(settings, clock_offset_s=-30.0)
    ledger = Ledger(redis_client, settings)
    fake.fake.update_faults({"latency_ms": 600})
    keys_ = [f"skew-{i}" for i in range(6)]
    for i, key in enumerate(keys_):
        await enqueue(ledger, {"name": f"Skewed {i}", "applyTo": 1}, key)
    async with running_worker(behind), running_worker(ahead), running_worker(settings):
        terminal = await wait_for_terminal(redis_client, keys_, within_s=30)
    assert {k: len(v) for k, v in terminal.items()} == dict.fromkeys(keys_, 1)
    assert sorted(adds_named(fake, "Skewed ")) == sorted(f"Skewed {i}" for i in range(6))
    assert add_posts(fake) == 6
    [entry] = [e for e in await read_events(redis_client) if e["idempotency_key"] == "skew-0"]
    enqueued = await redis_client.hget(keys.ledger_key("default:skew-0"), "enqueued_at")  # type: ignore[misc]  # redis-py's async stubs
    server_seconds, _ = await redis_client.time()
    # enqueued_at is the server's clock, not the producer's.
    assert enqueued is not None
    assert abs(int(enqueued) / 1000 - server_seconds) < 60
    assert entry["event"] == "succeeded"


@pytest.mark.system  # starts a redis-server of its own
async def test_the_heartbeat_and_the_poll_survive_refused_writes_and_no_add_is_posted_twice(
    fake: RunningFakeIvvy, private_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = worker_settings(private_redis.url, fake.url, lease_s=1.2, request_timeout_s=4.0)
    client = aioredis.Redis.from_url(private_redis.url)
    ledger = Ledger(client, settings)
    fake.fake.update_faults({"latency_ms": 2500})  # the POST outlasts two leases: the lease must be renewed
    await enqueue(ledger, {"name": "Refused", "applyTo": 1}, "oom")
    admin = private_redis.client()
    try:
        async with running_worker(settings) as worker:

            async def posted() -> bool:
                return add_posts(fake) == 1

            await eventually(posted, within_s=5)
            admin.config_set("maxmemory", 1)  # every write is refused with OOM from now on
            await asyncio.sleep(2.0)
            assert not worker.done(), "the worker stopped on a refused write"
            admin.config_set("maxmemory", 0)
            terminal = await wait_for_terminal(client, ["oom"], within_s=20)
            assert not worker.done()
    finally:
        admin.config_set("maxmemory", 0)
        await client.aclose()
    [event] = terminal["oom"]
    assert event["event"] == "succeeded"
    # The first POST was still at iVvy when its run was given up; the next run found it.
    assert adds_named(fake, "Refused") == ["Refused"]
    assert add_posts(fake) == 1
    messages = capsys.readouterr().out
    assert "worker.heartbeat_failed" in messages
    assert "job.lease_lost" in messages


@pytest.mark.system  # starts a redis-server of its own
async def test_a_primary_demoted_to_read_only_stalls_the_worker_but_does_not_stop_it(
    fake: RunningFakeIvvy, private_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = worker_settings(private_redis.url, fake.url)
    client = aioredis.Redis.from_url(private_redis.url)
    admin = private_redis.client()
    try:
        async with running_worker(settings) as worker:
            # As after a failover behind a plain URL: the server is a replica now and refuses writes.
            admin.replicaof("127.0.0.1", 1)
            admin.config_set("replica-read-only", "no")  # only to let the test enqueue through it
            await enqueue(Ledger(client, settings), {"name": "Read only", "applyTo": 1}, "ro")
            admin.config_set("replica-read-only", "yes")

            async def refused() -> bool:
                return "worker.redis_unavailable" in capsys.readouterr().out

            await eventually(refused, within_s=5)
            assert not worker.done(), "the worker stopped on READONLY"
            admin.replicaof("NO", "ONE")
            terminal = await wait_for_terminal(client, ["ro"], within_s=20)
    finally:
        admin.replicaof("NO", "ONE")
        await client.aclose()
    assert terminal["ro"][0]["event"] == "succeeded"


async def test_a_5xx_after_iVvy_committed_an_add_is_reconciled_never_posted_again(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = worker_settings(redis_url, fake.url, request_timeout_s=0.3)
    await enqueue(Ledger(redis_client, settings), {"name": "Gateway", "applyTo": 2}, "gw")
    fake.fake.update_faults({"gateway_5xx_rate": 1.0})  # every add is committed, then answered 504
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, ["gw"], within_s=20)
    [event] = terminal["gw"]
    [stage] = [s for s in fake.fake.stages.values() if s.name == "Gateway"]
    assert (event["event"], event["stage_id"]) == ("succeeded", str(stage.id))
    assert add_posts(fake) == 1
    [retry] = [e for e in await read_events(redis_client) if e["event"] == "retrying"]
    assert retry["http_status"] == "504"


async def test_a_stage_edited_before_the_reconcile_is_still_found_and_an_older_namesake_is_not(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = worker_settings(redis_url, fake.url, request_timeout_s=0.3)
    ledger = Ledger(redis_client, settings)
    older = fake.fake.add_stage("Twin", apply_to=1)  # out of band, before any add of ours
    await enqueue(ledger, {"name": "Other", "applyTo": 1}, "first")
    async with running_worker(settings):
        await wait_for_terminal(redis_client, ["first"])
        fake.fake.update_faults({"drop_rate": 1.0})  # committed, then the connection is dropped
        await enqueue(ledger, {"name": "Twin", "applyTo": 1, "colour": "#111111"}, "twin")

        async def committed() -> bool:
            return len(adds_named(fake, "Twin")) == 2

        await eventually(committed)
        fake.fake.update_faults({"drop_rate": 0.0})
        [ours] = [s for s in fake.fake.stages.values() if s.name == "Twin" and s.id != older.id]
        ours.colour = "#222222"  # recoloured before the reconcile ran
        terminal = await wait_for_terminal(redis_client, ["twin"], within_s=20)
    [event] = terminal["twin"]
    assert (event["event"], event["stage_id"]) == ("succeeded", str(ours.id))
    assert len(adds_named(fake, "Twin")) == 2  # the older namesake and ours: nothing posted twice


@pytest.mark.parametrize("ends", ["superseded", "exhausted"])
async def test_a_change_decided_at_once_keeps_the_stage_locked_while_its_request_may_still_land(
    redis_client: aioredis.Redis, ends: str
) -> None:
    """After a request of unknown outcome, "old" sends nothing more: every field overtaken by "new"
    (superseded), or out of attempts (exhausted: "new" enqueued after it failed). Either way it is
    decided at once, and "new" waits on the stage's lock until the late-commit hold is over."""
    settings = Settings(request_timeout_s=2.0)
    ledger = Ledger(redis_client, settings)
    old, new = parse_change({"id": 9, "colour": "#000000"}), parse_change({"id": 9, "colour": "#ffffff"})
    await ledger.enqueue_many([(old, parse_envelope(idempotency_key="old"))])

    async def start(key: str, by: Ledger = ledger) -> Start:
        await redis_client.zadd(keys.queue_key(settings.queue_name, "default"), {f"default:{key}": 0}, xx=True)
        return await by.start(f"default:{key}", "w", 1e6, 0)

    first = await start("old")
    assert first.decision == "go"
    # The old request timed out: iVvy may still apply it for a while.
    event = {"event": "retrying", "idempotency_key": "old", "stage_id": ""}
    finished = await ledger.finish("default:old", first.run, old, event=event, history={}, outcome_unknown=True)
    assert finished.recorded
    if ends == "superseded":
        await ledger.enqueue_many([(new, parse_envelope(idempotency_key="new"))])
    out_of_attempts = Ledger(redis_client, dataclasses.replace(settings, max_attempts=1))
    decided = await start("old", out_of_attempts if ends == "exhausted" else ledger)
    assert decided.decision == ends
    done = {"event": "superseded" if ends == "superseded" else "failed", "idempotency_key": "old", "stage_id": ""}
    assert (await ledger.finish("default:old", decided.run, old, event=done, history={})).recorded
    if ends == "exhausted":
        await ledger.enqueue_many([(new, parse_envelope(idempotency_key="new"))])
    newer = await start("new")
    assert (newer.decision, newer.reason) == ("wait", "locked")
    lock_ttl = await redis_client.pttl(keys.stage_lock_key("default", "9"))
    assert 0 < lock_ttl <= ledger.late_commit_ms


async def test_a_stale_run_cannot_finish_adopt_or_renew(redis_client: aioredis.Redis) -> None:
    settings = Settings(lease_s=0.1, request_timeout_s=0.05, in_flight_margin_s=0.05)
    ledger = Ledger(redis_client, settings)
    change = parse_change({"name": "Fenced", "applyTo": 1})
    await ledger.enqueue_many([(change, parse_envelope(idempotency_key="f"))])
    stale = await ledger.start("default:f", "w1", 1e6, 0)
    # The lease and the in-flight guard run out (with a margin for the clocks): another worker takes over.
    await asyncio.sleep(max(ledger.lease_ms, ledger.in_flight_guard_ms) / 1000 + 0.1)
    current = await ledger.start("default:f", "w2", 1e6, 0)
    assert (stale.run, current.run) == (1, 2)
    event = {"event": "succeeded", "idempotency_key": "f", "stage_id": "5"}
    refused = await ledger.finish("default:f", stale.run, change, event=event, history={})
    assert (refused.recorded, refused.refused_because) == (False, "fenced")
    assert await ledger.extend_leases({"default:f": stale.run}, "w1") == set()
    assert await ledger.extend_leases({"default:f": current.run}, "w2") == {"default:f"}
    with pytest.raises(StaleRun):
        await ledger.adopt("default", "default:f", stale.run, [5])
    assert (await ledger.finish("default:f", current.run, change, event=event, history={})).recorded
    assert await redis_client.xlen(settings.results_stream) == 1


async def test_a_change_that_waits_keeps_its_ledger_entry(redis_client: aioredis.Redis) -> None:
    settings = Settings(ledger_retention_s=3600)
    ledger = Ledger(redis_client, settings)
    await enqueue(ledger, {"name": "Patient", "applyTo": 1}, "patient")
    await redis_client.hset(keys.rate_key("default"), "pause_until", str(2**50))  # type: ignore[misc]  # a long 429 pause; redis-py's async stubs
    await redis_client.pexpire(keys.ledger_key("default:patient"), 500)
    waiting = await ledger.start("default:patient", "w", 10.0, 0)
    assert (waiting.decision, waiting.reason) == ("wait", "paused")
    assert await redis_client.pttl(keys.ledger_key("default:patient")) == -1  # none until it is done


async def test_a_vanished_ledger_entry_is_reported_failed_never_dropped_silently(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = worker_settings(redis_url, fake.url)
    await enqueue(Ledger(redis_client, settings), {"name": "Vanished", "applyTo": 1}, "gone")
    await redis_client.delete(keys.ledger_key("default:gone"))
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, ["gone"])
    [event] = terminal["gone"]
    assert (event["event"], event["error_code"]) == ("failed", "ledger_missing")
    [dead] = await read_events(redis_client, settings.dlq_stream)
    assert dead["idempotency_key"] == "gone"
    assert "job.ledger_missing" in capsys.readouterr().out
    assert await redis_client.hget(keys.PENDING, "default") is None  # type: ignore[misc]  # redis-py's async stubs


async def test_a_retry_after_beyond_the_cap_dead_letters_with_the_reason(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = worker_settings(redis_url, fake.url, retry_after_max_s=5.0)
    await enqueue(Ledger(redis_client, settings), {"name": "Throttled", "applyTo": 1}, "slow")
    fake.fake.update_faults({"rate_limit_rate": 1.0, "retry_after_s": 3600})
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, ["slow"])
    [event] = terminal["slow"]
    assert (event["event"], event["error_code"]) == ("failed", "retry_after_too_long")
    assert "LEADSTAGE_RETRY_AFTER_MAX" in event["error_message"]
    assert await redis_client.xlen(settings.dlq_stream) == 1


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LEADSTAGE_LEDGER_RETENTION": "3000", "LEADSTAGE_MAX_AGE": "3600"}, "LEADSTAGE_LEDGER_RETENTION"),
        ({"LEADSTAGE_LEDGER_RETENTION": "4000", "LEADSTAGE_RETRY_AFTER_MAX": "600"}, "LEADSTAGE_RETRY_AFTER_MAX"),
        ({"LEADSTAGE_REDIS_MIN_REPLICAS": "-1"}, "LEADSTAGE_REDIS_MIN_REPLICAS"),
    ],
)
def test_settings_that_contradict_each_other_are_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


async def test_a_backlog_past_the_maximum_age_is_told_at_enqueue(redis_client: aioredis.Redis) -> None:
    settings = Settings(rate_limit=10.0, max_age_s=5.0)
    ledger = Ledger(redis_client, settings)
    counted = (
        prometheus_client.REGISTRY.get_sample_value("leadstage_enqueued_past_max_age_total", {"account": "default"})
        or 0.0
    )
    items = [
        (parse_change({"name": f"Queued {i}", "applyTo": 1}), parse_envelope(idempotency_key=f"q{i}"))
        for i in range(80)
    ]
    receipts = await ledger.enqueue_many(items)
    assert [r.backlog for r in receipts[:3]] == [1, 2, 3]
    assert receipts[-1].expected_wait_s == pytest.approx(8.0)
    assert receipts[-1].expected_wait_s > settings.max_age_s
    again = await ledger.enqueue_many(
        [(parse_change({"name": "One more", "applyTo": 1}), parse_envelope(idempotency_key="late"))]
    )
    assert again[0].backlog == 81
    warning = backlog_warning(receipts, settings)
    assert warning is not None
    assert "'default' has 80 changes waiting, about 8s" in warning
    assert "LEADSTAGE_MAX_AGE (5s)" in warning
    assert backlog_warning(receipts[:50], settings) is None  # 5 s: within the maximum age
    now_counted = prometheus_client.REGISTRY.get_sample_value(
        "leadstage_enqueued_past_max_age_total", {"account": "default"}
    )
    assert now_counted == counted + 31  # the 30 changes behind the 50th, and the one more
    account = (await readers.stats(redis_client, settings))["accounts"]
    assert account == {"default": {"backlog": 81, "expected_start_in_s": 8.1, "past_max_age": True}}


async def through_a_late_commit(
    fake: RunningFakeIvvy,
    redis_client: aioredis.Redis,
    settings: Settings,
    changes: tuple[dict[str, object], dict[str, object]],
    late_commit_s: float,
) -> dict[str, str]:
    """ "older" (the first change) through a worker, its first request held by the fake for
    ``late_commit_s`` (past the worker's request timeout) and then committed; "newer" enqueued while
    it is held. Each key's terminal event, once every request was answered (the held one too)."""
    ledger = Ledger(redis_client, settings)
    await enqueue(ledger, changes[0], "older")
    fake.fake.update_faults({"late_commit_rate": 1.0, "late_commit_s": late_commit_s})
    async with running_worker(settings):

        async def held() -> bool:
            return len(fake.fake.requests) > 0

        await eventually(held)  # the first request is held by the fake; the worker will time out
        fake.fake.update_faults({"late_commit_rate": 0.0})
        await enqueue(ledger, changes[1], "newer")
        terminal = await wait_for_terminal(redis_client, ["older", "newer"], within_s=10)

        async def all_answered() -> bool:
            return all(request.status is not None for request in fake.fake.requests)

        await eventually(all_answered)
    return {key: events[0]["event"] for key, events in terminal.items()}


async def test_a_retry_after_a_timeout_waits_out_the_late_commit_before_carrying_newer_changes(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """An update's request times out; iVvy applies it later anyway (within one request timeout).
    Its retry (its colour is still its own) coalesces a newer change's name: sent before the late
    commit landed, the newer name would be overwritten by the older. The retry waits out the hold
    first."""
    stage = fake.fake.add_stage("Before", apply_to=1)
    settings = worker_settings(redis_url, fake.url, request_timeout_s=0.3, batch_mode="off")
    older, newer = {"id": stage.id, "name": "Older", "colour": "#111111"}, {"id": stage.id, "name": "Newer"}
    ends = await through_a_late_commit(fake, redis_client, settings, (older, newer), 0.5)  # 0.2 s after the timeout
    # The older one's colour is still its own: its retry goes, and carries the newer name with it.
    assert ends == {"older": "succeeded", "newer": "succeeded"}
    assert (fake.fake.stages[stage.id].name, fake.fake.stages[stage.id].colour) == ("Newer", "#111111")


async def test_a_last_attempt_that_times_out_keeps_the_stage_locked_while_it_may_still_land(
    fake: RunningFakeIvvy, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """An update's last attempt times out and the change fails (out of attempts); iVvy applies that
    request later anyway (within one request timeout). A newer change of the stage, waiting on its
    lock meanwhile, must not go before the late commit, which would overwrite its name. The worker's
    clock is two minutes behind: a hold counted by it would be over before it began (by Redis's it
    is not)."""
    stage = fake.fake.add_stage("Before", apply_to=1)
    settings = worker_settings(
        redis_url, fake.url, request_timeout_s=0.3, batch_mode="off", max_attempts=1, clock_offset_s=-120.0
    )
    older, newer = {"id": stage.id, "name": "Older"}, {"id": stage.id, "name": "Newer"}
    ends = await through_a_late_commit(fake, redis_client, settings, (older, newer), 0.4)  # 0.1 s after the timeout
    assert ends == {"older": "failed", "newer": "succeeded"}
    assert fake.fake.stages[stage.id].name == "Newer"
