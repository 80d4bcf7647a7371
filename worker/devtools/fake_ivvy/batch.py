"""The fake iVvy's ``batch`` namespace: ``run``, ``progress``, ``results``.

* ``batch?action=run`` ``{"jobs": [{"namespace", "action", "params"}, ...], "callbackUrl"?}``
  answers ``{"asyncId"}`` (32 hex digits). Jobs that are not a non-empty list of objects, each
  with a string namespace and action and an object of params: 24092; more than 200 jobs: 24448;
  a job without params (or with empty ones): 24093. Nothing of a refused batch is applied. The
  callback URL is accepted and never called (the fake makes no outgoing requests).
* The jobs are applied one after the other, in order, spread evenly over ``batch_delay_s`` (the
  last at the end of it; as set when the run came in, so a batch whose answer was dropped can be
  applied late, after later ones), each answered as the single call would be: its answer, or its
  error body, is the job's ``response``. A job of the ``batch`` namespace itself is a 404 body.
* ``batch?action=progress`` ``{"async"}``: ``{"progress": 0..100}``, the share of jobs applied;
  24105 for an unknown batch.
* ``batch?action=results`` ``{"async"}``: ``{"asyncId", "results": [{"namespace", "action",
  "request", "response"}]}`` once every job is applied; 24114 before; 24115 for an unknown batch
  or one created more than ``batch_results_s`` ago (iVvy keeps them for 2 days).

Faults (``Faults``, drawn once per batch or per job): ``batch_run_drop_rate`` accepts the batch
(its jobs are applied), then drops the connection without an answer; ``batch_never_ready_rate``
makes a batch that never starts (progress 0, results 24114, nothing applied);
``batch_job_24322_rate`` answers a job with 500/24322 instead of applying it. A batch call counts
once against ``rate_limit_per_s``, whatever the number of its jobs.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.devtools.fake_ivvy.faults import Faults
from worker.devtools.fake_ivvy.params import ApiError

#: The most jobs one ``batch?action=run`` takes.
MAX_JOBS: Final = 200

#: Answers one job as the single call would (or raises ``ApiError``).
ApplyJob = Callable[[str, str, Mapping[str, Any]], dict[str, Any]]


class DropAnswer(Exception):
    """The request was processed; its connection is to be dropped without an answer."""


@dataclass
class Batch:
    """One accepted batch: its jobs, and the results of those applied so far."""

    async_id: str
    jobs: list[dict[str, Any]]
    created: float
    #: False for a batch of the never-ready fault: none of its jobs is ever applied.
    starts: bool = True
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.jobs)

    def admin(self) -> dict[str, Any]:
        """As GET /_admin/batches shows it."""
        return {"asyncId": self.async_id, "jobs": len(self.jobs), "applied": len(self.results), "starts": self.starts}


@dataclass
class BatchStore:
    """Every batch the fake was given, by asyncId, and the tasks applying them."""

    batches: dict[str, Batch] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def clear(self) -> None:
        """Forget every batch; those still being applied stop where they are."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self.batches.clear()

    def run(self, params: Mapping[str, Any], faults: Faults, rng: random.Random, apply_job: ApplyJob) -> dict[str, Any]:
        """Check and accept a batch, and start applying its jobs; ``ApiError`` refuses it whole."""
        jobs = _checked_jobs(params.get("jobs"))
        now = time.monotonic()
        self._forget_expired(now, faults.batch_results_s)
        batch = Batch(uuid.uuid4().hex, jobs, now, starts=rng.random() >= faults.batch_never_ready_rate)
        self.batches[batch.async_id] = batch
        if batch.starts:
            task = asyncio.get_running_loop().create_task(self._apply(batch, faults, rng, apply_job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if rng.random() < faults.batch_run_drop_rate:
            raise DropAnswer
        return {"asyncId": batch.async_id}

    async def _apply(self, batch: Batch, faults: Faults, rng: random.Random, apply_job: ApplyJob) -> None:
        step = faults.batch_delay_s / len(batch.jobs)
        for job in batch.jobs:
            await asyncio.sleep(step)
            request: dict[str, Any] = job["params"]
            try:
                if rng.random() < faults.batch_job_24322_rate:
                    raise ApiError(500, "An error has occurred", 24322)
                response = apply_job(job["namespace"], job["action"], request)
            except ApiError as error:
                response = error.body()
            batch.results.append(
                {"namespace": job["namespace"], "action": job["action"], "request": request, "response": response}
            )

    def _forget_expired(self, now: float, keep_s: float) -> None:
        for async_id in [a for a, batch in self.batches.items() if now - batch.created > keep_s]:
            del self.batches[async_id]

    def _find(self, params: Mapping[str, Any], faults: Faults, unknown_code: int) -> Batch:
        batch = self.batches.get(str(params.get("async", "")))
        if batch is None or time.monotonic() - batch.created > faults.batch_results_s:
            raise ApiError(404, "Could not find batch", unknown_code)
        return batch

    def progress(self, params: Mapping[str, Any], faults: Faults) -> dict[str, Any]:
        batch = self._find(params, faults, 24105)
        return {"progress": 100 * len(batch.results) // len(batch.jobs)}

    def results(self, params: Mapping[str, Any], faults: Faults) -> dict[str, Any]:
        batch = self._find(params, faults, 24115)
        if not batch.done:
            raise ApiError(400, "Batch job not completed", 24114)
        return {"asyncId": batch.async_id, "results": list(batch.results)}


def _checked_jobs(jobs: object) -> list[dict[str, Any]]:
    """The jobs of a run, copied; 24092, 24448 or 24093 for the first thing wrong with them."""
    if not isinstance(jobs, list) or not jobs:
        raise ApiError(400, "Incorrect Job Format", 24092, ["jobs must be a non-empty array of jobs"], field="jobs")
    if len(jobs) > MAX_JOBS:
        message = f"The maximum number of jobs can be put on a single request is {MAX_JOBS}"
        raise ApiError(400, message, 24448, [f"{len(jobs)} jobs were sent"], field="jobs")
    for index, job in enumerate(jobs):
        if not (
            isinstance(job, dict)
            and isinstance(job.get("namespace"), str)
            and isinstance(job.get("action"), str)
            and isinstance(job.get("params", {}), dict)
        ):
            why = f"job {index} must be an object with a string namespace and action and an object of params"
            raise ApiError(400, "Incorrect Job Format", 24092, [why], field="jobs")
    for index, job in enumerate(jobs):
        if not job.get("params"):
            raise ApiError(400, "Empty job parameter found", 24093, [f"job {index} has no params"], field="jobs")
    return [{"namespace": job["namespace"], "action": job["action"], "params": dict(job["params"])} for job in jobs]
