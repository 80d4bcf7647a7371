"""Batch mode (docs/contract.md: Batches): an account's due updates, one per stage, sent as one
iVvy batch when more than ``LEADSTAGE_BATCH_THRESHOLD`` of them could go now.

A worker's turn on an account first asks batch.lua for a batch (``launch``); the changes it
claims are runs of this worker like any other (their leases renewed by the heartbeat, each fenced
by its run), all carried by one task (``run_batch``) that holds one of the worker's slots:

1. ``batch?action=run`` with each change's request (its surviving fields, as a single call's);
2. its asyncId written once in the batch's record (which each change's ledger entry names since
   its claim) and the batch listed for collection (batch.lua 'sent');
3. ``progress``/``results`` polled with backoff (``worker.batch``), each poll taking a slot of the
   account's rate limit;
4. each change finished by its job's answer as a single attempt's is (``worker.recording``):
   succeeded, retried later (retryable), dead-lettered (permanent); then the
   batch's record goes (batch.lua 'ended').

A worker killed after step 2 leaves its batch to be collected: once the changes' leases lapse,
the next turn's claim takes them over (``collect_batch``: steps 3 and 4, each change by its own
job's index). A run or a wait whose outcome is unknown (no answer, results never ready within
``LEADSTAGE_BATCH_WAIT``) is an unknown outcome for each change, whose stage stays locked for
another ``LEADSTAGE_BATCH_WAIT`` (the batch may still be applied); results that are gone (24115)
or do not answer the jobs are an unknown outcome with the single call's hold. Either way an update
is simply resent later. A worker killed before step 2 leaves its changes to be resent after the
in-flight guard, their stages locked until that batch's wait is over.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import orjson

from worker import coalesce
from worker.batch import BatchCalls, BatchJob, JobOutcome, ReadyEstimate, lead_stage_job
from worker.core import keys, metrics, tracing
from worker.core.batch_claim import (
    BatchClaim,
    claim_batch,
    end_batch,
    hold_unresolved,
    record_sent,
    take_rate_slot,
    take_run_slot,
)
from worker.core.change import LeadStageChange, parse_change
from worker.core.errors import BatchGone, IvvyNoAnswer, PermanentError, RetryableError
from worker.core.ledger import Start
from worker.core.logs import bind_job_context, get_logger
from worker.core.results import JobFacts
from worker.ivvy import IvvyClient
from worker.recording import CARRIAGE, failed_attempt, outcome_unknown, permanent_failure, succeeded
from worker.runtime import Lease, Runtime

if TYPE_CHECKING:
    from worker.runner import LeadstageWorker

log = get_logger("leadstage.batch")

#: After a claim found too few updates for a batch, this worker's turns on that account do not
#: ask again for this long (a claim reads up to 64 times LEADSTAGE_BATCH_MAX ledger entries).
QUIET_S = 1.0
#: (worker id, account) -> until when (this host's monotonic clock) no batch is asked for.
_quiet_until: dict[tuple[str, str], float] = {}
#: (worker id, account) -> how soon its batches are done (when a batch's first poll asks for results).
_ready: dict[tuple[str, str], ReadyEstimate] = {}


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
    work = _traced(
        runtime,
        account,
        claim,
        collect_batch(runtime, client, claim) if claim.async_id else run_batch(runtime, client, claim),
    )
    # Never raising (as a single job): whatever the batch could not record, its leases bring back.
    task = asyncio.create_task(
        runtime.guarded(work, leases, runtime.settings.job_timeout_s, log, "batch", changes=len(leases))
    )
    for job_id, lease in leases.items():
        lease.task = task
        runtime.running[job_id] = lease
        lease.confirm(claimed_at + runtime.settings.lease_s, runtime.settings.lease_margin_s)
    task.add_done_callback(lambda _: worker._release_sem_dec_counter_on_complete())
    worker.tasks[f"batch:{uuid.uuid4().hex}"] = task
    if claim.async_id:
        log.info("batch.collecting", account=account, async_id=claim.async_id, changes=len(claim.starts))
    else:
        log.info("batch.claimed", account=account, changes=len(claim.starts), candidates=claim.candidates)
    return len(claim.starts)


async def _traced(runtime: Runtime, account: str, claim: BatchClaim, work: Awaitable[None]) -> None:
    """The batch's work inside its span (tracing.batch_span); once every change of it has ended, its
    record goes (should an end fail, a later claim or the ledger retention takes it)."""
    with tracing.batch_span(account, [s.traceparent for s in claim.starts], collected=bool(claim.async_id)):
        await work
        await end_batch(runtime.ledger, account, claim)


def _facts(start: Start) -> JobFacts:
    account, idempotency_key = keys.split_job_id(start.job_id)
    change = parse_change(orjson.loads(start.change_json))
    source, enqueued_at, generation = start.facts
    return JobFacts(start.job_id, idempotency_key, account, change, source, enqueued_at, generation)


async def run_batch(runtime: Runtime, client: IvvyClient, claim: BatchClaim) -> None:
    """Send the claimed changes as one batch, wait for its results and finish each change."""
    CARRIAGE.set(("batch", ""))  # each job is its own change's request
    members = [(start, _facts(start)) for start in claim.starts]
    for start, _ in members:
        runtime.check_lease(start.job_id)
    started = time.monotonic()
    groups = await _gather(runtime, members, started)
    members = [m for m in members if m[1].job_id not in groups or not groups[m[1].job_id].empty]
    if not members:
        return
    starts = [start for start, _ in members]
    sent = [
        groups[facts.job_id].sent if facts.job_id in groups else facts.change.without(set(start.dropped))
        for start, facts in members
    ]
    jobs = [lead_stage_job(change) for change in sent]
    calls = BatchCalls(client)
    account = members[0][1].account
    rate = runtime.settings.rate_limit_for(account)
    try:
        # The run's slot, now that it is gathered: the claim only saw one free (a slot taken there,
        # a gathering ago, would let this request arrive in the next one's).
        await _pace(lambda: take_run_slot(runtime.ledger, account, rate, claim, starts))
        async_id = await calls.run(jobs)
    except (RetryableError, PermanentError) as error:
        held = isinstance(error, IvvyNoAnswer) and error.outcome_unknown
        if held:
            await hold_unresolved(runtime.ledger, starts)  # accepted or not: it may still be applied
        await _end_all(runtime, members, sent, error, started, unknown=None, held=held, groups=groups)
        return
    await record_sent(runtime.ledger, account, claim, async_id)
    log.info("batch.sent", async_id=async_id, changes=len(starts))
    # A change another worker took over since is refused its end (fencing by run).
    await _collect(runtime, calls, async_id, jobs, members, sent, list(range(len(members))), started, groups)


async def _gather(runtime: Runtime, members: list[tuple[Start, JobFacts]], started: float) -> dict[str, coalesce.Group]:
    """Coalescing inside the batch: each update's job carries the other due updates of its stage
    (``coalesce.gather_group``, one call per stage, in this task: their leases last as long as it);
    a group none of whose fields survive is superseded here, whole. The groups by leader."""
    groups: dict[str, coalesce.Group] = {}
    for start, facts in members:
        if facts.change.operation != "update":
            continue
        group = await coalesce.gather_group(runtime, facts, start)
        if group is None:
            continue
        groups[facts.job_id] = group
        if group.empty:
            await coalesce.end(runtime, facts, start, group, started)
    return groups


async def collect_batch(runtime: Runtime, client: IvvyClient, claim: BatchClaim) -> None:
    """A dead worker's batch (its asyncId recorded): wait for its results and finish each change
    claimed by its own job's answer, as that worker would have."""
    CARRIAGE.set(("batch", ""))
    members = [(start, _facts(start)) for start in claim.starts]
    sent = [facts.change.without(set(start.dropped)) for start, facts in members]
    jobs: list[BatchJob | None] = [None] * claim.candidates
    for index, change in zip(claim.indexes, sent, strict=True):
        jobs[index] = lead_stage_job(change)
    metrics.BATCHES_COLLECTED.labels(members[0][1].account).inc()
    await _collect(
        runtime, BatchCalls(client), claim.async_id, jobs, members, sent, claim.indexes, time.monotonic(), {}
    )


async def _collect(
    runtime: Runtime,
    calls: BatchCalls,
    async_id: str,
    jobs: list[BatchJob] | list[BatchJob | None],
    members: list[tuple[Start, JobFacts]],
    sent: list[LeadStageChange],
    indexes: list[int],
    started: float,
    groups: Mapping[str, coalesce.Group],
) -> None:
    """Poll the batch within the rate limit and finish each member by its job (``indexes``), with
    the changes its job carried (``groups``)."""
    if not members:
        return
    account = members[0][1].account
    rate = runtime.settings.rate_limit_for(account)
    ready = _ready.setdefault((runtime.worker_id, account), ReadyEstimate())
    try:
        settings = runtime.settings
        outcomes = await calls.wait_for_results(
            async_id,
            jobs,
            timeout_s=settings.batch_wait_s,
            poll_min_s=settings.batch_poll_min_s,
            poll_max_s=settings.batch_poll_max_s,
            rng=runtime.rng,
            pace=lambda: _pace(lambda: take_rate_slot(runtime.ledger, account, rate)),
            ready=ready,
        )
    except (RetryableError, PermanentError) as error:
        # The batch may still be applied (unless iVvy says it does not know it): each change's outcome
        # is unknown.
        log.warning("batch.unanswered", async_id=async_id, error=str(error), error_code=error.error_code)
        held = not isinstance(error, BatchGone)
        if held:
            await hold_unresolved(runtime.ledger, [start for start, _ in members])
        await _end_all(runtime, members, sent, error, started, unknown=True, held=held, groups=groups)
        return
    # An add's job that failed may have been applied for all this worker knows: reconciled first.
    unknown = [True if facts.change.operation == "add" else None for _, facts in members]
    await _end_each(
        runtime, members, sent, [outcomes[index] for index in indexes], started, unknown=unknown, groups=groups
    )


async def _pace(take: Callable[[], Awaitable[int]]) -> None:
    """Until ``take`` took a slot of the account's rate limit (it says how long to wait otherwise)."""
    while True:
        wait_ms = await take()
        if not wait_ms:
            return
        await asyncio.sleep(wait_ms / 1000)


async def _end_all(
    runtime: Runtime,
    members: list[tuple[Start, JobFacts]],
    sent: list[LeadStageChange],
    error: RetryableError | PermanentError,
    started: float,
    *,
    unknown: bool | None,
    held: bool,
    groups: Mapping[str, coalesce.Group],
) -> None:
    """Every change of the batch ends as its request would have alone with ``error``; ``held``: the
    batch may still be applied for another LEADSTAGE_BATCH_WAIT (an add reconciles after that)."""
    await _end_each(
        runtime,
        members,
        sent,
        [JobOutcome(error=error) for _ in members],
        started,
        unknown=[unknown] * len(members),
        settle_s=runtime.settings.batch_wait_s if held else None,
        groups=groups,
    )


async def _end_each(
    runtime: Runtime,
    members: list[tuple[Start, JobFacts]],
    sent: list[LeadStageChange],
    outcomes: Sequence[JobOutcome],
    started: float,
    *,
    unknown: Sequence[bool | None],
    groups: Mapping[str, coalesce.Group],
    settle_s: float | None = None,
) -> None:
    """Each change of the batch ends by its own job's outcome through the single attempt's path
    (``_end_one``), and gives up its lease as soon as it has (``_ended``)."""
    await asyncio.gather(
        *(
            _ended(
                runtime,
                start,
                _end_one(
                    runtime,
                    start,
                    facts,
                    change,
                    outcome,
                    started,
                    unknown=change_unknown,
                    settle_s=settle_s,
                    group=groups.get(facts.job_id),
                ),
            )
            for (start, facts), change, outcome, change_unknown in zip(members, sent, outcomes, unknown, strict=True)
        )
    )


async def _ended(runtime: Runtime, start: Start, end: Awaitable[None]) -> None:
    """A change's ``end``, then its lease dropped: the heartbeat, finding its run over, would cancel
    the batch's one task while the other changes' ends are under way (left to a collection a lease
    later)."""
    await end
    lease = runtime.running.get(start.job_id)
    if lease is not None and lease.run == start.run:
        lease.end()
        del runtime.running[start.job_id]


async def _end_one(
    runtime: Runtime,
    start: Start,
    facts: JobFacts,
    sent: LeadStageChange,
    outcome: JobOutcome,
    started: float,
    *,
    unknown: bool | None = None,
    settle_s: float | None = None,
    group: coalesce.Group | None = None,
) -> None:
    """One change's end by its job's answer: the single attempt's finish path; the changes its job
    carried (``group``) end first, as a coalesced request's do (``carried_by`` this change)."""
    operation = facts.change.operation
    with (
        bind_job_context(facts.job_id, facts.idempotency_key, facts.account, start.attempt),
        tracing.attempt_span(
            start.traceparent, job_id=facts.job_id, account=facts.account, operation=operation, attempt=start.attempt
        ),
    ):
        stage_id: int | None = None
        error: RetryableError | PermanentError | None = None
        try:
            stage_id = outcome.lead_stage_id(sent)
        except (RetryableError, PermanentError) as failure:
            error = failure
        if group is not None:
            carried = CARRIAGE.set(("batch", facts.idempotency_key))
            try:
                if await coalesce.end(runtime, facts, start, group, started, stage_id=stage_id, error=error):
                    return  # none of the job's fields was this change's: superseded
            finally:
                CARRIAGE.reset(carried)
        if isinstance(error, RetryableError):
            if unknown is None:
                unknown = outcome_unknown(facts.change, error)
            await failed_attempt(
                runtime, facts, start, sent, error, started, outcome_unknown=unknown, settle_s=settle_s
            )
        elif isinstance(error, PermanentError):
            await permanent_failure(runtime, facts, start, sent, error, started)
        else:
            await succeeded(runtime, facts, start, sent, stage_id, started)
