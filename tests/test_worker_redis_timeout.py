"""The worker's arq pool waits LEADSTAGE_REDIS_TIMEOUT at most: a hung Redis is logged and ridden
through, not a hang, and the idle wait on a healthy Redis blocks for less than that timeout."""

from __future__ import annotations

import asyncio
import dataclasses

from structlog.testing import capture_logs

from tests.harness import eventually, worker_settings
from tests.redis_servers import RedisServer
from worker.core import keys
from worker.devtools.fake_ivvy import RunningFakeIvvy
from worker.runner import running_worker

TIMEOUT_S = 0.4


async def test_a_hung_redis_is_logged_within_the_redis_timeout_and_ridden_through(
    private_redis: RedisServer, fake_ivvy: RunningFakeIvvy
) -> None:
    settings = dataclasses.replace(
        worker_settings(private_redis.url, fake_ivvy.url), redis_timeout_s=TIMEOUT_S, redis_connect_timeout_s=TIMEOUT_S
    )
    with private_redis.client() as client, capture_logs() as events:
        async with running_worker(settings) as worker:

            async def started() -> bool:
                return bool(client.hlen(keys.WORKERS))

            await eventually(started)
            private_redis.pause()
            try:

                async def complained() -> bool:
                    return any(e["event"] in ("worker.redis_unavailable", "worker.heartbeat_failed") for e in events)

                # Well within the 30 s an idle worker's wait would block without a socket timeout.
                await eventually(complained, within_s=5)
            finally:
                private_redis.resume()
            await asyncio.sleep(3 * TIMEOUT_S)
            assert not worker.done()  # it goes on once Redis answers again


async def test_an_idle_worker_waits_for_less_than_the_redis_timeout(
    private_redis: RedisServer, fake_ivvy: RunningFakeIvvy
) -> None:
    """Its blocking wait for work would otherwise end as a Redis that does not answer, each time."""
    # A longer timeout than above: a healthy Redis on a loaded machine must never look hung here.
    timeout_s = 1.0
    settings = dataclasses.replace(worker_settings(private_redis.url, fake_ivvy.url), redis_timeout_s=timeout_s)
    with capture_logs() as events:
        async with running_worker(settings):
            await asyncio.sleep(4 * timeout_s)  # several idle waits (of half the timeout) end with nothing to do
    assert [e for e in events if e["log_level"] == "warning"] == []
