"""``LEADSTAGE_REDIS_MIN_REPLICAS`` on a Redis Cluster whose masters have a replica each.

A write that must be confirmed is followed by ``WAIT`` on the connection that made it, so on a
cluster the ``WAIT`` goes to the master of the change's own slot: the replica that counts is that
master's. Cut one master's replica and only the accounts of that master are unconfirmed; the others
go on as before (docs/contract.md: Durability).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.harness import wait_for_terminal, worker_settings
from tests.redis_servers import redis_cluster
from tests.test_cluster import master_of
from worker.core import keys
from worker.core.change import parse_change, parse_envelope
from worker.core.errors import RedisNotReplicated
from worker.core.ledger import Ledger
from worker.core.redis_connection import connect_redis_or_cluster
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker

pytestmark = pytest.mark.system  # six redis-servers (three masters, a replica each) and a worker


async def test_a_write_is_confirmed_by_the_replica_of_its_own_master(
    fake_ivvy: RunningFakeIvvy, tmp_path: Path
) -> None:
    with redis_cluster(tmp_path, masters=3, replicas=1) as servers:
        base = worker_settings(
            servers.url, fake_ivvy.url, redis_min_replicas=1, redis_replica_timeout_s=0.3, max_attempts=100
        )
        default = base.accounts["default"]
        settings = dataclasses.replace(
            base, accounts={**base.accounts, "second": dataclasses.replace(default, name="second")}
        )
        client = connect_redis_or_cluster(servers.url)
        assert isinstance(client, RedisCluster)
        await client.initialize()  # the slots' masters, for master_of
        ledger = Ledger(client, settings)
        cut = master_of(client, servers, keys.pending_key("default", cluster=True))
        assert master_of(client, servers, keys.pending_key("second", cluster=True)) is not cut
        [replica] = servers.replicas[cut.port]
        unconfirmed = (parse_change({"name": "Unconfirmed", "applyTo": 1}), parse_envelope(idempotency_key="u"))
        confirmed = (
            parse_change({"name": "Confirmed", "applyTo": 1}),
            parse_envelope(idempotency_key="c", account="second"),
        )
        try:
            replica.pause()  # the master of "default" still takes writes; its replica has none of them
            with pytest.raises(RedisNotReplicated, match="retry with the same idempotency key"):
                await ledger.enqueue_many([unconfirmed])
            [receipt] = await ledger.enqueue_many([confirmed])  # another master's replica confirms it
            assert receipt.status == "queued"
            async with running_worker(settings):
                await wait_for_terminal(client, ["c"], within_s=20)
                # "u" was written but not confirmed, and neither can its recovery point be: no POST.
                assert [s.name for s in fake_ivvy.fake.stages.values()].count("Unconfirmed") == 0
                replica.resume()  # its attempts are confirmed from now on: the worker applies it by itself
                terminal = await wait_for_terminal(client, ["u"], within_s=20)
        finally:
            replica.resume()
            await client.aclose()
    assert terminal["u"][0]["event"] == "succeeded"
    names = [s.name for s in fake_ivvy.fake.stages.values()]
    assert (names.count("Unconfirmed"), names.count("Confirmed")) == (1, 1)
