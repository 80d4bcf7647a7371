"""What the console's tests share: settings with tokens, the console served on loopback, changes."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from producers.serving import serving
from tests.harness import eventually, read_events, reconciling_soon, wait_for_terminal, worker_settings
from worker.console.app import create_app
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.core.redis_connection import RedisClient
from worker.core.settings import Secret, Settings
from worker.devtools.fake_ivvy import FakeIvvy, RunningFakeIvvy, Stage
from worker.runner import running_worker

TOKEN = "console-admin-token-for-tests-0123"
READ_TOKEN = "console-read-token-for-tests-4567"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"console test webhook secret").decode()
#: A stage id the fake iVvy does not have (its new ids count up from 1000, far from here): an update
#: of it fails with 24320 until ``create_missing_stage``, after which a replay succeeds.
MISSING_STAGE = 424242


def console_settings(redis_url: str, ivvy_url: str, **overrides: object) -> Settings:
    """A fast test worker's settings, with both console tokens and a webhook secret (never to be shown)."""
    values: dict[str, object] = {
        "console_token": Secret(TOKEN),
        "console_read_token": Secret(READ_TOKEN),
        "webhook_secret": Secret(WEBHOOK_SECRET),
    }
    values.update(overrides)
    return worker_settings(redis_url, ivvy_url, **values)


@contextlib.asynccontextmanager
async def running_console(settings: Settings, redis: RedisClient) -> AsyncIterator[str]:
    """The console on a free loopback port, served as ``leadstage console`` serves it; yields its base URL.
    Its overview is reused for a twentieth of a second, not a second: a test sees a change soon."""
    app = create_app(settings, redis, overview_ttl_s=0.05)
    async with serving(app, "127.0.0.1", 0, shutdown_timeout=2.0) as (host, port):
        yield f"http://{host}:{port}"


async def enqueue(
    redis: RedisClient, settings: Settings, change: dict[str, object], key: str, account: str = "default"
) -> None:
    """Enqueue one change through the ledger, as every producer does."""
    await Ledger(redis, settings).enqueue_many(
        [(parse_change(change), parse_envelope(idempotency_key=key, account=account))]
    )


async def queue_with_one_claimed(redis: aioredis.Redis, settings: Settings, *names: str) -> None:
    """Changes ``names`` of account default and one (``o1``) of account other queued, and a worker's
    claim of the first (start.lua): running, hidden for a lease longer than any test takes, however
    slowly it runs (and no real worker takes it)."""
    for key in names:
        await enqueue(redis, settings, {"name": f"Stage {key}", "applyTo": "lead"}, key)
    await enqueue(redis, settings, {"name": "Other", "applyTo": "lead"}, "o1", account="other")
    long_lease = dataclasses.replace(settings, lease_s=600.0)
    start = await Ledger(redis, long_lease).start(f"default:{names[0]}", "test-worker", 1000.0, 0)
    assert start.decision == "go"


async def retried_then_applied(
    redis: aioredis.Redis, settings: Settings, fake_ivvy: RunningFakeIvvy, change: dict[str, object], key: str
) -> None:
    """``change`` enqueued as ``key`` and worked on while the fake fails every request until an
    attempt was retried, then applied: a timeline of a retry and a success."""
    fake_ivvy.fake.update_faults({"error_rate": 1.0})
    await enqueue(redis, settings, change, key)
    async with running_worker(reconciling_soon(settings)):

        async def retried() -> bool:
            return any(e["event"] == "retrying" for e in await read_events(redis))

        await eventually(retried)
        fake_ivvy.fake.update_faults({"error_rate": 0.0})
        await wait_for_terminal(redis, [key])


def create_missing_stage(fake: FakeIvvy) -> None:
    """Make ``MISSING_STAGE`` exist, as if someone had created it in iVvy meanwhile."""
    fake.stages[MISSING_STAGE] = Stage(MISSING_STAGE, "Made later", None, 2, True)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
