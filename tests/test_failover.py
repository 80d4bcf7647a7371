"""Durability: writes confirmed by replicas (``LEADSTAGE_REDIS_MIN_REPLICAS``) survive a Sentinel
failover; writes that were not confirmed are never reported as done. Real redis-server processes:
a primary, a replica and a Sentinel, on loopback ports of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from producers.library import connect_redis
from tests.harness import eventually, wait_for_terminal, worker_settings
from tests.redis_servers import RedisServer, start_redis
from worker.core.change import parse_change, parse_envelope
from worker.core.errors import RedisNotReplicated, RedisUnavailable
from worker.core.ledger import Ledger
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.runner import running_worker

SERVICE = "leadstage-test"


@pytest.fixture
async def fake() -> AsyncIterator[RunningFakeIvvy]:
    async with running_fake_ivvy(seed=5) as running:
        running.fake.update_faults({"latency_ms": 20})
        yield running


#: Replication without the 5 s wait for more replicas before a full sync (Redis' default).
FAST_SYNC = ("--repl-diskless-sync-delay", "0")
#: Replicas sync as a user of their own, so that a test can cut replication by switching that user
#: off on the primary (SIGSTOP would not cut it: the kernel keeps buffering what the primary sends),
#: while clients and Sentinel go on as the default user.
REPLICATOR = ("replicator", "replication-secret")


def allow_replicator(server: RedisServer) -> None:
    user, password = REPLICATOR
    server.client().acl_setuser(user, enabled=True, passwords=[f"+{password}"], commands=["+@all"], keys=["*"])


def cut_replication(primary: RedisServer) -> None:
    """From now on no replica gets the primary's writes (and none can sync again)."""
    client = primary.client()
    client.acl_setuser(REPLICATOR[0], enabled=False, reset_passwords=False)
    client.client_kill_filter(user=REPLICATOR[0])


@contextlib.asynccontextmanager
async def replicated(tmp_path: Path, replicas: int = 1) -> AsyncIterator[list[RedisServer]]:
    """A primary and its replicas, each in sync (its first full sync done) before it is returned."""
    primary = start_redis(tmp_path / "primary", *FAST_SYNC)
    allow_replicator(primary)
    servers = [primary]
    user, password = REPLICATOR
    try:
        for index in range(replicas):
            replica = start_redis(
                tmp_path / f"replica-{index}", *FAST_SYNC, "--masteruser", user, "--masterauth", password,
                "--replicaof", "127.0.0.1", str(primary.port),
            )  # fmt: skip
            allow_replicator(replica)  # for when it is the primary of the others
            servers.append(replica)
        deadline = time.monotonic() + 10
        while not all(s.client().info("replication").get("master_link_status") == "up" for s in servers[1:]):  # type: ignore[union-attr]  # redis-py's sync stubs
            assert time.monotonic() < deadline, "the replicas did not sync"
            await asyncio.sleep(0.05)
        yield servers
    finally:
        for server in reversed(servers):
            with contextlib.suppress(ProcessLookupError):
                server.kill()


async def test_a_write_no_replica_confirmed_is_unknown_and_nothing_is_posted(
    fake: RunningFakeIvvy, tmp_path: Path
) -> None:
    async with replicated(tmp_path) as (primary, replica):
        settings = worker_settings(
            primary.url, fake.url, redis_min_replicas=1, redis_replica_timeout_s=0.3, max_attempts=100
        )
        client = aioredis.Redis.from_url(primary.url)
        ledger = Ledger(client, settings)
        change = parse_change({"name": "Unconfirmed", "applyTo": 1})
        envelope = parse_envelope(idempotency_key="unconfirmed")
        try:
            replica.pause()  # replication is cut: the primary still takes writes
            with pytest.raises(RedisNotReplicated, match="retry with the same idempotency key"):
                await ledger.enqueue_many([(change, envelope)])
            async with running_worker(settings):
                await asyncio.sleep(1.5)
                # Written, but a failover could lose the recovery point: nothing went to iVvy.
                assert [r for r in fake.fake.requests if r.action == "addOrUpdateLeadStage"] == []
                replica.resume()
                receipts = []

                async def retried() -> bool:  # the retry the error asked for, until it is confirmed
                    with contextlib.suppress(RedisNotReplicated):
                        receipts.extend(await ledger.enqueue_many([(change, envelope)]))
                    return bool(receipts)

                await eventually(retried, within_s=10)
                assert receipts[0].status == "duplicate"
                terminal = await wait_for_terminal(client, ["unconfirmed"], within_s=20)
        finally:
            replica.resume()
            await client.aclose()
    assert terminal["unconfirmed"][0]["event"] == "succeeded"
    assert [s.name for s in fake.fake.stages.values()].count("Unconfirmed") == 1


async def test_a_sentinel_failover_loses_no_confirmed_change_and_adds_no_stage_twice(
    fake: RunningFakeIvvy, tmp_path: Path
) -> None:
    async with replicated(tmp_path, replicas=2) as (primary, *replicas):
        sentinel = start_redis(
            tmp_path / "sentinel",
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 1",
            f"sentinel down-after-milliseconds {SERVICE} 400",
            f"sentinel failover-timeout {SERVICE} 2000",
            sentinel=True,
        )
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}"
        settings = worker_settings(
            url, fake.url, redis_min_replicas=2, redis_replica_timeout_s=0.5, max_attempts=200, max_age_s=600.0,
            request_timeout_s=1.0,
        )  # fmt: skip
        client = connect_redis(url)
        ledger = Ledger(client, settings)
        stages = [fake.fake.add_stage(f"Failover {i}", apply_to=1) for i in range(5)]
        changes = [({"name": f"Added {i}", "applyTo": 1}, f"add-{i}") for i in range(20)]
        changes += [({"id": s.id, "colour": f"#00000{r}"}, f"upd-{s.id}-{r}") for r in range(4) for s in stages]

        rejoined: RedisServer | None = None

        async def enqueue_until_confirmed(raw: dict[str, object], key: str) -> None:
            # What a producer does when told the outcome is unknown: the same key again.
            while True:
                try:
                    await ledger.enqueue_many([(parse_change(raw), parse_envelope(idempotency_key=key))])
                    return
                except RedisUnavailable:
                    await asyncio.sleep(0.1)

        try:
            async with running_worker(settings):
                for raw, key in changes[:15]:
                    await enqueue_until_confirmed(raw, key)
                await asyncio.sleep(0.3)
                # Replication is cut: the primary alone still takes writes (enqueues, recovery points),
                # and no replica will have them. Then the primary dies.
                cut_replication(primary)
                producers = [asyncio.create_task(enqueue_until_confirmed(raw, key)) for raw, key in changes[15:35]]
                await asyncio.sleep(1.5)
                primary.kill()

                def current_primary() -> int | None:
                    with redis.Redis(port=sentinel.port) as ask:
                        master = ask.sentinel_get_master_addr_by_name(SERVICE)
                    return int(master[1]) if master else None

                async def failed_over() -> bool:
                    return current_primary() in {r.port for r in replicas}

                # Sentinel promotes one replica and points the other at it. Every replica must confirm
                # a write (Sentinel may promote any of them): the old primary comes back, empty, as
                # the new primary's replica, and the writes that waited go on.
                await eventually(failed_over, within_s=20)
                user, password = REPLICATOR
                rejoined = start_redis(
                    tmp_path / "primary-again", *FAST_SYNC, "--masteruser", user, "--masterauth", password,
                    "--replicaof", "127.0.0.1", str(current_primary()), port=primary.port,
                )  # fmt: skip
                allow_replicator(rejoined)
                await asyncio.gather(*producers)
                for raw, key in changes[35:]:
                    await enqueue_until_confirmed(raw, key)
                terminal = await wait_for_terminal(client, [key for _, key in changes], within_s=60)
        finally:
            await client.aclose()
            for server in (sentinel, rejoined):
                if server is not None:
                    with contextlib.suppress(ProcessLookupError):
                        server.kill()

    assert {key: len(events) for key, events in terminal.items() if len(events) != 1} == {}
    assert {events[0]["event"] for events in terminal.values()} <= {"succeeded", "superseded"}
    names = [s.name for s in fake.fake.stages.values() if s.name.startswith("Added ")]
    assert sorted(names) == sorted(f"Added {i}" for i in range(20))
    for stage in stages:
        assert fake.fake.stages[stage.id].colour == "#000003"
