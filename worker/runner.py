"""``leadstage worker``: an arq worker for the change job, with its shared clients made once.

Two things are added to plain arq:

- a short in-progress lease. arq marks a running job with ``arq:in-progress:{id}`` for the job
  timeout plus 10 s, so a killed worker's job waits that long. Here the mark lives for
  ``LEADSTAGE_LEASE`` seconds and a heartbeat renews it for the jobs still running, so another
  worker takes a dead worker's change within the lease (SPEC.md: within 15 s).
- graceful SIGTERM: arq stops taking jobs and waits up to ``LEADSTAGE_SHUTDOWN_GRACE`` for the
  running ones (``job_completion_wait``); whatever is still unfinished is simply taken up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func

from worker import keys, metrics
from worker.errors import redis_errors
from worker.ivvy import AiohttpTransport, IvvyClient
from worker.job import Runtime, apply_lead_stage_change
from worker.ledger import Ledger
from worker.settings import Settings

log = structlog.get_logger("leadstage.worker")


def build_worker(settings: Settings, *, burst: bool = False, handle_signals: bool = True) -> Worker:
    """An arq Worker for the change job; clients are made in ``on_startup``, once per process."""
    settings.require_accounts()
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    async def on_startup(ctx: dict[str, Any]) -> None:
        redis: ArqRedis = ctx["redis"]
        transport = AiohttpTransport(max_connections=max(settings.concurrency, 10))
        clients = {
            name: IvvyClient(account, transport, timeout=settings.request_timeout_s)
            for name, account in settings.accounts.items()
        }
        runtime = Runtime(settings, Ledger(redis, settings), clients, worker_id)
        ctx["runtime"], ctx["transport"] = runtime, transport
        ctx["heartbeat"] = asyncio.create_task(_heartbeat(redis, runtime))
        log.info(
            "worker.started", worker_id=worker_id, accounts=sorted(settings.accounts), concurrency=settings.concurrency
        )

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        heartbeat: asyncio.Task[None] | None = ctx.get("heartbeat")
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if "transport" in ctx:
            await ctx["transport"].close()
        log.info("worker.stopped", worker_id=worker_id)

    worker = Worker(
        functions=[func(apply_lead_stage_change, name=keys.JOB_FUNCTION, max_tries=1_000_000)],
        redis_settings=redis_settings(settings.redis_url),
        queue_name=settings.queue_name,
        max_jobs=settings.concurrency,
        job_timeout=settings.job_timeout_s,
        keep_result=0,
        poll_delay=settings.poll_delay_s,
        job_completion_wait=int(settings.shutdown_grace_s),
        handle_signals=handle_signals,
        burst=burst,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        job_serializer=_json_dumps,
        job_deserializer=orjson.loads,
        health_check_interval=60,
        log_results=False,
    )
    # The lease (see the module docstring): arq would use job_timeout + 10 s.
    worker.in_progress_timeout_s = settings.lease_s
    return worker


def _json_dumps(value: Any) -> bytes:
    """arq's serializer: JSON, never pickle; arq's own failure records hold exceptions, kept as text."""
    return orjson.dumps(value, default=repr)


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings from REDIS_URL (Sentinel through redis+sentinel:// URLs)."""
    if url.startswith("redis+sentinel://"):
        return _sentinel_settings(url)
    return RedisSettings.from_dsn(url)


def _sentinel_settings(url: str) -> RedisSettings:
    """``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]``."""
    rest = url.removeprefix("redis+sentinel://")
    password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        password = auth.partition(":")[2] or None
    hosts_part, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    hosts = [(h.rpartition(":")[0] or h, int(h.rpartition(":")[2] or 26379)) for h in hosts_part.split(",") if h]
    return RedisSettings(
        host=hosts,
        sentinel=True,
        sentinel_master=service or "mymaster",
        password=password,
        database=int(db or 0),
    )


async def _heartbeat(redis: aioredis.Redis, runtime: Runtime) -> None:
    """Renew the in-progress lease of this worker's running jobs, and refresh the gauges."""
    interval = runtime.settings.lease_s / 3
    while True:
        await asyncio.sleep(interval)
        try:
            with redis_errors():
                running = list(runtime.running)
                if running:
                    async with redis.pipeline(transaction=False) as pipe:
                        for job in running:
                            pipe.pexpire(keys.arq_in_progress_key(job), int(runtime.settings.lease_s * 1000))
                        await pipe.execute()
                metrics.IN_PROGRESS.set(len(running))
                await metrics.refresh_queue_gauges(redis, runtime.settings)
        except Exception as error:  # noqa: BLE001 - the heartbeat must outlive a Redis hiccup
            log.warning("worker.heartbeat_failed", error=str(error))


def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    worker = build_worker(settings)
    metrics.start_metrics_server(settings.metrics_port)
    worker.run()
    return 0
