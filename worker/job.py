"""The lead-stage change job: a thin function over the ledger, the iVvy client and the streams.

The worker (``worker.runner``) claims a due job with ``start.lua``, which also decides: already
done, wait (rescheduled in the queue), superseded, exhausted, or go; every decision that runs
begins a new ``run`` of the change, its fencing token: the scripts refuse a stale run, and the
worker cancels a run whose lease it could not renew before that lease ends. "go" takes the stage
lock and, unless the add must be reconciled first, records the recovery point ``phase=posting``.
This module does the rest of one run:

1. An add whose previous attempt has an unknown outcome is reconciled first: a listed stage of the
   same name, created after the add was first posted (``id_floor``) and claimed by no other add,
   is adopted instead of posting again; otherwise the recovery point is written just before the
   POST (``Ledger.mark_posting``).
2. The POST; its outcome is classified by ``worker.core.errors`` (for an add, any 5xx or 24322 may have
   been committed: unknown) and recorded by ``finish.lua`` together with the results event (and
   the dead letter when it is terminal and failed), which also puts a retry back on the queue.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from worker import coalesce
from worker.core import keys, metrics, tracing
from worker.core.change import parse_change
from worker.core.errors import Exhausted, PermanentError, RedisNotReplicated, RetryableError, StaleRun, UnknownAccount
from worker.core.ledger import Start
from worker.core.logs import bind_job_context, get_logger
from worker.core.results import JobFacts
from worker.core.states import UNACCOUNTED, Decision, Outcome
from worker.ivvy import IvvyClient
from worker.recording import CARRIAGE, failed_attempt, finish, outcome_unknown, permanent_failure, succeeded
from worker.runtime import Runtime

log = get_logger("leadstage.job")


async def apply_lead_stage_change(ctx: dict[str, Any], job_id: str, start: Start) -> Outcome:
    """The job, for a start that has work to do; returns the state the change reached."""
    runtime: Runtime = ctx["runtime"]
    account, idempotency_key = keys.split_job_id(job_id)
    change = parse_change(orjson.loads(start.change_json))
    source, enqueued_at, generation = start.facts
    facts = JobFacts(job_id, idempotency_key, account, change, source, enqueued_at, generation)
    client = runtime.clients.get(account)
    with (
        bind_job_context(job_id, idempotency_key, account, start.attempt),
        tracing.attempt_span(
            start.traceparent, job_id=job_id, account=account, operation=change.operation, attempt=start.attempt
        ),
    ):
        if start.decision is Decision.SUPERSEDED:
            await finish(runtime, facts, start, Outcome.SUPERSEDED, sent=None)
            return Outcome.SUPERSEDED
        if client is None:
            await finish(runtime, facts, start, Outcome.FAILED, sent=None, error=UnknownAccount(account))
            return Outcome.FAILED
        if start.decision is Decision.EXHAUSTED:
            return await _exhausted(runtime, client, facts, start)
        return await _attempt(runtime, client, facts, start)


def _must_reconcile(facts: JobFacts, start: Start) -> bool:
    return facts.change.operation == "add" and start.previous_phase in UNACCOUNTED


async def _attempt(runtime: Runtime, client: IvvyClient, facts: JobFacts, start: Start) -> Outcome:
    settings = runtime.settings
    change = facts.change
    sent = change.without(set(start.dropped))
    await runtime.wait_for_slot(facts.job_id)  # a reconcile's listing is a request too
    started = time.monotonic()
    if _must_reconcile(facts, start):
        try:
            adopted = await _reconcile(runtime, client, facts, start)
        except RetryableError as error:
            # The earlier attempt is still unaccounted for: stay in the unknown phase.
            return await failed_attempt(runtime, facts, start, sent, error, started, outcome_unknown=True)
        except PermanentError as error:
            return await permanent_failure(runtime, facts, start, sent, error, started)
        if adopted is not None:
            await finish(runtime, facts, start, Outcome.SUCCEEDED, sent=sent, stage_id=adopted)
            return Outcome.SUCCEEDED
    try:
        if not _must_reconcile(facts, start):
            if not start.replicated:
                raise RedisNotReplicated(
                    "the recovery point before the POST",
                    0,
                    settings.redis_min_replicas,
                    settings.redis_replica_timeout_s,
                )
        elif not await runtime.ledger.mark_posting(facts.job_id, start.run):
            raise StaleRun(facts.job_id, start.run)
    except RedisNotReplicated as error:
        # A failover now could lose the recovery point, and another worker post the add again:
        # nothing is sent until Redis can promise it.
        return await failed_attempt(runtime, facts, start, sent, error, started, outcome_unknown=False)
    runtime.check_lease(facts.job_id)
    group = await coalesce.gather_group(runtime, facts, start) if change.operation == "update" else None
    if group is not None:
        CARRIAGE.set(("coalesced", facts.idempotency_key))
        sent = group.sent
        if group.empty:
            await coalesce.end(runtime, facts, start, group, started)
            return Outcome.SUPERSEDED
    try:
        with metrics.IVVY_LATENCY.labels(facts.account, "addOrUpdateLeadStage").time():
            stage_id = await client.add_or_update_lead_stage(sent)
    except RetryableError as error:
        if await coalesce.end(runtime, facts, start, group, started, error=error):
            return Outcome.SUPERSEDED
        return await failed_attempt(
            runtime, facts, start, sent, error, started, outcome_unknown=outcome_unknown(change, error)
        )
    except PermanentError as error:
        if await coalesce.end(runtime, facts, start, group, started, error=error):
            return Outcome.SUPERSEDED
        return await permanent_failure(runtime, facts, start, sent, error, started)
    if await coalesce.end(runtime, facts, start, group, started, stage_id=stage_id):
        return Outcome.SUPERSEDED
    return await succeeded(runtime, facts, start, sent, stage_id, started)


async def _exhausted(runtime: Runtime, client: IvvyClient, facts: JobFacts, start: Start) -> Outcome:
    """Out of attempts or too old: fail, unless an add of unknown outcome turns out to exist."""
    if _must_reconcile(facts, start):
        try:
            adopted = await _reconcile(runtime, client, facts, start)
        except RetryableError as error:
            # Failing now could make a replay create a second stage: keep reconciling instead.
            return await failed_attempt(
                runtime, facts, start, facts.change, error, time.monotonic(), outcome_unknown=True
            )
        if adopted is not None:
            await finish(runtime, facts, start, Outcome.SUCCEEDED, sent=facts.change, stage_id=adopted)
            return Outcome.SUCCEEDED
    exhausted = Exhausted(
        f"gave up after {start.attempt} attempts"
        if start.attempt >= runtime.settings.max_attempts
        else f"older than LEADSTAGE_MAX_AGE ({runtime.settings.max_age_s:g}s)"
    )
    await finish(runtime, facts, start, Outcome.FAILED, sent=None, error=exhausted)
    return Outcome.FAILED


@tracing.traced("reconcile")
async def _reconcile(runtime: Runtime, client: IvvyClient, facts: JobFacts, start: Start) -> int | None:
    """Find the stage an earlier attempt of this add may have created, and claim it.

    Only what cannot have changed since that attempt decides: the name it was created with (the
    list's filter and ours), an id above every stage claimed before the add was first posted
    (iVvy's ids grow), and no claim by another add. Colour and applyTo are not compared: an update
    may have changed them in the meantime.
    """
    with metrics.IVVY_LATENCY.labels(facts.account, "getLeadStageList").time():
        stages = await client.get_lead_stage_list(name=facts.change.name)
    wanted = (facts.change.name or "").casefold()
    floor = await runtime.ledger.id_floor(facts.job_id)
    candidates = sorted(s.id for s in stages if s.name.strip().casefold() == wanted and s.id > floor)
    adopted = await runtime.ledger.adopt(facts.account, facts.job_id, start.run, candidates)
    log.info("job.reconciled", candidates=len(candidates), adopted=adopted, id_floor=floor)
    return adopted
