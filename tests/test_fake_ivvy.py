"""The fake iVvy, over real loopback sockets, with requests signed by the independent signer.

Requests are written byte for byte with asyncio streams (``send``), so what the fake sees is
exactly what the test wrote: no HTTP client adds, drops or re-encodes anything, and a dropped
connection shows up as an answer of no bytes at all.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import random
import re
import socket
import string
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest

from tests import independent_ivvy_signing as independent
from tests.conftest import TEST_API_SECRET
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET
from worker.devtools import demo as demo_package
from worker.devtools import fake_ivvy as fake_ivvy_package
from worker.devtools.fake_ivvy import (
    FIRST_STAGE_ID,
    MAX_PER_PAGE,
    ApiError,
    FakeIvvy,
    Faults,
    RunningFakeIvvy,
    add_arguments,
    default_credentials,
    run_from_args,
    running_fake_ivvy,
)

ADD_URI = "/api/1.0/crm?action=addOrUpdateLeadStage"
LIST_URI = "/api/1.0/crm?action=getLeadStageList"
PING_URI = "/api/1.0/test?action=ping"
BUILT_IN_IDS = (1, 2, 3)
REPO_ROOT = Path(__file__).resolve().parents[1]


class Listening(Protocol):
    """Where a fake listens: a ``RunningFakeIvvy``, or one started by ``run_from_args``."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


@dataclass(frozen=True)
class Address:
    host: str
    port: int


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-case
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def send(
    server: Listening, method: str, uri: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> Answer | None:
    """Write one HTTP/1.1 request as given; the answer, or None when the connection closed without one."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = f"{method} {uri} HTTP/1.1\r\nHost: {server.host}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    writer.write(head.encode("utf-8") + b"\r\n" + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    if not raw:
        return None
    head_bytes, _, content = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    names_values = (line.split(":", 1) for line in header_lines)
    return Answer(int(status_line.split()[1]), {n.strip().lower(): v.strip() for n, v in names_values}, content)


def signed(
    uri: str,
    body: bytes,
    *,
    key: str = DEMO_API_KEY,
    secret: str = DEMO_API_SECRET,
    now: datetime | None = None,
    use_ivvy_date: bool = True,
) -> list[tuple[str, str]]:
    return independent.sign(
        key=key, secret=secret, request_uri=uri, body=body, now=now or datetime.now(UTC), use_ivvy_date=use_ivvy_date
    )


async def call(server: Listening, uri: str, payload: Any, **sign_options: Any) -> Answer:
    """A correctly signed API call that is expected to be answered."""
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    answer = await send(server, "POST", uri, signed(uri, body, **sign_options), body)
    assert answer is not None, "the fake closed the connection without answering"
    return answer


async def admin(server: RunningFakeIvvy, method: str, path: str, payload: Any = None) -> Answer:
    body = b"" if payload is None else orjson.dumps(payload)
    answer = await send(server, method, path, [("Content-Type", "application/json")], body)
    assert answer is not None
    return answer


def assert_ivvy_error(answer: Answer, status: int, *specific_codes: int | None) -> dict[str, Any]:
    """The exception body of the docs: errorCode = HTTP status, message, specificCode (one of those given)."""
    assert answer.status == status
    assert answer.headers["content-type"] == "application/json"
    error: dict[str, Any] = answer.json()
    assert error["errorCode"] == status
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["specificCode"] in specific_codes
    assert set(error) <= {"errorCode", "message", "specificCode", "additionalMessages"}
    if "additionalMessages" in error:
        assert error["additionalMessages"]
        assert all(isinstance(m, str) for m in error["additionalMessages"])
    return error


def stage_snapshot(server: RunningFakeIvvy) -> list[dict[str, Any]]:
    return [stage.admin() for stage in server.fake.stages.values()]


# Signatures.


@pytest.mark.parametrize("use_ivvy_date", [True, False], ids=["IVVY-Date", "Date"])
async def test_a_request_signed_by_the_independent_signer_is_accepted(
    fake_ivvy: RunningFakeIvvy, use_ivvy_date: bool
) -> None:
    answer = await call(fake_ivvy, PING_URI, {}, use_ivvy_date=use_ivvy_date)
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    pong = answer.json()
    assert pong["ack"] == "pong"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC", pong["timestamp"])
    server_time = datetime.strptime(pong["timestamp"], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
    assert abs(server_time - datetime.now(UTC)) < timedelta(seconds=5)


def _other_char(char: str) -> str:
    """A different character that is not the same one in another case (the signed string is lower-cased)."""
    for alphabet in (string.digits, string.ascii_lowercase, string.ascii_uppercase):
        if char in alphabet:
            return alphabet[(alphabet.index(char) + 1) % len(alphabet)]
    return "x"


def _with_header(headers: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(n, value if n == name else v) for n, v in headers]


def _changed_at(text: str, i: int) -> str:
    return text[:i] + _other_char(text[i]) + text[i + 1 :]


def _mutations(headers: list[tuple[str, str]], body: bytes, part: str) -> list[tuple[list[tuple[str, str]], bytes]]:
    """Every variant of a signed request with exactly one byte of ``part`` changed."""
    if part == "body":
        text = body.decode()
        return [(headers, _changed_at(text, i).encode()) for i in range(len(text))]
    values = dict(headers)
    if part in ("key", "signature"):
        name = "X-Api-Authorization"
        key, signature = values[name].removeprefix("IWS ").split(":")
        if part == "key":
            variants = [f"IWS {_changed_at(key, i)}:{signature}" for i in range(len(key))]
        else:
            variants = [f"IWS {key}:{_changed_at(signature, i)}" for i in range(len(signature))]
    else:
        name = {"date": "IVVY-Date", "md5": "Content-MD5", "content-type": "Content-Type"}[part]
        variants = [_changed_at(values[name], i) for i in range(len(values[name]))]
    return [(_with_header(headers, name, variant), body) for variant in variants]


@pytest.mark.parametrize("part", ["body", "key", "date", "signature", "md5", "content-type"])
async def test_any_single_byte_changed_is_refused_with_401(fake_ivvy: RunningFakeIvvy, part: str) -> None:
    body = orjson.dumps({"name": "Referral", "applyTo": 1})
    headers = signed(ADD_URI, body)
    mutations = _mutations(headers, body, part)
    assert mutations
    for changed_headers, changed_body in mutations:
        assert (changed_headers, changed_body) != (headers, body)
        answer = await send(fake_ivvy, "POST", ADD_URI, changed_headers, changed_body)
        assert answer is not None
        # A changed date may also be a stale one (23005); everything else has no specific code.
        assert_ivvy_error(answer, 401, *((None, 23005) if part == "date" else (None,)))
    assert stage_snapshot(fake_ivvy) == [stage.admin() for stage in FakeIvvy(credentials={}).stages.values()]
    # The untouched request still goes through: the refusals were about the changed byte.
    answer = await send(fake_ivvy, "POST", ADD_URI, headers, body)
    assert answer is not None
    assert answer.status == 200


async def test_a_request_signed_for_another_uri_is_refused(fake_ivvy: RunningFakeIvvy) -> None:
    headers = signed(LIST_URI, b"{}")
    answer = await send(fake_ivvy, "POST", PING_URI, headers, b"{}")
    assert answer is not None
    assert_ivvy_error(answer, 401, None)


@pytest.mark.parametrize("header", ["X-Api-Authorization", "Content-MD5"])
async def test_a_non_ascii_header_is_refused_not_a_server_error(fake_ivvy: RunningFakeIvvy, header: str) -> None:
    headers = signed(PING_URI, b"{}")
    headers = _with_header(headers, header, dict(headers)[header][:-1] + "é")
    answer = await send(fake_ivvy, "POST", PING_URI, headers, b"{}")
    assert answer is not None
    assert_ivvy_error(answer, 401, None)


@pytest.mark.parametrize("offset", [timedelta(minutes=-6), timedelta(minutes=6), timedelta(days=-4000)])
async def test_a_date_more_than_five_minutes_off_is_stale(fake_ivvy: RunningFakeIvvy, offset: timedelta) -> None:
    answer = await call(fake_ivvy, PING_URI, {}, now=datetime.now(UTC) + offset)
    error = assert_ivvy_error(answer, 401, 23005)
    assert error["message"] == "Request is stale"


async def test_a_date_four_minutes_off_is_still_fresh(fake_ivvy: RunningFakeIvvy) -> None:
    answer = await call(fake_ivvy, PING_URI, {}, now=datetime.now(UTC) - timedelta(minutes=4))
    assert answer.status == 200


@pytest.mark.parametrize("missing", ["X-Api-Authorization", "Content-MD5", "IVVY-Date"])
async def test_a_missing_signing_header_is_refused(fake_ivvy: RunningFakeIvvy, missing: str) -> None:
    headers = [(n, v) for n, v in signed(PING_URI, b"{}") if n != missing]
    answer = await send(fake_ivvy, "POST", PING_URI, headers, b"{}")
    assert answer is not None
    assert_ivvy_error(answer, 401, None)


async def test_extra_credentials_are_accepted_and_logged_by_key() -> None:
    async with running_fake_ivvy(credentials={"first": "secret-1", "second": "secret-2"}) as server:
        assert (await call(server, PING_URI, {}, key="second", secret="secret-2")).status == 200
        wrong_pair = await call(server, PING_URI, {}, key="first", secret="secret-2")
        assert_ivvy_error(wrong_pair, 401, None)
        assert [(r.key, r.status) for r in server.fake.requests] == [("second", 200), ("first", 401)]


def test_default_credentials_come_from_the_environment_else_the_demo_pair() -> None:
    assert default_credentials({}) == {DEMO_API_KEY: DEMO_API_SECRET}
    assert default_credentials({"IVVY_API_KEY": "k", "IVVY_API_SECRET": TEST_API_SECRET}) == {"k": TEST_API_SECRET}


# Routing.


@pytest.mark.parametrize(
    ("method", "uri", "status"),
    [
        ("GET", PING_URI, 405),
        ("PUT", ADD_URI, 405),
        ("POST", "/api/1.0/crm?action=deleteLeadStage", 404),
        ("POST", "/api/1.0/crm", 404),
        ("POST", "/api/1.0/nope?action=ping", 404),
        ("POST", "/api/2.0/test?action=ping", 404),
        ("POST", "/somewhere/else", 404),
    ],
)
async def test_unknown_calls_and_other_methods_get_ivvy_error_bodies(
    fake_ivvy: RunningFakeIvvy, method: str, uri: str, status: int
) -> None:
    answer = await send(fake_ivvy, method, uri, signed(uri, b"{}"), b"{}")
    assert answer is not None
    assert_ivvy_error(answer, status, None)


# addOrUpdateLeadStage.


async def test_add_stores_a_normalised_stage_and_answers_its_id(fake_ivvy: RunningFakeIvvy) -> None:
    first = await call(fake_ivvy, ADD_URI, {"name": "  Referral Lead ", "applyTo": 1, "colour": "#7EE546"})
    second = await call(fake_ivvy, ADD_URI, {"name": "Walk-in", "applyTo": "2", "ignored": True})
    assert (first.status, first.json()) == (200, {"success": True, "id": FIRST_STAGE_ID})
    assert (second.status, second.json()) == (200, {"success": True, "id": FIRST_STAGE_ID + 1})
    assert stage_snapshot(fake_ivvy)[3:] == [
        {"id": FIRST_STAGE_ID, "name": "Referral Lead", "colour": "#7ee546", "applyTo": 1, "editable": True},
        {"id": FIRST_STAGE_ID + 1, "name": "Walk-in", "colour": None, "applyTo": 2, "editable": True},
    ]


async def test_update_changes_only_the_fields_given(fake_ivvy: RunningFakeIvvy) -> None:
    stage = fake_ivvy.fake.add_stage("Referral", apply_to=1, colour="#000000")
    answer = await call(fake_ivvy, ADD_URI, {"id": stage.id, "colour": "#7ee546"})
    assert (answer.status, answer.json()) == (200, {"success": True, "id": stage.id})
    assert stage.admin() == {"id": stage.id, "name": "Referral", "colour": "#7ee546", "applyTo": 1, "editable": True}
    await call(fake_ivvy, ADD_URI, {"id": stage.id, "name": " Renamed ", "applyTo": 2})
    assert stage.admin() == {"id": stage.id, "name": "Renamed", "colour": "#7ee546", "applyTo": 2, "editable": True}


async def test_a_name_of_255_characters_after_trimming_is_accepted(fake_ivvy: RunningFakeIvvy) -> None:
    answer = await call(fake_ivvy, ADD_URI, {"name": "  " + "n" * 255 + "  ", "applyTo": 1})
    assert answer.status == 200
    assert fake_ivvy.fake.stages[answer.json()["id"]].name == "n" * 255


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        pytest.param({"id": 999, "name": "x"}, 404, 24320, id="24320-unknown-id"),
        pytest.param({"id": 0, "colour": "#000000"}, 404, 24320, id="24320-id-0"),
        pytest.param({"id": -5, "colour": "#000000"}, 404, 24320, id="24320-negative-id"),
        *(
            pytest.param({"id": built_in, "name": "x"}, 400, 24321, id=f"24321-built-in-{built_in}")
            for built_in in BUILT_IN_IDS
        ),
        pytest.param({"applyTo": 1}, 400, 24323, id="24323-add-without-name"),
        pytest.param({"name": "   ", "applyTo": 1}, 400, 24323, id="24323-blank-name"),
        pytest.param({"name": "n" * 256, "applyTo": 1}, 400, 24323, id="24323-name-too-long"),
        pytest.param({"name": "Referral"}, 400, 24323, id="24323-add-without-applyTo"),
        pytest.param({"name": "x", "applyTo": 1, "colour": "red"}, 400, 24324, id="24324-colour-word"),
        pytest.param({"name": "x", "applyTo": 1, "colour": "#12345g"}, 400, 24324, id="24324-colour-not-hex"),
        pytest.param({"name": "x", "applyTo": 3}, 400, 24324, id="24324-applyTo-3"),
        pytest.param({"name": "x", "applyTo": "lead"}, 400, 24324, id="24324-applyTo-word"),
        pytest.param({"id": "wrong"}, 400, 23016, id="23016-id-string"),
        pytest.param({"id": 1.5, "name": "x"}, 400, 23016, id="23016-id-fraction"),
        pytest.param({"id": True, "name": "x"}, 400, 23016, id="23016-id-bool"),
        pytest.param({"id": None, "name": "x", "applyTo": 1}, 400, 23016, id="23016-id-null"),
        pytest.param({"name": 5, "applyTo": 1}, 400, 23016, id="23016-name-number"),
        pytest.param({"name": "x", "applyTo": [1]}, 400, 23016, id="23016-applyTo-list"),
        pytest.param({"name": "x", "applyTo": 1, "colour": 7}, 400, 23016, id="23016-colour-number"),
        pytest.param([{"name": "x", "applyTo": 1}], 400, 23016, id="23016-body-array"),
        pytest.param(b"{not json", 400, 23016, id="23016-body-not-json"),
    ],
)
async def test_each_specific_code_of_the_seed(fake_ivvy: RunningFakeIvvy, payload: Any, status: int, code: int) -> None:
    before = stage_snapshot(fake_ivvy)
    answer = await call(fake_ivvy, ADD_URI, payload)
    error = assert_ivvy_error(answer, status, code)
    if code in (24323, 24324, 23016):
        assert error["additionalMessages"], "invalid data says why"
    assert stage_snapshot(fake_ivvy) == before


async def test_23016_names_the_parameter_as_the_docs_show(fake_ivvy: RunningFakeIvvy) -> None:
    error = (await call(fake_ivvy, ADD_URI, {"id": "wrong"})).json()
    assert error == {
        "errorCode": 400,
        "message": "'id' does not validate",
        "specificCode": 23016,
        "additionalMessages": ["Value must be a whole number"],
    }


async def test_a_body_not_sent_as_json_is_refused(fake_ivvy: RunningFakeIvvy) -> None:
    body = b'{"name": "x", "applyTo": 1}'
    headers = independent.sign(
        key=DEMO_API_KEY,
        secret=DEMO_API_SECRET,
        request_uri=ADD_URI,
        body=body,
        now=datetime.now(UTC),
        content_type="text/plain",
    )
    answer = await send(fake_ivvy, "POST", ADD_URI, headers, body)
    assert answer is not None
    assert_ivvy_error(answer, 400, 23016)


# getLeadStageList.


async def test_get_lead_stage_list_pages_with_start_and_per_page(fake_ivvy: RunningFakeIvvy) -> None:
    for n in range(25):
        fake_ivvy.fake.add_stage(f"Stage {n}", apply_to=2)
    total = 3 + 25

    default = (await call(fake_ivvy, LIST_URI, {})).json()
    assert default["meta"] == {"totalResults": total, "start": 0, "perPage": 10, "count": 10}
    assert [s["id"] for s in default["results"]] == [1, 2, 3, *range(FIRST_STAGE_ID, FIRST_STAGE_ID + 7)]
    assert default["results"][1] == {
        "id": 2,
        "name": "Won",
        "colour": "#2ca02c",
        "applyTo": 1,
        "reasons": [{"id": 11, "reason": "Price under budget"}, {"id": 12, "reason": "Repeat client"}],
    }

    last = (await call(fake_ivvy, LIST_URI, {"start": 20, "perPage": 10})).json()
    assert last["meta"] == {"totalResults": total, "start": 20, "perPage": 10, "count": 8}
    beyond = (await call(fake_ivvy, LIST_URI, {"start": 500})).json()
    assert (beyond["meta"]["count"], beyond["results"]) == (0, [])

    collected, start = [], 0
    while True:
        page = (await call(fake_ivvy, LIST_URI, {"start": start, "perPage": 4})).json()
        if not page["results"]:
            break
        collected += [s["id"] for s in page["results"]]
        start += page["meta"]["count"]
    assert collected == [stage["id"] for stage in stage_snapshot(fake_ivvy)]
    assert collected == sorted(collected)


async def test_per_page_above_the_cap_has_no_effect_beyond_it(fake_ivvy: RunningFakeIvvy) -> None:
    for n in range(MAX_PER_PAGE + 10):
        fake_ivvy.fake.add_stage(f"Stage {n}", apply_to=2)
    page = (await call(fake_ivvy, LIST_URI, {"perPage": 5000})).json()
    assert page["meta"]["perPage"] == page["meta"]["count"] == MAX_PER_PAGE


@pytest.mark.parametrize(
    ("payload", "field"), [({"start": -1}, "start"), ({"perPage": 0}, "perPage"), ({"start": "0"}, "start")]
)
async def test_bad_paging_parameters_are_23016(fake_ivvy: RunningFakeIvvy, payload: Any, field: str) -> None:
    error = assert_ivvy_error(await call(fake_ivvy, LIST_URI, payload), 400, 23016)
    assert error["message"] == f"'{field}' does not validate"


# Faults.


async def test_latency_delays_every_api_request(fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"latency_ms": 150})
    started = time.monotonic()
    answer = await call(fake_ivvy, PING_URI, {})
    assert answer.status == 200
    assert time.monotonic() - started >= 0.15
    assert fake_ivvy.fake.requests[-1].fault == "latency"


async def test_5xx_fault_answers_an_error_body_and_applies_nothing(fake_ivvy: RunningFakeIvvy) -> None:
    (await admin(fake_ivvy, "POST", "/_admin/faults", {"error_rate": 1})).json()
    before = stage_snapshot(fake_ivvy)
    statuses = set()
    for _ in range(12):
        answer = await call(fake_ivvy, ADD_URI, {"name": "x", "applyTo": 1})
        assert answer.status in {500, 502, 503}
        assert_ivvy_error(answer, answer.status, None)
        statuses.add(answer.status)
    assert len(statuses) > 1, "the 5xx status varies"
    assert stage_snapshot(fake_ivvy) == before
    assert {r.fault for r in fake_ivvy.fake.requests} == {"5xx"}


async def test_429_fault_says_when_to_retry(fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"rate_limit_rate": 1, "retry_after_s": 7})
    answer = await call(fake_ivvy, ADD_URI, {"name": "x", "applyTo": 1})
    assert_ivvy_error(answer, 429, None)
    assert answer.headers["retry-after"] == "7"
    assert len(fake_ivvy.fake.stages) == len(BUILT_IN_IDS)


async def test_24322_fault_hits_add_or_update_only(fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"error_24322_rate": 1})
    error = assert_ivvy_error(await call(fake_ivvy, ADD_URI, {"name": "x", "applyTo": 1}), 500, 24322)
    assert error["message"] == "An error has occurred"
    assert len(fake_ivvy.fake.stages) == len(BUILT_IN_IDS)
    assert (await call(fake_ivvy, PING_URI, {})).status == 200
    assert [r.fault for r in fake_ivvy.fake.requests] == ["24322", None]


async def test_hang_holds_the_request_then_closes_without_applying_it(fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"hang_rate": 1, "hang_s": 0.2})
    body = orjson.dumps({"name": "Hung", "applyTo": 1})
    started = time.monotonic()
    answer = await send(fake_ivvy, "POST", ADD_URI, signed(ADD_URI, body), body)
    assert answer is None
    assert time.monotonic() - started >= 0.2
    assert len(fake_ivvy.fake.stages) == len(BUILT_IN_IDS)
    record = fake_ivvy.fake.requests[-1]
    assert (record.fault, record.status) == ("hang", None)


async def test_a_hung_request_does_not_hold_up_shutdown() -> None:
    async with running_fake_ivvy(credentials={"k": "s"}, faults=Faults(hang_rate=1, hang_s=60)) as server:
        pending = asyncio.create_task(call(server, PING_URI, {}, key="k", secret="s"))
        done, _ = await asyncio.wait({pending}, timeout=0.1)
        assert not done, "the request hangs"
        assert server.fake.requests[-1].fault == "hang"
        started = time.monotonic()
    assert time.monotonic() - started < 5
    with pytest.raises(AssertionError, match="without answering"):
        await pending


async def test_drop_commits_the_change_then_drops_the_connection(fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"drop_rate": 1})
    body = orjson.dumps({"name": "Dropped", "applyTo": 2})
    assert await send(fake_ivvy, "POST", ADD_URI, signed(ADD_URI, body), body) is None
    stages = (await admin(fake_ivvy, "GET", "/_admin/stages")).json()["stages"]
    assert stages[-1] == {"id": FIRST_STAGE_ID, "name": "Dropped", "colour": None, "applyTo": 2, "editable": True}
    record = fake_ivvy.fake.requests[-1]
    assert (record.fault, record.status) == ("drop", None)


async def test_faults_come_after_the_signature_check(fake_ivvy: RunningFakeIvvy) -> None:
    fake_ivvy.fake.update_faults({"error_rate": 1})
    answer = await call(fake_ivvy, PING_URI, {}, secret="not the secret")
    assert_ivvy_error(answer, 401, None)
    assert fake_ivvy.fake.requests[-1].fault is None


async def test_the_seed_makes_fault_draws_repeatable() -> None:
    async def statuses(seed: int) -> list[int]:
        faults = Faults(error_rate=0.3, rate_limit_rate=0.3)
        async with running_fake_ivvy(credentials={"k": "s"}, faults=faults, seed=seed) as server:
            return [(await call(server, PING_URI, {}, key="k", secret="s")).status for _ in range(30)]

    first = await statuses(7)
    assert first == await statuses(7)
    assert {200, 429} <= set(first)
    assert first != await statuses(8)


def test_each_rate_is_the_share_of_requests_it_hits() -> None:
    faults = Faults(error_rate=0.1, rate_limit_rate=0.2, hang_rate=0.05, drop_rate=0.15, error_24322_rate=0.1)
    rng = random.Random(1)
    draws = [faults.pick(rng) for _ in range(20_000)]
    shares = {fault: draws.count(fault) / len(draws) for fault in ("5xx", "429", "hang", "drop", "24322", None)}
    expected = {"5xx": 0.1, "429": 0.2, "hang": 0.05, "drop": 0.15, "24322": 0.1, None: 0.4}
    assert shares == pytest.approx(expected, abs=0.015)


# Admin endpoints.


async def test_admin_stages_lists_and_creates_stages(fake_ivvy: RunningFakeIvvy) -> None:
    listed = (await admin(fake_ivvy, "GET", "/_admin/stages")).json()["stages"]
    assert [(s["id"], s["name"], s["editable"]) for s in listed] == [
        (1, "Quoted", False),
        (2, "Won", False),
        (3, "Lost", False),
    ]
    created = await admin(fake_ivvy, "POST", "/_admin/stages", {"name": " Locked ", "applyTo": 2, "editable": False})
    assert created.json() == {"id": FIRST_STAGE_ID}
    assert (await admin(fake_ivvy, "GET", "/_admin/stages")).json()["stages"][-1] == {
        "id": FIRST_STAGE_ID,
        "name": "Locked",
        "colour": None,
        "applyTo": 2,
        "editable": False,
    }
    assert_ivvy_error(await call(fake_ivvy, ADD_URI, {"id": FIRST_STAGE_ID, "name": "x"}), 400, 24321)


async def refused_naming(fake_ivvy: RunningFakeIvvy, path: str, payload: dict[str, Any], field: str) -> str:
    """POST an admin payload that must be refused with 400 naming ``field``; the error's text."""
    answer = await admin(fake_ivvy, "POST", path, payload)
    assert answer.status == 400
    assert answer.json()["field"] == field
    error: str = answer.json()["error"]
    return error


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"applyTo": 1}, "name"),
        ({"name": "x"}, "applyTo"),
        ({"name": "x", "applyTo": 1, "colour": "blue"}, "colour"),
        ({"name": "x", "applyTo": 1, "editable": "yes"}, "editable"),
        ({"name": "x", "applyTo": 1, "shape": "round"}, "shape"),
    ],
)
async def test_admin_stage_creation_names_the_bad_field(
    fake_ivvy: RunningFakeIvvy, payload: dict[str, Any], field: str
) -> None:
    await refused_naming(fake_ivvy, "/_admin/stages", payload, field)
    assert len(fake_ivvy.fake.stages) == len(BUILT_IN_IDS)


async def test_admin_requests_logs_every_api_request(fake_ivvy: RunningFakeIvvy) -> None:
    before = time.time()
    await call(fake_ivvy, ADD_URI, {"name": "Logged", "applyTo": 1})
    await call(fake_ivvy, PING_URI, b"")
    await send(fake_ivvy, "POST", PING_URI, [("X-Api-Authorization", "IWS stranger:0000")], b"{}")
    requests = (await admin(fake_ivvy, "GET", "/_admin/requests")).json()["requests"]
    assert [(r["namespace"], r["action"], r["key"], r["body"], r["status"], r["fault"]) for r in requests] == [
        ("crm", "addOrUpdateLeadStage", DEMO_API_KEY, {"name": "Logged", "applyTo": 1}, 200, None),
        ("test", "ping", DEMO_API_KEY, None, 200, None),
        ("test", "ping", "stranger", {}, 401, None),
    ]
    assert all(before <= r["at"] <= time.time() for r in requests)


async def test_admin_faults_merges_and_answers_the_current_faults(fake_ivvy: RunningFakeIvvy) -> None:
    assert (await admin(fake_ivvy, "GET", "/_admin/faults")).json() == Faults().as_dict()
    await admin(fake_ivvy, "POST", "/_admin/faults", {"error_rate": 0.25, "latency_ms": 3})
    merged = (await admin(fake_ivvy, "POST", "/_admin/faults", {"hang_s": 2.5})).json()
    assert merged == {**Faults().as_dict(), "error_rate": 0.25, "latency_ms": 3, "hang_s": 2.5}
    assert (await admin(fake_ivvy, "GET", "/_admin/faults")).json() == merged


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"hang_rate": "half"}, "hang_rate"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"hang_s": None}, "hang_s"),
        ({"retry_after_s": 1.5}, "retry_after_s"),
        ({"error_24322_rate": True}, "error_24322_rate"),
        ({"teleport_rate": 0.1}, "teleport_rate"),
        (
            {"error_rate": 0.6, "drop_rate": 0.6},
            "hang_rate+error_rate+rate_limit_rate+drop_rate+error_24322_rate+gateway_5xx_rate+late_commit_rate",
        ),
        ({"clock_offset_s": "ahead"}, "clock_offset_s"),
        ({"clock_offset_s": float("inf")}, "clock_offset_s"),
        ({"errors_as_200_rate": 2}, "errors_as_200_rate"),
    ],
)
async def test_admin_faults_refuses_bad_settings_by_name(
    fake_ivvy: RunningFakeIvvy, payload: dict[str, Any], field: str
) -> None:
    error = await refused_naming(fake_ivvy, "/_admin/faults", payload, field)
    assert field.split("+")[0] in error
    assert fake_ivvy.fake.faults == Faults()


async def test_admin_refuses_a_body_that_is_not_an_object(fake_ivvy: RunningFakeIvvy) -> None:
    answer = await admin(fake_ivvy, "POST", "/_admin/faults", [1])
    assert answer.status == 400
    assert "JSON object" in answer.json()["error"]


@pytest.mark.parametrize("reset_faults", [False, True])
async def test_admin_reset_restores_the_built_in_stages(fake_ivvy: RunningFakeIvvy, reset_faults: bool) -> None:
    await call(fake_ivvy, ADD_URI, {"name": "Gone soon", "applyTo": 1})
    await call(fake_ivvy, ADD_URI, {"id": 3, "name": "x"})
    fake_ivvy.fake.update_faults({"latency_ms": 1})
    answer = await admin(fake_ivvy, "POST", "/_admin/reset", {"faults": True} if reset_faults else None)
    assert answer.status == 200
    assert [s["id"] for s in stage_snapshot(fake_ivvy)] == list(BUILT_IN_IDS)
    assert (await admin(fake_ivvy, "GET", "/_admin/requests")).json() == {"requests": []}
    assert fake_ivvy.fake.faults == (Faults() if reset_faults else Faults(latency_ms=1))
    assert (await call(fake_ivvy, ADD_URI, {"name": "New", "applyTo": 1})).json()["id"] == FIRST_STAGE_ID


# The command line's side: add_arguments and run_from_args.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leadstage fake-ivvy")
    add_arguments(parser)
    return parser


def test_add_arguments_defaults() -> None:
    args = _parser().parse_args([])
    assert (args.host, args.port, args.credentials, args.seed) == ("127.0.0.1", 8765, [], None)
    assert Faults(**{name: getattr(args, name) for name in Faults().as_dict()}) == Faults()


def test_add_arguments_reads_every_fault_flag_and_credentials() -> None:
    args = _parser().parse_args(
        [
            "--port=9001",
            "--host=::1",
            "--seed=4",
            "--latency-ms=5",
            "--error-rate=0.1",
            "--rate-limit-rate=0.2",
            "--retry-after-s=3",
            "--hang-rate=0.05",
            "--hang-s=2",
            "--drop-rate=0.15",
            "--error-24322-rate=0.1",
            "--credentials=second:s2",
            "--credentials=third:with:colon",
        ]
    )
    assert (args.port, args.host, args.seed) == (9001, "::1", 4)
    assert args.credentials == [("second", "s2"), ("third", "with:colon")]
    faults = Faults(**{name: getattr(args, name) for name in Faults().as_dict()})
    assert faults == Faults(
        latency_ms=5,
        error_rate=0.1,
        rate_limit_rate=0.2,
        retry_after_s=3,
        hang_rate=0.05,
        hang_s=2,
        drop_rate=0.15,
        error_24322_rate=0.1,
    )


@pytest.mark.parametrize(
    "argv", [["--error-rate=2"], ["--latency-ms=-1"], ["--retry-after-s=1.5"], ["--credentials=nocolon"]]
)
def test_add_arguments_refuses_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert argv[0].split("=")[0] in capsys.readouterr().err


def test_run_from_args_refuses_rates_adding_up_past_one(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["--error-rate=0.7", "--drop-rate=0.7"])
    assert run_from_args(args) == 2
    assert "must add up to at most 1" in capsys.readouterr().err


def test_run_from_args_reports_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_from_args(_parser().parse_args([f"--port={port}"])) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.system
async def test_run_from_args_serves_until_sigterm() -> None:
    code = (
        "import argparse, sys\n"
        "from worker.devtools.fake_ivvy import add_arguments, run_from_args\n"
        "parser = argparse.ArgumentParser()\n"
        "add_arguments(parser)\n"
        "sys.exit(run_from_args(parser.parse_args(sys.argv[1:])))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--port=0",
        "--credentials=extra:extra-secret",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        match = re.fullmatch(r"fake iVvy listening on http://127\.0\.0\.1:(\d+) \(API keys: (.*)\)\n", line)
        assert match, line
        assert "extra" in match[2].split(", ")
        answer = await call(Address("127.0.0.1", int(match[1])), PING_URI, {}, key="extra", secret="extra-secret")
        assert answer.status == 200
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert await process.stdout.read() == b""  # one line, and no per-request output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(
    ("lead_filter", "names"),
    [
        ({"name": "Hot lead"}, ["Hot lead"]),
        ({"name__BEGINS": "Hot"}, ["Hot lead", "Hot opportunity"]),
        ({"name__CONTAINS": "opp", "applyTo": 1}, ["Hot opportunity"]),
        ({"name__NOT": "Hot lead", "name__ENDS": "lead"}, ["Cold lead"]),
    ],
)
async def test_get_lead_stage_list_filters_as_the_docs_describe(
    lead_filter: dict[str, object], names: list[str]
) -> None:
    fake = FakeIvvy(credentials={DEMO_API_KEY: DEMO_API_SECRET})
    fake.add_stage("Hot lead", apply_to=2)
    fake.add_stage("Hot opportunity", apply_to=1)
    fake.add_stage("Cold lead", apply_to=2)
    answer = fake.get_lead_stage_list({"filter": lead_filter, "perPage": 100})
    assert [stage["name"] for stage in answer["results"]] == names
    assert answer["meta"]["totalResults"] == len(names)


@pytest.mark.parametrize("lead_filter", [["name"], {"reasons": "x"}, {"name__LIKE": "x"}])
async def test_a_filter_the_fake_does_not_know_is_23016(lead_filter: object) -> None:
    fake = FakeIvvy(credentials={DEMO_API_KEY: DEMO_API_SECRET})
    with pytest.raises(ApiError) as raised:
        fake.get_lead_stage_list({"filter": lead_filter})
    assert raised.value.specific_code == 23016


@pytest.mark.parametrize("package", [fake_ivvy_package, demo_package], ids=lambda p: p.__name__)
def test_the_devtools_packages_export_exactly_their_public_names(package: types.ModuleType) -> None:
    public = {
        name for name in dir(package) if not name.startswith("_") and not inspect.ismodule(getattr(package, name))
    }
    assert sorted(package.__all__) == sorted(public)
    assert all(getattr(package, name) is not None for name in package.__all__)
