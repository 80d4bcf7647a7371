"""The console's JSON API and its security, against a real Redis, a real worker and the fake iVvy."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
import redis.asyncio as aioredis

from tests.console_support import (
    MISSING_STAGE,
    READ_TOKEN,
    TOKEN,
    WEBHOOK_SECRET,
    bearer,
    console_settings,
    create_missing_stage,
    enqueue,
    queue_with_one_claimed,
    retried_then_applied,
    running_console,
)
from tests.harness import eventually, read_events, wait_for_terminal
from tests.raw_http import assert_malformed_answered_as_problems
from worker.console.app import create_app, exposure_warning
from worker.console.auth import COOKIE
from worker.console.openapi import openapi_document
from worker.core import keys
from worker.core.errors import ConfigError
from worker.core.redis_connection import connect_redis_of
from worker.core.settings import DEMO_API_SECRET, Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker

API = "/api/v1"


@pytest.fixture
def settings(redis_url: str, fake_ivvy: RunningFakeIvvy) -> Settings:
    return console_settings(redis_url, fake_ivvy.url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No automatic redirects: the tests look at the 303s themselves. Cookies are kept per session.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, token: str = TOKEN) -> Any:
    async with http.get(url, headers=bearer(token)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def post(http: aiohttp.ClientSession, url: str, body: object, token: str = TOKEN) -> tuple[int, Any]:
    async with http.post(url, json=body, headers=bearer(token)) as response:
        return response.status, await response.json(content_type=None)


def conforms(document: dict[str, Any], schema_name: str, instance: object) -> None:
    """``instance`` is what the OpenAPI document says ``schema_name`` is."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    jsonschema_rs.validator_for(schema).validate(instance)


async def test_a_request_without_the_token_is_refused(console: str, http: aiohttp.ClientSession) -> None:
    for path in ("/overview", "/failures", "/changes/k", "/openapi.json"):
        async with http.get(console + API + path) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.content_type == "application/problem+json"
        async with http.get(console + API + path, headers=bearer("not-the-token-at-all-xx")) as response:
            assert response.status == 401
    async with http.post(console + API + "/dead-letters/replay", json={"filter": {}}) as response:
        assert response.status == 401
    # Pages send the browser to the login form, and come back to where it was going.
    async with http.get(console + "/failures?account=a", allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/login?next=%2Ffailures%3Faccount%3Da"
    async with http.get(console + "/login") as response:
        assert response.status == 200
        assert 'name="token"' in await response.text()
    async with http.get(console + "/static/console.js") as response:
        assert response.status == 200
        assert response.content_type == "text/javascript"


async def test_the_read_only_token_reads_but_changes_nothing(
    console: str, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    assert (await get(http, console + API + "/overview", READ_TOKEN))["accounts"][0]["account"] == "default"
    for action in ("replay", "discard"):
        status, problem = await post(http, console + f"{API}/dead-letters/{action}", {"filter": {}}, READ_TOKEN)
        assert (status, problem["detail"]) == (403, "the read-only token may not change anything")
    # Logged in with it, the Failures page offers no replay or discard, and a page's POST is refused.
    async with http.post(console + "/login", data={"token": READ_TOKEN, "next": "/failures"}) as response:
        page = await response.text()
    assert "read only" in page
    assert 'id="replay-selected"' not in page
    assert 'data-action="discard"' not in page
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert match is not None
    replay = console + API + "/dead-letters/replay"
    async with http.post(replay, json={"filter": {}}, headers={"X-CSRF-Token": match.group(1)}) as response:
        assert response.status == 403


def test_the_console_is_off_without_a_token(settings: Settings, redis_client: aioredis.Redis) -> None:
    with pytest.raises(ConfigError, match="LEADSTAGE_CONSOLE_TOKEN is not set"):
        create_app(Settings(redis_url=settings.redis_url), redis_client)


def test_console_tokens_are_secrets_and_must_differ() -> None:
    # Reading each variable is in tests/test_settings.py's tables.
    settings = Settings.from_env({"LEADSTAGE_CONSOLE_TOKEN": TOKEN, "LEADSTAGE_CONSOLE_READ_TOKEN": READ_TOKEN})
    assert TOKEN in settings.secret_values()  # so that the log redactor hides them
    assert READ_TOKEN in settings.secret_values()
    assert "console-admin" not in repr(settings)
    with pytest.raises(ConfigError, match="must differ"):
        Settings.from_env({"LEADSTAGE_CONSOLE_TOKEN": TOKEN, "LEADSTAGE_CONSOLE_READ_TOKEN": TOKEN})


def test_listening_beyond_loopback_warns_unless_a_tls_proxy_is_declared(settings: Settings) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warning(settings, host) is None
    for host in ("0.0.0.0", "::", "192.0.2.10"):  # noqa: S104 - the addresses under test
        warning = exposure_warning(settings, host)
        assert warning is not None
        assert "LEADSTAGE_CONSOLE_TLS_PROXY" in warning
    proxied = console_settings(settings.redis_url, "http://127.0.0.1:1", console_tls_proxy=True)
    assert exposure_warning(proxied, "0.0.0.0") is None  # noqa: S104 - the address under test


async def test_login_sets_an_httponly_samesite_cookie_and_posts_need_the_csrf_token(
    console: str, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    async with http.post(console + "/login", data={"token": "wrong-token-0123456789", "next": "/"}) as response:
        assert response.status == 401
        assert "That token is not valid." in await response.text()
    async with http.post(
        console + "/login", data={"token": TOKEN, "next": "//evil.example/"}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/"  # never to another site
        cookie = response.cookies[COOKIE]
        assert cookie["httponly"]
        assert cookie["samesite"] == "Strict"
        assert not cookie["secure"]  # no TLS proxy declared
        assert TOKEN not in cookie.value
    async with http.get(console + "/failures") as response:
        page = await response.text()
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert match is not None
    csrf = match.group(1)
    assert (await (await http.get(console + API + "/overview")).json())["accounts"]
    replay = console + API + "/dead-letters/replay"
    async with http.post(replay, json={"filter": {}}) as response:
        assert response.status == 403
        assert "CSRF" in (await response.json(content_type=None))["detail"]
    async with http.post(replay, json={"filter": {}}, headers={"X-CSRF-Token": "0" * 64}) as response:
        assert response.status == 403
    async with http.post(replay, json={"filter": {}}, headers={"X-CSRF-Token": csrf}) as response:
        assert response.status == 200
        assert await response.json() == {"action": "replay", "results": []}
    # Logging out is a POST with the CSRF token too (the page's form carries it as a field).
    async with http.post(console + "/logout", data={}, allow_redirects=False) as response:
        assert response.status == 403
    async with http.post(console + "/logout", data={"csrf": csrf}, allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (303, "/login")
    async with http.get(console + "/", allow_redirects=False) as response:
        assert response.status == 303  # the cookie is gone
    async with aiohttp.ClientSession() as fresh:
        kept = {"Cookie": f"{COOKIE}={cookie.value}"}
        async with fresh.get(console + "/", headers=kept, allow_redirects=False) as response:
            assert response.status == 303  # and a copy of it is no session any more
    # A cookie that was altered is no session, and no cookie is none either.
    async with aiohttp.ClientSession() as fresh:
        for sent in ({"Cookie": f"{COOKIE}={cookie.value.replace('admin', 'read', 1)}"}, {}):
            async with fresh.get(console + "/", headers=sent, allow_redirects=False) as response:
                assert response.status == 303


@pytest.mark.parametrize(
    ("target", "location"),
    [
        ("/failures\r\nSet-Cookie: evil=1", "/"),  # header injection: refused
        ("/\u2028x", "/"),
        ("//elsewhere.example/", "/"),
        ("/changes?key=caf\u00e9", "/changes?key=caf%C3%A9"),
    ],
)
async def test_the_login_goes_only_to_a_path_a_location_header_can_carry(
    console: str, http: aiohttp.ClientSession, target: str, location: str
) -> None:
    data = {"token": TOKEN, "next": target}
    async with http.post(console + "/login", data=data, allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == location
        assert "evil" not in response.cookies


async def test_the_cookie_is_secure_behind_a_declared_tls_proxy(
    settings: Settings, redis_client: aioredis.Redis, http: aiohttp.ClientSession
) -> None:
    proxied = console_settings(settings.redis_url, "http://127.0.0.1:1", console_tls_proxy=True)
    async with (
        running_console(proxied, redis_client) as url,
        http.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as response,
    ):
        assert response.cookies[COOKIE]["secure"]


async def test_no_secret_is_ever_shown(
    fake_ivvy: RunningFakeIvvy, redis_client: aioredis.Redis, http: aiohttp.ClientSession
) -> None:
    # A Redis URL with a password (the pages name the Redis they read) to a Redis that is not
    # reached: the pages render without it, the API answers 503.
    settings = console_settings("redis://reader:hunter2-redis-password@127.0.0.1:1/0", fake_ivvy.url)
    unreachable = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.5)
    secrets = [TOKEN, READ_TOKEN, WEBHOOK_SECRET, DEMO_API_SECRET, "hunter2-redis-password"]
    try:
        async with running_console(settings, unreachable) as url:
            bodies = []
            async with http.post(url + "/login", data={"token": TOKEN}) as response:
                bodies.append(await response.text())
            for path in ("/", "/failures", "/changes?key=k", API + "/overview", API + "/openapi.json"):
                async with http.get(url + path) as response:
                    bodies.append(await response.text())
                    if path == API + "/overview":
                        assert response.status == 503
            assert "redis://127.0.0.1:1/0" in bodies[0]
            for body in bodies:
                for secret in secrets:
                    assert secret not in body
    finally:
        await unreachable.aclose()


async def test_a_redis_url_that_is_not_redis_is_503_not_a_400(
    fake_ivvy: RunningFakeIvvy, http: aiohttp.ClientSession
) -> None:
    """REDIS_URL at an HTTP server (the fake iVvy) is the operator's mistake, not the request's."""
    settings = console_settings(fake_ivvy.url.replace("http://", "redis://") + "/0", fake_ivvy.url)
    not_redis = connect_redis_of(settings)
    try:
        async with (
            running_console(settings, not_redis) as url,
            http.get(url + API + "/failures", headers=bearer()) as response,
        ):
            assert response.status == 503
            assert response.content_type == "application/problem+json"
            assert "see the server log" in (await response.json(content_type=None))["detail"]
    finally:
        await not_redis.aclose()


async def test_the_overview_shows_what_redis_holds(
    settings: Settings, console: str, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    await queue_with_one_claimed(redis_client, settings, "a0", "a1", "a2", "a3")
    pause_until = int(time.time() * 1000) + 60_000
    await redis_client.hset(keys.rate_key("default"), "pause_until", str(pause_until))  # type: ignore[misc]  # redis-py's async stubs

    overview = await get(http, console + API + "/overview")
    conforms(openapi_document(), "Overview", overview)
    rows = {row["account"]: row for row in overview["accounts"]}
    assert sorted(rows) == ["default", "other"]
    default, other = rows["default"], rows["other"]
    queued = [await redis_client.zcard(keys.queue_key(settings.queue_name, a)) for a in ("default", "other")]
    assert sum(queued) == default["queued"] + other["queued"] == 5
    assert (default["queued"], default["due"], default["in_progress"], default["retrying"]) == (4, 3, 1, 0)
    assert (other["queued"], other["due"], other["in_progress"], other["retrying"]) == (1, 1, 0, 0)
    assert default["paused_until"] is not None
    assert other["paused_until"] is None
    assert default["rate_limit"] == {"per_s": 1000.0, "used_per_s": 0.0}
    assert overview["workers"] == []

    # A worker takes the rest: default's succeed, other's fails (no credentials for it). Its
    # heartbeat, every third of a lease, is what the overview shows: a short lease, a quick one.
    await redis_client.hdel(keys.rate_key("default"), "pause_until")  # type: ignore[misc]  # redis-py's async stubs
    async with running_worker(dataclasses.replace(settings, lease_s=0.6)):
        await wait_for_terminal(redis_client, ["a1", "a2", "a3", "o1"])

        async def heard() -> bool:
            # A heartbeat after the last change finished (one written mid-change says running 1).
            workers = (await get(http, console + API + "/overview"))["workers"]
            return bool(workers) and workers[0]["running"] == 0

        await eventually(heard)
        overview = await get(http, console + API + "/overview")
    rows = {row["account"]: row for row in overview["accounts"]}
    assert [(w["alive"], w["running"]) for w in overview["workers"]] == [(True, 0)]
    assert (rows["default"]["queued"], rows["default"]["in_progress"], rows["default"]["dead_letters"]) == (1, 1, 0)
    assert (rows["other"]["queued"], rows["other"]["dead_letters"]) == (0, 1)
    assert rows["default"]["rate_limit"]["used_per_s"] == round(3 / 60, 3)
    rates = overview["rates"]
    assert (rates["succeeded_last_hour"], rates["failed_last_hour"], rates["retrying_last_hour"]) == (3, 1, 0)
    assert len(rates["succeeded"]) == 360
    assert sum(rates["succeeded"]) * rates["bucket_s"] == pytest.approx(3)


async def make_dead_letters(settings: Settings, redis_client: aioredis.Redis) -> None:
    """Two dead letters of code 24320 (missing-1, missing-2) and one of 24321 (builtin)."""
    await enqueue(redis_client, settings, {"id": MISSING_STAGE, "name": "Later"}, "missing-1")
    await enqueue(redis_client, settings, {"id": MISSING_STAGE, "colour": "#123456"}, "missing-2")
    await enqueue(redis_client, settings, {"id": 1, "name": "Quoted!"}, "builtin")
    async with running_worker(settings):
        await wait_for_terminal(redis_client, ["missing-1", "missing-2", "builtin"])


async def test_failures_are_grouped_and_replayed_or_discarded(
    settings: Settings,
    console: str,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    fake_ivvy: RunningFakeIvvy,
) -> None:
    await make_dead_letters(settings, redis_client)
    failures = await get(http, console + API + "/failures")
    conforms(openapi_document(), "Failures", failures)
    assert failures["groups"] == [
        {"account": "default", "error_code": "24320", "dead_letters": 2, "recent_failed": 2, "recent_retrying": 0},
        {"account": "default", "error_code": "24321", "dead_letters": 1, "recent_failed": 1, "recent_retrying": 0},
    ]
    # Newest first: the dead-letter stream's order, backwards (the worker finished them in any order).
    newest_first = [e["idempotency_key"] for e in reversed(await read_events(redis_client, settings.dlq_stream))]
    assert sorted(newest_first) == ["builtin", "missing-1", "missing-2"]
    assert [d["idempotency_key"] for d in failures["dead_letters"]] == newest_first
    [builtin] = [d for d in failures["dead_letters"] if d["idempotency_key"] == "builtin"]
    assert builtin["original_change"] == {"id": 1, "name": "Quoted!"}
    assert (builtin["error_code"], builtin["http_status"], builtin["attempt"]) == ("24321", "400", "1")
    assert failures["next"] is None
    # Paged, newest first.
    first = await get(http, console + API + "/failures?limit=2")
    second = await get(http, console + API + f"/failures?limit=2&before={first['next']}")
    assert [d["idempotency_key"] for d in first["dead_letters"] + second["dead_letters"]] == newest_first
    assert second["next"] is None
    only = await get(http, console + API + "/failures?error_code=24320&account=default&since=1h")
    assert [d["idempotency_key"] for d in only["dead_letters"]] == [k for k in newest_first if k != "builtin"]
    assert (await get(http, console + API + "/failures?account=nobody"))["groups"] == []
    for query, named in (("since=soon", "since"), ("limit=0", "limit"), ("before=x", "before")):
        async with http.get(console + API + "/failures?" + query, headers=bearer()) as response:
            assert response.status == 400
            assert named in (await response.json(content_type=None))["detail"]

    create_missing_stage(fake_ivvy.fake)  # MISSING_STAGE exists now
    status, replayed = await post(http, console + API + "/dead-letters/replay", {"filter": {"error_code": "24320"}})
    assert status == 200
    conforms(openapi_document(), "Outcomes", replayed)
    assert sorted((r["idempotency_key"], r["status"], r["generation"]) for r in replayed["results"]) == [
        ("missing-1", "queued", 1), ("missing-2", "queued", 1),
    ]  # fmt: skip
    async with running_worker(settings):

        async def both_succeeded() -> bool:
            events = await read_events(redis_client)
            return {e["idempotency_key"] for e in events if e["event"] == "succeeded"} == {"missing-1", "missing-2"}

        await eventually(both_succeeded, within_s=20)
    assert fake_ivvy.fake.stages[MISSING_STAGE].colour == "#123456"
    # A replayed change's timeline: both enqueues, the failed attempt, then the replay's success.
    replayed_timeline = (await get(http, console + API + "/changes/missing-2"))["timeline"]
    assert [(t["kind"], t.get("generation"), t.get("event")) for t in replayed_timeline] == [
        ("enqueued", 0, None), ("attempt", None, "failed"), ("enqueued", 1, None), ("attempt", None, "succeeded"),
    ]  # fmt: skip

    status, discarded = await post(
        http, console + API + "/dead-letters/discard", {"keys": ["builtin", "nope"], "account": "default"}
    )
    assert status == 200
    assert [(r["idempotency_key"], r["status"]) for r in discarded["results"]] == [
        ("builtin", "discarded"), ("nope", "not_found"),
    ]  # fmt: skip
    assert await redis_client.xlen(settings.dlq_stream) == 0
    status, again = await post(http, console + API + "/dead-letters/replay", {"keys": ["builtin"]})
    assert [(r["idempotency_key"], r["status"]) for r in again["results"]] == [("builtin", "not_found")]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ([], "JSON object"),
        ({}, "either keys or filter"),
        ({"keys": ["a"], "filter": {}}, "either keys or filter"),
        ({"keys": []}, "keys"),
        ({"keys": ["a", 3]}, "keys"),
        ({"keys": ["a"], "account": ""}, "account"),
        ({"filter": {"bogus": 1}}, "filter.bogus"),
        ({"filter": {"since": "tomorrow"}}, "filter.since"),
        ({"filter": []}, "filter"),
        ({"filter": {}, "account": "default"}, "account"),
        ({"filter": {}, "extra": 1}, "extra"),
    ],
)
async def test_a_bad_selection_is_refused_naming_what_is_wrong(
    console: str, http: aiohttp.ClientSession, body: object, named: str
) -> None:
    status, problem = await post(http, console + API + "/dead-letters/replay", body)
    assert status == 400
    assert named in problem["detail"] or any(e["field"] == named for e in problem.get("errors", []))


async def test_a_body_that_is_not_json_is_refused(console: str, http: aiohttp.ClientSession) -> None:
    url = console + API + "/dead-letters/discard"
    async with http.post(url, data=b"{", headers={**bearer(), "Content-Type": "application/json"}) as response:
        assert response.status == 400
    async with http.post(url, data=b"keys=a", headers=bearer()) as response:
        assert response.status == 415
    async with http.get(url, headers=bearer()) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"  # the 405's own header, kept in the problem
    async with http.post(url, data=b"{}", headers={**bearer(), "Content-Type": "text/" + "x" * 7000}) as response:
        assert response.status == 415
        assert len(await response.read()) < 1000  # what was sent is not echoed whole
    for limit in ("9" * 7000, "\u00b2", "\u0665"):  # int() refuses all three: never a 500
        async with http.get(console + API + "/failures", params={"limit": limit}, headers=bearer()) as response:
            assert response.status == 400, limit
            assert len(await response.read()) < 1000


async def test_requests_the_parser_refuses_are_problems_without_echoes(console: str) -> None:
    await assert_malformed_answered_as_problems(int(console.rsplit(":", 1)[1]))


async def test_a_changes_timeline_shows_each_attempt(
    settings: Settings,
    console: str,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    fake_ivvy: RunningFakeIvvy,
) -> None:
    await retried_then_applied(
        redis_client, settings, fake_ivvy, {"name": "Timeline", "applyTo": "lead", "colour": "#00aa00"}, "t1"
    )
    answer = await get(http, console + API + "/changes/t1?account=default")
    conforms(openapi_document(), "Change", answer)
    assert answer["change"]["state"] == "succeeded"
    assert answer["change"]["change"] == {"name": "Timeline", "applyTo": 2, "colour": "#00aa00"}
    timeline = answer["timeline"]
    assert timeline[0]["kind"] == "enqueued"
    attempts = timeline[1:]
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert [a["event"] for a in attempts] == ["retrying"] * (len(attempts) - 1) + ["succeeded"]
    assert all(a["http_status"] in (500, 502, 503) and a["error_code"] == "unavailable" for a in attempts[:-1])
    assert attempts[-1]["http_status"] is None
    assert attempts[-1]["stage_id"] == answer["change"]["stage_id"]
    assert all(isinstance(a["duration_ms"], int) and a["result"]["idempotency_key"] == "t1" for a in attempts)

    async with http.get(console + API + "/changes/unknown", headers=bearer()) as response:
        assert response.status == 404
        assert "unknown" in (await response.json(content_type=None))["detail"]
    async with http.get(console + API + "/changes/t1?account=no%20such", headers=bearer()) as response:
        assert response.status == 400
        assert (await response.json(content_type=None))["errors"][0]["field"] == "account"


@pytest.mark.system  # schemathesis takes seconds to load: with the fuzz tests, in the full suite
async def test_the_openapi_document_is_served_and_valid(console: str, http: aiohttp.ClientSession) -> None:
    import schemathesis
    from schemathesis.core.result import Ok

    document = await get(http, console + API + "/openapi.json")
    assert document == openapi_document()
    operations = set()
    for result in schemathesis.openapi.from_dict(document).get_all_operations():
        assert isinstance(result, Ok), result
        operations.add(result.ok().label)
    assert operations == {
        "GET /api/v1/overview",
        "GET /api/v1/failures",
        "GET /api/v1/changes/{idempotency_key}",
        "POST /api/v1/dead-letters/replay",
        "POST /api/v1/dead-letters/discard",
    }
