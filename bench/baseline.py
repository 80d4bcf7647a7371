"""The baseline: a bare arq job that makes the product's signed POST, and nothing else.

It prices what the product's guarantees cost, so it differs from arq's defaults in exactly two
settings, the ones that decide how fast work is picked up: ``max_jobs`` and ``poll_delay`` equal
the product's ``LEADSTAGE_CONCURRENCY`` and ``LEADSTAGE_POLL_DELAY``. Everything else is arq's
default: pickle, the standard asyncio event loop, results kept for an hour, five tries, arq's
own logging config (as the ``arq`` command sets it up). No idempotency, ledger, ordering, rate
limit, lease or results stream: that is the product's part.
"""

from __future__ import annotations

import logging.config
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import default_queue_name, result_key_prefix
from arq.jobs import deserialize_result
from arq.logs import default_log_config
from arq.worker import Worker, func

from bench.infra import BenchError
from bench.measure import Probe
from bench.workload import Change, Item
from worker.core.settings import Settings
from worker.signing import API_VERSION, signed_headers

JOB_NAME = "post_change"
REQUEST_URI = f"/api/{API_VERSION}/crm?action=addOrUpdateLeadStage"


async def post_change(ctx: dict[str, Any], change: Change) -> int:
    """The arq job: sign and POST the change, return the stage id iVvy reports."""
    settings: Settings = ctx["settings"]
    session: aiohttp.ClientSession = ctx["session"]
    account = settings.accounts["default"]
    body = orjson.dumps(change)
    headers = signed_headers(
        api_key=account.api_key,
        api_secret=account.api_secret.get(),
        request_uri=REQUEST_URI,
        body=body,
        now=datetime.now(UTC),
    )
    timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)
    async with session.post(account.base_url + REQUEST_URI, data=body, headers=headers, timeout=timeout) as response:
        answer = orjson.loads(await response.read())
    if response.status != 200 or not isinstance(answer, dict) or answer.get("success") is not True:
        raise RuntimeError(f"iVvy answered {response.status}: {answer!r}")
    return int(answer["id"])


def build_baseline_worker(settings: Settings) -> Worker:
    """arq's Worker with its defaults, but the product's concurrency and poll delay."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        # One session per process, made once, like the product's transport.
        ctx["settings"] = settings
        ctx["session"] = aiohttp.ClientSession()

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        if "session" in ctx:
            await ctx["session"].close()

    return Worker(
        functions=[func(post_change, name=JOB_NAME)],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        max_jobs=settings.concurrency,
        poll_delay=settings.poll_delay_s,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
    )


def run_baseline_worker(settings: Settings) -> int:
    """What ``arq bench.baseline.WorkerSettings`` would do: arq's logging config, then run."""
    logging.config.dictConfig(default_log_config(verbose=False))
    build_baseline_worker(settings).run()
    return 0


class BaselineSide:
    """The baseline seen by the phases (``bench.side.Side``)."""

    name = "baseline"
    queue_name: str = default_queue_name

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker_env: Mapping[str, str] = {}
        self._pool: ArqRedis | None = None

    @property
    def pool(self) -> ArqRedis:
        if self._pool is None:
            raise BenchError("BaselineSide.connect() was not called")
        return self._pool

    async def connect(self) -> None:
        self._pool = await create_pool(RedisSettings.from_dsn(self.settings.redis_url))
        await self._pool.ping()

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    def worker_args(self) -> list[str]:
        return ["baseline-worker"]

    async def enqueue_one(self, key: str, change: Change) -> str:
        job = await self.pool.enqueue_job(JOB_NAME, change)
        if job is None:
            raise BenchError("arq refused a job (an id clash)")
        job_id: str = job.job_id
        return job_id

    async def enqueue_bulk(self, items: Sequence[Item]) -> list[str]:
        """arq has no batch enqueue: one ``enqueue_job`` after another is how a producer does it."""
        return [await self.enqueue_one(key, change) for key, change in items]

    async def finished_count(self, probe: Probe, enqueued: int) -> int:
        return enqueued - await probe.zcard(self.queue_name)

    async def settled(self, probe: Probe, expected: int) -> bool:
        # arq removes a job from the queue in the same transaction that stores its result.
        return await probe.zcard(self.queue_name) == 0

    async def finish_times(self, handles: Sequence[str]) -> Mapping[str, float]:
        raw: list[bytes | None] = []
        for start in range(0, len(handles), 2000):
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id in handles[start : start + 2000]:
                    pipe.get(result_key_prefix + job_id)
                raw.extend(await pipe.execute())
        finished: dict[str, float] = {}
        for job_id, data in zip(handles, raw, strict=True):
            if data is None:
                raise BenchError(f"baseline job {job_id} has no result")
            result = deserialize_result(data)
            if not result.success:
                raise BenchError(f"baseline job {job_id} failed: {result.result!r}")
            finished[job_id] = result.finish_time.timestamp()
        return finished
