"""On a Redis Cluster: publishing the events finish.lua and lost.lua leave in an account's outbox.

A script may touch one slot only, and the results and dead-letter streams are each in a slot of
their own, so on a cluster a terminal state and its event are written together into the account's
outbox (``keys.outbox_key``, a stream in its slot), then published: the event XADDed to the results
stream (and its dead letter to the dead-letter stream), and the entry acked (ack.lua: removed, and
the ledger's ``event_id`` written). Events are published **at least once**: a worker that dies
before the ack leaves the entry, and the sweep (each worker at start-up and every few heartbeats)
publishes entries older than a lease again; a death between the XADD and the ack publishes twice.
On a single Redis none of this runs: the scripts write the streams themselves (docs/architecture.md,
"Redis Cluster").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from worker.core import keys
from worker.core.errors import RedisUnavailable, redis_errors
from worker.core.replies import parse_acked
from worker.core.scripts import now_ms

if TYPE_CHECKING:
    from worker.core.scripts import Scripts

#: Outbox entries read per account per sweep call.
SWEEP_COUNT = 100


async def publish(scripts: Scripts, account: str, ids: Iterable[str]) -> int:
    """Publish these outbox entries of the account (those still there); how many were acked. A
    Redis that does not answer now leaves them to the sweep (logged): their terminal states are
    recorded already, so the runs that wrote them are not failed for it."""
    wanted = [entry_id for entry_id in ids if entry_id]
    if not wanted:
        return 0
    outbox = keys.outbox_key(account)
    try:
        with redis_errors():
            async with scripts.client.pipeline(transaction=False) as pipe:
                for entry_id in wanted:
                    pipe.xrange(outbox, entry_id, entry_id)
                found = await pipe.execute()
        return await _publish_entries(scripts, account, [entry for entries in found for entry in entries])
    except RedisUnavailable as error:
        from worker.core.logs import get_logger

        get_logger("leadstage.outbox").warning(
            "outbox.publish_deferred", account=account, entries=len(wanted), error=str(error) or type(error).__name__
        )
        return 0


async def sweep(scripts: Scripts, accounts: Iterable[str], older_than_ms: int) -> int:
    """Publish the entries of these accounts' outboxes older than ``older_than_ms`` (those a worker
    died before acking); how many were acked."""
    newest = max(0, now_ms() - older_than_ms)  # this host's clock: too early only publishes twice
    published = 0
    for account in sorted(set(accounts)):
        with redis_errors():
            entries = await scripts.client.xrange(keys.outbox_key(account), "-", str(newest), count=SWEEP_COUNT)
        published += await _publish_entries(scripts, account, entries)
    return published


async def _publish_entries(scripts: Scripts, account: str, entries: Sequence[Any]) -> int:
    if not entries:
        return 0
    settings = scripts.settings
    with redis_errors():
        async with scripts.client.pipeline(transaction=False) as pipe:
            for _, fields in entries:
                items = list(fields.items())
                event = dict(items[4:])  # after ledger, letter, original_change, generation (finish.lua)
                pipe.xadd(settings.results_stream, event, maxlen=settings.results_maxlen, approximate=True)
                if fields[b"letter"]:
                    pipe.xadd(settings.dlq_stream, dict(items[2:]))
            added = await pipe.execute()
    event_ids, at = [], 0
    for _, fields in entries:
        event_ids.append(added[at])
        at += 2 if fields[b"letter"] else 1
    outbox = keys.outbox_key(account)
    with redis_errors():
        acked = await scripts._ack(
            keys=[outbox, *((fields[b"ledger"] or outbox) for _, fields in entries)],
            args=[
                value
                for (entry_id, _), event_id in zip(entries, event_ids, strict=True)
                for value in (entry_id, event_id)
            ],
        )
    return parse_acked(acked)
