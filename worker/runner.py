"""``leadstage worker``: arq's Worker running the change job, with its shared clients made once.

arq supplies the process: the main loop, the concurrency limit, job timeouts, health checks and
graceful shutdown (SIGTERM stops taking jobs and waits up to ``LEADSTAGE_SHUTDOWN_GRACE`` for
running ones). Two things are replaced. What to run next: instead of polling one queue, the
worker picks the first due account from the schedule (``keys.ready_key``, round-robin among due
accounts), claims that account's next change that may be sent, and, when nothing is due, blocks
on the wake list (BLPOP) until an enqueue or a retry notifies it or the next account is due. And
how a due job is claimed: not arq's four round trips (WATCH/MULTI, an in-progress key, a pickled
record), but ``start.lua``, every decision in one, the record being the ledger entry; a running job
is hidden for one lease (``LEADSTAGE_LEASE``), renewed by a heartbeat, so a killed worker's change
is due again within the lease (docs/contract.md: within 15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from signal import Signals
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.worker import Worker, func

from worker import batching
from worker.arq_pool import ClusterPool, cluster_pool, redis_settings
from worker.core import keys, metrics
from worker.core.errors import ConfigError, LeadstageError, RedisUnavailable, redis_errors
from worker.core.ledger import Ledger, Pick, Start
from worker.core.processes import cancel_until_done
from worker.core.redis_connection import RedisClient, close_sentinels
from worker.core.results import lost_event
from worker.core.settings import Settings
from worker.core.states import Decision
from worker.ivvy import LIST_RETRY_BASE_S, LIST_RETRY_CAP_S, AiohttpTransport, IvvyClient
from worker.ivvy_tracing import traced_transport
from worker.job import apply_lead_stage_change
from worker.layout import migrate
from worker.runtime import Lease, Runtime

log = structlog.get_logger("leadstage.worker")

#: How long the poll loop rests after Redis stopped answering, before it tries again.
REDIS_RETRY_S = 1.0
#: The longest an idle worker blocks before it looks at the schedule again (a notice, or the next
#: due account, wakes it sooner): a safety net that costs about 4 commands per this many seconds.
IDLE_WAKE_S = 30.0
#: A wait for the next due account this short is slept here, not blocked in Redis: Redis ends a
#: BLPOP's timeout on its timer tick (100 ms at the default hz), which would halve a 20/s account.
SHORT_WAIT_MS = 110
#: While many jobs run, a worker claims again once this share of its slots is free (``_may_claim``).
CLAIM_SHARE = 4
#: Every this many heartbeats the worker puts accounts with queued changes back on the schedule
#: (``Ledger.resync``).
RESYNC_BEATS = 20
#: Every this many heartbeats the queue gauges are read from Redis (an idle worker's cost is mostly
#: its heartbeat).
GAUGE_BEATS = 3


CLOSE_TIMEOUT_S = 10.0  # closing once the jobs are done: Redis calls and the transport, each bounded


class LeadstageWorker(Worker):
    """arq's Worker serving accounts from the schedule, claiming with ``start.lua``, blocking while idle."""

    #: Whether a queue of the old layout was migrated and the schedule resynced (``layout``).
    prepared = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Both of arq's stops (SIGTERM's, which waits for the jobs first, and close's) cancel the
        # main task once, then call on_stop: a cancellation redis-py lost would leave it running.
        self.on_stop = self._cancel_until_stopped
        self._stopping: asyncio.Future[None] | None = None

    def _cancel_until_stopped(self, _signum: Signals) -> None:
        if self.main_task is not None and self._stopping is None:
            self._stopping = asyncio.ensure_future(cancel_until_done(self.main_task))

    async def close(self) -> None:
        """arq's close, bounded: a task that lost its cancellation (redis-py can) is logged, not waited for."""
        closing = asyncio.ensure_future(super().close())
        await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_S)
        if not closing.done():
            held = [repr(task.get_coro()) for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            log.error("worker.close_timed_out", timeout_s=CLOSE_TIMEOUT_S, tasks=held[:20])
        elif (error := closing.exception()) is not None:  # arq's last Redis calls failed: the stop goes on
            log.warning("worker.close_failed", error=str(error) or type(error).__name__)

    async def _serve(self, runtime: Runtime) -> None:
        """Serve due accounts, a claim of changes at a time each, until none is due or the worker's
        slots are taken; then wait: for running jobs to end (full), or for a notice or the next due
        account (idle)."""
        pick: Pick | None = None
        while self._may_claim():
            if pick is None:
                pick = await runtime.ledger.pick()
            if pick.account is not None:
                pick = await self._claim_from(runtime, pick)
            elif 0 <= pick.wait_ms <= SHORT_WAIT_MS:
                await asyncio.sleep(pick.wait_ms / 1000)
                pick = None
            else:
                # Redis ends a blocking wait on its own timer tick (1/hz, 100 ms by default): block for
                # all but that, and wait out the rest here (above).
                timeout_ms = IDLE_WAKE_S * 1000 if pick.wait_ms < 0 else pick.wait_ms - SHORT_WAIT_MS
                # And for less than the socket timeout, which would end it as a Redis that does not answer:
                # with nothing scheduled, only a notice brings work, so the worker blocks again (no pick)
                # until one does or IDLE_WAKE_S has passed.
                longest_s = min(IDLE_WAKE_S, runtime.settings.redis_timeout_s / 2)
                until = time.monotonic() + timeout_ms / 1000
                while not await runtime.ledger.wait_for_work(min(until - time.monotonic(), longest_s)):
                    if pick.wait_ms >= 0 or time.monotonic() >= until or not self.allow_pick_jobs:
                        break
                return
        running = [task for task in self.tasks.values() if not task.done()]
        if self.allow_pick_jobs and running:
            await asyncio.wait(running, timeout=IDLE_WAKE_S, return_when=asyncio.FIRST_COMPLETED)

    def _free_slots(self) -> int:
        return self.max_jobs - self.job_counter

    def _may_claim(self) -> bool:
        """Whether the worker claims now: one free slot while few jobs run; while many do, a share
        of the slots, so that a claim (and the schedule's pick around it) serves several changes."""
        return self.allow_pick_jobs and self._free_slots() >= max(
            1, min(self.max_jobs // CLAIM_SHARE, self.job_counter)
        )

    async def _claim_from(self, runtime: Runtime, pick: Pick) -> Pick | None:
        """Claim from the picked account as many changes as the worker has free slots (other
        accounts get their turn after that claim), and put it back on the schedule for its next
        due time; then the next pick, in the same call, when the worker may claim again."""
        account = pick.account or ""
        # A claim that fails leaves the account hidden for one lease: it comes back by itself.
        try:
            next_ms = await self._claim(runtime, account)
        except ConfigError as error:
            # Another program's value at one of the account's keys (the script wrote nothing): this
            # account waits for it to go, said once a lease; the other accounts are served meanwhile.
            log.error("worker.account_refused", account=account, error=str(error))
            return None
        if self._may_claim():
            return await runtime.ledger.reschedule_and_pick(account, pick.epoch, next_ms)
        await runtime.ledger.reschedule(account, pick.epoch, next_ms, wake=True)
        return None

    async def _claim(self, runtime: Runtime, account: str) -> int:
        """The claims of one turn of the account; when it may next have work (server ms, -1: none)."""
        if runtime.settings.batch_mode == "auto":
            await batching.launch(self, runtime, account)  # a batch first, when enough are due
        while True:
            claimed_at = time.monotonic()
            claim = await runtime.ledger.claim(
                account,
                runtime.worker_id,
                runtime.settings.rate_limit_for(account),
                runtime.rng.randrange(30),
                self._free_slots(),
            )
            answered_at = time.monotonic()
            launched = 0
            for start in claim.starts:
                if start.runs:
                    await self._launch(runtime, start, claimed_at, answered_at + start.send_in_us / 1_000_000)
                    launched += 1
            # After the launches: a report that fails leaves no claimed change unstarted, and its job
            # comes back after one lease to be reported then (start.lua hides it, lost.lua removes it).
            for start in claim.starts:
                if start.decision is Decision.MISSING:
                    await _report_missing(runtime, start.job_id)
            if claim.rate_reason is not None:
                metrics.RATE_LIMIT_WAITS.labels(account).inc()
            # Only jobs found done or missing: the account may have more to claim now.
            if launched or not claim.starts or claim.rate_reason is not None or not self._free_slots():
                return claim.account_next_ms

    async def _launch(self, runtime: Runtime, start: Start, claimed_at: float, send_at: float) -> None:
        job_id = start.job_id
        await self.sem.acquire()  # never waits (the claim asked for no more than the free slots)
        self.job_counter += 1
        lease = Lease(start.run, claimed_at, send_at)
        runtime.running[job_id] = lease
        lease.task = asyncio.create_task(self._run(runtime, job_id, start, lease))
        lease.confirm(claimed_at + runtime.settings.lease_s, runtime.settings.lease_margin_s)
        lease.task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = lease.task

    async def _run(self, runtime: Runtime, job_id: str, start: Start, lease: Lease) -> None:
        """One job, never raising: whatever it could not record, the lease brings back."""
        work = apply_lead_stage_change(self.ctx, job_id, start)
        await runtime.guarded(work, {job_id: lease}, self.job_timeout_s, log, "job", job_id=job_id, run=start.run)

    async def _poll_iteration(self) -> None:
        """arq's poll, but accounts are served from the schedule by the Redis server's clock, an idle
        worker blocks until woken, and a Redis that does not answer or refuses commands is ridden
        through instead of stopping the worker."""
        runtime: Runtime = self.ctx["runtime"]
        try:
            if not self.prepared:
                # Before the first claim, and ridden through like any other Redis error.
                await migrate(runtime.ledger)
                await runtime.ledger.resync(runtime.settings.accounts)
                await runtime.ledger.sweep_outboxes(runtime.settings.accounts)
                self.prepared = True
            # Before the wait, which blocks while idle: arq's health check must not wait for work.
            with redis_errors():
                await self.heart_beat()
            await self._serve(runtime)
            for job_id, task in list(self.tasks.items()):
                if task.done():
                    del self.tasks[job_id]
        except RedisUnavailable as error:
            if not self.allow_pick_jobs:
                return  # shutting down: the blocking wait was cut off by the closing pool
            log.warning("worker.redis_unavailable", error=str(error))
            await asyncio.sleep(REDIS_RETRY_S)


async def _report_missing(runtime: Runtime, job_id: str) -> None:
    """A due job without a ledger entry: never dropped silently (a failed event and a dead letter)."""
    account, idempotency_key = keys.split_job_id(job_id)
    if await runtime.ledger.report_missing(job_id, lost_event(job_id, finished_at_ms=runtime.wall_ms())):
        log.error("job.ledger_missing", job_id=job_id, account=account, idempotency_key=idempotency_key)
        metrics.CHANGES.labels(account, "failed").inc()
        metrics.DEAD_LETTERED.labels(account).inc()


def build_worker(settings: Settings, *, handle_signals: bool = True) -> LeadstageWorker:
    """The worker for the change job; clients are made in ``on_startup``, once per process."""
    settings.require_accounts()
    pool = cluster_pool(settings)
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    async def on_startup(ctx: dict[str, Any]) -> None:
        redis = await _shared_client(ctx["redis"], settings)
        transport = traced_transport(AiohttpTransport(max_connections=max(settings.concurrency, 10)))
        offset = timedelta(seconds=settings.clock_offset_s)
        clients = {
            name: IvvyClient(
                account,
                transport,
                timeout=settings.request_timeout_s,
                clock=lambda: datetime.now(UTC) + offset,
                # The longest backoff, but never past the longest Retry-After honoured (which would
                # dead-letter the change instead of pausing it).
                clock_skew_pause_s=min(settings.backoff_max_s, settings.retry_after_max_s),
                # A page of a listing never backs off longer than the job itself would.
                list_retry_base_s=min(LIST_RETRY_BASE_S, settings.backoff_base_s),
                list_retry_cap_s=min(LIST_RETRY_CAP_S, settings.backoff_max_s),
            )
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
            # The heartbeat only ends by cancellation, and a lost one would hold the shutdown.
            await cancel_until_done(heartbeat)
        runtime: Runtime | None = ctx.get("runtime")
        if runtime is not None:  # only a started worker's heartbeat wrote it into the workers hash
            with contextlib.suppress(LeadstageError), redis_errors():
                await runtime.ledger.client.hdel(keys.WORKERS, worker_id)  # type: ignore[misc]  # redis-py's async stubs
        if "transport" in ctx:
            await ctx["transport"].close()
        if not isinstance(ctx["redis"], ClusterPool):
            await close_sentinels(ctx["redis"])
        log.info("worker.stopped", worker_id=worker_id)

    return LeadstageWorker(
        functions=[func(apply_lead_stage_change, name=keys.JOB_FUNCTION)],
        redis_settings=None if pool else redis_settings(settings.redis_url),
        redis_pool=pool,
        queue_name=settings.queue_name,
        max_jobs=settings.concurrency,
        queue_read_limit=settings.concurrency,
        job_timeout=settings.job_timeout_s,
        keep_result=0,
        poll_delay=settings.poll_delay_s,
        job_completion_wait=int(settings.shutdown_grace_s),
        handle_signals=handle_signals,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        health_check_interval=60,
    )


async def _shared_client(pool: ArqRedis, settings: Settings) -> RedisClient:
    """The client the worker shares: arq's pool (its connections given the socket timeouts), or on a
    Redis Cluster the cluster client under arq's (``worker.arq_pool``)."""
    if isinstance(pool, ClusterPool):
        return pool.cluster
    # arq's RedisSettings has no socket timeout: every connection of its pool waits
    # LEADSTAGE_REDIS_TIMEOUT for an answer at most (a hung Redis is an error, ridden through
    # by the poll and the heartbeat, not a hang). The connection of arq's start-up ping is
    # closed and dropped, to be made again with it (once).
    kwargs = pool.connection_pool.connection_kwargs
    if kwargs.get("socket_timeout") != settings.redis_timeout_s:
        kwargs.update(socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_connect_timeout_s)
        await pool.connection_pool.disconnect()
        pool.connection_pool.reset()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    return pool


async def _heartbeat(redis: RedisClient, runtime: Runtime) -> None:
    """Keep this worker's running attempts hidden, say that it is alive, and refresh the gauges.

    It survives every error: a beat that fails is logged and the next one tries again. An attempt
    whose lease was not renewed is cancelled by its own timer before the lease ends (``Lease``), and
    one that the ledger says is no longer its change's run is cancelled at once.
    """
    beats = 0
    while True:
        await asyncio.sleep(runtime.settings.lease_s / 3)
        await _beat(runtime)
        beats += 1
        if beats % GAUGE_BEATS == 0:
            try:
                await metrics.refresh_queue_gauges(redis, runtime.settings)
            except Exception as error:  # noqa: BLE001 - gauges are best effort; the leases are what matter
                log.warning("worker.gauges_failed", error=str(error) or type(error).__name__)
        if beats % RESYNC_BEATS == 0:
            try:
                await runtime.ledger.resync(runtime.settings.accounts)
                await runtime.ledger.sweep_outboxes(runtime.settings.accounts)
            except Exception as error:  # noqa: BLE001 - the next resync tries again
                log.warning("worker.resync_failed", error=str(error) or type(error).__name__)


async def _beat(runtime: Runtime) -> None:
    running = dict(runtime.running)
    sent_at = time.monotonic()
    try:
        extended = await runtime.ledger.extend_leases(
            {job: lease.run for job, lease in running.items()}, runtime.worker_id
        )
    except Exception as error:  # noqa: BLE001 - whatever went wrong, the next beat tries again
        log.warning("worker.heartbeat_failed", error=str(error) or type(error).__name__, running=len(running))
        return
    for job_id, lease in running.items():
        if lease.task is None or lease.task.done():
            continue
        if job_id in extended:
            lease.confirm(sent_at + runtime.settings.lease_s, runtime.settings.lease_margin_s)
        else:
            log.warning("job.run_overtaken", job_id=job_id, run=lease.run)
            lease.give_up()
    metrics.IN_PROGRESS.set(len(running))


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    """The worker in this event loop (the demo, tests), closed on exit as SIGTERM closes it."""
    worker = build_worker(settings, handle_signals=False)
    task = asyncio.create_task(worker.main())
    try:
        yield task
    finally:
        try:
            # As on SIGTERM: no new jobs, and the running ones finish (up to the grace) before arq's
            # close cancels what is left mid-step.
            worker.allow_pick_jobs = False
            if worker.tasks:
                await asyncio.wait(list(worker.tasks.values()), timeout=settings.shutdown_grace_s)
            await worker.close()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    worker = build_worker(settings)
    metrics.start_metrics_server(settings.metrics_port)
    worker.run()
    return 0
