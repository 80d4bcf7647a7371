"""The lead-stage change job: a thin function over the ledger, the iVvy client and the streams.

One run of ``process_change`` is one attempt (or none, when the ledger says "not now"):

1. ``begin`` (one Lua call) decides: already done, wait (backoff / lock / rate limit), superseded,
   exhausted, or go; "go" records the recovery point ``phase=posting`` and takes the stage lock.
2. An add whose previous attempt has an unknown outcome is reconciled first: a listed stage of the
   same name that no other add claimed is adopted instead of posting again.
3. The POST; its outcome is classified by ``worker.errors`` and recorded by ``finish`` (one Lua
   call) together with the results event, and the dead letter when it is terminal and failed.
4. A retryable failure re-schedules the arq job with ``Retry``; the ledger holds the real time
   of the next attempt, so an early wake-up (a crash, a redelivery) just waits again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from arq import Retry

from worker import metrics
from worker.backoff import backoff_seconds
from worker.change import LeadStageChange, parse_change
from worker.errors import (
    IvvyNoAnswer,
    IvvyRateLimited,
    LeadstageError,
    PermanentError,
    RetryableError,
    UnknownAccount,
)
from worker.ivvy import IvvyClient
from worker.ledger import Begin, Ledger, now_ms
from worker.logs import bind_job_context
from worker.results import Event, JobFacts, build_event
from worker.settings import Settings

log = structlog.get_logger("leadstage.job")

#: Waits for the rate limit or a stage lock up to this long happen inside the job; longer ones
#: hand the job back to arq, so a slot is not held idle.
IN_JOB_WAIT_MAX_S = 1.0


class Exhausted(PermanentError):
    """Out of attempts or past the maximum age."""

    error_code = "exhausted"


@dataclass
class Runtime:
    """What every job of one worker process shares, made once at start-up."""

    settings: Settings
    ledger: Ledger
    clients: Mapping[str, IvvyClient]
    worker_id: str
    running: set[str] = field(default_factory=set)
    rng: random.Random = field(default_factory=random.Random)


async def apply_lead_stage_change(ctx: dict[str, Any], job_id: str, account: str, change_json: str) -> str:
    """The arq job. Returns the ledger state the change reached (or ``waiting``)."""
    runtime: Runtime = ctx["runtime"]
    runtime.running.add(job_id)
    try:
        return await process_change(runtime, job_id, account, parse_change(orjson.loads(change_json)))
    finally:
        runtime.running.discard(job_id)


async def process_change(runtime: Runtime, job_id: str, account: str, change: LeadStageChange) -> str:
    settings = runtime.settings
    client = runtime.clients.get(account)
    rate_limit = client.account.rate_limit if client else settings.rate_limit
    begin = await _begin_when_allowed(runtime, job_id, account, change, rate_limit)
    source, enqueued_at, generation = begin.facts
    facts = JobFacts(job_id, job_id.partition(":")[2], account, change, source, enqueued_at, generation)
    with bind_job_context(job_id, facts.idempotency_key, account, begin.attempt):
        if begin.decision in ("missing", "done"):
            log.info("job.skipped", reason=begin.decision, state=begin.reason)
            return begin.reason or begin.decision
        if begin.decision == "superseded":
            await _finish(runtime, facts, "superseded", attempt=0, sent=None)
            return "superseded"
        if client is None:
            await _finish(runtime, facts, "failed", attempt=begin.attempt, sent=None, error=UnknownAccount(account))
            return "failed"
        unknown_before = begin.previous_phase in ("posting", "unknown")
        if begin.decision == "exhausted":
            return await _exhausted(runtime, client, facts, begin, unknown_before)
        return await _attempt(runtime, client, facts, begin, unknown_before)


async def _begin_when_allowed(
    runtime: Runtime, job_id: str, account: str, change: LeadStageChange, rate_limit: float
) -> Begin:
    """begin.lua, waiting in the job for short waits and deferring the job for long ones."""
    waited = 0.0
    while True:
        begin = await runtime.ledger.begin(job_id, account, change, runtime.worker_id, rate_limit)
        if begin.decision != "wait":
            return begin
        delay = begin.wait_ms / 1000
        if begin.reason in ("rate", "paused"):
            metrics.RATE_LIMIT_WAITS.labels(account).inc()
            metrics.RATE_LIMIT_WAIT_SECONDS.labels(account).inc(delay)
        if begin.reason == "locked":
            # The holder usually finishes within one request; poll sooner than its lock's expiry.
            delay = min(delay, 0.02 + runtime.rng.uniform(0, 0.03))
        if waited + delay > IN_JOB_WAIT_MAX_S:
            raise Retry(defer=delay + runtime.rng.uniform(0, 0.05))
        waited += delay
        await asyncio.sleep(delay)


async def _attempt(runtime: Runtime, client: IvvyClient, facts: JobFacts, begin: Begin, unknown_before: bool) -> str:
    change = facts.change
    sent = change.without(set(begin.dropped))
    started = time.monotonic()
    if change.operation == "add" and unknown_before:
        try:
            adopted = await _reconcile(runtime, client, facts)
        except RetryableError as error:
            # The earlier attempt is still unaccounted for: stay in the unknown phase.
            return await _failed_attempt(runtime, facts, begin.attempt, sent, error, started, outcome_unknown=True)
        except PermanentError as error:
            return await _permanent_failure(runtime, facts, begin.attempt, sent, error, started)
        if adopted is not None:
            await _finish(runtime, facts, "succeeded", attempt=begin.attempt, sent=sent, stage_id=adopted)
            return "succeeded"
    try:
        with metrics.IVVY_LATENCY.labels(facts.account, "addOrUpdateLeadStage").time():
            stage_id = await client.add_or_update_lead_stage(sent)
    except RetryableError as error:
        unknown = isinstance(error, IvvyNoAnswer) and error.outcome_unknown
        return await _failed_attempt(runtime, facts, begin.attempt, sent, error, started, outcome_unknown=unknown)
    except PermanentError as error:
        return await _permanent_failure(runtime, facts, begin.attempt, sent, error, started)
    metrics.ATTEMPTS.labels(facts.account, change.operation, "ok").inc()
    await _finish(
        runtime,
        facts,
        "succeeded",
        attempt=begin.attempt,
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
    raise Retry(defer=delay)


async def _exhausted(runtime: Runtime, client: IvvyClient, facts: JobFacts, begin: Begin, unknown_before: bool) -> str:
    """Out of attempts or too old: fail, unless an add of unknown outcome turns out to exist."""
    if facts.change.operation == "add" and unknown_before:
        try:
            adopted = await _reconcile(runtime, client, facts)
        except RetryableError as error:
            # Failing now could make a replay create a second stage: keep reconciling instead.
            return await _failed_attempt(
                runtime, facts, begin.attempt, facts.change, error, time.monotonic(), outcome_unknown=True
            )
        if adopted is not None:
            await _finish(runtime, facts, "succeeded", attempt=begin.attempt, sent=facts.change, stage_id=adopted)
            return "succeeded"
    exhausted = Exhausted(
        f"gave up after {begin.attempt} attempts"
        if begin.attempt >= runtime.settings.max_attempts
        else f"older than LEADSTAGE_MAX_AGE ({runtime.settings.max_age_s:g}s)"
    )
    await _finish(runtime, facts, "failed", attempt=begin.attempt, sent=None, error=exhausted)
    return "failed"


async def _reconcile(runtime: Runtime, client: IvvyClient, facts: JobFacts) -> int | None:
    """Find the stage an earlier attempt of this add may have created, and claim it."""
    with metrics.IVVY_LATENCY.labels(facts.account, "getLeadStageList").time():
        stages = await client.get_lead_stage_list()
    change = facts.change
    wanted = (change.name or "").casefold()
    candidates = sorted(s.id for s in stages if s.name.strip().casefold() == wanted and _compatible(s.raw, change))
    adopted = await runtime.ledger.claim(facts.account, facts.job_id, candidates)
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
        facts.account,
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
