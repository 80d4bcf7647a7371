"""iVvy's batch namespace: up to 200 calls in one request, their results polled, and each job's
answer read exactly as the single call's (``worker.ivvy.classify_answer``).

* ``run`` sends the jobs and returns the batch's ``asyncId``. It is a write: with no answer its
  outcome is unknown (``IvvyNoAnswer.outcome_unknown``), as a single call's is.
* ``progress`` is the share done, 0 to 100; ``results`` one ``JobOutcome`` per job, in the jobs'
  order, once the batch is done (``BatchNotReady`` before: 24114). An unknown batch (24115 from
  results, 24105 from progress: never accepted, or past iVvy's two days), or results that do not
  answer the jobs sent (another count, another call), are ``BatchGone``.
* ``wait_for_results`` polls: ``progress`` until it says 100, sleeping in between for what the
  progress so far predicts is left (within a floor and a cap), then ``results`` once. Given the
  account's ``ReadyEstimate`` (how soon its last batch was done, per job), it first waits that long
  and asks for the ``results`` directly (a batch done by then costs no progress poll), polling
  progress as above only if they are not ready yet; a poll that
  fails for a retryable reason (429, 5xx, no answer) is a read, asked again after a backoff that
  honours ``Retry-After``. Past its deadline it raises ``BatchNotReady``: the batch may still run.

docs/contract.md: Batches says how the worker uses these.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.backoff import backoff_seconds
from worker.core.change import LeadStageChange
from worker.core.errors import (
    BatchGone,
    BatchNotReady,
    IvvyErrorDetails,
    IvvyUnavailable,
    LeadstageError,
    PermanentError,
    RetryableError,
)
from worker.core.settings import BATCH_MAX_JOBS
from worker.ivvy import IvvyClient, classify_answer, excerpt, lead_stage_id

#: iVvy's specific codes of the batch namespace.
NOT_COMPLETED_CODE = 24114
UNKNOWN_BATCH_CODES = frozenset({24105, 24115})
#: A batch whose results were ready at the first ask: the next is asked this much sooner (its share).
SOONER = 0.8


@dataclass(frozen=True, slots=True)
class BatchJob:
    """One call inside a batch."""

    namespace: str
    action: str
    params: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "action": self.action, "params": dict(self.params)}


def lead_stage_job(change: LeadStageChange) -> BatchJob:
    """The batch job of addOrUpdateLeadStage for ``change``: the body a single call would post."""
    return BatchJob("crm", "addOrUpdateLeadStage", change.body())


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What iVvy answered one job: its decoded answer, or the error that answer means (classified
    as a single call's: retryable or permanent)."""

    answer: Any = None
    error: RetryableError | PermanentError | None = None

    def lead_stage_id(self, change: LeadStageChange) -> int:
        """The stage id of an addOrUpdateLeadStage job for ``change``, or raise its error."""
        if self.error is not None:
            raise self.error
        return lead_stage_id(self.answer, change)


def job_outcome(response: Any) -> JobOutcome:
    """Classify one job's ``response`` from the results (its body only: no status, no headers)."""
    try:
        return JobOutcome(answer=classify_answer(response, None, {}, raw=repr(response)))
    except (RetryableError, PermanentError) as error:
        return JobOutcome(error=error)


class BatchCalls:
    """The batch namespace of one iVvy account, over its ``IvvyClient`` (signing, transport, the
    clock-skew reading and the error classification are the single calls')."""

    def __init__(self, client: IvvyClient) -> None:
        self.client = client

    async def run(self, jobs: Sequence[BatchJob]) -> str:
        """Send ``jobs`` (1 to ``BATCH_MAX_JOBS``) as one batch; return its asyncId."""
        if not 1 <= len(jobs) <= BATCH_MAX_JOBS:
            raise ValueError(f"a batch takes 1 to {BATCH_MAX_JOBS} jobs, not {len(jobs)}")
        answer = await self.client.call("batch", "run", {"jobs": [job.as_json() for job in jobs]})
        async_id = answer.get("asyncId") if isinstance(answer, dict) else None
        if not isinstance(async_id, str) or not async_id:
            # Accepted or not, nobody can ask about it: as unknown as a dropped answer.
            raise IvvyUnavailable(f"batch?action=run answered without an asyncId: {excerpt(answer)}")
        return async_id

    async def progress(self, async_id: str) -> int:
        """How much of the batch is done, 0 to 100."""
        try:
            answer = await self.client.call("batch", "progress", {"async": async_id})
        except IvvyErrorDetails as error:
            raise _batch_error(async_id, error) from None
        value = answer.get("progress") if isinstance(answer, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise IvvyUnavailable(f"batch?action=progress answered without a progress: {excerpt(answer)}")
        return max(0, min(100, int(value)))

    async def results(self, async_id: str, jobs: Sequence[BatchJob | None]) -> list[JobOutcome]:
        """One outcome per job of the batch ``async_id`` (sent as ``jobs``), in their order; a job
        given as None (another worker's, not collected here) is counted, not checked."""
        try:
            answer = await self.client.call("batch", "results", {"async": async_id})
        except IvvyErrorDetails as error:
            raise _batch_error(async_id, error) from None
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(jobs):
            count = len(results) if isinstance(results, list) else "no"
            raise BatchGone(async_id, f"{count} results for {len(jobs)} jobs")
        outcomes = []
        for index, (job, result) in enumerate(zip(jobs, results, strict=True)):
            if job is None:
                outcomes.append(JobOutcome())
                continue
            if not (
                isinstance(result, dict)
                and result.get("namespace") == job.namespace
                and result.get("action") == job.action
            ):
                raise BatchGone(async_id, f"result {index} is not the answer to its job: {excerpt(result)}")
            outcomes.append(job_outcome(result.get("response")))
        return outcomes

    async def wait_for_results(
        self,
        async_id: str,
        jobs: Sequence[BatchJob | None],
        *,
        timeout_s: float,
        poll_min_s: float,
        poll_max_s: float,
        rng: random.Random | None = None,
        pace: Callable[[], Awaitable[None]] | None = None,
        ready: ReadyEstimate | None = None,
    ) -> list[JobOutcome]:
        """Poll until the batch is done and return its results (see the module docstring).
        ``pace``, when given, is awaited before each poll (the account's rate limit). With ``ready``
        (the account's batches so far), the first poll asks for the results themselves, when the
        batch is expected done; progress is polled only if they are not ready then."""
        started = time.monotonic()
        deadline = started + timeout_s
        failures = 0
        ask_results = ready is not None
        delay = 0.0 if ready is None else ready.expect(len(jobs), poll_min_s, poll_max_s)
        first = True
        while True:
            if delay > 0:
                # The last poll is at the deadline: a pause longer than what is left is cut short.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BatchNotReady(async_id, f"batch {async_id}: not done within {timeout_s:g}s")
                await asyncio.sleep(min(delay, remaining))
            try:
                if pace is not None:
                    await pace()
                if ask_results:
                    asked_after = time.monotonic() - started
                    outcomes = await self.results(async_id, jobs)
                    if ready is not None:
                        ready.observe(len(jobs), asked_after, first_try=first)
                    return outcomes
                done = await self.progress(async_id)
                elapsed = time.monotonic() - started
                # At this pace, what is left takes elapsed * (100 - done) / done.
                delay = poll_max_s if done <= 0 else elapsed * (100 - done) / done
                delay = 0.0 if done >= 100 else min(poll_max_s, max(poll_min_s, delay))
                ask_results = done >= 100
                failures = 0
            except BatchGone:
                raise  # asking again cannot bring it back
            except BatchNotReady:
                # Results asked for too soon (or progress said done before they were): the progress
                # says how long is left.
                ask_results, delay = False, poll_min_s
            except RetryableError as error:
                failures += 1
                delay = backoff_seconds(
                    failures, base=poll_min_s, cap=poll_max_s, retry_after=getattr(error, "retry_after", None), rng=rng
                )
            first = False


@dataclass(slots=True)
class ReadyEstimate:
    """How soon after its run was answered an account's batch is done, per job, as its last batch
    showed: when the next batch's first poll asks for its results (``wait_for_results``)."""

    #: Seconds per job; None before any batch was done.
    s_per_job: float | None = None

    def expect(self, jobs: int, floor_s: float, cap_s: float) -> float:
        """When to ask a batch of ``jobs`` jobs for its results: within ``floor_s`` and ``cap_s``."""
        guess = floor_s if self.s_per_job is None else self.s_per_job * jobs
        return min(cap_s, max(floor_s, guess))

    def observe(self, jobs: int, asked_after_s: float, *, first_try: bool) -> None:
        """A batch's results were ready when asked ``asked_after_s`` after its run's answer: at the
        first try it may have been done sooner (the next is asked a little sooner), else about then."""
        self.s_per_job = asked_after_s * (SOONER if first_try else 1.0) / max(1, jobs)


def _batch_error(async_id: str, error: IvvyErrorDetails) -> LeadstageError:
    """The batch namespace's own answers among a poll's errors; any other error as it is."""
    if error.specific_code in UNKNOWN_BATCH_CODES:
        return BatchGone(
            async_id, f"iVvy does not know it (specific code {error.specific_code})", specific_code=error.specific_code
        )
    if error.specific_code == NOT_COMPLETED_CODE:
        return BatchNotReady(async_id)
    return error
