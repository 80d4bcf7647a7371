"""Start-up migration of the single-queue layout (one sorted set, keys without hash tags).

Before per-account queues, every change sat in one sorted set named ``LEADSTAGE_QUEUE`` and the
keys of an account had no ``{account}`` tag. A worker that starts on such a Redis moves it over
before it serves anything: every ledger entry, stage hash, lock, claims hash, newest claim and
rate limiter is renamed to its tagged name (terminal entries too: they keep idempotency), each
ledger entry learns the names of its stage hash and lock, each queued job moves to its
account's queue with its due time, and the accounts are put on the schedule. Renames never
overwrite a newer key, so workers starting together, or a migration cut short and run again, are
harmless. ``keys.LAYOUT`` records that it is done. The old workers must be stopped first.
"""

from __future__ import annotations

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster

from worker.core import keys
from worker.core.errors import ConfigError, redis_errors
from worker.core.ledger import Ledger
from worker.core.settings import Settings

log = structlog.get_logger("leadstage.layout")

#: Prefixes whose old names were ``prefix + account + ':' + rest``.
_PER_CHANGE = (keys.LEDGER_PREFIX, keys.STAGE_PREFIX, keys.STAGE_LOCK_PREFIX)
#: Prefixes whose old names were ``prefix + account``.
_PER_ACCOUNT = (keys.CLAIMS_PREFIX, keys.NEWEST_CLAIM_PREFIX, keys.RATE_PREFIX)


#: The type of what the old layout kept under each prefix.
_TYPES = {
    keys.LEDGER_PREFIX: b"hash",
    keys.STAGE_PREFIX: b"hash",
    keys.STAGE_LOCK_PREFIX: b"string",
    keys.CLAIMS_PREFIX: b"hash",
    keys.NEWEST_CLAIM_PREFIX: b"string",
    keys.RATE_PREFIX: b"hash",
}


def _tagged(old: str) -> tuple[str, str] | None:
    """(prefix, tagged name) of a key of the old layout, or None when it is not one."""
    for prefix in _PER_CHANGE:
        if old.startswith(prefix) and not old.startswith(prefix + "{"):
            account, _, rest = old.removeprefix(prefix).partition(":")
            return prefix, f"{prefix}{keys.tag(account)}:{rest}"
    for prefix in _PER_ACCOUNT:
        if old.startswith(prefix) and not old.startswith(prefix + "{"):
            return prefix, prefix + keys.tag(old.removeprefix(prefix))
    return None


async def migrate(ledger: Ledger) -> int:
    """Move a Redis of the single-queue layout to per-account queues; returns the jobs moved."""
    client, queue = ledger.client, ledger.settings.queue_name
    if isinstance(client, RedisCluster):
        # The old layout never ran on a cluster (its scripts could not): nothing to move, and a
        # single queue there is not this product's to serve.
        with redis_errors():
            if await client.type(queue) == b"zset":
                raise ConfigError(
                    f"a queue of the single-queue layout ({queue!r}) is on the Redis Cluster: it was never "
                    "migrated; move it on a single Redis first (docs/architecture.md, Redis Cluster)"
                )
        return 0
    assert isinstance(client, aioredis.Redis)
    with redis_errors():
        if (await client.get(keys.LAYOUT)) == keys.LAYOUT_VERSION.encode():
            return 0
        old_queue = await client.type(queue) == b"zset"
        if not old_queue and queue != Settings.queue_name:
            # A queue of its own name (the demo's) and nothing of it in the old layout: the keys of
            # the deployment around it are not its to move.
            return 0
        renamed = await _rename_keys(client)
        moved: dict[str, int] = {}
        jobs = 0
        if old_queue:
            async for member, score in client.zscan_iter(queue):
                job = member.decode()
                account = keys.split_job_id(job)[0]
                await client.zadd(keys.queue_key(queue, account), {job: score}, nx=True)
                moved[account] = min(moved.get(account, int(score)), int(score))
                jobs += 1
            await client.delete(queue)
        await client.set(keys.LAYOUT, keys.LAYOUT_VERSION)
    for account, due_ms in moved.items():
        await ledger.notify([account], due_ms)
    if renamed or moved:
        log.info("layout.migrated", keys_renamed=renamed, jobs_moved=jobs, accounts=sorted(moved))
    return jobs


async def _rename_keys(client: aioredis.Redis) -> int:
    """One SCAN pass over the product's keys (large pages: it runs once, before any claim)."""
    renamed = 0
    async for raw in client.scan_iter(match="leadstage:*", count=10_000):
        found = _tagged(raw.decode())
        if found is None:
            continue
        prefix, new = found
        # Only what the old layout wrote there: a key of another type is someone else's.
        if await client.type(raw) != _TYPES[prefix] or not await client.renamenx(raw, new):
            continue
        renamed += 1
        if prefix == keys.LEDGER_PREFIX:
            await _name_keys_of(client, new)
    return renamed


async def _name_keys_of(client: aioredis.Redis, ledger_key: str) -> None:
    """Store the names start.lua reads from a ledger entry (new entries get them at enqueue)."""
    account, subject, stage_id = await client.hmget(ledger_key, ["account", "lock", "stage_id"])  # type: ignore[misc]  # redis-py's async stubs
    if account is None:
        return
    names = {"lock_key": keys.stage_lock_key(account.decode(), (subject or b"").decode())}
    if stage_id:
        names["stage_key"] = keys.stage_key(account.decode(), int(stage_id))
    await client.hset(ledger_key, mapping=names)  # type: ignore[misc]  # redis-py's async stubs
