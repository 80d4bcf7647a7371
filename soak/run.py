"""The soak: ``python -m soak [--changes 20000] [--workers 3] [--seed 1] ...``.

What it does (RELIABILITY.md has the figures of the last run):

1. Starts its own ``redis-server`` (append-only file on, ``appendfsync always``, in a temporary
   directory), the fake iVvy (``leadstage fake-ivvy``) with every fault on (latency, 5xx, 429 with
   Retry-After, hangs past the client timeout, commit-then-drop, 24322, a 504 after the commit,
   commits after the client gave up), and ``--workers`` worker processes (``leadstage worker``)
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

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from producers.library import ChangeItem, LeadStageProducer, Receipt
from soak import checks
from soak.observe import REDIS_DOWN, FakeAdmin, ResultsTail, Takeover, orphans_of, probe_takeover
from soak.topology import ReplicatedRedis, SingleRedis
from soak.workload import Planned, Workload
from worker.core import keys
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
from worker.devtools.fake_ivvy import FAULT_FIELDS, Faults

#: Every fault on, at rates that leave the run able to finish in minutes on two cores: about one
#: request in eight misbehaves. 429s pause the whole account, so they are kept rarer.
DEFAULT_FAULTS = Faults(
    latency_ms=3,
    error_rate=0.04,
    rate_limit_rate=0.003,
    retry_after_s=1,
    hang_rate=0.01,
    hang_s=3,
    drop_rate=0.02,
    error_24322_rate=0.03,
    gateway_5xx_rate=0.02,
    late_commit_rate=0.01,
    late_commit_s=2.0,
)
#: The workers' clocks, by slot: one right, one ahead, one behind (LEADSTAGE_TEST_CLOCK_OFFSET).
CLOCK_OFFSETS_S = ("0", "3", "-3")
#: Share of batches the driver delivers twice (same keys, same changes), as an unsure producer does.
REDELIVERY_SHARE = 0.05
#: The guarantee of docs/contract.md: a killed worker's change is taken up again within this.
TAKEOVER_LIMIT_S = 15.0


@dataclass(frozen=True)
class Options:
    changes: int
    workers: int
    seed: int
    add_share: float
    seed_stages: int
    batch: int
    enqueue_rate: float
    kill_every: tuple[float, float]
    redis_restarts: int
    redis_down_s: float
    refusals: int
    refusal_s: float
    sentinel: bool
    settle_timeout_s: float
    faults: Faults
    max_attempts: int
    request_timeout_s: float
    lease_s: float
    concurrency: int
    log_dir: Path | None
    keep_logs: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m soak",
        description="Soak leadstage-sync under faults, worker kills and Redis restarts; exit 1 on any violation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--changes", type=int, default=20_000, help="changes to enqueue")
    parser.add_argument("--workers", type=int, default=3, help="worker processes")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workload, the kills and the faults")
    parser.add_argument("--add-share", type=float, default=0.2, help="share of the changes that are adds")
    parser.add_argument("--seed-stages", type=int, default=None, help="stages made before the run (default changes/40)")
    parser.add_argument("--batch", type=int, default=250, help="changes per enqueue_many call")
    parser.add_argument("--enqueue-rate", type=float, default=70.0, help="changes enqueued per second")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(2.0, 6.0), metavar=("MIN", "MAX"),
                        help="seconds between worker kills, uniformly drawn")  # fmt: skip
    parser.add_argument("--redis-restarts", type=int, default=2, help="Redis restarts during the enqueue phase")
    parser.add_argument("--redis-down-s", type=float, default=2.0, help="seconds Redis stays down per restart")
    parser.add_argument("--refusals", type=int, default=2, help="times Redis refuses every write (OOM) meanwhile")
    parser.add_argument("--sentinel", action="store_true",
                        help="a primary, two replicas and a Sentinel; each Redis restart is a failover "
                        "(LEADSTAGE_REDIS_MIN_REPLICAS=2)")  # fmt: skip
    parser.add_argument("--refusal-s", type=float, default=4.0, help="seconds each refusal lasts (past a lease)")
    parser.add_argument("--settle-timeout", type=float, default=420.0, help="seconds to wait after the last enqueue")
    parser.add_argument("--fault", action="append", default=[], metavar="NAME=VALUE",
                        help=f"override a fault setting ({', '.join(FAULT_FIELDS)}); 'none' turns all off")  # fmt: skip
    parser.add_argument("--max-attempts", type=int, default=50, help="LEADSTAGE_MAX_ATTEMPTS of the workers")
    parser.add_argument("--request-timeout", type=float, default=1.5, help="LEADSTAGE_REQUEST_TIMEOUT of the workers")
    parser.add_argument("--lease", type=float, default=3.0, help="LEADSTAGE_LEASE of the workers")
    parser.add_argument("--concurrency", type=int, default=50, help="LEADSTAGE_CONCURRENCY of each worker")
    parser.add_argument("--log-dir", type=Path, default=None, help="where logs go (default: a temporary directory)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the log directory after a clean run")
    args = parser.parse_args(argv)
    faults = DEFAULT_FAULTS
    for setting in args.fault:
        if setting == "none":
            faults = Faults()
            continue
        name, _, value = setting.partition("=")
        try:
            faults = faults.merged({name: int(value) if name == "retry_after_s" else float(value)})
        except ValueError as exc:
            parser.error(f"--fault {setting}: {exc}")
    if args.changes < 1 or args.workers < 1:
        parser.error("--changes and --workers must be at least 1")
    return Options(
        changes=args.changes,
        workers=args.workers,
        seed=args.seed,
        add_share=args.add_share,
        seed_stages=args.seed_stages if args.seed_stages is not None else max(20, args.changes // 40),
        batch=args.batch,
        enqueue_rate=args.enqueue_rate,
        kill_every=(args.kill_every[0], args.kill_every[1]),
        redis_restarts=args.redis_restarts,
        refusals=args.refusals,
        sentinel=args.sentinel,
        refusal_s=args.refusal_s,
        redis_down_s=args.redis_down_s,
        settle_timeout_s=args.settle_timeout,
        faults=faults,
        max_attempts=args.max_attempts,
        request_timeout_s=args.request_timeout,
        lease_s=args.lease,
        concurrency=args.concurrency,
        log_dir=args.log_dir,
        keep_logs=args.keep_logs,
    )


@dataclass
class Figures:
    """What the run prints at the end (and writes to figures.json)."""

    changes: int = 0
    adds: int = 0
    updates: int = 0
    seeded_stages: int = 0
    workers: int = 0
    duration_s: float = 0.0
    enqueue_s: float = 0.0
    throughput_per_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    worker_self_exits: int = 0
    redis_restarts: list[str] = field(default_factory=list)
    write_refusals: list[str] = field(default_factory=list)
    #: With --sentinel: keys a reader tailing the stream through the failovers saw end twice.
    seen_twice_by_live_reader: int = 0
    enqueue_retries: int = 0
    duplicates_on_retry: int = 0
    redelivered: int = 0
    retries_by_error_code: dict[str, int] = field(default_factory=dict)
    failed_by_error_code: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    dead_letter_details: list[str] = field(default_factory=list)
    replayed: int = 0
    orphans_measured: int = 0
    orphan_due_again_max_s: float | None = None
    takeover_max_s: float | None = None
    takeover_median_s: float | None = None
    slowest_takeover: str = ""
    ivvy_requests: int = 0
    ivvy_requests_by_fault: dict[str, int] = field(default_factory=dict)
    ivvy_requests_by_action: dict[str, int] = field(default_factory=dict)
    worker_log_counts: dict[str, int] = field(default_factory=dict)
    faults: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


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

    def _env(self) -> dict[str, str]:
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
            shutdown_grace_s=5.0,
            metrics_port=0,
            log_format="json",
        ).to_env()

    def _start_fake(self) -> None:
        port = free_port()
        self.fake_url = f"http://{LOOPBACK}:{port}"
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in self.options.faults.as_dict().items()]
        fake_args = ["fake-ivvy", "--port", str(port), "--seed", str(self.options.seed), *flags]
        fake = self.children.start("fake-ivvy", python_module("worker.cli", *fake_args), self._env())
        wait_for_port(port, 30, fake.popen)

    def _start_workers(self) -> None:
        env = self._env()
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
            await self._verify(client, admin, results)
            await self._replay_dead_letters(client, admin, results)
            await self._collect_figures(admin, results)
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

    # -- the verdict ----------------------------------------------------------------------------

    async def _verify(self, client: aioredis.Redis, admin: FakeAdmin, results: ResultsTail) -> None:
        await self._drain(results, client)
        planned = self.workload.planned
        stages = await admin.stages()
        terminal = results.terminal
        if self.options.sentinel:
            # A failover can lose a terminal state that a live reader had already seen on the old
            # primary; the change then ends again and that reader sees two events (at least once,
            # as docs/contract.md says). The stream the product keeps must still hold exactly one.
            kept = ResultsTail(self.settings, lambda key, stage_id: None)
            while await kept.poll(client):
                pass
            terminal = kept.terminal
            self.figures.seen_twice_by_live_reader = sum(1 for events in results.terminal.values() if len(events) > 1)
        self.violations += checks.nothing_lost(planned, terminal)
        self.violations += checks.exactly_one_terminal(planned, terminal)
        self.violations += checks.adds_once(self.workload, terminal, stages)
        self.violations += checks.last_value_wins(self.workload, stages)
        async with client.pipeline(transaction=False) as pipe:
            for p in planned:
                pipe.hget(keys.ledger_key(keys.job_id("default", p.key)), "state")
            states = await pipe.execute()
        queue_depth = await client.zcard(keys.queue_key(self.settings.queue_name, "default"))
        self.violations += checks.ledgers_terminal(
            {p.key: (s or b"missing").decode() for p, s in zip(planned, states, strict=True)}, queue_depth
        )
        for takeover in self.takeovers:
            late = [d for d in takeover.due_after if d > TAKEOVER_LIMIT_S]
            if takeover.stuck:
                self.violations.append(f"takeover: {len(takeover.stuck)} changes of killed pid {takeover.pid} were "
                                       f"never taken up: {takeover.stuck[:5]}")  # fmt: skip
            if late and not self._overlaps_restart(takeover.killed_at, takeover.killed_at + max(late)):
                self.violations.append(f"takeover: changes of killed pid {takeover.pid} due again only after "
                                       f"{max(late):.1f}s (> {TAKEOVER_LIMIT_S:g}s)")  # fmt: skip

    def _overlaps_restart(self, begin: float, end: float) -> bool:
        return any(b < end and e > begin for b, e in self.restart_windows)

    async def _drain(self, results: ResultsTail, client: aioredis.Redis) -> None:
        while await results.poll(client):
            pass

    async def _replay_dead_letters(self, client: aioredis.Redis, admin: FakeAdmin, results: ResultsTail) -> None:
        """Dead letters (if any) must be replayable: faults off, ``leadstage dlq replay --all``, all succeed."""
        entries = await client.xrange(self.settings.dlq_stream)
        self.figures.dead_letters = len(entries)
        if not entries:
            return
        for _, raw_fields in entries[:10]:
            letter = {k.decode(): v.decode() for k, v in raw_fields.items()}
            self.figures.dead_letter_details.append(
                f"{letter['idempotency_key']} {letter['operation']} attempt {letter['attempt']}: "
                f"{letter['error_code']} {letter['error_message']}"
            )
        await admin.set_faults(Faults().as_dict())
        by_key = {p.key: p for p in self.workload.planned}
        replay = await asyncio.to_thread(
            subprocess.run,
            python_module("worker.cli", "dlq", "replay", "--all"),
            env=self._env(),
            capture_output=True,
            check=False,
        )
        outcomes = [orjson.loads(line) for line in replay.stdout.splitlines() if line.strip()]
        if replay.returncode != 0:
            self.violations.append(f"dlq replay exited {replay.returncode}: {replay.stderr.decode()[-500:]}")
        replayed = [(o["idempotency_key"], str(o["generation"])) for o in outcomes if o["status"] == "queued"]
        self.figures.replayed = len(replayed)
        for key, _ in replayed:
            self.workload.replayed(by_key[key])
        deadline = time.monotonic() + 120
        while any((key, gen) not in results.terminal for key, gen in replayed) and time.monotonic() < deadline:
            await results.poll(client)
            await asyncio.sleep(0.2)
        failed = [
            f"{key}@{gen}:{[e['event'] + '/' + e.get('error_code', '') for e in results.terminal.get((key, gen), [])]}"
            for key, gen in replayed
            if [e["event"] for e in results.terminal.get((key, gen), [])] not in (["succeeded"], ["superseded"])
        ]
        if failed:
            self.violations.append(f"replay: {len(failed)} replayed dead letters did not succeed: {failed[:5]}")
        stages = await admin.stages()
        self.violations += checks.last_value_wins(self.workload, stages)
        self.violations += checks.adds_once(self.workload, results.terminal, stages)

    async def _collect_figures(self, admin: FakeAdmin, results: ResultsTail) -> None:
        f = self.figures
        done = sum(results.outcomes.values())
        f.throughput_per_s = round(done / f.duration_s, 1) if f.duration_s else 0.0
        f.outcomes = dict(results.outcomes)
        f.retries_by_error_code = dict(results.retries.most_common())
        f.failed_by_error_code = dict(results.failures.most_common())
        due = [d for t in self.takeovers for d in t.due_after]
        taken = [d for t in self.takeovers for d in t.taken_after]
        f.orphans_measured = len(taken)
        if due:
            f.orphan_due_again_max_s = round(max(due), 2)
        if taken:
            f.takeover_max_s = round(max(taken), 2)
            f.takeover_median_s = round(statistics.median(taken), 2)
            slowest = max(self.takeovers, key=lambda t: max(t.taken_after, default=0.0))
            f.slowest_takeover = (
                f"{max(slowest.taken_after):.1f}s after a kill with {slowest.due_backlog} changes due in the queue"
            )
        requests = await admin.requests()
        f.ivvy_requests = len(requests)
        f.ivvy_requests_by_fault = dict(Counter(str(r.get("fault")) for r in requests).most_common())
        f.ivvy_requests_by_action = dict(Counter(str(r.get("action")) for r in requests).most_common())
        f.worker_log_counts = self._worker_log_counts()

    def _worker_log_counts(self) -> dict[str, int]:
        """Events of interest in the workers' logs (crashed jobs are bugs: each one is a violation)."""
        counts: Counter[str] = Counter()
        wanted = ("job.crashed", "job.interrupted", "job.reconciled", "worker.redis_unavailable", "Traceback")
        for worker in self.workers:
            with contextlib.suppress(OSError), worker.log_path.open(errors="replace") as log:
                for line in log:
                    for word in wanted:
                        if word in line:
                            counts[word] += 1
        if counts["job.crashed"]:
            self.violations.append(f"workers: {counts['job.crashed']} jobs crashed (see worker-*.log, job.crashed)")
        return dict(counts)


def _print_figures(figures: Figures, log_dir: Path, *, interrupted: bool) -> None:
    print("\nsoak figures")
    for name, value in asdict(figures).items():
        if name == "violations":
            continue
        print(f"  {name:24} {value}")
    print(f"  {'logs':24} {log_dir}")
    if figures.violations:
        print(f"\n{len(figures.violations)} VIOLATION(S):")
        for violation in figures.violations:
            print(f"  - {violation}")
    elif interrupted:
        print("\ninterrupted: no verdict (the checks did not run)")
    else:
        print("\nno violations")


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
    _print_figures(soak.figures, log_dir, interrupted=status == 130)
    if status == 0 and not options.keep_logs and options.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    return status
