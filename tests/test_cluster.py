"""``REDIS_URL=redis+cluster://``: everything the product runs, on a real 3-master Redis Cluster.

The readers (``leadstage stats``, ``status``, ``dlq list``, ``results``), the consumer groups and
``standing`` (where a change stands, and its event) are shown by reading what the product wrote:
the worker applies changes to the fake iVvy on the test Redis, every key is then moved onto the
cluster with DUMP and RESTORE (each to its slot's master, with its time to live), and each reader
must read the same on both. The worker, the producer library, ``leadstage enqueue`` and ``dlq
replay`` run on the cluster itself; so do the webhook (through its HTTP server, also with the
account's master hung and killed), the console (through its HTTP API) and ``leadstage demo``
(docs/architecture.md, "Redis Cluster").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from producers import ChangeItem, DeadLetter, DeadLetterConsumer, LeadStageProducer, ResultsConsumer
from producers.openapi import CHANGES_PATH
from producers.serving import serving
from producers.status import status_token
from producers.waits import standing
from producers.webhook import create_app as create_webhook
from producers.webhook_auth import ACCOUNT_HEADER
from tests import console_support as consoles
from tests.console_support import MISSING_STAGE, enqueue
from tests.harness import eventually, wait_for_terminal, worker_settings
from tests.redis_servers import RedisCluster as ClusterServers
from tests.redis_servers import RedisServer
from tests.test_cli import background, http, wait_for
from tests.test_demo import lines_of, run_demo
from tests.test_dlq_filters import leadstage
from tests.webhook_signing import signed_headers
from worker.core import keys, outbox, readers
from worker.core.errors import ConfigError
from worker.core.ledger import Ledger
from worker.core.processes import free_port
from worker.core.redis_connection import RedisClient, connect_redis_or_cluster
from worker.core.settings import Settings
from worker.devtools.demo import DEMO_DLQ
from worker.devtools.demo.embedded import DEMO_ACCOUNT
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.layout import migrate
from worker.runner import running_worker

pytestmark = pytest.mark.system  # a cluster of three redis-servers, workers, leadstage commands

#: What the worker did on the test Redis: two adds that succeed, an update iVvy refuses (a dead letter).
DONE: dict[str, dict[str, object]] = {
    "hot": {"name": "Hot", "applyTo": "lead"},
    "warm": {"name": "Warm", "applyTo": "lead"},
}
REFUSED: dict[str, dict[str, object]] = {"gone": {"id": MISSING_STAGE, "name": "Nowhere"}}
#: Enqueued after the worker stopped: still queued.
QUEUED: dict[str, dict[str, object]] = {"later": {"name": "Later", "applyTo": "lead"}}


@dataclasses.dataclass
class Both:
    """The same data on the test Redis and on the cluster, with a client and settings for each."""

    single: aioredis.Redis
    cluster: RedisClient
    single_settings: Settings
    cluster_settings: Settings


async def copy_to_cluster(source: aioredis.Redis, target: RedisClient) -> int:
    """Every key of ``source`` RESTOREd on ``target`` as DUMP serialised it (streams with their
    consumer groups, hashes, sorted sets), with its time to live; how many keys."""
    copied = 0
    async for key in source.scan_iter(count=1000):
        if key == keys.PENDING.encode():  # on a cluster each account counts its backlog in its slot
            for account, count in (await source.hgetall(key)).items():  # type: ignore[misc]  # redis-py's async stubs
                await target.hset(keys.pending_key(account.decode(), cluster=True), account, count)  # type: ignore[misc]  # redis-py's async stubs
            copied += 1
            continue
        dumped, ttl = await source.dump(key), await source.pttl(key)
        await target.restore(key, max(ttl, 0), dumped, replace=True)
        copied += 1
    return copied


@pytest.fixture
async def both(
    redis_url: str, redis_client: aioredis.Redis, fake_ivvy: RunningFakeIvvy, cluster_url: str
) -> AsyncIterator[Both]:
    settings = worker_settings(redis_url, fake_ivvy.url)
    for key, change in {**DONE, **REFUSED}.items():
        await enqueue(redis_client, settings, change, key)
    async with running_worker(settings):
        await wait_for_terminal(redis_client, [*DONE, *REFUSED])
    for key, change in QUEUED.items():
        await enqueue(redis_client, settings, change, key)

    async def no_live_worker() -> bool:
        return (await readers.stats(redis_client, settings))["workers"] == 0

    await eventually(no_live_worker)  # the stopped worker's last heartbeat is older than a lease
    cluster = connect_redis_or_cluster(cluster_url)
    try:
        assert await copy_to_cluster(redis_client, cluster) > 0
        yield Both(redis_client, cluster, settings, dataclasses.replace(settings, redis_url=cluster_url))
    finally:
        await cluster.aclose()


async def listed(entries: AsyncIterator[readers.Entry]) -> list[readers.Entry]:
    return [entry async for entry in entries]


async def test_the_cluster_is_three_masters_that_split_the_accounts_keys_by_slot(both: Both) -> None:
    """The data really is spread: the streams and the account's keys live on different masters."""
    settings = both.cluster_settings
    assert isinstance(both.cluster, aioredis.RedisCluster)
    masters = {node.name for node in both.cluster.get_primaries()}
    assert len(masters) == 3
    where = {
        name: both.cluster.get_node_from_key(name).name
        for name in (
            settings.results_stream,
            settings.dlq_stream,
            keys.PENDING,
            keys.queue_key(settings.queue_name, "default"),
        )
    }
    assert len(set(where.values())) > 1, where


async def test_the_readers_read_on_the_cluster_what_they_read_on_a_single_redis(both: Both) -> None:
    single, cluster, settings = both.single, both.cluster, both.single_settings
    events = await listed(readers.results(single, settings))
    assert {e["idempotency_key"] for e in events if e["event"] in ("succeeded", "failed")} == {*DONE, *REFUSED}
    assert await listed(readers.results(cluster, settings)) == events
    assert await listed(readers.results(cluster, settings, idempotency_key="hot")) == [
        e for e in events if e["idempotency_key"] == "hot"
    ]
    letters = await listed(readers.dead_letters(single, settings))
    assert [letter["idempotency_key"] for letter in letters] == ["gone"]
    assert await listed(readers.dead_letters(cluster, settings)) == letters
    for key in (*DONE, *REFUSED, *QUEUED):
        status = await readers.change_status(single, settings, "default", key)
        assert status is not None
        assert await readers.change_status(cluster, settings, "default", key) == status
        assert await readers.change_timeline(cluster, settings, "default", key) == await readers.change_timeline(
            single, settings, "default", key
        )
    assert await readers.change_status(cluster, settings, "default", "never") is None
    on_cluster, on_single = await readers.stats(cluster, settings), await readers.stats(single, settings)
    assert (on_single["queue_depth"], on_single["waiting"], on_single["dead_letters"]) == (1, 1, 1)
    assert on_cluster == on_single


async def test_the_consoles_readers_read_the_same_on_the_cluster(both: Both) -> None:
    """The overview (each account's queue by ZSCAN, the states of its deferred changes, pauses,
    dead letters) and the failures; their clock-dependent fields (now, heartbeat ages) left out."""
    single, cluster, settings = both.single, both.cluster, both.single_settings
    views = []
    for client in (single, cluster):
        history = readers.RateHistory()
        overview = await readers.overview(client, settings, history)
        failures = await readers.failures(client, settings, history)
        rows = cast(list[dict[str, object]], overview["accounts"])
        views.append((rows, {k: v for k, v in failures.items() if k != "recent_since"}))
    assert views[1] == views[0]
    accounts, failures = views[0]
    counts = ("account", "queued", "due", "in_progress", "retrying", "dead_letters", "paused_until")
    assert [tuple(row[k] for k in counts) for row in accounts] == [("default", 1, 1, 0, 0, 1, None)]
    assert failures["dead_letters_matching"] == 1


async def test_consumer_groups_and_standing_read_the_streams_on_the_cluster(both: Both) -> None:
    single, cluster, settings = both.single, both.cluster, both.cluster_settings
    events = await listed(readers.results(single, both.single_settings))
    async with ResultsConsumer("billing", "b-1", settings=settings, redis=cluster, start="all", follow=False) as first:
        received = [event async for event in first]
        assert [event.id for event in received] == [e["id"] for e in events]
        assert await first.ack(*received) == len(events)
    async with ResultsConsumer("billing", "b-2", settings=settings, redis=cluster, follow=False) as second:
        assert [event async for event in second] == []  # the group has every event acked
    async with DeadLetterConsumer("ops", "o-1", settings=settings, redis=cluster, start="all", follow=False) as ops:
        letters = [letter async for letter in ops]
    assert [(type(letter), letter.idempotency_key) for letter in letters] == [(DeadLetter, "gone")]

    for key in (*DONE, *REFUSED):
        assert await standing(cluster, settings, "default", key) == await standing(single, settings, "default", key)


async def test_the_read_commands_print_the_same_on_the_cluster(both: Both) -> None:
    for command in (
        ("stats",),
        ("status", "hot"),
        ("status", "gone"),
        ("dlq", "list"),
        ("results",),
        ("results", "--key", "warm"),
    ):
        single = await leadstage(both.single_settings, *command)
        cluster = await leadstage(both.cluster_settings, *command)
        assert single[0] == 0, single
        assert cluster == single, command
    status, lines, err = await leadstage(both.cluster_settings, "status", "never")
    assert (status, lines) == (1, [])
    assert "no change with idempotency key 'never'" in err


async def cluster_terminal(cluster: RedisClient, settings: Settings, wanted: set[str]) -> dict[str, list[str]]:
    """The terminal events of each key in the cluster's results stream, once every wanted key has one."""
    terminal: dict[str, list[str]] = {}

    async def all_done() -> bool:
        terminal.clear()
        for event in await listed(readers.results(cluster, settings)):
            if event["event"] in ("succeeded", "failed", "superseded"):
                terminal.setdefault(str(event["idempotency_key"]), []).append(str(event["event"]))
        return wanted <= terminal.keys()

    await eventually(all_done, within_s=30)
    return terminal


async def test_the_worker_applies_changes_on_the_cluster(
    cluster_url: str, fake_ivvy: RunningFakeIvvy, tmp_path: Path
) -> None:
    """Enqueued one by one and in bulk across two accounts (whose keys are on different masters), a
    worker drains them: every key has exactly one terminal event in the results stream, a refused
    change one dead letter, the outboxes are empty and the backlog is zero; then a replay."""
    base = worker_settings(cluster_url, fake_ivvy.url)
    default = base.accounts["default"]
    settings = dataclasses.replace(
        base, accounts={**base.accounts, "second": dataclasses.replace(default, name="second")}
    )
    cluster = connect_redis_or_cluster(cluster_url)
    assert isinstance(cluster, aioredis.RedisCluster)
    await cluster.initialize()
    assert cluster.get_node_from_key(keys.outbox_key("default")) != cluster.get_node_from_key(keys.outbox_key("second"))
    bulk = [
        ChangeItem(
            {"name": f"Bulk {i}", "applyTo": "lead"}, idempotency_key=f"bulk-{i}", account=("default", "second")[i % 2]
        )
        for i in range(30)
    ]
    try:
        async with LeadStageProducer(settings) as producer:
            for key, change in {**DONE, **REFUSED}.items():
                assert (await producer.enqueue(change, idempotency_key=key)).status == "queued"
            receipts = await producer.enqueue_many(bulk)
            assert [(r.idempotency_key, r.account, r.status) for r in receipts] == [
                (item.idempotency_key, item.account, "queued") for item in bulk
            ]
            assert (await producer.enqueue(DONE["hot"], idempotency_key="hot")).status == "duplicate"
            # The command line: one change, and a file of them.
            status, lines, err = await leadstage(
                settings, "enqueue", "--name", "Cold", "--apply-to", "lead", "--key", "cold"
            )
            assert (status, [line["status"] for line in lines]) == (0, ["queued"]), err
            jsonl = tmp_path / "changes.jsonl"
            jsonl.write_text(
                "".join(
                    f'{{"name": "Filed {i}", "applyTo": "lead", "idempotency_key": "filed-{i}"}}\n' for i in range(3)
                )
            )
            status, lines, err = await leadstage(settings, "enqueue", "--file", str(jsonl))
            assert (status, [line["status"] for line in lines]) == (0, ["queued"] * 3), err
            wanted = {
                *DONE,
                *REFUSED,
                "cold",
                "filed-0",
                "filed-1",
                "filed-2",
                *(str(item.idempotency_key) for item in bulk),
            }
            async with running_worker(settings):
                terminal = await cluster_terminal(cluster, settings, wanted)
                assert {key: events for key, events in terminal.items()} == {
                    key: ["failed" if key in REFUSED else "succeeded"] for key in wanted
                }
                letters = await listed(readers.dead_letters(cluster, settings))
                assert [letter["idempotency_key"] for letter in letters] == ["gone"]

                async def published() -> bool:
                    outboxes = [await cluster.xlen(keys.outbox_key(a)) for a in settings.accounts]
                    stats = await readers.stats(cluster, settings)
                    return outboxes == [0, 0] and stats["queue_depth"] == 0

                await eventually(published)
                for key in ("hot", "gone"):
                    where, event = await standing(cluster, settings, "default", key)
                    assert event is not None, where
                    assert event.idempotency_key == key
                # A wait reads the results stream on its master (and stops its reader between reads).
                assert (await producer.wait(receipts[1], timeout=10)).event == "succeeded"
                late = await producer.enqueue({"name": "Late", "applyTo": "lead"}, idempotency_key="late")
                assert (await producer.wait(late, timeout=30)).event == "succeeded"

                # The dead letter goes back on the queue (its account's slot) and is deleted (another
                # slot); iVvy refuses it again: a second failed event and a new dead letter.
                replayed, _, err = await leadstage(settings, "dlq", "replay", "gone")
                assert replayed == 0, err

                async def failed_twice() -> bool:
                    return (await cluster_terminal(cluster, settings, {"gone"}))["gone"] == ["failed", "failed"]

                await eventually(failed_twice)
                letters = await listed(readers.dead_letters(cluster, settings))
                assert [(letter["idempotency_key"], letter["generation"]) for letter in letters] == [("gone", "1")]
        assert sorted(s.name for s in fake_ivvy.fake.stages.values() if s.name.startswith("Bulk ")) == sorted(
            f"Bulk {i}" for i in range(30)
        )
    finally:
        await cluster.aclose()


async def test_an_event_left_in_the_outbox_is_published_by_the_sweep(
    cluster_url: str, fake_ivvy: RunningFakeIvvy
) -> None:
    """A worker that dies between finish.lua and publishing leaves the event in the account's outbox:
    the change stands terminal and unpublished (a wait goes on waiting), and the sweep publishes it
    and writes its event id, as the worker would have."""
    settings = worker_settings(cluster_url, fake_ivvy.url)
    cluster = connect_redis_or_cluster(cluster_url)
    try:
        async with LeadStageProducer(settings, redis=cluster) as producer:
            await producer.enqueue(DONE["hot"], idempotency_key="hot")
            async with running_worker(settings):
                assert (await producer.wait("hot", timeout=30)).event == "succeeded"
        # What finish.lua leaves when its worker dies before publishing: the entry, named in the ledger.
        ledger_key = keys.ledger_key(keys.job_id("default", "hot"))
        [(event_id, event)] = await cluster.xrange(settings.results_stream)
        await cluster.xdel(settings.results_stream, event_id)
        entry = {
            b"ledger": ledger_key.encode(),
            b"letter": b"",
            b"original_change": b"{}",
            b"generation": b"0",
            **event,
        }
        outbox_id = await cluster.xadd(keys.outbox_key("default"), entry)
        await cluster.hset(ledger_key, "outbox", outbox_id)  # type: ignore[misc]  # redis-py's async stubs
        await cluster.hdel(ledger_key, "event_id")  # type: ignore[misc]  # redis-py's async stubs
        where, published = await standing(cluster, settings, "default", "hot")
        assert published is None
        assert where is not None
        assert (where["state"], where["unpublished"]) == ("succeeded", True)

        assert await outbox.sweep(Ledger(cluster, settings), ["default"], older_than_ms=0) == 1
        [(again_id, again)] = await cluster.xrange(settings.results_stream)
        assert again == event
        assert await cluster.xlen(keys.outbox_key("default")) == 0
        assert await cluster.hget(ledger_key, "event_id") == again_id  # type: ignore[misc]  # redis-py's async stubs
        where, published = await standing(cluster, settings, "default", "hot")
        assert published is not None
        assert published.id == again_id.decode()
    finally:
        await cluster.aclose()


async def test_the_layout_migration_is_skipped_on_the_cluster_and_an_old_queue_refused(cluster_url: str) -> None:
    """The single-queue layout never ran on a cluster: nothing is renamed there, and a single queue
    found under the queue's name stops the worker before it serves anything."""
    settings = worker_settings(cluster_url, "http://127.0.0.1:1")
    cluster = connect_redis_or_cluster(cluster_url)
    try:
        ledger = Ledger(cluster, settings)
        assert await migrate(ledger) == 0
        assert await cluster.get(keys.LAYOUT) is None
        await cluster.zadd(settings.queue_name, {"default:old": 1})
        with pytest.raises(ConfigError, match="single-queue layout"):
            await migrate(ledger)
    finally:
        await cluster.aclose()


# -- the webhook and the console, served over the cluster ------------------------------------------


def two_account_settings(cluster_url: str, ivvy_url: str, **overrides: object) -> Settings:
    """Console settings (both tokens, a webhook secret) with accounts ``default`` and ``second``,
    whose keys are on different masters of the test cluster."""
    base = consoles.console_settings(cluster_url, ivvy_url, **overrides)
    default = base.accounts["default"]
    return dataclasses.replace(base, accounts={**base.accounts, "second": dataclasses.replace(default, name="second")})


def signed(body: bytes, msg_id: str) -> dict[str, str]:
    """Headers of a webhook signed with the console tests' ``WEBHOOK_SECRET`` by the reference library."""
    return signed_headers(body, consoles.WEBHOOK_SECRET, msg_id=msg_id)


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """``app`` on a free loopback port as ``leadstage webhook`` serves it; its base URL and a session."""
    async with (
        serving(app, "127.0.0.1", 0, shutdown_timeout=2.0) as (host, port),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
    ):
        yield f"http://{host}:{port}", http


async def post_change(http: aiohttp.ClientSession, base: str, payload: object, msg_id: str) -> tuple[int, Any]:
    body = orjson.dumps(payload)
    async with http.post(base + CHANGES_PATH, data=body, headers=signed(body, msg_id)) as response:
        return response.status, await response.json(content_type=None)


def master_of(cluster: aioredis.RedisCluster, servers: ClusterServers, key: str) -> RedisServer:
    """The test cluster's server that is the master of ``key``'s slot."""
    node = cluster.get_node_from_key(key)
    assert node is not None
    [server] = [server for server in servers.masters if server.port == node.port]
    return server


async def test_the_webhook_enqueues_and_answers_status_on_the_cluster(
    cluster_url: str, fake_ivvy: RunningFakeIvvy
) -> None:
    """Signed POSTs (one change, a list, for two accounts on different masters) are enqueued on the
    cluster, a redelivery is a duplicate, /readyz is ready, and the status route reads where each
    change stands, with its event once a worker has applied it."""
    settings = two_account_settings(cluster_url, fake_ivvy.url)
    cluster = connect_redis_or_cluster(cluster_url)
    assert isinstance(cluster, aioredis.RedisCluster)
    try:
        await cluster.initialize()
        assert cluster.get_node_from_key(keys.outbox_key("default")) != cluster.get_node_from_key(
            keys.outbox_key("second")
        )
        async with served(create_webhook(settings, cluster)) as (base, http):
            async with http.get(base + "/readyz") as ready:
                assert ready.status == 200
            status, answer = await post_change(http, base, DONE["hot"], "wh-hot")
            assert (status, [r["status"] for r in answer["receipts"]]) == (202, ["queued"]), answer
            status, answer = await post_change(http, base, DONE["hot"], "wh-hot")
            assert (status, [r["status"] for r in answer["receipts"]]) == (202, ["duplicate"]), answer
            listed_body = {"account": "second", "changes": [DONE["warm"], {"name": "Cold", "applyTo": "lead"}]}
            status, answer = await post_change(http, base, listed_body, "wh-list")
            assert status == 202, answer
            assert [(r["job_id"], r["status"]) for r in answer["receipts"]] == [
                ("second:wh-list:0", "queued"),
                ("second:wh-list:1", "queued"),
            ]
            for account, key in (("default", "wh-hot"), ("second", "wh-list:0"), ("second", "wh-list:1")):
                where = await readers.change_status(cluster, settings, account, key)
                assert where is not None
                assert (where["state"], where["source"]) == ("queued", f"webhook:{key.split(':')[0]}")

            async def status_of(account: str, key: str) -> tuple[int, Any]:
                headers = {
                    "Authorization": f"Bearer {status_token(consoles.WEBHOOK_SECRET, account)}",
                    ACCOUNT_HEADER: account,
                }
                async with http.get(base + f"{CHANGES_PATH}/{key}", headers=headers) as response:
                    return response.status, await response.json(content_type=None)

            status, where = await status_of("second", "wh-list:1")
            assert (status, where["state"], where["event"]) == (200, "queued", None)
            assert (await status_of("default", "wh-list:1"))[0] == 404  # another account's change
            async with running_worker(settings):
                await cluster_terminal(cluster, settings, {"wh-hot", "wh-list:0", "wh-list:1"})

                async def published() -> bool:
                    answers = [await status_of(a, k) for a, k in (("default", "wh-hot"), ("second", "wh-list:1"))]
                    return all(status == 200 and body["event"] is not None for status, body in answers)

                await eventually(published)
            status, where = await status_of("second", "wh-list:1")
            assert (where["state"], where["event"]["event"], where["event"]["account"]) == ("succeeded",) * 2 + (
                "second",
            )
    finally:
        await cluster.aclose()


async def test_a_hung_or_killed_master_is_503_on_the_cluster_and_the_retry_is_safe(
    cluster_url: str, cluster_servers: ClusterServers
) -> None:
    """The master of the account's slot stopped by SIGSTOP (it never answers), then killed (nothing
    listens): each time the enqueue and /readyz answer 503 within the Redis timeout, as on a single
    Redis, and the same delivery once it is back is enqueued exactly once (the killed one comes back
    empty: the test cluster keeps nothing on disk). Each outage is shorter
    than the cluster's node timeout (5 s), so the other masters never mark it failed."""
    settings = two_account_settings(cluster_url, "http://127.0.0.1:1", redis_timeout_s=0.5)
    cluster = connect_redis_or_cluster(cluster_url, timeout_s=0.5)
    assert isinstance(cluster, aioredis.RedisCluster)
    try:
        await cluster.initialize()
        server = master_of(cluster, cluster_servers, keys.outbox_key("default"))
        async with served(create_webhook(settings, cluster)) as (base, http):
            assert (await post_change(http, base, DONE["hot"], "before"))[0] == 202
            for outage, key in ((server.pause, "during-hang"), (server.kill, "during-crash")):
                outage()
                try:
                    status, problem = await post_change(http, base, QUEUED["later"], key)
                    assert status == 503, problem
                    assert "unknown" in problem["detail"]
                    async with http.get(base + "/readyz") as ready:
                        assert ready.status == 503
                        assert ready.headers["Retry-After"].isdigit()
                finally:
                    if outage == server.pause:
                        server.resume()
                    else:
                        server.start(timeout=10)

                async def enqueued_again(key: str = key) -> bool:
                    status, answer = await post_change(http, base, QUEUED["later"], key)
                    return status == 202 and answer["receipts"][0]["status"] in ("queued", "duplicate")

                await eventually(enqueued_again, within_s=20)
                queued = await cluster.zrange(keys.queue_key(settings.queue_name, "default"), 0, -1)
                # The killed master comes back empty (the test cluster does not persist): only its key.
                expected = ["before", key] if outage == server.pause else [key]
                assert sorted(queued) == sorted(f"default:{k}".encode() for k in expected)
    finally:
        await cluster.aclose()


async def test_the_console_reads_replays_and_discards_on_the_cluster(
    cluster_url: str, fake_ivvy: RunningFakeIvvy
) -> None:
    """The console's API over the cluster: the overview and the failures count both accounts'
    changes and dead letters, a change's timeline has its events; a replay of a dead letter (its
    stage created meanwhile) succeeds, and a discard deletes the other account's dead letter."""
    settings = two_account_settings(cluster_url, fake_ivvy.url)
    cluster = connect_redis_or_cluster(cluster_url)
    try:
        async with LeadStageProducer(settings, redis=cluster) as producer:
            await producer.enqueue(DONE["hot"], idempotency_key="hot")
            for account in ("default", "second"):
                await producer.enqueue(REFUSED["gone"], idempotency_key="gone", account=account)
        async with running_worker(settings):
            await eventually(lambda: dead_letters_are(cluster, settings, 2), within_s=30)
        async with consoles.running_console(settings, cluster) as console, aiohttp.ClientSession() as http:

            async def api(method: str, path: str, body: object = None) -> Any:
                async with http.request(
                    method, console + "/api/v1" + path, json=body, headers=consoles.bearer()
                ) as response:
                    assert response.status == 200, await response.text()
                    return await response.json()

            overview = await api("GET", "/overview")
            rows = {row["account"]: row for row in overview["accounts"]}
            assert {name: rows[name]["dead_letters"] for name in ("default", "second")} == {"default": 1, "second": 1}
            failures = await api("GET", "/failures")
            assert failures["dead_letters_matching"] == 2
            assert {(letter["account"], letter["idempotency_key"]) for letter in failures["dead_letters"]} == {
                ("default", "gone"),
                ("second", "gone"),
            }
            timeline = await api("GET", "/changes/hot?account=default")
            assert timeline["change"]["state"] == "succeeded"
            assert [entry["kind"] for entry in timeline["timeline"]] == ["enqueued", "attempt"]
            assert timeline["timeline"][1]["result"]["event"] == "succeeded"  # from the results stream

            consoles.create_missing_stage(fake_ivvy.fake)
            replayed = await api("POST", "/dead-letters/replay", {"keys": ["gone"], "account": "default"})
            assert [(r["account"], r["status"]) for r in replayed["results"]] == [("default", "queued")]
            discarded = await api("POST", "/dead-letters/discard", {"filter": {"account": "second"}})
            assert [(r["account"], r["status"]) for r in discarded["results"]] == [("second", "discarded")]
            assert await dead_letters_are(cluster, settings, 0)
            async with running_worker(settings):
                terminal = await cluster_terminal(cluster, settings, {"gone"})

                async def replay_succeeded() -> bool:
                    where = await readers.change_status(cluster, settings, "default", "gone")
                    return where is not None and where["state"] == "succeeded"

                await eventually(replay_succeeded, within_s=30)
            assert "failed" in terminal["gone"]
            assert (await api("GET", "/failures"))["dead_letters_matching"] == 0
    finally:
        await cluster.aclose()


async def dead_letters_are(cluster: RedisClient, settings: Settings, count: int) -> bool:
    return len(await listed(readers.dead_letters(cluster, settings))) == count


async def test_the_demo_runs_on_the_cluster_and_leaves_production_keys_alone(cluster_url: str) -> None:
    """``leadstage demo`` with REDIS_URL naming the cluster: every sample ends as expected (the
    metrics counted before the summary), what an earlier demo left on any master is cleared
    first, and production keys stay."""
    cluster = connect_redis_or_cluster(cluster_url)
    production = {"leadstage:queue": "job", keys.ledger_key("default:crm-42"): "entry", "leadstage:results": "x"}
    stale = [keys.ledger_key(keys.job_id(DEMO_ACCOUNT, "stale")), keys.pending_key(DEMO_ACCOUNT, cluster=True)]
    try:
        for key, value in {**production, **dict.fromkeys(stale, "old")}.items():
            await cluster.set(key, value)
        run = await run_demo(REDIS_URL=cluster_url, LEADSTAGE_METRICS_PORT="0")
        assert run.status == 0, run.stdout + run.stderr
        assert run.stderr == ""
        assert len(lines_of(run, "succeeded")) == 4
        assert 'leadstage_changes_total{account="leadstage-demo",outcome="succeeded"} 4.0' in run.stdout
        assert "Every sample ended as expected" in run.stdout
        [dead] = await cluster.xrange(DEMO_DLQ)
        assert dead[1][b"idempotency_key"].endswith(b"-quoted")
        assert await cluster.exists(*stale) == 0
        for key, value in production.items():
            assert await cluster.get(key) == value.encode()
    finally:
        await cluster.aclose()


def test_leadstage_webhook_and_console_serve_the_cluster(cluster_url: str) -> None:
    """``leadstage webhook`` and ``leadstage console`` as an operator starts them, with REDIS_URL
    naming the cluster: the webhook is ready and enqueues a signed change, the console's API reads it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IVVY_", "LEADSTAGE_", "REDIS_URL", "WEBHOOK_"))}
    env |= {"REDIS_URL": cluster_url, "LEADSTAGE_METRICS_PORT": "0", "LEADSTAGE_LOG_FORMAT": "json"}
    webhook_port, console_port = free_port(), free_port()
    with (
        background("webhook", "--port", str(webhook_port), env={**env, "WEBHOOK_SECRET": consoles.WEBHOOK_SECRET}),
        background("console", "--port", str(console_port), env={**env, "LEADSTAGE_CONSOLE_TOKEN": consoles.TOKEN}),
    ):
        webhook, console = f"http://127.0.0.1:{webhook_port}", f"http://127.0.0.1:{console_port}"
        wait_for(lambda: http("GET", webhook + "/healthz") == 200, "the webhook")
        assert http("GET", webhook + "/readyz") == 200
        body = orjson.dumps(DONE["hot"])
        assert http("POST", webhook + CHANGES_PATH, body, signed(body, "cli-hot")) == 202
        wait_for(lambda: http("GET", console + "/login") == 200, "the console")
        assert http("GET", console + "/api/v1/changes/cli-hot?account=default", headers=consoles.bearer()) == 200
        assert http("GET", console + "/api/v1/overview", headers=consoles.bearer()) == 200
