"""The demo's embedded default: its names, its Redis (``REDIS_URL``, or a redis-server of its own), its settings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from redis.asyncio.cluster import RedisCluster

from worker.core import keys, metrics
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.errors import ConfigError, DemoFailed, RedisCredentialsRefused, RedisUnavailable, redis_errors
from worker.core.processes import Children, RedisServer
from worker.core.redis_connection import RedisClient, connect_redis_or_cluster, ping
from worker.core.redis_url import printable_url
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret, Settings
from worker.devtools.demo.printer import Printer

#: The demo's own names (see ``worker.devtools.demo``: it never shares a key with production).
DEMO_ACCOUNT: Final = "leadstage-demo"
DEMO_QUEUE: Final = "leadstage:demo:queue"
DEMO_RESULTS: Final = "leadstage:demo:results"
DEMO_DLQ: Final = "leadstage:demo:dlq"

#: How long a redis-server the demo started may take to answer.
REDIS_START_TIMEOUT_S: Final = 5.0
#: How long "does Redis answer at REDIS_URL?" may take (an unroutable host would hang otherwise).
REDIS_PROBE_TIMEOUT_S: Final = 2.0


async def answers(url: str) -> bool:
    """Whether a Redis answers at ``url``; one that answers but refuses us is a ``DemoFailed``."""
    client = connect_redis_or_cluster(url)
    try:
        await ping(client, REDIS_PROBE_TIMEOUT_S)
    except RedisCredentialsRefused as error:  # a RedisUnavailable: before it
        raise DemoFailed(f"the Redis at {printable_url(url)} (REDIS_URL) refused the demo: {error}") from None
    except RedisUnavailable:
        return False
    finally:
        await client.aclose()
    return True


@contextlib.asynccontextmanager
async def own_redis_server(unanswered_url: str) -> AsyncIterator[str]:
    """A redis-server of the demo's own, on a free loopback port, without persistence; stopped on exit."""
    if shutil.which("redis-server") is None:
        raise DemoFailed(
            f"nothing answers at {printable_url(unanswered_url)} (REDIS_URL) and redis-server is not on PATH: "
            "start a Redis or point REDIS_URL at one"
        )
    with tempfile.TemporaryDirectory(prefix="leadstage-demo-redis-") as directory:
        children = Children(Path(directory))
        try:
            # A session of its own: Ctrl-C reaches the demo only, which stops the worker before Redis.
            server = RedisServer(children, Path(directory, "data"), new_session=True)
            await asyncio.to_thread(server.start, REDIS_START_TIMEOUT_S)
            yield server.url
        finally:
            await asyncio.to_thread(children.close)


async def clear_demo_keys(client: RedisClient) -> None:
    """Delete what earlier demos left: the demo's queue, streams and every key of its account.

    One SCAN pass (of every master, on a Redis Cluster), then an exact prefix check, so that no
    production key is ever touched; on a cluster also the account's backlog count and outbox, which
    are its own there (on a single Redis its backlog is a field of the shared hash, left alone).
    """
    prefixes = tuple(
        prefix + keys.tag(DEMO_ACCOUNT) + ":"
        for prefix in (keys.LEDGER_PREFIX, keys.STAGE_PREFIX, keys.STAGE_LOCK_PREFIX)
    )
    doomed = [DEMO_QUEUE, DEMO_RESULTS, DEMO_DLQ, keys.claims_key(DEMO_ACCOUNT), keys.rate_key(DEMO_ACCOUNT)]
    doomed += [keys.newest_claim_key(DEMO_ACCOUNT), keys.queue_key(DEMO_QUEUE, DEMO_ACCOUNT)]
    doomed += [keys.ready_key(DEMO_QUEUE), keys.wake_key(DEMO_QUEUE), keys.epoch_key(DEMO_QUEUE)]
    if isinstance(client, RedisCluster):
        doomed += [keys.pending_key(DEMO_ACCOUNT, cluster=True), keys.outbox_key(DEMO_ACCOUNT)]
    with redis_errors():
        async for raw in client.scan_iter(match="leadstage:*" + keys.tag(DEMO_ACCOUNT) + ":*", count=1000):
            if raw.decode(errors="replace").startswith(prefixes):
                doomed.append(raw)
        for start in range(0, len(doomed), 500):
            await client.unlink(*doomed[start : start + 500])


def demo_credentials(settings: Settings) -> tuple[str, str]:
    """The default account's key and secret when one is configured, else the fake's demo pair."""
    account = settings.account(DEFAULT_ACCOUNT)
    if account is None:
        return DEMO_API_KEY, DEMO_API_SECRET
    return account.api_key, account.api_secret.get()


def settings_for_demo(settings: Settings, redis_url: str, ivvy_url: str, credentials: tuple[str, str]) -> Settings:
    """``settings`` with the demo's names, its one account (at the fake) and its fast timings."""
    key, secret = credentials
    rate_limit = 20.0  # requests per second to the fake: the shared rate limiter at work, without slowing the demo
    account = Account(DEMO_ACCOUNT, ivvy_url, key, Secret(secret), rate_limit)
    return dataclasses.replace(
        settings,
        redis_url=redis_url,
        accounts={DEMO_ACCOUNT: account},
        queue_name=DEMO_QUEUE,
        results_stream=DEMO_RESULTS,
        dlq_stream=DEMO_DLQ,
        ledger_retention_s=3600,  # throw-away entries: they expire after an hour, not the production 24 h
        rate_limit=rate_limit,
        concurrency=10,
        # Fast timings: a retry is seen within a second, not after the production defaults.
        max_attempts=6,
        max_age_s=60.0,
        backoff_base_s=0.2,
        backoff_max_s=2.0,
        request_timeout_s=2.0,
        job_timeout_s=10.0,
        shutdown_grace_s=2.0,
    )


def start_metrics(port: int, printer: Printer, stack: contextlib.AsyncExitStack) -> str | None:
    """The metrics endpoint on loopback at ``port``, if it is free; the demo goes on without it otherwise."""
    try:
        server = metrics.start_metrics_server(port, host="127.0.0.1")
    except ConfigError as error:
        printer.note(f"no metrics endpoint: {error}")
        return None
    if server is None:
        printer.note("no metrics endpoint: LEADSTAGE_METRICS_PORT is 0")
        return None
    stack.callback(server.close)
    return f"http://127.0.0.1:{server.port}/metrics"
