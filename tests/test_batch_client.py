"""worker.batch.BatchCalls with the real aiohttp transport against the fake iVvy over HTTP: run,
progress, results, the polling, and each job's answer classified as a single call's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson
import pytest

from tests.harness import eventually
from worker.batch import BatchCalls, BatchJob, ReadyEstimate, lead_stage_job
from worker.core.change import LeadStageChange
from worker.core.errors import (
    BatchGone,
    BatchNotReady,
    IvvyNoAnswer,
    IvvyRejected,
    IvvyUnavailable,
    PermanentError,
    RetryableError,
)
from worker.core.settings import BATCH_MAX_JOBS as MAX_JOBS
from worker.core.settings import Account
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.ivvy import AiohttpTransport, IvvyClient, RawResponse, Transport


@pytest.fixture
def batches(ivvy_account: Account, transport: AiohttpTransport, fake_ivvy: RunningFakeIvvy) -> BatchCalls:
    fake_ivvy.fake.update_faults({"batch_delay_s": 0.05})
    return BatchCalls(IvvyClient(ivvy_account, transport, timeout=2.0))


def calls(fake_ivvy: RunningFakeIvvy, action: str) -> int:
    return sum(1 for r in fake_ivvy.fake.requests if (r.namespace, r.action) == ("batch", action))


async def test_each_job_is_answered_and_classified_as_a_single_call(
    batches: BatchCalls, fake_ivvy: RunningFakeIvvy
) -> None:
    stage = fake_ivvy.fake.add_stage("Existing", apply_to=1)
    changes = [
        LeadStageChange(name="Batched", apply_to=2),
        LeadStageChange(id=stage.id, colour="#123456"),
        LeadStageChange(id=999_999, name="Nowhere"),  # 24320: permanent
        LeadStageChange(id=2, name="Built in"),  # 24321: permanent
    ]
    jobs = [lead_stage_job(change) for change in changes]
    async_id = await batches.run(jobs)
    outcomes = await batches.wait_for_results(async_id, jobs, timeout_s=10, poll_min_s=0.02, poll_max_s=0.05)
    added = outcomes[0].lead_stage_id(changes[0])
    assert fake_ivvy.fake.stages[added].name == "Batched"
    assert outcomes[1].lead_stage_id(changes[1]) == stage.id
    assert stage.colour == "#123456"
    for outcome, code in zip(outcomes[2:], (24320, 24321), strict=True):
        assert isinstance(outcome.error, IvvyRejected)
        assert isinstance(outcome.error, PermanentError)
        assert outcome.error.specific_code == code
        with pytest.raises(IvvyRejected):
            outcome.lead_stage_id(changes[2])
    assert "HTTP status" not in str(outcomes[2].error)  # a job has no HTTP status of its own
    # The run's body is the single call's body for every job.
    [run] = [r.body for r in fake_ivvy.fake.requests if r.action == "run"]
    assert [job["params"] for job in run["jobs"]] == [change.body() for change in changes]


async def test_a_job_answered_24322_is_retryable(batches: BatchCalls, fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"batch_job_24322_rate": 1.0})
    change = LeadStageChange(name="Not applied", apply_to=1)
    jobs = [lead_stage_job(change)]
    [outcome] = await batches.wait_for_results(
        await batches.run(jobs), jobs, timeout_s=10, poll_min_s=0.02, poll_max_s=0.05
    )
    assert isinstance(outcome.error, IvvyUnavailable)
    assert isinstance(outcome.error, RetryableError)
    assert outcome.error.specific_code == 24322


async def test_run_refuses_an_empty_or_oversized_batch_before_sending(
    batches: BatchCalls, fake_ivvy: RunningFakeIvvy
) -> None:
    job = lead_stage_job(LeadStageChange(name="S", apply_to=1))
    for jobs in ([], [job] * (MAX_JOBS + 1)):
        with pytest.raises(ValueError, match=f"1 to {MAX_JOBS} jobs"):
            await batches.run(jobs)
    assert calls(fake_ivvy, "run") == 0
    assert await batches.run([job] * MAX_JOBS)  # exactly the limit is accepted


async def test_unfinished_unknown_and_expired_batches(batches: BatchCalls, fake_ivvy: RunningFakeIvvy) -> None:
    jobs = [lead_stage_job(LeadStageChange(name="Slow", apply_to=1))]
    fake_ivvy.fake.update_faults({"batch_delay_s": 0.1, "batch_results_s": 0.25})
    async_id = await batches.run(jobs)
    with pytest.raises(BatchNotReady):
        await batches.results(async_id, jobs)
    assert 0 <= await batches.progress(async_id) < 100
    for call in (batches.progress("nope"), batches.results("nope", jobs)):
        with pytest.raises(BatchGone):
            await call
    await batches.wait_for_results(async_id, jobs, timeout_s=10, poll_min_s=0.02, poll_max_s=0.05)

    async def expired() -> bool:
        """Kept until batch_results_s after the run, then gone (24115: iVvy knows it no more)."""
        try:
            await batches.results(async_id, jobs)
        except BatchGone as gone:
            return gone.specific_code == 24115
        return False

    await eventually(expired, within_s=5)


async def test_a_run_whose_answer_is_dropped_has_an_unknown_outcome(
    batches: BatchCalls, fake_ivvy: RunningFakeIvvy
) -> None:
    fake_ivvy.fake.update_faults({"batch_run_drop_rate": 1.0})
    with pytest.raises(IvvyNoAnswer) as dropped:
        await batches.run([lead_stage_job(LeadStageChange(name="Dropped", apply_to=1))])
    assert dropped.value.outcome_unknown


async def test_a_pause_longer_than_the_time_left_ends_at_the_deadline_with_a_last_poll(
    batches: BatchCalls, fake_ivvy: RunningFakeIvvy
) -> None:
    """A batch at 0 % is next polled after the cap; with less time left, at the deadline: it does
    not give up before its wait is over (the batch is done by then)."""
    jobs = [lead_stage_job(LeadStageChange(name="Slow start", apply_to=1))]
    [outcome] = await batches.wait_for_results(
        await batches.run(jobs), jobs, timeout_s=0.2, poll_min_s=0.02, poll_max_s=30
    )
    assert outcome.error is None
    assert calls(fake_ivvy, "progress") == 2


async def test_waiting_for_a_batch_that_never_finishes_gives_up_at_its_deadline(
    batches: BatchCalls, fake_ivvy: RunningFakeIvvy
) -> None:
    fake_ivvy.fake.update_faults({"batch_never_ready_rate": 1.0})
    jobs = [lead_stage_job(LeadStageChange(name="Never", apply_to=1))]
    async_id = await batches.run(jobs)
    with pytest.raises(BatchNotReady, match="not done within"):
        await batches.wait_for_results(async_id, jobs, timeout_s=0.15, poll_min_s=0.005, poll_max_s=0.03)
    # A batch stuck at 0 % is polled at the cap, not at the floor.
    assert 2 <= calls(fake_ivvy, "progress") <= 0.15 / 0.03 + 1
    assert calls(fake_ivvy, "results") == 0


async def test_polls_follow_the_progress_instead_of_the_floor(batches: BatchCalls, fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"batch_delay_s": 0.15})
    jobs = [lead_stage_job(LeadStageChange(name="Paced", apply_to=1))]
    await batches.wait_for_results(await batches.run(jobs), jobs, timeout_s=10, poll_min_s=0.003, poll_max_s=0.15)
    # Polling at the floor would ask about 50 times in that time.
    assert calls(fake_ivvy, "progress") <= 12
    assert calls(fake_ivvy, "results") == 1


async def test_polls_ride_through_the_servers_rate_limit(batches: BatchCalls, fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"rate_limit_per_s": 2, "rate_limit_window_s": 0.1, "batch_delay_s": 0.1})
    jobs = [lead_stage_job(LeadStageChange(name="Limited", apply_to=1))]
    async_id = await batches.run(jobs)
    [outcome] = await batches.wait_for_results(async_id, jobs, timeout_s=10, poll_min_s=0.01, poll_max_s=0.05)
    assert outcome.error is None
    assert any(r.fault == "limit" for r in fake_ivvy.fake.requests)


async def test_with_an_estimate_a_batch_done_by_then_costs_no_progress_poll(
    batches: BatchCalls, fake_ivvy: RunningFakeIvvy
) -> None:
    """The first poll asks for the results themselves; results not ready then fall back to the
    progress, and the estimate learns how soon this account's batches are done."""
    fake_ivvy.fake.update_faults({"batch_delay_s": 0.0})
    ready = ReadyEstimate()
    jobs = [lead_stage_job(LeadStageChange(name=f"Quick {n}", apply_to=1)) for n in range(2)]
    await batches.wait_for_results(
        await batches.run(jobs), jobs, timeout_s=10, poll_min_s=0.01, poll_max_s=0.3, ready=ready
    )
    assert (calls(fake_ivvy, "progress"), calls(fake_ivvy, "results")) == (0, 1)
    assert ready.s_per_job is not None
    fake_ivvy.fake.update_faults({"batch_delay_s": 0.2})  # far past the first try, at the floor
    slow = ReadyEstimate()
    [outcome] = await batches.wait_for_results(
        await batches.run(jobs[:1]), jobs[:1], timeout_s=10, poll_min_s=0.01, poll_max_s=0.1, ready=slow
    )
    assert outcome.error is None
    assert calls(fake_ivvy, "progress") >= 1
    assert calls(fake_ivvy, "results") == 3  # the first try too soon (24114), then once done
    assert slow.s_per_job is not None
    assert slow.expect(1, 0.01, 30) > 0.01  # the next waits longer


@dataclass
class AlteringTransport:
    """The real transport, but the answers of ``batch?action=results`` are cut to ``keep`` results,
    or their first result renamed to another action."""

    inner: Transport
    keep: int | None = None
    rename: bool = False

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> RawResponse:
        response = await self.inner.post(url, headers, body, timeout_s)
        if not url.endswith("batch?action=results") or response.status != 200:
            return response
        answer = orjson.loads(response.body)
        if self.keep is not None:
            answer["results"] = answer["results"][: self.keep]
        if self.rename:
            answer["results"][0]["action"] = "getLeadStageList"
        return RawResponse(response.status, response.headers, orjson.dumps(answer))

    async def close(self) -> None:
        await self.inner.close()


@pytest.mark.parametrize(("keep", "rename", "says"), [(1, False, "1 results for 2 jobs"), (None, True, "result 0")])
async def test_results_that_do_not_answer_the_jobs_are_refused(
    ivvy_account: Account,
    transport: AiohttpTransport,
    fake_ivvy: RunningFakeIvvy,
    keep: int | None,
    rename: bool,
    says: str,
) -> None:
    fake_ivvy.fake.update_faults({"batch_delay_s": 0.0})
    altered = BatchCalls(IvvyClient(ivvy_account, AlteringTransport(transport, keep, rename), timeout=2.0))
    jobs: list[BatchJob] = [lead_stage_job(LeadStageChange(name=f"S{n}", apply_to=1)) for n in range(2)]
    with pytest.raises(BatchGone, match=says):
        await altered.wait_for_results(await altered.run(jobs), jobs, timeout_s=0.3, poll_min_s=0.02, poll_max_s=0.3)
