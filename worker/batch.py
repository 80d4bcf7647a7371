"""iVvy's batch namespace: up to 200 calls in one request, their results polled, and each job's
answer read exactly as the single call's (``worker.ivvy.classify_answer``).

* ``run`` sends the jobs and returns the batch's ``asyncId``. It is a write: with no answer its
  outcome is unknown (``IvvyNoAnswer.outcome_unknown``), as a single call's is.
* ``progress`` is the share done, 0 to 100; ``results`` one ``JobOutcome`` per job, in the jobs'
  order, once the batch is done (``BatchNotReady`` before: 24114). An unknown batch (24115 from
  results, 24105 from progress: never accepted, or past iVvy's two days), or results that do not
  answer the jobs sent (another count, another call), are ``BatchGone``.
* ``wait_for_results`` polls: ``progress`` until it says 100, sleeping in between for what the
  progress so far predicts is left (within a floor and a cap), then ``results`` once; a poll that
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
    ) -> list[JobOutcome]:
        """Poll until the batch is done and return its results (see the module docstring).
        ``pace``, when given, is awaited before each poll (the account's rate limit)."""
        started = time.monotonic()
        deadline = started + timeout_s
        failures = 0
        while True:
            try:
                if pace is not None:
                    await pace()
                done = await self.progress(async_id)
                if done >= 100:
                    if pace is not None:
                        await pace()
                    return await self.results(async_id, jobs)
                elapsed = time.monotonic() - started
                # At this pace, what is left takes elapsed * (100 - done) / done.
                delay = poll_max_s if done <= 0 else elapsed * (100 - done) / done
                delay = min(poll_max_s, max(poll_min_s, delay))
                failures = 0
            except BatchGone:
                raise  # asking again cannot bring it back
            except BatchNotReady:
                delay = poll_min_s  # progress said done before results were: ask again soon
            except RetryableError as error:
                failures += 1
                delay = backoff_seconds(
                    failures, base=poll_min_s, cap=poll_max_s, retry_after=getattr(error, "retry_after", None), rng=rng
                )
            # The last poll is at the deadline: a pause longer than what is left is cut short.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BatchNotReady(async_id, f"batch {async_id}: not done within {timeout_s:g}s")
            await asyncio.sleep(min(delay, remaining))


def _batch_error(async_id: str, error: IvvyErrorDetails) -> LeadstageError:
    """The batch namespace's own answers among a poll's errors; any other error as it is."""
    if error.specific_code in UNKNOWN_BATCH_CODES:
        return BatchGone(
            async_id, f"iVvy does not know it (specific code {error.specific_code})", specific_code=error.specific_code
        )
    if error.specific_code == NOT_COMPLETED_CODE:
        return BatchNotReady(async_id)
    return error
