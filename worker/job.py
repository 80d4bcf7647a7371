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

import asyncio
import random
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Unpack

import orjson

from worker import coalesce
from worker.backoff import backoff_seconds
from worker.core import keys, metrics, tracing
from worker.core.change import LeadStageChange, parse_change
from worker.core.errors import (
    Exhausted,
    IvvyErrorDetails,
    IvvyNoAnswer,
    IvvyRateLimited,
    IvvyUnavailable,
    LeadstageError,
    PermanentError,
    RedisNotReplicated,
    RetryableError,
    RetryAfterTooLong,
    StaleRun,
    UnknownAccount,
)
from worker.core.ledger import Ledger, Start
from worker.core.logs import bind_job_context, get_logger
from worker.core.results import JobFacts, Verdict, build_event
from worker.core.settings import Settings
from worker.core.states import UNACCOUNTED, Decision, Outcome
from worker.ivvy import IvvyClient

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

log = get_logger("leadstage.job")


@dataclass
class Lease:
    """One running attempt as its worker knows it: the run it holds, until when (this host's
    monotonic clock) its lease is known to last, and the timer that cancels the attempt before
    that moment unless the heartbeat renews the lease first."""

    run: int
    confirmed_until: float
    #: From when (monotonic) it may send: the claim's answer plus the wait for its slot (never early).
    send_at: float = 0.0
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    #: Set when the attempt was cancelled for its lease (not by a shutdown).
    lost: bool = False

    def confirm(self, until: float, margin_s: float) -> None:
        """The lease holds until ``until``: cancel the attempt ``margin_s`` before, unless renewed."""
        self.confirmed_until = until
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + (until - margin_s - time.monotonic()), self.give_up)

    def give_up(self) -> None:
        if self.task is not None and not self.task.done():
            self.lost = True
            self.task.cancel()

    def end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


@dataclass
class Runtime:
    """What every job of one worker process shares, made once at start-up."""

    settings: Settings
    ledger: Ledger
    clients: Mapping[str, IvvyClient]
    worker_id: str
    running: dict[str, Lease] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def wall_ms(self) -> int:
        """This host's clock (with the test offset): event times only, never a decision."""
        return int((time.time() + self.settings.clock_offset_s) * 1000)

    async def guarded(
        self, work: Awaitable[object], leases: Mapping[str, Lease], timeout_s: float, log: FilteringBoundLogger,
        what: str, **context: object,
    ) -> None:  # fmt: skip
        """A job's (or a batch's, ``what`` naming its log lines) work, never raising: whatever it could
        not record, its leases bring back; they end with it."""
        try:
            await asyncio.wait_for(work, timeout_s)
        except asyncio.CancelledError:
            # By its lease timer (another worker may take over now), or by the stop past its grace: not
            # raised, as arq's close gathers the tasks and one cancelled would cut its shutdown short.
            lost = any(lease.lost for lease in leases.values())
            log.warning(f"{what}.lease_lost" if lost else f"{what}.stopped", **context)
        except (LeadstageError, TimeoutError) as error:
            log.warning(f"{what}.interrupted", error=str(error) or type(error).__name__, **context)
        except Exception:  # a bug in one job must not stop the worker; logged with its traceback
            log.exception(f"{what}.crashed", **context)
        finally:
            for job_id, lease in leases.items():
                lease.end()
                if self.running.get(job_id) is lease:
                    del self.running[job_id]

    async def wait_for_slot(self, job_id: str) -> None:
        """Until the rate-limit slot the run's claim took opens; ``StaleRun`` unless its lease holds then."""
        lease = self.running.get(job_id)
        await asyncio.sleep(max(0.0, lease.send_at - time.monotonic()) if lease is not None else 0.0)
        self.check_lease(job_id)

    def check_lease(self, job_id: str) -> None:
        """``StaleRun`` unless this run's lease is still known to hold, with the margin to spare."""
        lease = self.running.get(job_id)
        if lease is None or lease.confirmed_until - self.settings.lease_margin_s <= time.monotonic():
            raise StaleRun(job_id, lease.run if lease else 0)


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
            await _finish(runtime, facts, start, Outcome.SUPERSEDED, sent=None)
            return Outcome.SUPERSEDED
        if client is None:
            await _finish(runtime, facts, start, Outcome.FAILED, sent=None, error=UnknownAccount(account))
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
            return await _failed_attempt(runtime, facts, start, sent, error, started, outcome_unknown=True)
        except PermanentError as error:
            return await _permanent_failure(runtime, facts, start, sent, error, started)
        if adopted is not None:
            await _finish(runtime, facts, start, Outcome.SUCCEEDED, sent=sent, stage_id=adopted)
            return Outcome.SUCCEEDED
    try:
        if not _must_reconcile(facts, start):
            if not start.replicated:
                raise RedisNotReplicated("the recovery point before the POST", 0, settings.redis_min_replicas,
                                         settings.redis_replica_timeout_s)  # fmt: skip
        elif not await runtime.ledger.mark_posting(facts.job_id, start.run):
            raise StaleRun(facts.job_id, start.run)
    except RedisNotReplicated as error:
        # A failover now could lose the recovery point, and another worker post the add again:
        # nothing is sent until Redis can promise it.
        return await _failed_attempt(runtime, facts, start, sent, error, started, outcome_unknown=False)
    runtime.check_lease(facts.job_id)
    group = await coalesce.gather_group(runtime, facts, start) if change.operation == "update" else None
    if group is not None:
        coalesce.CARRIAGE.set(("coalesced", facts.idempotency_key))
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
        return await _failed_attempt(
            runtime, facts, start, sent, error, started, outcome_unknown=_outcome_unknown(change, error)
        )
    except PermanentError as error:
        if await coalesce.end(runtime, facts, start, group, started, error=error):
            return Outcome.SUPERSEDED
        return await _permanent_failure(runtime, facts, start, sent, error, started)
    if await coalesce.end(runtime, facts, start, group, started, stage_id=stage_id):
        return Outcome.SUPERSEDED
    metrics.ATTEMPTS.labels(facts.account, change.operation, "ok").inc()
    await _finish(
        runtime, facts, start, Outcome.SUCCEEDED, sent=sent, stage_id=stage_id, started=started,
        created=change.operation == "add",
    )  # fmt: skip
    return Outcome.SUCCEEDED


def _outcome_unknown(change: LeadStageChange, error: RetryableError) -> bool:
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


async def _permanent_failure(
    runtime: Runtime, facts: JobFacts, start: Start, sent: LeadStageChange, error: PermanentError, started: float
) -> Outcome:
    metrics.ATTEMPTS.labels(facts.account, facts.change.operation, "permanent").inc()
    await _finish(runtime, facts, start, Outcome.FAILED, sent=sent, error=error, started=started)
    return Outcome.FAILED


async def _failed_attempt(
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
        await _finish(runtime, facts, start, Outcome.FAILED, sent=sent, error=failure, started=started,
                      outcome_unknown=outcome_unknown)  # fmt: skip
        return Outcome.FAILED
    delay = backoff_seconds(start.attempt, base=settings.backoff_base_s, cap=settings.backoff_max_s,
                            retry_after=min(wait_s, settings.retry_after_max_s), rng=runtime.rng)  # fmt: skip
    if must_reconcile:
        # A request of unknown outcome may still be applied late: give it that long to land before
        # the reconcile looks for it.
        delay = max(delay, settings.request_timeout_s if settle_s is None else settle_s)
    delay_ms = int(delay * 1000)
    await _finish(
        runtime, facts, start, Outcome.RETRYING, sent=sent, error=error, started=started, delay_ms=delay_ms,
        outcome_unknown=outcome_unknown, pause_ms=delay_ms if error.pauses_account else None,
    )  # fmt: skip
    return Outcome.RETRYING


async def _exhausted(runtime: Runtime, client: IvvyClient, facts: JobFacts, start: Start) -> Outcome:
    """Out of attempts or too old: fail, unless an add of unknown outcome turns out to exist."""
    if _must_reconcile(facts, start):
        try:
            adopted = await _reconcile(runtime, client, facts, start)
        except RetryableError as error:
            # Failing now could make a replay create a second stage: keep reconciling instead.
            return await _failed_attempt(
                runtime, facts, start, facts.change, error, time.monotonic(), outcome_unknown=True
            )
        if adopted is not None:
            await _finish(runtime, facts, start, Outcome.SUCCEEDED, sent=facts.change, stage_id=adopted)
            return Outcome.SUCCEEDED
    exhausted = Exhausted(
        f"gave up after {start.attempt} attempts"
        if start.attempt >= runtime.settings.max_attempts
        else f"older than LEADSTAGE_MAX_AGE ({runtime.settings.max_age_s:g}s)"
    )
    await _finish(runtime, facts, start, Outcome.FAILED, sent=None, error=exhausted)
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


async def _finish(
    runtime: Runtime,
    facts: JobFacts,
    start: Start,
    event: Outcome,
    *,
    started: float | None = None,
    created: bool = False,
    delay_ms: int = 0,
    outcome_unknown: bool = False,
    pause_ms: int | None = None,
    **verdict: Unpack[Verdict],
) -> None:
    duration = 0 if started is None else int((time.monotonic() - started) * 1000)
    sent_as, carried_by = coalesce.CARRIAGE.get() or ("alone", None)
    if verdict.get("stage_id") is None and facts.change.id is not None and event == Outcome.SUCCEEDED:
        verdict["stage_id"] = facts.change.id
    stage_id, error = verdict.get("stage_id"), verdict.get("error")
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
        pause_ms=pause_ms,
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
