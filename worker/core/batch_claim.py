"""batch.lua for the worker (batch mode, docs/contract.md: Batches): a batch's claim of an account's
due updates, its record (its run's send, its asyncId, its end), a rate slot for its run and for each
poll; the script's calls (its replies are parsed in ``worker.core.replies``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from itertools import chain

from worker.core import keys
from worker.core.errors import redis_errors
from worker.core.ledger import Ledger, Start
from worker.core.replies import BatchClaim, parse_batch_claim, parse_batch_held, parse_batch_sent
from worker.core.scripts import RATE_WINDOW_US, rate_interval_us

__all__ = [
    "BatchClaim",
    "claim_batch",
    "end_batch",
    "hold_unresolved",
    "record_sent",
    "take_rate_slot",
    "take_run_slot",
]

#: How many of an account's due jobs one claim reads at most (a batch takes one per stage): enough
#: that the updates overtaken by newer ones, or on locked stages, at the head of a backlog do not
#: hide the sendable changes behind them (the bench's backlog has 8,500 overtaken updates before
#: its last 1,500). A due job read costs Redis about 5 µs: 12,800 about 60 ms.
SCAN_FACTOR = 64


def batch_lock_ms(ledger: Ledger) -> int:
    """A batch's stage locks last for its run, its wait for results, one more poll and the finish."""
    settings = ledger.settings
    return int((settings.batch_wait_s + 2 * settings.request_timeout_s) * 1000) + 5000


async def claim_batch(ledger: Ledger, account: str, worker_id: str, rate_limit: float) -> BatchClaim:
    """A dead worker's batch to collect; otherwise up to ``LEADSTAGE_BATCH_MAX``
    of the account's due updates for one batch, when more than ``LEADSTAGE_BATCH_THRESHOLD`` could
    be sent now (see batch.lua)."""
    settings = ledger.settings
    reply, acked = await ledger._call(
        ledger._batch,
        [
            keys.queue_key(settings.queue_name, account),
            keys.rate_key(account),
            keys.batches_key(account),
            keys.newest_claim_key(account),
        ],
        [
            "claim",
            ledger.lease_ms,
            settings.max_attempts,
            int(settings.max_age_s * 1000),
            rate_interval_us(rate_limit),
            batch_lock_ms(ledger),
            ledger.in_flight_guard_ms,
            worker_id,
            keys.ledger_prefix(account),
            keys.batch_key(account, uuid.uuid4().hex),
            settings.batch_threshold,
            settings.batch_max,
            settings.batch_max * SCAN_FACTOR,
            RATE_WINDOW_US,
            int(settings.batch_wait_s * 1000),
            int(settings.rate_lead_s * 1_000_000),
        ],
        confirm=True,
    )
    claim = parse_batch_claim(reply)
    if claim.starts:
        ledger._require_replicas(acked, "the recovery point of a batch")
    return claim


async def record_sent(ledger: Ledger, account: str, claim: BatchClaim, async_id: str) -> None:
    """The batch's asyncId in its record, once for all its changes, and the batch listed for collection."""
    settings = ledger.settings
    with redis_errors():
        reply = await ledger._batch(
            keys=[keys.batches_key(account), claim.record],
            args=["sent", async_id, int(settings.batch_wait_s * 1000), ledger.in_flight_guard_ms, ledger.lease_ms],
        )
    parse_batch_sent(reply)


async def end_batch(ledger: Ledger, account: str, claim: BatchClaim) -> None:
    """Every change of the batch ended: its record and its listing go."""
    with redis_errors():
        await ledger._batch(keys=[keys.batches_key(account), claim.record], args=["ended"])


async def hold_unresolved(ledger: Ledger, starts: Sequence[Start]) -> None:
    """A batch that may still be applied: each change still on its run keeps its stage locked for
    another ``LEADSTAGE_BATCH_WAIT`` whatever becomes of it, also should this worker die first."""
    with redis_errors():
        reply = await ledger._batch(
            keys=[keys.ledger_key(s.job_id) for s in starts],
            args=[
                "unresolved",
                int(ledger.settings.batch_wait_s * 1000),
                *chain.from_iterable((str(s.run), s.job_id) for s in starts),
            ],
        )
    parse_batch_held(reply)


async def take_run_slot(
    ledger: Ledger, account: str, rate_limit: float, claim: BatchClaim, starts: Sequence[Start]
) -> int:
    """The slot of a batch's run, taken just before it is sent (the claim only saw one free): 0 when
    taken, and then its record says the run (``starts``, in job order) was sent now; else how long
    to wait (ms)."""
    with redis_errors():
        [wait_ms] = await ledger._batch(
            keys=[keys.queue_key(ledger.settings.queue_name, account), keys.rate_key(account), claim.record],
            args=[
                "go",
                rate_interval_us(rate_limit),
                RATE_WINDOW_US,
                ledger.settings.ledger_retention_s * 1000,
                "\n".join(s.job_id for s in starts),
            ],
        )
    return int(wait_ms)


async def take_rate_slot(ledger: Ledger, account: str, rate_limit: float) -> int:
    """A slot of the account's rate limit for one poll: 0 when taken, else how long to wait (ms)."""
    with redis_errors():
        [wait_ms] = await ledger._batch(
            keys=[keys.queue_key(ledger.settings.queue_name, account), keys.rate_key(account)],
            args=["slot", rate_interval_us(rate_limit), RATE_WINDOW_US],
        )
    return int(wait_ms)
