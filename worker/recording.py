"""How an attempt ends, recorded: ``finish`` writes its event with finish.lua (the retry's
schedule, the dead letter); ``succeeded`` after iVvy applied a request, ``failed_attempt`` decides
retry or dead letter after a retryable failure, ``permanent_failure`` dead-letters;
``outcome_unknown`` says whether iVvy may have applied a request it did not confirm. Shared by a
change sent alone (``worker.job``), the changes a request carries (``worker.coalesce``) and a
batch's (``worker.batching``).
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Literal, Unpack

from worker.backoff import backoff_seconds
from worker.core import metrics, tracing
from worker.core.change import LeadStageChange
from worker.core.errors import (
    IvvyErrorDetails,
    IvvyNoAnswer,
    IvvyRateLimited,
    IvvyUnavailable,
    PermanentError,
    RetryableError,
    RetryAfterTooLong,
)
from worker.core.ledger import Start
from worker.core.logs import get_logger
from worker.core.results import JobFacts, Verdict, build_event
from worker.core.states import Outcome
from worker.runtime import Runtime

log = get_logger("leadstage.job")

SentAs = Literal["alone", "coalesced", "batch"]
#: How the change whose run this task is finishing was sent, and by which key's request: unset
#: for a change sent alone (its own key).
CARRIAGE: ContextVar[tuple[SentAs, str] | None] = ContextVar("leadstage_carriage", default=None)


def outcome_unknown(change: LeadStageChange, error: RetryableError) -> bool:
    """Whether iVvy may have applied the request although it did not say so.

    No answer after the request was sent: unknown. For an add, also every 5xx and 24322: a gateway
    can answer 502/504 after the backend committed, and posting again would add a second stage
    (an update posted twice sets the same values, so its 5xx is simply retried).
    """
    if isinstance(error, IvvyNoAnswer):
        return error.outcome_unknown
    if change.operation == "add" and isinstance(error, IvvyUnavailable) and not isinstance(error, IvvyRateLimited):
        return (error.http_status or 0) >= 500 or error.specific_code is not None
    return False


async def succeeded(
    runtime: Runtime, facts: JobFacts, start: Start, sent: LeadStageChange, stage_id: int | None, started: float
) -> Outcome:
    """iVvy applied the request ``sent`` (an add created ``stage_id``)."""
    operation = facts.change.operation
    metrics.ATTEMPTS.labels(facts.account, operation, "ok").inc()
    created = operation == "add"
    await finish(
        runtime, facts, start, Outcome.SUCCEEDED, sent=sent, stage_id=stage_id, started=started, created=created
    )
    return Outcome.SUCCEEDED


async def permanent_failure(
    runtime: Runtime, facts: JobFacts, start: Start, sent: LeadStageChange, error: PermanentError, started: float
) -> Outcome:
    metrics.ATTEMPTS.labels(facts.account, facts.change.operation, "permanent").inc()
    await finish(runtime, facts, start, Outcome.FAILED, sent=sent, error=error, started=started)
    return Outcome.FAILED


async def failed_attempt(
    runtime: Runtime,
    facts: JobFacts,
    start: Start,
    sent: LeadStageChange,
    error: RetryableError,
    started: float,
    *,
    outcome_unknown: bool,
    settle_s: float | None = None,
) -> Outcome:
    """A retryable failure: schedule the next attempt, or fail when out of attempts.

    ``outcome_unknown``: iVvy may have applied some attempt of this change; an add in that state
    is never failed here, so that the next run reconciles it first, once the request may no longer
    land: after the request timeout, or ``settle_s`` (a batch that may still be applied).
    """
    settings = runtime.settings
    metrics.ATTEMPTS.labels(facts.account, facts.change.operation, "retryable").inc()
    must_reconcile = outcome_unknown and facts.change.operation == "add"
    # Failed for good, a request of unknown outcome may still land: its stage stays locked as long.
    wait_s = error.retry_after or 0.0
    if (wait_s > settings.retry_after_max_s or start.attempt >= settings.max_attempts) and not must_reconcile:
        too_long = wait_s > settings.retry_after_max_s
        failure = RetryAfterTooLong(wait_s, settings.retry_after_max_s, str(error)) if too_long else error
        await finish(
            runtime,
            facts,
            start,
            Outcome.FAILED,
            sent=sent,
            error=failure,
            started=started,
            outcome_unknown=outcome_unknown,
        )
        return Outcome.FAILED
    delay = backoff_seconds(
        start.attempt,
        base=settings.backoff_base_s,
        cap=settings.backoff_max_s,
        retry_after=min(wait_s, settings.retry_after_max_s),
        rng=runtime.rng,
    )
    if must_reconcile:
        # A request of unknown outcome may still be applied late: give it that long to land before
        # the reconcile looks for it.
        delay = max(delay, settings.request_timeout_s if settle_s is None else settle_s)
    delay_ms = int(delay * 1000)
    await finish(
        runtime,
        facts,
        start,
        Outcome.RETRYING,
        sent=sent,
        error=error,
        started=started,
        delay_ms=delay_ms,
        outcome_unknown=outcome_unknown,
    )
    return Outcome.RETRYING


async def finish(
    runtime: Runtime,
    facts: JobFacts,
    start: Start,
    event: Outcome,
    *,
    started: float | None = None,
    created: bool = False,
    delay_ms: int = 0,
    outcome_unknown: bool = False,
    **verdict: Unpack[Verdict],
) -> None:
    """Record the end of this run of the change: ``event`` and its fields, and for a retry its delay
    (for the whole account when the error is about the account: ``pauses_account``)."""
    duration = 0 if started is None else int((time.monotonic() - started) * 1000)
    sent_as, carried_by = CARRIAGE.get() or ("alone", None)
    if verdict.get("stage_id") is None and facts.change.id is not None and event == Outcome.SUCCEEDED:
        verdict["stage_id"] = facts.change.id
    stage_id, error = verdict.get("stage_id"), verdict.get("error")
    pauses = event is Outcome.RETRYING and isinstance(error, RetryableError) and error.pauses_account
    fields = build_event(
        event,
        facts,
        attempt=start.attempt,
        finished_at_ms=runtime.wall_ms(),
        duration_ms=duration,
        sent_as=sent_as,
        carried_by=carried_by,
        **verdict,
    )
    tracing.record_outcome(fields)
    history = {k: fields[k] for k in ("event", "attempt", "finished_at", "http_status", "error_code", "error_message")}
    history["run"] = str(start.run)
    finished = await runtime.ledger.finish(
        facts.job_id,
        start.run,
        facts.change,
        event=fields,
        history=history,
        delay_ms=delay_ms,
        outcome_unknown=outcome_unknown,
        pause_ms=delay_ms if pauses else None,
        created_stage_id=stage_id if created else None,
    )
    if not finished.replicated:
        log.warning("job.finish_not_replicated", outcome=event, replicas=runtime.settings.redis_min_replicas)
    if finished.recorded and event != Outcome.RETRYING:
        metrics.CHANGES.labels(facts.account, event).inc()
        if fields["sent_as"]:
            metrics.CHANGES_SENT.labels(facts.account, fields["sent_as"]).inc()
        if event == Outcome.FAILED:
            metrics.DEAD_LETTERED.labels(facts.account).inc()
    log.info(
        "job.attempt_finished" if event == Outcome.RETRYING else "job.finished",
        outcome=event,
        stage_id=stage_id,
        error_code=fields["error_code"] or None,
        http_status=error.http_status if isinstance(error, IvvyErrorDetails) else None,
        recorded=finished.recorded,
        refused_because=finished.refused_because or None,
    )
