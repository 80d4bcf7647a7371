"""worker.ivvy.IvvyClient with the real aiohttp transport, against servers on loopback.

Every outcome the worker branches on is produced by a real server: the fake iVvy for answers
and faults, a closed port for a refused connection, and a recording server that checks the
client's signatures with the independent implementation (not with ``worker.signing``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import prometheus_client
import pytest
from aiohttp import web

from tests import independent_ivvy_signing as independent
from tests.conftest import TEST_API_SECRET
from worker.core.change import LeadStageChange
from worker.core.errors import (
    IvvyAuthError,
    IvvyClockSkew,
    IvvyNoAnswer,
    IvvyRateLimited,
    IvvyRejected,
    IvvyTimeout,
    IvvyUnavailable,
)
from worker.core.processes import free_port
from worker.core.settings import Account, Secret
from worker.devtools.fake_ivvy import FIRST_STAGE_ID, RunningFakeIvvy
from worker.ivvy import CLOCK_SKEW_PAUSE_S, LIST_PAGE_TRIES, AiohttpTransport, IvvyClient, RawResponse, Transport

BUILT_IN_STAGES = 3


@pytest.fixture
def client(ivvy_account: Account, transport: AiohttpTransport) -> IvvyClient:
    return IvvyClient(ivvy_account, transport, timeout=2.0)


async def test_ping(client: IvvyClient) -> None:
    answer = await client.ping()
    assert answer["ack"] == "pong"


async def test_add_returns_the_new_stage_id(client: IvvyClient, fake_ivvy: RunningFakeIvvy) -> None:
    stage_id = await client.add_or_update_lead_stage(LeadStageChange(name="Referral", colour="#7ee546", apply_to=2))
    assert stage_id == FIRST_STAGE_ID
    assert fake_ivvy.fake.stages[stage_id].admin() == {
        "id": stage_id,
        "name": "Referral",
        "colour": "#7ee546",
        "applyTo": 2,
        "editable": True,
    }


async def test_update_returns_the_stage_id_and_changes_the_stage(
    client: IvvyClient, fake_ivvy: RunningFakeIvvy
) -> None:
    stage = fake_ivvy.fake.add_stage("Referral", apply_to=1)
    assert await client.add_or_update_lead_stage(LeadStageChange(id=stage.id, name="Renamed")) == stage.id
    assert (stage.name, stage.apply_to) == ("Renamed", 1)


async def test_get_lead_stage_list_follows_every_page(client: IvvyClient, fake_ivvy: RunningFakeIvvy) -> None:
    for n in range(250):
        fake_ivvy.fake.add_stage(f"Stage {n}", apply_to=1 + n % 2)
    stages = await client.get_lead_stage_list(per_page=7)
    assert [(s.id, s.name) for s in stages] == [(s.id, s.name) for s in fake_ivvy.fake.stages.values()]
    assert len(stages) == BUILT_IN_STAGES + 250
    pages = [r.body for r in fake_ivvy.fake.requests if r.action == "getLeadStageList"]
    assert pages == [{"start": start, "perPage": 7} for start in range(0, 253, 7)]


async def test_get_lead_stage_list_by_name_asks_for_one_name(client: IvvyClient, fake_ivvy: RunningFakeIvvy) -> None:
    for n in range(250):
        fake_ivvy.fake.add_stage(f"Stage {n % 125}", apply_to=1)
    stages = await client.get_lead_stage_list(name="Stage 7", per_page=100)
    assert [s.name for s in stages] == ["Stage 7", "Stage 7"]
    [page] = [r.body for r in fake_ivvy.fake.requests if r.action == "getLeadStageList"]
    assert page == {"filter": {"name": "Stage 7"}, "start": 0, "perPage": 100}


def quick_lister(account: Account, transport: Transport) -> IvvyClient:
    """A client whose page retries back off briefly: what is checked is how many tries each page gets."""
    return IvvyClient(account, transport, timeout=2.0, list_retry_base_s=0.005, list_retry_cap_s=0.05)


@dataclass
class FlakyTransport:
    """The real transport, but each distinct request is answered 503 its first ``failures`` times."""

    inner: AiohttpTransport
    failures: int
    seen: Counter[bytes]

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> RawResponse:
        self.seen[body] += 1
        if self.seen[body] <= self.failures:
            return RawResponse(503, {}, b'{"errorCode": 503, "message": "Service Unavailable", "specificCode": null}')
        return await self.inner.post(url, headers, body, timeout_s)

    async def close(self) -> None:
        await self.inner.close()


async def test_get_lead_stage_list_tries_each_page_again_before_giving_up(
    ivvy_account: Account, transport: AiohttpTransport, fake_ivvy: RunningFakeIvvy
) -> None:
    """A reconcile needs every page: one flaky page must not fail the whole listing (found by the soak)."""
    for n in range(25):
        fake_ivvy.fake.add_stage(f"Stage {n}", apply_to=1)
    flaky = FlakyTransport(transport, failures=LIST_PAGE_TRIES - 1, seen=Counter())
    stages = await quick_lister(ivvy_account, flaky).get_lead_stage_list(per_page=10)
    assert len(stages) == BUILT_IN_STAGES + 25
    assert sorted(flaky.seen.values()) == [LIST_PAGE_TRIES] * 3

    hopeless = FlakyTransport(transport, failures=LIST_PAGE_TRIES, seen=Counter())
    with pytest.raises(IvvyUnavailable):
        await quick_lister(ivvy_account, hopeless).get_lead_stage_list(per_page=10)
    assert list(hopeless.seen.values()) == [LIST_PAGE_TRIES]


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        pytest.param({"id": 999, "name": "x"}, 404, 24320, id="24320"),
        pytest.param({"id": 2, "name": "x"}, 400, 24321, id="24321"),
        pytest.param({"name": " ", "applyTo": 1}, 400, 24323, id="24323"),
        pytest.param({"name": "x", "applyTo": 1, "colour": "red"}, 400, 24324, id="24324"),
        pytest.param({"id": "wrong", "name": "x"}, 400, 23016, id="23016"),
    ],
)
async def test_ivvy_rejections_are_permanent(
    client: IvvyClient, payload: dict[str, Any], status: int, code: int
) -> None:
    with pytest.raises(IvvyRejected) as rejected:
        await client.call("crm", "addOrUpdateLeadStage", payload)
    error = rejected.value
    assert type(error) is IvvyRejected
    assert (error.http_status, error.specific_code, error.retryable) == (status, code, False)
    assert str(code) in str(error)


async def test_a_wrong_secret_is_an_auth_error(fake_ivvy: RunningFakeIvvy, transport: AiohttpTransport) -> None:
    account = Account("default", fake_ivvy.url, "demo-key", Secret("not-the-secret"), 10.0)
    with pytest.raises(IvvyAuthError) as refused:
        await IvvyClient(account, transport, timeout=2.0).ping()
    assert (refused.value.http_status, refused.value.retryable) == (401, False)
    assert "not-the-secret" not in str(refused.value)


@pytest.mark.parametrize("offset", [timedelta(minutes=-6), timedelta(minutes=7)], ids=["slow", "fast"])
async def test_a_stale_clock_is_the_workers_fault_measured_against_ivvys_date(
    ivvy_account: Account, transport: AiohttpTransport, offset: timedelta
) -> None:
    """23005 is not the change's fault: retryable, pausing the account, with the skew measured
    from iVvy's Date header (and the gauge and counter of the account set)."""
    skewed = IvvyClient(ivvy_account, transport, timeout=2.0, clock=lambda: datetime.now(UTC) + offset)
    errors_before = _sample("leadstage_clock_skew_errors_total", ivvy_account.name)
    with pytest.raises(IvvyClockSkew) as refused:
        await skewed.add_or_update_lead_stage(LeadStageChange(name="x", apply_to=1))
    error = refused.value
    assert (error.http_status, error.specific_code, error.retryable, error.pauses_account) == (401, 23005, True, True)
    assert error.retry_after is not None
    assert error.retry_after >= CLOCK_SKEW_PAUSE_S
    assert error.skew_s is not None
    assert abs(error.skew_s + offset.total_seconds()) < 5
    assert ("behind" if offset < timedelta(0) else "ahead of") in str(error)
    assert abs(_sample("leadstage_clock_skew_seconds", ivvy_account.name) + offset.total_seconds()) < 5
    assert _sample("leadstage_clock_skew_errors_total", ivvy_account.name) == errors_before + 1


async def test_a_fake_whose_clock_is_off_refuses_a_right_clock_as_stale(
    client: IvvyClient, fake_ivvy: RunningFakeIvvy
) -> None:
    fake_ivvy.fake.update_faults({"clock_offset_s": -400})
    with pytest.raises(IvvyClockSkew) as refused:
        await client.ping()
    assert refused.value.skew_s is not None
    assert abs(refused.value.skew_s + 400) < 5
    fake_ivvy.fake.update_faults({"clock_offset_s": 120})  # within the tolerance: fine, and measured
    assert (await client.ping())["ack"] == "pong"
    assert abs(_sample("leadstage_clock_skew_seconds", client.account.name) - 120) < 5


@contextlib.asynccontextmanager
async def _answering(status: int, body: object) -> AsyncIterator[str]:
    """A server on loopback answering every API call with ``status`` and ``body``; its base URL."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/api/1.0/{namespace}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _sample(name: str, account: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, {"account": account}) or 0.0


@pytest.mark.parametrize(
    ("body", "kind", "code"),
    [
        pytest.param({"errorCode": 400, "message": "bad", "specificCode": 24323}, IvvyRejected, 24323, id="400"),
        pytest.param({"errorCode": 401, "message": "no"}, IvvyAuthError, None, id="401"),
        pytest.param({"errorCode": 500, "message": "oops", "specificCode": 24322}, IvvyUnavailable, 24322, id="24322"),
        pytest.param({"errorCode": 429, "message": "slow down"}, IvvyRateLimited, None, id="429"),
        pytest.param({"errorCode": 401, "message": "Request is stale", "specificCode": 23005}, IvvyClockSkew, 23005),
        pytest.param({"errorCode": "weird", "message": "?"}, IvvyUnavailable, None, id="unreadable-code"),
    ],
)
async def test_a_200_with_an_error_body_is_classified_by_the_body(
    ivvy_account: Account, transport: AiohttpTransport, body: dict[str, Any], kind: type[Exception], code: int | None
) -> None:
    """As the official .NET SDK does: the error fields decide, whatever the status. Before, an
    add read this as "did not report success" and a list page as a retry."""
    async with _answering(200, body) as url:
        client = IvvyClient(dataclasses.replace(ivvy_account, base_url=url), transport, timeout=2.0)
        with pytest.raises(kind) as raised:
            await client.add_or_update_lead_stage(LeadStageChange(name="x", apply_to=1))
        assert type(raised.value) is kind
        assert getattr(raised.value, "specific_code", None) == code
        if isinstance(body["errorCode"], int):
            assert "(HTTP status 200)" in str(raised.value)


async def test_list_pages_answered_200_with_a_permanent_error_are_not_retried(
    client: IvvyClient, fake_ivvy: RunningFakeIvvy
) -> None:
    fake_ivvy.fake.update_faults({"errors_as_200_rate": 1})
    fake_ivvy.fake.requests.clear()
    with pytest.raises(IvvyRejected) as rejected:
        await client.call("crm", "getLeadStageList", {"start": -1})
    assert (rejected.value.http_status, rejected.value.specific_code) == (400, 23016)
    # A refused page in a listing: a permanent error at once, not LIST_PAGE_TRIES tries.
    with pytest.raises(IvvyRejected):
        await client.get_lead_stage_list(per_page=0)
    assert len(fake_ivvy.fake.requests) == 2
    # A 24322 answered with 200 is still retryable.
    fake_ivvy.fake.update_faults({"error_24322_rate": 1})
    with pytest.raises(IvvyUnavailable) as unavailable:
        await client.add_or_update_lead_stage(LeadStageChange(name="x", apply_to=1))
    assert unavailable.value.specific_code == 24322
    assert not fake_ivvy.fake.stages.keys() - {1, 2, 3}


async def test_5xx_is_retryable(client: IvvyClient, fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"error_rate": 1})
    with pytest.raises(IvvyUnavailable) as unavailable:
        await client.add_or_update_lead_stage(LeadStageChange(name="x", apply_to=1))
    assert type(unavailable.value) is IvvyUnavailable
    assert unavailable.value.http_status in (500, 502, 503)
    assert unavailable.value.retryable


async def test_24322_is_retryable(client: IvvyClient, fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"error_24322_rate": 1})
    with pytest.raises(IvvyUnavailable) as unavailable:
        await client.add_or_update_lead_stage(LeadStageChange(name="x", apply_to=1))
    assert (unavailable.value.http_status, unavailable.value.specific_code) == (500, 24322)
    assert unavailable.value.retryable


async def test_429_is_rate_limited_with_the_servers_retry_after(client: IvvyClient, fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"rate_limit_rate": 1, "retry_after_s": 7})
    with pytest.raises(IvvyRateLimited) as limited:
        await client.ping()
    assert (limited.value.http_status, limited.value.retry_after, limited.value.retryable) == (429, 7.0, True)


async def test_a_hang_past_the_timeout_is_a_timeout_with_unknown_outcome(
    ivvy_account: Account, transport: AiohttpTransport, fake_ivvy: RunningFakeIvvy
) -> None:
    fake_ivvy.fake.update_faults({"hang_rate": 1, "hang_s": 2})
    impatient = IvvyClient(ivvy_account, transport, timeout=0.15)
    with pytest.raises(IvvyTimeout) as timed_out:
        await impatient.add_or_update_lead_stage(LeadStageChange(name="x", apply_to=1))
    assert timed_out.value.outcome_unknown
    assert timed_out.value.retryable
    assert len(fake_ivvy.fake.stages) == BUILT_IN_STAGES


async def test_a_dropped_connection_is_no_answer_with_unknown_outcome(
    client: IvvyClient, fake_ivvy: RunningFakeIvvy
) -> None:
    fake_ivvy.fake.update_faults({"drop_rate": 1})
    with pytest.raises(IvvyNoAnswer) as dropped:
        await client.add_or_update_lead_stage(LeadStageChange(name="Committed", apply_to=1))
    assert type(dropped.value) is IvvyNoAnswer
    assert dropped.value.outcome_unknown
    assert fake_ivvy.fake.stages[FIRST_STAGE_ID].name == "Committed"  # iVvy did commit it
    fake_ivvy.fake.update_faults({"drop_rate": 0})
    assert (await client.ping())["ack"] == "pong"  # the pool recovers from the dropped connection


async def test_a_refused_connection_is_no_answer_that_cannot_have_arrived(transport: AiohttpTransport) -> None:
    account = Account("default", f"http://127.0.0.1:{free_port()}", "k", Secret(TEST_API_SECRET), 10.0)
    with pytest.raises(IvvyNoAnswer) as refused:
        await IvvyClient(account, transport, timeout=2.0).ping()
    assert type(refused.value) is IvvyNoAnswer
    assert not refused.value.outcome_unknown


@dataclass(frozen=True)
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


_CANNED = {
    "addOrUpdateLeadStage": {"success": True, "id": 42},
    "getLeadStageList": {"meta": {"totalResults": 0, "start": 0, "perPage": 5, "count": 0}, "results": []},
    "ping": {"ack": "pong"},
}


async def test_the_clients_requests_pass_the_independent_verifier() -> None:
    """The client's headers as they arrive on the wire, checked by code that shares nothing with it."""
    seen: list[Seen] = []

    async def record(request: web.Request) -> web.Response:
        headers = [(name.decode(), value.decode()) for name, value in request.raw_headers]
        seen.append(Seen(request.method, request.raw_path, headers, await request.read()))
        return web.json_response(_CANNED[request.query["action"]])

    app = web.Application()
    app.router.add_post("/api/1.0/{namespace}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    transport = AiohttpTransport()
    try:
        account = Account("default", f"http://127.0.0.1:{port}", "key-7", Secret("sec:ret é"), 10.0)
        client = IvvyClient(account, transport, timeout=2.0)
        await client.add_or_update_lead_stage(LeadStageChange(name="Referral", apply_to=1))
        await client.add_or_update_lead_stage(LeadStageChange(id=42, colour="#7ee546"))
        await client.get_lead_stage_list(per_page=5)
        await client.ping()
    finally:
        await transport.close()
        await runner.cleanup()

    assert [(s.method, s.raw_path) for s in seen] == [
        ("POST", "/api/1.0/crm?action=addOrUpdateLeadStage"),
        ("POST", "/api/1.0/crm?action=addOrUpdateLeadStage"),
        ("POST", "/api/1.0/crm?action=getLeadStageList"),
        ("POST", "/api/1.0/test?action=ping"),
    ]
    assert [orjson.loads(s.body) for s in seen] == [
        {"name": "Referral", "applyTo": 1},
        {"id": 42, "colour": "#7ee546"},
        {"start": 0, "perPage": 5},
        {},
    ]
    for request in seen:
        key = independent.verify(
            method=request.method,
            request_uri=request.raw_path,
            headers=request.headers,
            body=request.body,
            secrets={"key-7": "sec:ret é"},
            now=datetime.now(UTC),
        )
        assert key == "key-7"
        # The Content-Type that was signed is the one sent: exactly one, and the docs' only type.
        content_types = [value for name, value in request.headers if name.lower() == "content-type"]
        assert content_types == ["application/json"]
        dates = [name for name, _ in request.headers if name.lower() in ("date", "ivvy-date")]
        assert dates == ["IVVY-Date"], "the date travels in IVVY-Date only, so the signed date part is empty"
