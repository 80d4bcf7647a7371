"""The arq internals ``worker.runner.LeadstageWorker`` relies on, checked against the installed arq.

The worker overrides ``_poll_iteration`` (its own claim replaces arq's ``start_jobs``, which is
never reached) and uses ``sem``, ``job_counter``, ``tasks``, ``allow_pick_jobs``, ``on_stop`` and
``_release_sem_dec_counter_on_complete``, none of which arq documents. pyproject pins
arq below its next minor release; when a new release is allowed, these tests say whether the
contract still holds: a failure here means reading arq's new ``worker.py`` before moving the bound.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import signal

from arq.worker import Worker

from tests.harness import LosingCancellations, worker_settings
from worker.runner import LeadstageWorker, build_worker

#: The arq releases whose internals were read against ``worker.runner`` (pyproject's bound).
CHECKED_RELEASES = ("0.28",)


def test_the_installed_arq_is_a_checked_release() -> None:
    version = importlib.metadata.version("arq")
    assert version.rsplit(".", 1)[0] in CHECKED_RELEASES, f"arq {version}: check its internals, then add it"


def test_the_overridden_methods_keep_their_signatures() -> None:
    for name, parameters in (("_poll_iteration", ["self"]),):
        method = getattr(Worker, name)
        assert inspect.iscoroutinefunction(method), name
        assert list(inspect.signature(method).parameters) == parameters, name
        assert getattr(LeadstageWorker, name) is not method, f"LeadstageWorker no longer overrides {name}"
    release = Worker._release_sem_dec_counter_on_complete
    assert not inspect.iscoroutinefunction(release)
    assert list(inspect.signature(release).parameters) == ["self"]


def test_the_poll_iteration_hands_due_job_ids_to_start_jobs_and_reaps_tasks() -> None:
    source = inspect.getsource(Worker._poll_iteration)
    assert "await self.start_jobs(job_ids)" in source
    assert "self.job_counter < self.max_jobs" in source
    assert "self.tasks.items()" in source


async def test_the_counter_and_semaphore_are_what_start_jobs_balances() -> None:
    worker = build_worker(worker_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1"), handle_signals=False)
    assert isinstance(worker.sem, asyncio.BoundedSemaphore)
    assert worker.job_counter == 0
    assert worker.tasks == {}
    assert worker.max_jobs == 20  # worker_settings' concurrency

    # What the done-callback of each started job does: one job fewer, one semaphore slot back.
    await worker.sem.acquire()
    worker.job_counter = 1
    worker._release_sem_dec_counter_on_complete()
    assert worker.job_counter == 0
    assert worker.sem._value == worker.max_jobs + 1  # arq's BoundedSemaphore(max_jobs + 1), all free


def test_both_stops_cancel_the_main_task_then_call_on_stop() -> None:
    # SIGTERM's handler (the worker waits for its jobs) ends in _wait_for_tasks_to_complete; close's
    # (and SIGINT's without a wait) in handle_sig. The worker's on_stop relies on both.
    for method in (Worker._wait_for_tasks_to_complete, Worker.handle_sig):
        source = inspect.getsource(method)
        assert source.index("self.main_task.cancel()") < source.index("self.on_stop("), method.__name__
    assert "self._wait_for_tasks_to_complete(" in inspect.getsource(Worker.handle_sig_wait_for_completion)


async def test_sigterm_cancels_the_main_task_until_it_ends_when_a_cancellation_is_lost() -> None:
    worker = build_worker(worker_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1"), handle_signals=False)
    body = LosingCancellations(2)
    worker.main_task = asyncio.ensure_future(body.run())
    worker.handle_sig_wait_for_completion(signal.SIGTERM)  # what arq runs on SIGTERM (no jobs to wait for)
    await asyncio.wait({worker.main_task}, timeout=30)  # bounded, so that a regression fails instead of hanging
    assert worker.main_task.cancelled()
    assert body.lost == 2
