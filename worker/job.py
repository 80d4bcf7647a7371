"""The lead-stage change job: a thin function over the ledger, the iVvy client and the streams.

The worker (``worker.runner``) claims a due job with ``start.lua``, which also decides: already
done, wait (rescheduled in the queue), superseded, exhausted, or go; "go" records the recovery
point ``phase=posting`` and takes the stage lock. This module does the rest of one attempt:

1. An add whose previous attempt has an unknown outcome is reconciled first: a listed stage of the
   same name that no other add claimed is adopted instead of posting again.
2. The POST; its outcome is classified by ``worker.errors`` and recorded by ``finish.lua``
   together with the results event (and the dead letter when it is terminal and failed), which
   also puts a retry back on the queue at its time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from worker import keys, metrics
from worker.backoff import backoff_seconds
from worker.change import LeadStageChange, parse_change
from worker.errors import (
    Exhausted,
    IvvyNoAnswer,
    IvvyRateLimited,
    LeadstageError,
    PermanentError,
    RetryableError,
    UnknownAccount,
)
from worker.ivvy import IvvyClient
from worker.ledger import Ledger, Start, now_ms
from worker.logs import bind_job_context
from worker.results import Event, JobFacts, build_event
from worker.settings import Settings

log = structlog.get_logger("leadstage.job")


@dataclass
class Runtime:
    """What every job of one worker process shares, made once at start-up."""

    settings: Settings
    ledger: Ledger
    clients: Mapping[str, IvvyClient]
    worker_id: str
    running: set[str] = field(default_factory=set)
    rng: random.Random = field(default_factory=random.Random)

    def rate_limit(self, account: str) -> float:
        client = self.clients.get(account)
        return client.account.rate_limit if client else self.settings.rate_limit


async def apply_lead_stage_change(ctx: dict[str, Any], job_id: str, start: Start) -> str:
    """The job, for a start that has work to do; returns the state the change reached."""
    runtime: Runtime = ctx["runtime"]
    account, idempotency_key = keys.split_job_id(job_id)
    change = parse_change(orjson.loads(start.change_json))
    source, enqueued_at, generation = start.facts
    facts = JobFacts(job_id, idempotency_key, account, change, source, enqueued_at, generation)
    client = runtime.clients.get(account)
    with bind_job_context(job_id, idempotency_key, account, start.attempt):
        if start.decision == "superseded":
            await _finish(runtime, facts, "superseded", attempt=0, sent=None)
            return "superseded"
        if client is None:
            await _finish(runtime, facts, "failed", attempt=start.attempt, sent=None, error=UnknownAccount(account))
            return "failed"
        unknown_before = start.previous_phase in ("posting", "unknown")
        if start.decision == "exhausted":
            return await _exhausted(runtime, client, facts, start, unknown_before)
        return await _attempt(runtime, client, facts, start, unknown_before)


async def _attempt(runtime: Runtime, client: IvvyClient, facts: JobFacts, start: Start, unknown_before: bool) -> str:
    change = facts.change
    sent = change.without(set(start.dropped))
    started = time.monotonic()
    if change.operation == "add" and unknown_before:
        try:
            adopted = await _reconcile(runtime, client, facts)
        except RetryableError as error:
            # The earlier attempt is still unaccounted for: stay in the unknown phase.
            return await _failed_attempt(runtime, facts, start.attempt, sent, error, started, outcome_unknown=True)
        except PermanentError as error:
            return await _permanent_failure(runtime, facts, start.attempt, sent, error, started)
        if adopted is not None:
            await _finish(runtime, facts, "succeeded", attempt=start.attempt, sent=sent, stage_id=adopted)
            return "succeeded"
    try:
        with metrics.IVVY_LATENCY.labels(facts.account, "addOrUpdateLeadStage").time():
            stage_id = await client.add_or_update_lead_stage(sent)
    except RetryableError as error:
        unknown = isinstance(error, IvvyNoAnswer) and error.outcome_unknown
        return await _failed_attempt(runtime, facts, start.attempt, sent, error, started, outcome_unknown=unknown)
    except PermanentError as error:
        return await _permanent_failure(runtime, facts, start.attempt, sent, error, started)
    metrics.ATTEMPTS.labels(facts.account, change.operation, "ok").inc()
    await _finish(
        runtime,
        facts,
        "succeeded",
        attempt=start.attempt,
        sent=sent,
        stage_id=stage_id,
        started=started,
        created=change.operation == "add",
    )
    return "succeeded"


async def _permanent_failure(
    runtime: Runtime, facts: JobFacts, attempt: int, sent: LeadStageChange, error: PermanentError, started: float
) -> str:
    metrics.ATTEMPTS.labels(facts.account, facts.change.operation, "permanent").inc()
    await _finish(runtime, facts, "failed", attempt=attempt, sent=sent, error=error, started=started)
    return "failed"


async def _failed_attempt(
    runtime: Runtime,
    facts: JobFacts,
    attempt: int,
    sent: LeadStageChange,
    error: RetryableError,
    started: float,
    *,
    outcome_unknown: bool,
) -> str:
    """A retryable failure: schedule the next attempt, or fail when out of attempts.

    ``outcome_unknown``: iVvy may have applied some attempt of this change; an add in that state
    is never failed here, so that the next run reconciles it first.
    """
    settings = runtime.settings
    metrics.ATTEMPTS.labels(facts.account, facts.change.operation, "retryable").inc()
    must_reconcile = outcome_unknown and facts.change.operation == "add"
    if attempt >= settings.max_attempts and not must_reconcile:
        await _finish(runtime, facts, "failed", attempt=attempt, sent=sent, error=error, started=started)
        return "failed"
    delay = backoff_seconds(
        attempt,
        base=settings.backoff_base_s,
        cap=settings.backoff_max_s,
        retry_after=error.retry_after,
        rng=runtime.rng,
    )
    if must_reconcile:
        # A request that timed out may still be applied late: give it a request timeout to land
        # before the reconcile looks for it.
        delay = max(delay, settings.request_timeout_s)
    now = now_ms()
    pause_until = now + int(delay * 1000) if isinstance(error, IvvyRateLimited) else None
    await _finish(
        runtime,
        facts,
        "retrying",
        attempt=attempt,
        sent=sent,
        error=error,
        started=started,
        next_at_ms=now + int(delay * 1000),
        outcome_unknown=outcome_unknown,
        pause_until_ms=pause_until,
    )
    return "retrying"


async def _exhausted(runtime: Runtime, client: IvvyClient, facts: JobFacts, start: Start, unknown_before: bool) -> str:
    """Out of attempts or too old: fail, unless an add of unknown outcome turns out to exist."""
    if facts.change.operation == "add" and unknown_before:
        try:
            adopted = await _reconcile(runtime, client, facts)
        except RetryableError as error:
            # Failing now could make a replay create a second stage: keep reconciling instead.
            return await _failed_attempt(
                runtime, facts, start.attempt, facts.change, error, time.monotonic(), outcome_unknown=True
            )
        if adopted is not None:
            await _finish(runtime, facts, "succeeded", attempt=start.attempt, sent=facts.change, stage_id=adopted)
            return "succeeded"
    exhausted = Exhausted(
        f"gave up after {start.attempt} attempts"
        if start.attempt >= runtime.settings.max_attempts
        else f"older than LEADSTAGE_MAX_AGE ({runtime.settings.max_age_s:g}s)"
    )
    await _finish(runtime, facts, "failed", attempt=start.attempt, sent=None, error=exhausted)
    return "failed"


async def _reconcile(runtime: Runtime, client: IvvyClient, facts: JobFacts) -> int | None:
    """Find the stage an earlier attempt of this add may have created, and claim it."""
    with metrics.IVVY_LATENCY.labels(facts.account, "getLeadStageList").time():
        stages = await client.get_lead_stage_list(name=facts.change.name)
    change = facts.change
    wanted = (change.name or "").casefold()
    candidates = sorted(s.id for s in stages if s.name.strip().casefold() == wanted and _compatible(s.raw, change))
    adopted = await runtime.ledger.adopt(facts.account, facts.job_id, candidates)
    log.info("job.reconciled", candidates=len(candidates), adopted=adopted)
    return adopted


def _compatible(listed: Mapping[str, Any], change: LeadStageChange) -> bool:
    """A listed stage can be ours only if the fields the list shows agree with the change."""
    colour, apply_to = listed.get("colour"), listed.get("applyTo")
    if change.colour is not None and isinstance(colour, str) and colour.lower() != change.colour:
        return False
    return not (change.apply_to is not None and apply_to is not None and str(apply_to) != str(change.apply_to))


async def _finish(
    runtime: Runtime,
    facts: JobFacts,
    event: Event,
    *,
    attempt: int,
    sent: LeadStageChange | None,
    stage_id: int | None = None,
    error: LeadstageError | None = None,
    started: float | None = None,
    created: bool = False,
    next_at_ms: int = 0,
    outcome_unknown: bool = False,
    pause_until_ms: int | None = None,
) -> None:
    finished = now_ms()
    duration = 0 if started is None else int((time.monotonic() - started) * 1000)
    if stage_id is None and facts.change.id is not None and event == "succeeded":
        stage_id = facts.change.id
    fields = build_event(
        event,
        facts,
        attempt=attempt,
        finished_at_ms=finished,
        duration_ms=duration,
        sent=sent,
        stage_id=stage_id,
        error=error,
    )
    history = {k: fields[k] for k in ("event", "attempt", "finished_at", "http_status", "error_code", "error_message")}
    written = await runtime.ledger.finish(
        facts.job_id,
        facts.change,
        event=fields,
        history=history,
        next_at_ms=next_at_ms,
        outcome_unknown=outcome_unknown,
        pause_until_ms=pause_until_ms,
        created_stage_id=stage_id if created else None,
    )
    if written and event != "retrying":
        metrics.CHANGES.labels(facts.account, event).inc()
        if event == "failed":
            metrics.DEAD_LETTERED.labels(facts.account).inc()
    log.info(
        "job.attempt_finished" if event == "retrying" else "job.finished",
        outcome=event,
        stage_id=stage_id,
        error_code=fields["error_code"] or None,
        recorded=written,
    )
