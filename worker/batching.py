"""Batch mode (docs/contract.md: Batches): an account's due updates, one per stage, sent as one
iVvy batch when more than ``LEADSTAGE_BATCH_THRESHOLD`` of them could go now.

A worker's turn on an account first asks batch.lua for a batch (``launch``); the changes it
claims are runs of this worker like any other (their leases renewed by the heartbeat, each fenced
by its run), all carried by one task (``run_batch``) that holds one of the worker's slots:

1. ``batch?action=run`` with each change's request (its surviving fields, as a single call's);
2. its asyncId written in each change's recovery point (batch.lua 'sent');
3. ``progress``/``results`` polled with backoff (``worker.batch``), each poll taking a slot of the
   account's rate limit;
4. each change finished by its job's answer through the single attempt's finish path
   (``worker.job``): succeeded, retried later (retryable), dead-lettered (permanent).

A run or a wait whose outcome is unknown (no answer, results never ready within
``LEADSTAGE_BATCH_WAIT``, 24115, results that do not answer the jobs) is an unknown outcome for
each change: an update is simply resent later, the stage staying locked for the late-commit hold.
A worker killed mid-batch leaves its changes at ``phase=posting`` with a ``posted_at`` past the
batch's wait: once their leases lapse and that wait is over, they are claimed again and resent
(nobody collects the dead worker's results).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import orjson

from worker import coalesce
from worker.batch import BatchCalls, JobOutcome, lead_stage_job
from worker.core import keys, metrics
from worker.core.batch_claim import claim_batch, record_sent, take_rate_slot
from worker.core.change import LeadStageChange, parse_change
from worker.core.errors import LeadstageError, PermanentError, RetryableError
from worker.core.ledger import Start
from worker.core.logs import bind_job_context, get_logger
from worker.core.results import JobFacts
from worker.core.states import Outcome
from worker.ivvy import IvvyClient
from worker.job import Lease, Runtime, _failed_attempt, _finish, _outcome_unknown, _permanent_failure

if TYPE_CHECKING:
    from worker.runner import LeadstageWorker

log = get_logger("leadstage.batch")

#: After a claim found too few updates for a batch, this worker's turns on that account do not
#: ask again for this long (a claim reads up to four times LEADSTAGE_BATCH_MAX ledger entries).
QUIET_S = 1.0
#: (worker id, account) -> until when (this host's monotonic clock) no batch is asked for.
_quiet_until: dict[tuple[str, str], float] = {}


async def launch(worker: LeadstageWorker, runtime: Runtime, account: str) -> int:
    """Claim a batch of the account's due updates and start its task; how many changes it took."""
    client = runtime.clients.get(account)
    if client is None or worker.max_jobs - worker.job_counter < 1:
        return 0  # an unknown account's changes fail one by one, as single calls
    claimed_at = time.monotonic()
    if _quiet_until.get((runtime.worker_id, account), 0.0) > claimed_at:
        return 0
    claim = await claim_batch(runtime.ledger, account, runtime.worker_id, runtime.settings.rate_limit_for(account))
    if not claim.starts:
        if claim.refused == "below":
            _quiet_until[(runtime.worker_id, account)] = claimed_at + QUIET_S
        return 0
    await worker.sem.acquire()  # never waits: a free slot was checked above, in this same task
    worker.job_counter += 1
    leases = {start.job_id: Lease(start.run, claimed_at) for start in claim.starts}
    task = asyncio.create_task(_guarded(runtime, run_batch(runtime, client, claim.starts), leases))
    for job_id, lease in leases.items():
        lease.task = task
        runtime.running[job_id] = lease
        lease.confirm(claimed_at + runtime.settings.lease_s, runtime.lease_margin_s)
    task.add_done_callback(lambda _: worker._release_sem_dec_counter_on_complete())
    worker.tasks[f"batch:{uuid.uuid4().hex}"] = task
    log.info("batch.claimed", account=account, changes=len(claim.starts), candidates=claim.candidates)
    return len(claim.starts)


async def _guarded(runtime: Runtime, batch: Awaitable[None], leases: dict[str, Lease]) -> None:
    """The batch's task, never raising (as ``LeadstageWorker._run``): whatever it could not record,
    the leases bring back."""
    try:
        await asyncio.wait_for(batch, runtime.settings.job_timeout_s)
    except asyncio.CancelledError:
        if not any(lease.lost for lease in leases.values()):
            raise
        log.warning("batch.lease_lost", changes=len(leases))
    except (LeadstageError, TimeoutError) as error:
        log.warning("batch.interrupted", error=str(error) or type(error).__name__)
    except Exception:  # a bug in one batch must not stop the worker; logged with its traceback
        log.exception("batch.crashed")
    finally:
        for job_id, lease in leases.items():
            lease.end()
            if runtime.running.get(job_id) is lease:
                del runtime.running[job_id]


def _facts(start: Start) -> JobFacts:
    account, idempotency_key = keys.split_job_id(start.job_id)
    change = parse_change(orjson.loads(start.change_json))
    source, enqueued_at, generation = start.facts
    return JobFacts(start.job_id, idempotency_key, account, change, source, enqueued_at, generation)


async def run_batch(runtime: Runtime, client: IvvyClient, starts: list[Start]) -> None:
    """Send the claimed changes as one batch, wait for its results and finish each change."""
    coalesce.CARRIAGE.set(("batch", ""))  # each job is its own change's request
    members = [(start, _facts(start)) for start in starts]
    for start, _ in members:
        runtime.check_lease(start.job_id)
    sent = [facts.change.without(set(start.dropped)) for start, facts in members]
    jobs = [lead_stage_job(change) for change in sent]
    calls = BatchCalls(client)
    started = time.monotonic()
    try:
        async_id = await calls.run(jobs)
    except (RetryableError, PermanentError) as error:
        await _end_all(runtime, members, sent, error, started, unknown=None)
        return
    mine = await record_sent(runtime.ledger, async_id, starts)
    log.info("batch.sent", async_id=async_id, changes=len(starts), overtaken=len(starts) - len(mine))
    account = members[0][1].account

    async def pace() -> None:
        while True:
            wait_ms = await take_rate_slot(runtime.ledger, account, runtime.settings.rate_limit_for(account))
            if not wait_ms:
                return
            await asyncio.sleep(wait_ms / 1000)

    try:
        settings = runtime.settings
        outcomes = await calls.wait_for_results(
            async_id, jobs, timeout_s=settings.batch_wait_s, poll_min_s=settings.batch_poll_min_s,
            poll_max_s=settings.batch_poll_max_s, rng=runtime.rng, pace=pace,
        )  # fmt: skip
    except (RetryableError, PermanentError) as error:
        # The batch may still be applied: each change's outcome is unknown.
        log.warning("batch.unanswered", async_id=async_id, error=str(error), error_code=error.error_code)
        kept = [(i, m) for i, m in enumerate(members) if m[0].job_id in mine]
        await _end_all(runtime, [m for _, m in kept], [sent[i] for i, _ in kept], error, started, unknown=True)
        return
    await asyncio.gather(
        *(
            _end_one(runtime, start, facts, change, outcome, started)
            for (start, facts), change, outcome in zip(members, sent, outcomes, strict=True)
            if start.job_id in mine
        )
    )


async def _end_all(
    runtime: Runtime,
    members: list[tuple[Start, JobFacts]],
    sent: list[LeadStageChange],
    error: RetryableError | PermanentError,
    started: float,
    *,
    unknown: bool | None,
) -> None:
    """Every change of the batch ends as its request would have alone with ``error``."""
    await asyncio.gather(
        *(
            _end_one(runtime, start, facts, change, JobOutcome(error=error), started, unknown=unknown)
            for (start, facts), change in zip(members, sent, strict=True)
        )
    )


async def _end_one(
    runtime: Runtime,
    start: Start,
    facts: JobFacts,
    sent: LeadStageChange,
    outcome: JobOutcome,
    started: float,
    *,
    unknown: bool | None = None,
) -> None:
    """One change's end by its job's answer: the single attempt's finish path."""
    with bind_job_context(facts.job_id, facts.idempotency_key, facts.account, start.attempt):
        try:
            stage_id = outcome.lead_stage_id(sent)
        except RetryableError as error:
            if unknown is None:
                unknown = _outcome_unknown(facts.change, error)
            await _failed_attempt(runtime, facts, start, sent, error, started, outcome_unknown=unknown)
        except PermanentError as error:
            await _permanent_failure(runtime, facts, start, sent, error, started)
        else:
            metrics.ATTEMPTS.labels(facts.account, "update", "ok").inc()
            await _finish(runtime, facts, start, Outcome.SUCCEEDED, sent=sent, stage_id=stage_id, started=started)
