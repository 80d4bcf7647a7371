"""Coalescing: changes of one stage due together go out as one request, each key with its own
terminal event. The merge rule as a table; the rest end to end (real Redis, the fake iVvy over
HTTP, the real worker)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import prometheus_client
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.harness import eventually, read_events, wait_for_terminal, worker_settings
from worker.coalesce import merge
from worker.core import keys, readers
from worker.core.change import LeadStageChange, parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.core.logs import merge_job_context
from worker.core.settings import Account, Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.ivvy import AiohttpTransport, IvvyClient
from worker.job import apply_lead_stage_change
from worker.runner import running_worker
from worker.runtime import Lease, Runtime

A = LeadStageChange(id=9, name="A", colour="#000001")
B = LeadStageChange(id=9, colour="#000002")
C = LeadStageChange(id=9, apply_to=2)


@pytest.mark.parametrize(
    ("leader", "others", "newest", "sent", "owners"),
    [
        pytest.param(("a", 1, A), [("b", 2, B)], {"name": 1, "colour": 2}, {"name": "A", "colour": "#000002"},
                     {"a", "b"}, id="the newest change's field wins"),
        pytest.param(("b", 2, B), [("a", 1, A)], {"name": 1, "colour": 2}, {"name": "A", "colour": "#000002"},
                     {"a", "b"}, id="whatever the order they were gathered in"),
        pytest.param(("a", 1, A), [("c", 3, C)], {"name": 1, "colour": 2, "applyTo": 3},
                     {"name": "A", "applyTo": 2}, {"a", "c"}, id="a field a newer change outside sets is left out"),
        pytest.param(("a", 1, A), [("b", 2, B)], {"name": 5, "colour": 5}, {}, set(),
                     id="nothing left: every field set by newer changes"),
    ],
)  # fmt: skip
def test_merge(
    leader: tuple[str, int, LeadStageChange],
    others: list[tuple[str, int, LeadStageChange]],
    newest: dict[str, int],
    sent: dict[str, object],
    owners: set[str],
) -> None:
    merged, carried = merge(leader, others, newest)
    assert merged.body() == {"id": 9, **sent}
    assert carried == owners


@pytest.fixture
def fake(fake_ivvy: RunningFakeIvvy) -> RunningFakeIvvy:
    return fake_ivvy


@pytest.fixture
def settings(redis_url: str, fake_ivvy: RunningFakeIvvy) -> Settings:
    return worker_settings(redis_url, fake_ivvy.url)


async def enqueue(
    redis_client: aioredis.Redis, settings: Settings, changes: list[tuple[str, dict[str, object]]]
) -> None:
    await Ledger(redis_client, settings).enqueue_many(
        [(parse_change(raw), parse_envelope(idempotency_key=key)) for key, raw in changes]
    )


def sent_as(how: str) -> float:
    labels = {"account": "default", "sent_as": how}
    return prometheus_client.REGISTRY.get_sample_value("leadstage_changes_sent_total", labels) or 0.0


async def stage_fields(redis_client: aioredis.Redis, stage_key: str) -> list[str]:
    return [f.decode() for f in await redis_client.hkeys(stage_key)]  # type: ignore[misc]  # redis-py's async stubs


def posts(fake: RunningFakeIvvy, stage_id: int) -> list[dict[str, object]]:
    return [r.body for r in fake.fake.requests if r.action == "addOrUpdateLeadStage" and r.body.get("id") == stage_id]


async def test_changes_of_one_stage_due_together_go_in_one_request(
    settings: Settings, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    stage = fake.fake.add_stage("Start", apply_to=1)
    other = fake.fake.add_stage("Other", apply_to=1)
    changes: list[tuple[str, dict[str, object]]] = [
        ("u1", {"id": stage.id, "name": "First", "colour": "#000001"}),
        ("u2", {"id": stage.id, "colour": "#000002"}),
        ("o1", {"id": other.id, "name": "Elsewhere"}),
        ("u3", {"id": stage.id, "applyTo": "lead"}),
        ("u4", {"id": stage.id, "name": "Last"}),
    ]
    before = {how: sent_as(how) for how in ("alone", "coalesced")}
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert posts(fake, stage.id) == [{"id": stage.id, "name": "Last", "colour": "#000002", "applyTo": 2}]
    assert (stage.name, stage.colour, stage.apply_to) == ("Last", "#000002", 2)
    assert all(len(events) == 1 for events in terminal.values())
    # u1's every field was overtaken before it was claimed: it sent nothing, as without coalescing.
    assert terminal["u1"][0]["event"] == "superseded"
    carried = {key: terminal[key][0] for key in ("u2", "u3", "u4")}
    [leader] = {event["carried_by"] for event in carried.values()}
    assert leader in carried
    for event in carried.values():
        assert (event["event"], event["stage_id"], event["sent_as"]) == ("succeeded", str(stage.id), "coalesced")
        assert event["change"] == f'{{"id":{stage.id},"name":"Last","colour":"#000002","applyTo":2}}'
    assert len({event["attempt"] for event in carried.values()}) == 1
    [alone] = terminal["o1"]
    assert (alone["sent_as"], alone["carried_by"]) == ("alone", "o1")
    sent = {how: sent_as(how) - before[how] for how in before}
    assert sent == {"coalesced": 3, "alone": 1}
    recent = (await readers.stats(redis_client, settings))["recent"]
    assert isinstance(recent, dict)
    assert (recent["1m"]["sent_coalesced"], recent["1m"]["sent_alone"], recent["1m"]["superseded"]) == (3, 1, 1)


async def test_without_coalescing_each_change_is_its_own_request(
    settings: Settings, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    stage = fake.fake.add_stage("Start", apply_to=1)
    changes: list[tuple[str, dict[str, object]]] = [
        (f"u{i}", {"id": stage.id, ["name", "colour", "applyTo"][i]: ["N", "#000003", 2][i]}) for i in range(3)
    ]
    await enqueue(redis_client, settings, changes)
    async with running_worker(dataclasses.replace(settings, coalesce_max=1)):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert len(posts(fake, stage.id)) == 3
    assert {events[0]["sent_as"] for events in terminal.values()} == {"alone"}


async def test_a_coalesced_request_that_fails_is_retried_for_each_of_its_changes(
    settings: Settings, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    stage = fake.fake.add_stage("Start", apply_to=1)
    fake.fake.update_faults({"error_rate": 1.0})
    changes: list[tuple[str, dict[str, object]]] = [
        ("n", {"id": stage.id, "name": "Retried"}),
        ("c", {"id": stage.id, "colour": "#00000a"}),
    ]
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):

        async def both_retried() -> bool:
            return {e["idempotency_key"] for e in await read_events(redis_client) if e["event"] == "retrying"} == {
                "n",
                "c",
            }

        await eventually(both_retried)
        fake.fake.update_faults({"error_rate": 0.0})
        terminal = await wait_for_terminal(redis_client, ["n", "c"])
    # The failed coalesced request's end, one retrying event per change. Each then waits its own
    # backoff (full jitter, from 0 s): one may be sent again alone, and fail again, before the
    # test has cleared the fault.
    retrying = [e for e in await read_events(redis_client) if e["event"] == "retrying" and e["attempt"] == "1"]
    assert sorted((e["idempotency_key"], e["sent_as"]) for e in retrying) == [("c", "coalesced"), ("n", "coalesced")]
    assert {key: [e["event"] for e in events] for key, events in terminal.items()} == {
        "n": ["succeeded"],
        "c": ["succeeded"],
    }
    assert (stage.name, stage.colour) == ("Retried", "#00000a")


async def test_a_coalesced_request_refused_for_good_fails_each_of_its_changes(
    settings: Settings, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    changes: list[tuple[str, dict[str, object]]] = [
        ("x", {"id": 424242, "name": "Nowhere"}),
        ("y", {"id": 424242, "colour": "#0000ff"}),
    ]
    await enqueue(redis_client, settings, changes)
    async with running_worker(settings):
        terminal = await wait_for_terminal(redis_client, ["x", "y"])
    assert len(posts(fake, 424242)) == 1
    for events in terminal.values():
        [event] = events
        assert (event["event"], event["error_code"], event["sent_as"]) == ("failed", "24320", "coalesced")
    assert sorted(e["idempotency_key"] for e in await read_events(redis_client, "leadstage:dlq")) == ["x", "y"]


async def test_changes_far_apart_in_a_backlog_are_found_and_the_stage_forgets_them_when_done(
    settings: Settings, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    stage = fake.fake.add_stage("Start", apply_to=1)
    changes: list[tuple[str, dict[str, object]]] = [("first", {"id": stage.id, "name": "First"})]
    changes += [(f"add-{i}", {"name": f"Added {i}", "applyTo": 1}) for i in range(450)]
    changes += [("last", {"id": stage.id, "colour": "#0000dd"})]
    await enqueue(redis_client, settings, changes)
    stage_key = keys.stage_key("default", stage.id)
    pending = [f for f in await stage_fields(redis_client, stage_key) if f.startswith(keys.PENDING_FIELD_PREFIX)]
    assert len(pending) == 2
    # Batch mode off: a batch takes one change per stage (it would carry "first" with the adds, alone).
    # No rate limit: 452 requests, not a rate-limit test (0.45 s of waiting for slots).
    [account] = settings.accounts.values()
    unlimited = dataclasses.replace(account, rate_limit=1e6)
    async with running_worker(dataclasses.replace(settings, batch_mode="off", accounts={"default": unlimited})):
        terminal = await wait_for_terminal(redis_client, [key for key, _ in changes])
    assert posts(fake, stage.id) == [{"id": stage.id, "name": "First", "colour": "#0000dd"}]
    assert terminal["first"][0]["carried_by"] == terminal["last"][0]["carried_by"] == "first"
    assert sorted(await stage_fields(redis_client, stage_key)) == ["colour", "name", "seq"]


async def test_each_coalesced_change_logs_its_end_under_its_own_key(
    settings: Settings, redis_client: aioredis.Redis, fake: RunningFakeIvvy
) -> None:
    stage = fake.fake.add_stage("Start", apply_to=1)
    changes: list[tuple[str, dict[str, object]]] = [
        ("k1", {"id": stage.id, "name": "N"}),
        ("k2", {"id": stage.id, "colour": "#000004"}),
    ]
    await enqueue(redis_client, settings, changes)
    with capture_logs(processors=[merge_job_context]) as logged:
        async with running_worker(settings):
            await wait_for_terminal(redis_client, ["k1", "k2"])
    finished = sorted(line["idempotency_key"] for line in logged if line["event"] == "job.finished")
    assert finished == ["k1", "k2"]


@pytest.mark.parametrize(
    ("carried", "claimed_first", "newer", "ends"),
    [
        pytest.param({"name": "Carried"}, False, {"name": "Newer"}, ("Newer", "#111111"),
                     id="the leader and the change it carried"),
        pytest.param({"name": "Carried", "colour": "#222222"}, True, {"name": "Newer", "colour": "#333333"},
                     ("Newer", "#333333"), id="the leader carried none of its own (overtaken after its claim)"),
    ],
)  # fmt: skip
async def test_a_coalesced_request_of_unknown_outcome_holds_its_stage_whatever_its_changes_become(
    settings: Settings,
    redis_client: aioredis.Redis,
    fake: RunningFakeIvvy,
    transport: AiohttpTransport,
    ivvy_account: Account,
    carried: dict[str, object],
    claimed_first: bool,
    newer: dict[str, object],
    ends: tuple[str, str],
) -> None:
    """The leader's request (its colour, and "carried", coalesced) times out; iVvy applies it later
    anyway, within one request timeout. "newer", waiting on the stage's lock meanwhile, must not go
    before that late commit, nor may a retry that carries it: the stage ends at newer's values.
    Also when none of the request's fields was the leader's own and newer overtakes "carried" (both
    end superseded at once, neither waits out a hold): the leader's lock is what holds the stage."""
    stage = fake.fake.add_stage("Before", apply_to=1)
    settings = dataclasses.replace(settings, request_timeout_s=0.3, batch_mode="off")
    ledger = Ledger(redis_client, settings)
    leader = [("leader", {"id": stage.id, "colour": "#111111"})]
    await enqueue(
        redis_client, settings, leader if claimed_first else [*leader, ("carried", {"id": stage.id, **carried})]
    )
    start = await ledger.start(keys.job_id("default", "leader"), "w1", 1000.0, 0)
    assert start.decision == "go"
    if claimed_first:  # enqueued while the leader waits for its slot: gathered, and it overtakes the leader
        await enqueue(redis_client, settings, [("carried", {"id": stage.id, **carried})])
    # The first worker, by hand: the leader's run, its request committed 0.1 s after its timeout.
    fake.fake.update_faults({"late_commit_rate": 1.0, "late_commit_s": 0.4})
    runtime = Runtime(settings, ledger, {"default": IvvyClient(ivvy_account, transport, timeout=0.3)}, "w1")
    runtime.running[start.job_id] = Lease(start.run, time.monotonic() + settings.lease_s)
    first = asyncio.create_task(apply_lead_stage_change({"runtime": runtime}, start.job_id, start))

    async def held() -> bool:
        return len(fake.fake.requests) > 0

    await eventually(held)
    fake.fake.update_faults({"late_commit_rate": 0.0})
    await enqueue(redis_client, settings, [("newer", {"id": stage.id, **newer})])
    async with running_worker(settings):
        await first
        terminal = await wait_for_terminal(redis_client, ["leader", "carried", "newer"], within_s=10)

        async def all_answered() -> bool:  # the held request too: committed late, then answered
            return all(request.status is not None for request in fake.fake.requests)

        await eventually(all_answered)
    assert fake.fake.requests[0].body == {"id": stage.id, "colour": "#111111", **carried}
    assert terminal["newer"][0]["event"] == "succeeded"
    assert (stage.name, stage.colour) == ends
