"""The soak: ``python -m soak [--changes 20000] [--workers 3] [--seed 1] ...``.

What it does (RELIABILITY.md has the figures of the last run):

1. Starts its own ``redis-server`` (append-only file on, ``appendfsync always``, in a temporary
   directory), the fake iVvy (``leadstage fake-ivvy``) with every fault on (latency, 5xx, 429 with
   Retry-After, hangs past the client timeout, commit-then-drop, 24322, a 504 after the commit,
   commits after the client gave up; for batches, a run's answer dropped, batches never ready and
   jobs answered 24322), and ``--workers`` worker processes (``leadstage worker``)
   whose clocks are right, 3 s ahead and 3 s behind, all on loopback.
2. Enqueues ``--changes`` changes through the producer library (``LeadStageProducer``), in
   batches over time: adds, and several updates per stage (``soak.workload``). An enqueue that
   fails because Redis is down is retried with the same idempotency keys.
3. Meanwhile SIGKILLs a random worker every few seconds and starts a new one, restarts Redis
   (``--redis-restarts``; the first a crash, the next a graceful shutdown, alternately), and makes
   Redis refuse every write for longer than a lease (``--refusals``).
4. When every change has a terminal event, checks (``soak.checks``): nothing lost, no stage created
   twice, every field at its last enqueued value, exactly one terminal event per key, every
   ledger entry terminal; then replays any dead letters with the faults off
   (``leadstage dlq replay --all``) and checks that they succeed.
5. Prints the figures (also written to ``figures.json`` in the log directory) and exits 1 on
   any violation, 0 otherwise. Every child process is stopped on exit, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from producers.library import ChangeItem, LeadStageProducer, Receipt
from soak import verdict
from soak.figures import Figures, print_figures
from soak.observe import REDIS_DOWN, FakeAdmin, ResultsTail, Takeover, orphans_of, probe_takeover
from soak.options import Options, parse_args
from soak.topology import ReplicatedRedis, SingleRedis
from soak.workload import Planned, Workload
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.errors import ProcessFailed, RedisUnavailable
from worker.core.processes import (
    LOOPBACK,
    Child,
    Children,
    free_port,
    python_module,
    sigterm_as_interrupt,
    wait_for_port,
)
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret, Settings

#: The workers' clocks, by slot: one right, one ahead, one behind (LEADSTAGE_TEST_CLOCK_OFFSET).
CLOCK_OFFSETS_S = ("0", "3", "-3")
#: Share of batches the driver delivers twice (same keys, same changes), as an unsure producer does.
REDELIVERY_SHARE = 0.05


class Soak:
    """One run: the children, the driver's tasks, the verdict."""

    def __init__(self, options: Options, log_dir: Path) -> None:
        self.options = options
        self.log_dir = log_dir
        self.rng = random.Random(options.seed)  # noqa: S311 - picks changes and victims, not secrets
        foreign = ("LEADSTAGE_", "IVVY_", "REDIS_", "WEBHOOK_")
        self.children = Children(log_dir, {k: v for k, v in os.environ.items() if not k.startswith(foreign)})
        topology = ReplicatedRedis if options.sentinel else SingleRedis
        self.redis: SingleRedis | ReplicatedRedis = topology(self.children, log_dir / "redis-data")
        self.settings = Settings(
            redis_url=self.redis.url,
            redis_min_replicas=2 if options.sentinel else 0,  # every replica: see soak.topology
            results_maxlen=max(1_000_000, options.changes * 50),
            lease_s=options.lease_s,
        )
        self.workload = Workload(random.Random(options.seed + 1), options.changes, options.add_share)  # noqa: S311
        self.figures = Figures(faults=options.faults.as_dict(), workers=options.workers)
        self.workers: list[Child] = []
        self.takeovers: list[Takeover] = []
        self.restart_windows: list[tuple[float, float]] = []
        self.violations: list[str] = []
        self.fake_url = ""

    # -- the children ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The workers' (and the fake's) settings, as ``leadstage worker`` reads them."""
        o = self.options
        account = Account(DEFAULT_ACCOUNT, self.fake_url, DEMO_API_KEY, Secret(DEMO_API_SECRET), 2000.0)
        return dataclasses.replace(
            self.settings,
            accounts={DEFAULT_ACCOUNT: account},
            rate_limit=2000.0,
            max_attempts=o.max_attempts,
            max_age_s=3600.0,
            backoff_base_s=0.1,
            backoff_max_s=2.0,
            request_timeout_s=o.request_timeout_s,
            job_timeout_s=60.0,
            concurrency=o.concurrency,
            batch_mode="auto" if o.batch_mode == "auto" else "off",
            # A killed worker's batch is collected once its leases lapse (its run unanswered: resent
            # after the in-flight guard); the wait bounds a batch's polls and the hold of its stages
            # when it is not done in time (the fake applies a batch in 0.2 s).
            batch_wait_s=6.0,
            shutdown_grace_s=5.0,
            metrics_port=0,
            log_format="json",
        ).to_env()

    def _start_fake(self) -> None:
        port = free_port()
        self.fake_url = f"http://{LOOPBACK}:{port}"
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in self.options.faults.as_dict().items()]
        fake_args = ["fake-ivvy", "--port", str(port), "--seed", str(self.options.seed), *flags]
        fake = self.children.start("fake-ivvy", python_module("worker.cli", *fake_args), self.env())
        wait_for_port(port, 30, fake.popen)

    def _start_workers(self) -> None:
        env = self.env()
        for slot in range(self.options.workers):
            skewed = {**env, "LEADSTAGE_TEST_CLOCK_OFFSET": CLOCK_OFFSETS_S[slot % len(CLOCK_OFFSETS_S)]}
            worker = self.children.start(f"worker-{slot + 1}", python_module("worker.cli", "worker"), skewed)
            self.workers.append(worker)

    # -- the run --------------------------------------------------------------------------------

    async def run(self) -> int:
        self.redis.start()
        self._start_fake()
        client = self.redis.client()
        admin = FakeAdmin(self.fake_url)
        producer = LeadStageProducer(self.settings, producer="soak")
        results = ResultsTail(self.settings, self.workload.add_succeeded)
        try:
            await self._seed_stages(admin)
            self._start_workers()
            started = time.monotonic()
            done = asyncio.Event()
            chaos = [
                asyncio.create_task(self._kill_workers(client, done)),
                asyncio.create_task(self._watch_workers(done)),
                asyncio.create_task(self._tail(results, client, done)),
            ]
            restarts = asyncio.create_task(self._restart_redis(started))
            chaos.append(asyncio.create_task(self._refuse_writes(started, done)))
            await self._enqueue_all(producer)
            self.figures.enqueue_s = round(time.monotonic() - started, 1)
            await self._settle(results, started)
            self.figures.duration_s = round(time.monotonic() - started, 1)
            done.set()
            restarts.cancel()
            await asyncio.gather(*chaos, restarts, return_exceptions=True)
            await verdict.verify(self, client, admin, results)
            await verdict.replay_dead_letters(self, client, admin, results)
            await verdict.collect_figures(self, admin, results)
        finally:
            await producer.aclose()
            await admin.close()
            await client.aclose()
        self.figures.violations = self.violations
        return 1 if self.violations else 0

    async def _seed_stages(self, admin: FakeAdmin) -> None:
        for index in range(self.options.seed_stages):
            fields: dict[str, object] = {
                "name": f"soak seeded {index}",
                "applyTo": 1 + index % 2,
                "colour": f"#{index * 2654435761 % 16**6:06x}",
            }
            self.workload.seed_stage(await admin.add_stage(fields), fields)
        self.figures.seeded_stages = self.options.seed_stages

    async def _enqueue_all(self, producer: LeadStageProducer) -> None:
        """Batches at ``--enqueue-rate``; a batch refused because Redis is down is sent again, same keys.

        Some batches are also delivered twice, as a producer does that cannot tell whether its call
        landed (a timeout, a restart): ``REDELIVERY_SHARE`` of them at random, and the last batch
        before each Redis restart. Every change of a redelivery must come back ``duplicate``.
        """
        interval = self.options.batch / self.options.enqueue_rate
        next_at = started = time.monotonic()
        previous: list[Planned] = []
        restarts_seen = 0
        while self.workload.remaining:
            if self.redis.restarts > restarts_seen and previous:
                restarts_seen = self.redis.restarts
                await self._redeliver(producer, previous)
            batch = self.workload.next_batch(self.options.batch)
            await self._enqueue_batch(producer, batch)
            self.workload.enqueued(batch)
            if self.rng.random() < REDELIVERY_SHARE:
                await self._redeliver(producer, batch)
            previous = batch
            if len(self.workload.planned) % (self.options.batch * 20) == 0:
                print(f"  {time.monotonic() - started:4.0f}s enqueued {len(self.workload.planned)}", flush=True)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        self.figures.changes = len(self.workload.planned)
        self.figures.adds = len(self.workload.adds)
        self.figures.updates = self.figures.changes - self.figures.adds

    async def _redeliver(self, producer: LeadStageProducer, batch: list[Planned]) -> None:
        receipts = await self._enqueue_batch(producer, batch)
        self.figures.redelivered += len(receipts)
        queued = [r.idempotency_key for r in receipts if r.status != "duplicate"]
        if queued:
            self.violations.append(f"idempotency: {len(queued)} redelivered changes were queued again: {queued[:5]}")

    async def _enqueue_batch(self, producer: LeadStageProducer, batch: list[Planned]) -> list[Receipt]:
        """``enqueue_many``, sent again with the same keys until Redis takes it."""
        items = [ChangeItem(p.change, idempotency_key=p.key) for p in batch]
        deadline = time.monotonic() + 120
        retried = False
        while True:
            try:
                receipts = await producer.enqueue_many(items, source="soak")
                break
            except RedisUnavailable:
                pass
            except redis.exceptions.RedisError as exc:
                # The library promises RedisUnavailable when Redis does not answer; anything else
                # reaching the producer's caller during a restart is a finding.
                self.violations.append(f"producer: enqueue_many raised {type(exc).__name__}: {exc}")
            self.figures.enqueue_retries += 1
            retried = True
            if time.monotonic() > deadline:
                raise ProcessFailed("Redis did not take a batch for 120 s")
            await asyncio.sleep(0.25)
        if retried:
            self.figures.duplicates_on_retry += sum(1 for r in receipts if r.status == "duplicate")
        return receipts

    async def _settle(self, results: ResultsTail, started: float) -> None:
        """Until every change has a terminal event, or the settle timeout after the last enqueue."""
        deadline = time.monotonic() + self.options.settle_timeout_s
        keys_ = [p.key for p in self.workload.planned]
        while True:
            missing = sum(1 for key in keys_ if not results.finished(key))
            if not missing:
                return
            if time.monotonic() > deadline:
                self.violations.append(
                    f"settle: {missing} changes have no terminal event {self.options.settle_timeout_s:g}s after the"
                    " last enqueue"
                )
                return
            await asyncio.sleep(1.0)
            if int(time.monotonic() - started) % 10 == 0:
                print(f"  {time.monotonic() - started:4.0f}s settling: {missing} changes to go", flush=True)

    async def _tail(self, results: ResultsTail, client: aioredis.Redis, done: asyncio.Event) -> None:
        while not done.is_set():
            if not await results.poll(client):
                await asyncio.sleep(0.2)

    async def _kill_workers(self, client: aioredis.Redis, done: asyncio.Event) -> None:
        """SIGKILL a random worker every few seconds, start a new one at once, and time the takeover."""
        probes: list[asyncio.Task[None]] = []
        low, high = self.options.kill_every
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.rng.uniform(low, high))
            if done.is_set():
                break
            victim = self.rng.choice(self.workers)
            pid = victim.pid
            killed_at = time.monotonic()
            victim.kill()
            self.figures.kills += 1
            victim.start()
            try:
                jobs, due = await orphans_of(client, self.settings, pid)
            except REDIS_DOWN:
                continue  # Redis is restarting: this kill's takeover is not measured
            takeover = Takeover(pid, killed_at, len(jobs), due_backlog=due)
            self.takeovers.append(takeover)
            probes.append(asyncio.create_task(probe_takeover(client, self.settings, takeover, jobs)))
        await asyncio.gather(*probes)

    async def _watch_workers(self, done: asyncio.Event) -> None:
        """A worker that exits by itself (not killed by us) did not ride through: note it, start it again."""
        while not done.is_set():
            await asyncio.sleep(0.5)
            for worker in self.workers:
                if worker.popen is not None and worker.popen.poll() is not None:
                    self.figures.worker_self_exits += 1
                    self.violations.append(
                        f"{worker.name} exited by itself with status {worker.popen.returncode}: {worker.log_tail(5)}"
                    )
                    worker.start()

    async def _restart_redis(self, started: float) -> None:
        """Restart Redis at even intervals of the enqueue phase: a crash, then a graceful shutdown."""
        expected_s = self.options.changes / self.options.enqueue_rate
        for index in range(self.options.redis_restarts):
            at = started + expected_s * (index + 1) / (self.options.redis_restarts + 1)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            crash = index % 2 == 0
            began = time.monotonic()
            try:
                how = await asyncio.to_thread(self.redis.restart, crash=crash, down_s=self.options.redis_down_s)
            except (RuntimeError, ProcessFailed, redis.exceptions.RedisError, OSError) as error:
                # The chaos itself failed: the run cannot vouch for what it did not do.
                self.violations.append(f"redis restart {index + 1} failed: {type(error).__name__}: {error}")
                return
            self.restart_windows.append((began, time.monotonic()))
            self.figures.redis_restarts.append(
                f"{how} at {began - started:.0f}s, back after {time.monotonic() - began:.1f}s"
            )
            print(f"  redis restarted ({self.figures.redis_restarts[-1]})", flush=True)

    async def _refuse_writes(self, started: float, done: asyncio.Event) -> None:
        """Now and then Redis refuses every write (``maxmemory 1``: OOM) for longer than a lease, between
        the restarts: heartbeats, claims, finishes and enqueues fail; nothing may be lost or doubled."""
        expected_s = self.options.changes / self.options.enqueue_rate
        for index in range(self.options.refusals):
            # Halfway between two restarts (or before the first), so that the two rarely overlap.
            at = started + expected_s * (index + 0.5) / (self.options.redis_restarts + 1)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if done.is_set():
                return
            client = self.redis.client()
            began = time.monotonic()
            try:
                for attempt in range(3):
                    try:
                        await client.config_set("maxmemory", 1)
                        break
                    except (RedisUnavailable, redis.exceptions.RedisError, OSError):
                        if attempt == 2:
                            raise
                        await asyncio.sleep(1.0)
                await asyncio.sleep(self.options.refusal_s)
                await client.config_set("maxmemory", 0)
            except (RedisUnavailable, redis.exceptions.RedisError, OSError) as error:
                # A restart in between: the restarted (or promoted) server refuses nothing.
                print(f"  write refusal cut short: {type(error).__name__}", flush=True)
                continue
            finally:
                await client.aclose()
            self.figures.write_refusals.append(f"at {began - started:.0f}s for {self.options.refusal_s:g}s")
            print(f"  redis refused every write ({self.figures.write_refusals[-1]})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="leadstage-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        soak = Soak(options, log_dir)
    except ProcessFailed as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    status = 1
    print(f"soak: {options.changes} changes, {options.workers} workers, seed {options.seed}; logs in {log_dir}")
    try:
        with sigterm_as_interrupt():
            status = asyncio.run(soak.run())
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every child process", file=sys.stderr)
        status = 130
    except ProcessFailed as exc:
        soak.violations.append(f"the run could not go on: {exc}")
        status = 1
    finally:
        soak.children.close()
    soak.figures.violations = soak.violations
    (log_dir / "figures.json").write_bytes(orjson.dumps(asdict(soak.figures), option=orjson.OPT_INDENT_2))
    print_figures(soak.figures, log_dir, interrupted=status == 130)
    if status == 0 and not options.keep_logs and options.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    return status
