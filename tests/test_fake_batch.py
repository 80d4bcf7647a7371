"""The fake iVvy's batch namespace and server-side rate limit, over real HTTP with signed requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.harness import eventually
from worker.core.errors import IvvyErrorDetails, IvvyNoAnswer, IvvyRateLimited
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.ivvy import AiohttpTransport, IvvyClient


@pytest.fixture
async def fake() -> AsyncIterator[RunningFakeIvvy]:
    async with running_fake_ivvy(credentials={DEMO_API_KEY: DEMO_API_SECRET}, seed=1) as running:
        running.fake.update_faults({"batch_delay_s": 0.05})
        yield running


@pytest.fixture
async def client(fake: RunningFakeIvvy) -> AsyncIterator[IvvyClient]:
    transport = AiohttpTransport()
    account = Account("default", fake.url, DEMO_API_KEY, Secret(DEMO_API_SECRET), 1000.0)
    try:
        yield IvvyClient(account, transport, timeout=2.0)
    finally:
        await transport.close()


def job(params: dict[str, Any]) -> dict[str, Any]:
    return {"namespace": "crm", "action": "addOrUpdateLeadStage", "params": params}


async def specific_code(call: Any) -> int | None:
    with pytest.raises(IvvyErrorDetails) as raised:
        await call
    return raised.value.specific_code


async def done(client: IvvyClient, async_id: str) -> None:
    """Until the batch's progress is 100 (the test's timeout ends a batch that never is)."""
    for _ in range(10_000):
        if (await client.call("batch", "progress", {"async": async_id}))["progress"] == 100:
            return
        await asyncio.sleep(0.01)


async def test_a_batch_is_applied_in_order_and_its_results_answer_each_job(
    fake: RunningFakeIvvy, client: IvvyClient
) -> None:
    seeded = fake.fake.add_stage("Recoloured", apply_to=1)
    jobs = [
        job({"name": "Batched", "applyTo": 1}),
        job({"id": seeded.id, "colour": "#111111"}),
        job({"id": seeded.id, "colour": "#222222"}),  # the later job of the same stage wins
        job({"id": 999_999, "name": "Nowhere"}),  # an error answers that job only
    ]
    run = await client.call("batch", "run", {"jobs": jobs, "callbackUrl": "https://example.invalid/cb"})
    async_id = run["asyncId"]
    assert await specific_code(client.call("batch", "results", {"async": async_id})) == 24114
    assert 0 <= (await client.call("batch", "progress", {"async": async_id}))["progress"] < 100
    await done(client, async_id)
    answer = await client.call("batch", "results", {"async": async_id})
    assert answer["asyncId"] == async_id
    results = answer["results"]
    assert [r["request"] for r in results] == [j["params"] for j in jobs]
    assert {r["namespace"] + "?" + r["action"] for r in results} == {"crm?addOrUpdateLeadStage"}
    added = results[0]["response"]
    assert added["success"] is True
    assert fake.fake.stages[int(added["id"])].name == "Batched"
    assert fake.fake.stages[seeded.id].colour == "#222222"
    assert (results[3]["response"]["errorCode"], results[3]["response"]["specificCode"]) == (404, 24320)


@pytest.mark.parametrize(
    ("jobs", "code"),
    [
        ([job({"name": f"S{i}", "applyTo": 1}) for i in range(201)], 24448),
        ("not a list", 24092),
        ([{"namespace": "crm", "params": {"name": "x"}}], 24092),
        ([{"namespace": "crm", "action": "addOrUpdateLeadStage", "params": "x"}], 24092),
        ([{"namespace": "crm", "action": "addOrUpdateLeadStage", "params": {}}], 24093),
        ([{"namespace": "crm", "action": "addOrUpdateLeadStage"}], 24093),
    ],
)
async def test_malformed_batches_are_refused_as_the_docs_say(
    fake: RunningFakeIvvy, client: IvvyClient, jobs: object, code: int
) -> None:
    assert await specific_code(client.call("batch", "run", {"jobs": jobs})) == code
    assert fake.fake.batches.batches == {}


async def test_a_batch_of_200_jobs_is_taken(fake: RunningFakeIvvy, client: IvvyClient) -> None:
    fake.fake.update_faults({"batch_delay_s": 0.0})
    run = await client.call("batch", "run", {"jobs": [job({"name": f"S{i}", "applyTo": 1}) for i in range(200)]})
    await done(client, run["asyncId"])
    assert len((await client.call("batch", "results", {"async": run["asyncId"]}))["results"]) == 200


async def test_a_malformed_job_is_named_in_the_error(client: IvvyClient) -> None:
    good = job({"name": "Fine", "applyTo": 1})
    with pytest.raises(IvvyErrorDetails) as raised:
        await client.call("batch", "run", {"jobs": [good, good, {"namespace": "crm", "action": 7, "params": {}}]})
    assert any("job 2 " in message for message in raised.value.additional_messages)


async def test_progress_is_the_share_of_jobs_applied_in_order(fake: RunningFakeIvvy, client: IvvyClient) -> None:
    fake.fake.update_faults({"batch_delay_s": 0.2})
    names = [f"Step {i}" for i in range(10)]
    run = await client.call("batch", "run", {"jobs": [job({"name": name, "applyTo": 1}) for name in names]})
    seen: list[int] = []
    while not seen or seen[-1] < 100:
        progress = (await client.call("batch", "progress", {"async": run["asyncId"]}))["progress"]
        applied = [s.name for s in fake.fake.stages.values() if s.name.startswith("Step")]
        assert applied == names[: len(applied)]  # a prefix of the jobs: in order, one after the other
        assert len(applied) >= progress * len(names) // 100
        seen.append(progress)
        await asyncio.sleep(0.01)
    assert seen == sorted(seen)
    assert any(0 < p < 100 for p in seen), seen  # the jobs were applied over the delay, not at once


async def test_admin_batches_shows_each_batch_and_how_far_it_got(fake: RunningFakeIvvy, client: IvvyClient) -> None:
    fake.fake.update_faults({"batch_delay_s": 0.0})
    done_run = await client.call("batch", "run", {"jobs": [job({"name": f"A{i}", "applyTo": 1}) for i in range(3)]})
    await done(client, done_run["asyncId"])
    fake.fake.update_faults({"batch_never_ready_rate": 1.0})
    stuck = await client.call("batch", "run", {"jobs": [job({"name": "Stuck", "applyTo": 1})]})
    async with aiohttp.ClientSession() as http, http.get(fake.url + "/_admin/batches") as answer:
        assert answer.status == 200
        shown = (await answer.json())["batches"]
    assert shown == [
        {"asyncId": done_run["asyncId"], "jobs": 3, "applied": 3, "starts": True},
        {"asyncId": stuck["asyncId"], "jobs": 1, "applied": 0, "starts": False},
    ]


async def test_a_reset_stops_a_batch_being_applied(fake: RunningFakeIvvy, client: IvvyClient) -> None:
    fake.fake.update_faults({"batch_delay_s": 0.1})
    run = await client.call("batch", "run", {"jobs": [job({"name": "Too late", "applyTo": 1})]})
    fake.fake.reset()
    await asyncio.sleep(0.2)  # twice as long as the batch would have taken
    assert "Too late" not in [s.name for s in fake.fake.stages.values()]
    assert await specific_code(client.call("batch", "results", {"async": run["asyncId"]})) == 24115


async def test_unknown_and_expired_batches(fake: RunningFakeIvvy, client: IvvyClient) -> None:
    assert await specific_code(client.call("batch", "progress", {"async": "nope"})) == 24105
    assert await specific_code(client.call("batch", "results", {"async": "nope"})) == 24115
    fake.fake.update_faults({"batch_delay_s": 0.0, "batch_results_s": 0.25})
    run = await client.call("batch", "run", {"jobs": [job({"name": "Kept briefly", "applyTo": 1})]})
    await done(client, run["asyncId"])
    assert len((await client.call("batch", "results", {"async": run["asyncId"]}))["results"]) == 1

    async def expired() -> bool:
        """Kept until batch_results_s after the run, then gone (24115)."""
        try:
            await client.call("batch", "results", {"async": run["asyncId"]})
        except IvvyErrorDetails as error:
            return error.specific_code == 24115
        return False

    await eventually(expired, within_s=5)
    assert await specific_code(client.call("batch", "progress", {"async": run["asyncId"]})) == 24105
    await client.call("batch", "run", {"jobs": [job({"name": "Later", "applyTo": 1})]})
    assert run["asyncId"] not in fake.fake.batches.batches  # forgotten, not only hidden


async def test_batch_faults(fake: RunningFakeIvvy, client: IvvyClient) -> None:
    fake.fake.update_faults({"batch_run_drop_rate": 1.0, "batch_delay_s": 0.05})
    with pytest.raises(IvvyNoAnswer) as dropped:
        await client.call("batch", "run", {"jobs": [job({"name": "Dropped run", "applyTo": 1})]})
    assert dropped.value.outcome_unknown
    # Accepted all the same: its jobs are applied, though nobody learnt its asyncId.
    [accepted] = fake.fake.batches.batches
    await done(client, accepted)
    assert [s.name for s in fake.fake.stages.values()].count("Dropped run") == 1
    assert [r.fault for r in fake.fake.requests if r.action == "run"] == ["batch_drop"]

    fake.fake.update_faults({"batch_run_drop_rate": 0.0, "batch_never_ready_rate": 1.0})
    stuck = await client.call("batch", "run", {"jobs": [job({"name": "Never", "applyTo": 1})]})
    await asyncio.sleep(0.15)  # three times as long as a batch takes
    assert (await client.call("batch", "progress", {"async": stuck["asyncId"]}))["progress"] == 0
    assert await specific_code(client.call("batch", "results", {"async": stuck["asyncId"]})) == 24114
    assert "Never" not in [s.name for s in fake.fake.stages.values()]

    fake.fake.update_faults({"batch_never_ready_rate": 0.0, "batch_job_24322_rate": 1.0})
    failing = await client.call("batch", "run", {"jobs": [job({"name": "Not applied", "applyTo": 1})]})
    await done(client, failing["asyncId"])
    [result] = (await client.call("batch", "results", {"async": failing["asyncId"]}))["results"]
    assert result["response"] == {"errorCode": 500, "message": "An error has occurred", "specificCode": 24322}
    assert "Not applied" not in [s.name for s in fake.fake.stages.values()]


async def test_a_batch_whose_answer_was_dropped_is_applied_late_at_the_delay_of_its_run(
    fake: RunningFakeIvvy, client: IvvyClient
) -> None:
    """A batch keeps the ``batch_delay_s`` set when its run came in: one whose answer was lost can be
    applied long after a later batch of the same stage (a late application, as iVvy may do)."""
    stage = fake.fake.add_stage("Before", apply_to=1)
    fake.fake.update_faults({"batch_run_drop_rate": 1.0, "batch_delay_s": 60.0})
    with pytest.raises(IvvyNoAnswer):
        await client.call("batch", "run", {"jobs": [job({"id": stage.id, "name": "Older"})]})
    [late] = fake.fake.batches.batches.values()
    fake.fake.update_faults({"batch_run_drop_rate": 0.0, "batch_delay_s": 0.0})
    newer = await client.call("batch", "run", {"jobs": [job({"id": stage.id, "name": "Newer"})]})
    await done(client, newer["asyncId"])
    assert (stage.name, late.done) == ("Newer", False)  # the older batch is still to be applied


async def test_the_server_side_rate_limit_answers_429_past_its_rate(fake: RunningFakeIvvy, client: IvvyClient) -> None:
    fake.fake.update_faults({"rate_limit_per_s": 5})
    for _ in range(5):
        await client.ping()
    with pytest.raises(IvvyRateLimited) as limited:
        await client.ping()
    assert limited.value.retry_after == 1.0  # the window: iVvy's second
    assert [r.fault for r in fake.fake.requests][-1] == "limit"
    fake.fake.update_faults({"rate_limit_window_s": 0.1})  # so as not to wait a whole second for the next
    await asyncio.sleep(0.15)
    await client.ping()  # a new window, a new allowance


async def test_the_server_side_rate_limit_is_per_key_and_a_batch_counts_once(fake: RunningFakeIvvy) -> None:
    fake.fake.credentials["other-key"] = "other-secret"
    fake.fake.update_faults({"rate_limit_per_s": 2, "batch_delay_s": 0.0})
    transport = AiohttpTransport()
    try:
        mine_account = Account("mine", fake.url, DEMO_API_KEY, Secret(DEMO_API_SECRET), 1000.0)
        other_account = Account("other", fake.url, "other-key", Secret("other-secret"), 1000.0)
        mine = IvvyClient(mine_account, transport, timeout=2.0)
        other = IvvyClient(other_account, transport, timeout=2.0)
        jobs = [job({"name": f"Counted once {i}", "applyTo": 1}) for i in range(50)]
        await mine.call("batch", "run", {"jobs": jobs})  # 50 jobs, one request of the 2 a second
        await mine.ping()
        await other.ping()  # another key: not held against mine
        with pytest.raises(IvvyRateLimited):
            await mine.ping()
    finally:
        await transport.close()
    assert {r.key for r in fake.fake.requests if r.fault == "limit"} == {DEMO_API_KEY}
