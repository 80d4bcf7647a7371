"""How many changes of each account are enqueued and not yet terminal (the backlog), as the scripts
count them: in ``keys.PENDING`` on a single Redis, in each account's own hash on a Redis Cluster."""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from worker.core import keys
from worker.core.errors import redis_errors
from worker.core.redis_connection import RedisClient
from worker.core.settings import Settings


async def backlogs(client: RedisClient, settings: Settings) -> dict[bytes, bytes]:
    """Account -> changes not yet terminal, for the accounts that have any (as HGETALL of
    ``keys.PENDING`` answers it). On a cluster: the configured accounts' and those the schedule's
    epoch hash names (every account ever notified), in one pipeline."""
    with redis_errors():
        if not isinstance(client, RedisCluster):
            counts: dict[bytes, bytes] = await client.hgetall(keys.PENDING)  # type: ignore[misc]  # redis-py's async stubs
            return counts
        notified = await client.hkeys(keys.epoch_key(settings.queue_name))
        accounts = sorted({*settings.accounts, *(a.decode() for a in notified)})
        async with client.pipeline(transaction=False) as pipe:
            for account in accounts:
                pipe.hget(keys.pending_key(account, cluster=True), account)
            found = await pipe.execute()
    return {account.encode(): count for account, count in zip(accounts, found, strict=True) if count is not None}
