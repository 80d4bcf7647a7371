"""Shared fixtures: a real Redis (a database of its own, flushed per test) and real servers on loopback."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hypothesis
import pytest
import redis
import redis.asyncio as aioredis
import structlog

from tests.console_support import running_console
from tests.redis_servers import RedisCluster, RedisServer, redis_cluster, start_redis
from worker.core.redis_connection import RedisClient, connect_redis_or_cluster
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret, Settings
from worker.devtools.fake_ivvy import RunningFakeIvvy, running_fake_ivvy
from worker.ivvy import AiohttpTransport

# CI runs the property and fuzz tests with a fixed seed, so a landing never fails by the draw;
# elsewhere the draw is random and a failure prints the seed (``@reproduce_failure``) to replay it.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis.settings.register_profile("dev", print_blob=True)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")

#: The Redis the tests use (scripts/setup.sh starts one on 127.0.0.1:6379 when none answers).
TEST_REDIS_SERVER = os.environ.get("LEADSTAGE_TEST_REDIS_SERVER", "redis://127.0.0.1:6379")
#: Secrets for tests that configure one but do not care which: each as long as settings require
#: (MIN_SECRET_LENGTH), and unlike any word of a log line, so that the redactor masks only them.
TEST_API_SECRET = "test-api-secret-4f3e2d1c"
TEST_WEBHOOK_SECRET = "whsec_dGVzdC13ZWJob29rLWtleS0wMTIz"
TEST_REDIS_PASSWORD = "test-redis-password-9b8a"
#: Databases a test session may claim; 0 is left alone (it holds the claims).
TEST_DATABASES = range(15, 0, -1)


#: Modules whose every test starts processes (workers, commands, servers) or fuzzes for seconds
#: (schemathesis): marked ``system``, so that ``pytest -m "not system"`` is the quick loop. Single
#: tests elsewhere carry the mark themselves, and so do modules with ``pytestmark = pytest.mark.system``.
SYSTEM_MODULES = frozenset(
    {
        "test_chaos",
        "test_cli",
        "test_demo",
        "test_failover",
        "test_hostile_input",
        "test_one_shot",
        "test_outcomes_cli",
        "test_processes",
        "test_rate_limit",
        "test_secrets",
        "test_shutdown",
        "test_webhook_fuzz",
    }
)
#: How a module marks all of its tests ``system`` itself.
SYSTEM_MODULE_MARK = "\npytestmark = pytest.mark.system"


#: Fixtures that start a process (a redis-server of the test's own): a test using one is ``system``.
SYSTEM_FIXTURES = frozenset({"private_redis"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SYSTEM_MODULES or SYSTEM_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``-m "not system"``, a module whose every test is ``system`` is not even imported:
    importing and collecting them (schemathesis prepares its cases at collection, the browser
    tests import Playwright) is a third of the quick loop's time, for tests it would deselect."""
    if str(config.getoption("markexpr")).replace(" ", "") != "notsystem" or collection_path.suffix != ".py":
        return None
    whole = collection_path.stem in SYSTEM_MODULES or SYSTEM_MODULE_MARK in collection_path.read_text(encoding="utf-8")
    return True if whole else None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A database of the test Redis that this test session has to itself.

    Test runs of several checkouts on one machine would otherwise flush each other's data: each
    session claims a free database number with SET NX in database 0, and frees it at the end.
    """
    claims = redis.Redis.from_url(f"{TEST_REDIS_SERVER}/0")
    token = f"{os.getpid()}"
    for database in TEST_DATABASES:
        if claims.set(f"leadstage-tests:database:{database}", token, nx=True, ex=3600):
            break
    else:
        raise RuntimeError("every test database of the Redis is claimed by another test session")
    try:
        yield f"{TEST_REDIS_SERVER}/{database}"
    finally:
        if claims.get(f"leadstage-tests:database:{database}") == token.encode():
            claims.delete(f"leadstage-tests:database:{database}")
        claims.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A connection to the test database, emptied before and after the test."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
async def fake_ivvy() -> AsyncIterator[RunningFakeIvvy]:
    """The fake iVvy on a free loopback port, accepting the demo key and secret, without faults."""
    async with running_fake_ivvy(credentials={DEMO_API_KEY: DEMO_API_SECRET}) as server:
        yield server


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    """The real HTTP transport of the iVvy client, closed after the test."""
    transport = AiohttpTransport()
    yield transport
    await transport.close()


@pytest.fixture
def ivvy_account(fake_ivvy: RunningFakeIvvy) -> Account:
    """The default account, pointing at ``fake_ivvy``."""
    return Account("default", fake_ivvy.url, DEMO_API_KEY, Secret(DEMO_API_SECRET), rate_limit=1000.0)


@pytest.fixture
async def console(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """The console served over the test module's own ``settings`` fixture; yields its URL."""
    async with running_console(settings, redis_client) as url:
        yield url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own: it may refuse writes, stall or fail without disturbing other tests."""
    server = start_redis(tmp_path / "redis", "--appendonly", "no")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def cluster_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster of three masters on free loopback ports, started once per test session."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(params=["single", "cluster"])
async def any_redis(
    request: pytest.FixtureRequest, redis_url: str, redis_client: aioredis.Redis, cluster_servers: RedisCluster
) -> AsyncIterator[tuple[str, RedisClient]]:
    """(``REDIS_URL``, a client of it): the test database of the test Redis, then the session's Redis
    Cluster, each emptied before and after the test (a test that runs on both)."""
    if request.param == "single":
        yield redis_url, redis_client
        return
    cluster_servers.flush()
    client = connect_redis_or_cluster(cluster_servers.url)
    try:
        yield cluster_servers.url, client
    finally:
        await client.aclose()
        cluster_servers.flush()


@pytest.fixture
def cluster_url(cluster_servers: RedisCluster) -> Iterator[str]:
    """``REDIS_URL`` of the session's Redis Cluster (redis+cluster://), emptied before and after the test."""
    cluster_servers.flush()
    try:
        yield cluster_servers.url
    finally:
        cluster_servers.flush()


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that configures logging (to its own stream) leaves the process as it found it.

    Otherwise a later test's worker would write to that stream, and what it asserts of the logs
    would depend on the order the tests ran in.
    """
    monkeypatch.delenv("LEADSTAGE_LOG_LEVEL", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    structlog.contextvars.clear_contextvars()
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
