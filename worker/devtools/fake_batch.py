"""The fake iVvy's ``batch`` namespace, as iVvy's pages describe it: ``run``, ``progress``, ``results``.

* ``batch?action=run`` ``{"jobs": [{"namespace", "action", "params"}, ...], "callbackUrl"?}``
  answers ``{"asyncId"}``. More than 200 jobs: 24448; jobs that are not a list of objects with a
  string namespace and action and an object of params: 24092; a job without params (or with
  empty ones): 24093. The callback URL is accepted and never called (the fake makes no outgoing
  requests).
* After ``batch_delay_s`` the jobs are applied, in order, each as the single call would be
  (its answer or its error body is the job's ``response``).
* ``batch?action=progress`` ``{"async"}``: ``{"progress": 0..100}``, 24105 for an unknown batch.
* ``batch?action=results`` ``{"async"}``: ``{"asyncId", "results": [{"namespace", "action",
  "request", "response"}]}`` once done; 24114 before; 24115 for an unknown batch or one older than
  ``batch_results_s`` (iVvy keeps them for 2 days).

Faults (``Faults``): ``batch_run_drop_rate`` accepts the batch, then drops the connection without
an answer; ``batch_never_ready_rate`` makes a batch that never completes; ``batch_job_24322_rate``
answers a job with 500/24322 instead of applying it.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

#: The most jobs one ``batch?action=run`` takes.
MAX_JOBS = 200


class BatchFaults(Protocol):
    """The batch settings of ``worker.devtools.fake_ivvy.Faults`` (read only)."""

    @property
    def batch_delay_s(self) -> float: ...
    @property
    def batch_results_s(self) -> float: ...
    @property
    def batch_run_drop_rate(self) -> float: ...
    @property
    def batch_never_ready_rate(self) -> float: ...
    @property
    def batch_job_24322_rate(self) -> float: ...


class DropAnswer(Exception):
    """The request was processed; its connection is to be dropped without an answer."""


@dataclass
class Batch:
    async_id: str
    jobs: list[dict[str, Any]]
    created: float
    ready_at: float | None  # None: never (the never-ready fault)
    results: list[dict[str, Any]] | None = None


@dataclass
class BatchStore:
    """Every batch the fake was given, by asyncId."""

    batches: dict[str, Batch] = field(default_factory=dict)

    def clear(self) -> None:
        self.batches.clear()

    def run(
        self,
        params: Mapping[str, Any],
        faults: BatchFaults,
        rng: random.Random,
        apply_job: Callable[[str, str, Mapping[str, Any]], dict[str, Any]],
        error: Callable[[int, str, int], Exception],
    ) -> dict[str, Any]:
        """Check and accept a batch; its jobs are applied after the batch delay (``apply_job``
        answers one job as the single call would, or raises an exception with a ``body()``)."""
        jobs = params.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            raise error(400, "Incorrect Job Format", 24092)
        if len(jobs) > MAX_JOBS:
            raise error(400, f"The maximum number of jobs can be put on a single request is {MAX_JOBS}", 24448)
        for job in jobs:
            if not (
                isinstance(job, dict)
                and isinstance(job.get("namespace"), str)
                and isinstance(job.get("action"), str)
                and ("params" not in job or isinstance(job["params"], dict))
            ):
                raise error(400, "Incorrect Job Format", 24092)
            if not job.get("params"):
                raise error(400, "Empty job parameter found", 24093)
        now = time.monotonic()
        never = rng.random() < faults.batch_never_ready_rate
        batch = Batch(uuid.uuid4().hex, [dict(job) for job in jobs], now, None if never else now + faults.batch_delay_s)
        self.batches[batch.async_id] = batch
        if batch.ready_at is not None:
            asyncio.get_running_loop().call_later(faults.batch_delay_s, self._apply, batch, faults, rng, apply_job)
        if rng.random() < faults.batch_run_drop_rate:
            raise DropAnswer
        return {"asyncId": batch.async_id}

    def _apply(
        self,
        batch: Batch,
        faults: BatchFaults,
        rng: random.Random,
        apply_job: Callable[[str, str, Mapping[str, Any]], dict[str, Any]],
    ) -> None:
        results = []
        for job in batch.jobs:
            request = job.get("params", {})
            if rng.random() < faults.batch_job_24322_rate:
                response: dict[str, Any] = {"errorCode": 500, "message": "An error has occurred", "specificCode": 24322}
            else:
                try:
                    response = apply_job(job["namespace"], job["action"], request)
                except Exception as exc:
                    body = getattr(exc, "body", None)
                    if not callable(body):
                        raise
                    response = body()
            results.append({"namespace": job["namespace"], "action": job["action"], "request": request,
                            "response": response})  # fmt: skip
        batch.results = results

    def progress(self, params: Mapping[str, Any], error: Callable[[int, str, int], Exception]) -> dict[str, Any]:
        batch = self.batches.get(str(params.get("async", "")))
        if batch is None:
            raise error(404, "Could not find batch", 24105)
        if batch.results is not None:
            return {"progress": 100}
        if batch.ready_at is None:
            return {"progress": 0}
        span = max(batch.ready_at - batch.created, 1e-9)
        return {"progress": min(99, int(100 * (time.monotonic() - batch.created) / span))}

    def results(
        self, params: Mapping[str, Any], faults: BatchFaults, error: Callable[[int, str, int], Exception]
    ) -> dict[str, Any]:
        async_id = str(params.get("async", ""))
        batch = self.batches.get(async_id)
        if batch is None or time.monotonic() - batch.created > faults.batch_results_s:
            raise error(404, "Could not find batch", 24115)
        if batch.results is None:
            raise error(400, "Batch job not completed", 24114)
        return {"asyncId": async_id, "results": batch.results}
