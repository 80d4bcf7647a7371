"""The phases, written once and run for each side (``bench.side.Side``).

=============  ===============================================================================
throughput     N changes enqueued first (no worker running), then one worker process started;
               changes per second from the first completion to the last
latency        one worker running and warmed up; changes enqueued one at a time at a steady
               rate; enqueue -> terminal result, p50 / p99
bulk           N changes enqueued at once with no worker: enqueue rate and Redis memory per
               queued change
cli            N changes through ``leadstage enqueue --file``, start-up included, against a loop
               of arq's enqueue_job; and the start-up of ``leadstage --help`` and of one enqueue
=============  ===============================================================================

Every phase starts from an empty database and a reset fake iVvy, counts the Redis commands of
the whole phase (enqueue included) and the CPU time of each process involved.
"""

from __future__ import annotations

import asyncio
import compileall
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from arq.constants import health_check_key_suffix

from bench import workload
from bench.infra import REPO_ROOT, BenchError, start_bench_process
from bench.measure import (
    CommandDelta,
    CommandWindow,
    Completion,
    CpuMeter,
    Probe,
    latency_ms,
    throughput,
    wait_until,
)
from bench.profile import PySpy
from bench.side import Side
from worker.core import keys
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.processes import Child, Children

#: Changes enqueued and finished before a latency phase starts measuring: the first job of a
#: fresh worker opens its HTTP connection and loads scripts, which is not steady-state latency.
WARMUP_CHANGES = 10


@dataclass
class Rig:
    """What every phase needs: the probe, the process group, the fake's admin URL, a deadline."""

    probe: Probe
    group: Children
    worker_env: Mapping[str, str]
    fake_url: str
    #: Processes whose CPU time every phase reports, besides the worker (the fake, Redis).
    cpu_pids: Mapping[str, int]
    #: time.monotonic() by which the whole run must be over.
    deadline: float
    http: aiohttp.ClientSession = field(init=False)

    async def __aenter__(self) -> Rig:
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    def timeout(self, wanted: float) -> float:
        """``wanted`` seconds, or what is left of the run's time budget if that is less."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BenchError("the run's time budget is spent (raise --budget if this machine is slow)")
        return min(wanted, left)

    async def reset(self) -> None:
        """An empty database and a fake iVvy with its built-in stages only."""
        await self.probe.flushdb()
        async with self.http.post(f"{self.fake_url}/_admin/reset", json={"faults": True}) as response:
            if response.status != 200:
                raise BenchError(f"the fake iVvy's reset answered {response.status}")

    def start_worker(self, side: Side, run_name: str) -> Child:
        return start_bench_process(
            self.group, f"{run_name}-worker", side.worker_args(), {**self.worker_env, **side.worker_env}
        )

    async def wait_ready(self, side: Side, worker: Child) -> None:
        """Until the worker has run its first poll (arq writes its health-check key there)."""

        async def ready() -> bool:
            if not worker.alive():
                raise BenchError(f"the {side.name} worker exited at start:\n{worker.log_tail()}")
            return await self.probe.exists(side.queue_name + health_check_key_suffix)

        await wait_until(ready, within=self.timeout(30), interval=0.01, what=f"the {side.name} worker to start")

    def stop_worker(self, worker: Child) -> None:
        """Stop a worker (from a ``finally``: never raises; ``check_exit`` judges how it ended)."""
        self.group.stop(worker, grace=10.0)

    @staticmethod
    def check_exit(worker: Child) -> None:
        """A worker that did not exit cleanly on SIGTERM casts doubt on the phase: fail it."""
        status = worker.returncode
        if status not in (0, -15):
            raise BenchError(f"{worker.name} exited with status {status}:\n{worker.log_tail()}")


def _commands(delta: CommandDelta, changes: int) -> dict[str, Any]:
    return {
        "total_per_change": round(delta.calls / changes, 2),
        "round_trips_per_change": round(delta.round_trips / changes, 2),
        "per_change": delta.per_change(changes),
        "usec_per_change": delta.usec_per_change(changes),
    }


def _cpu(used: Mapping[str, float], changes: int) -> dict[str, Any]:
    return {
        "seconds": dict(used),
        "ms_per_change": {name: round(seconds * 1000 / changes, 3) for name, seconds in used.items()},
    }


async def run_throughput(
    rig: Rig, side: Side, *, changes: int, tag: str, profile_to: Path | None = None
) -> dict[str, Any]:
    """Pre-enqueue ``changes``, start one worker, time first to last completion."""
    await rig.reset()
    items = workload.changes(tag, changes)
    window = CommandWindow(rig.probe)
    await window.open()
    handles = await side.enqueue_bulk(items)
    worker = rig.start_worker(side, f"{tag}-{side.name}")
    profiler: PySpy | None = None
    try:
        # CPU (and the profile) count from the first completion on: the interpreter's start-up and
        # imports are not per-change costs. The first poll of a busy worker only ends once its
        # slots are full, so arq's health-check key would mark the start too late.
        async def first_done() -> bool:
            if not worker.alive():
                raise BenchError(f"the {side.name} worker exited:\n{worker.log_tail()}")
            return await side.finished_count(rig.probe, changes) > 0

        await wait_until(first_done, within=rig.timeout(60), interval=0.005, what=f"a first {side.name} completion")
        cpu = CpuMeter({"worker": worker.pid, **rig.cpu_pids})
        cpu.start()
        if profile_to is not None:
            profiler = PySpy.attach(worker.pid, profile_to)
        await wait_until(
            lambda: side.settled(rig.probe, changes),
            within=rig.timeout(max(120.0, changes / 20)),
            interval=0.05,
            what=f"{changes} {side.name} changes to finish",
        )
        delta = await window.close()
        used = cpu.stop()
    finally:
        if profiler is not None:
            profiler.stop()
        rig.stop_worker(worker)
    rig.check_exit(worker)
    finished = await side.finish_times(handles)
    rate, span = throughput(finished.values())
    return {
        "changes": changes,
        "changes_per_s": round(rate, 1),
        "first_to_last_s": round(span, 3),
        "commands": _commands(delta, changes),
        "cpu": _cpu(used, changes),
    }


async def run_latency(rig: Rig, side: Side, *, changes: int, rate: float, tag: str) -> dict[str, Any]:
    """Enqueue one change every 1/rate s into a running, warmed-up worker; enqueue -> terminal latency."""
    await rig.reset()
    worker = rig.start_worker(side, f"{tag}-{side.name}")
    try:
        await rig.wait_ready(side, worker)
        for key, change in workload.changes(f"{tag}-warmup", WARMUP_CHANGES):
            await side.enqueue_one(key, change)
        await wait_until(
            lambda: side.settled(rig.probe, WARMUP_CHANGES), within=rig.timeout(30), interval=0.01, what="warm-up"
        )
        window = CommandWindow(rig.probe)
        await window.open()
        cpu = CpuMeter({"worker": worker.pid, **rig.cpu_pids})
        cpu.start()
        enqueued: dict[str, float] = {}
        started = time.monotonic()
        for i, (key, change) in enumerate(workload.changes(tag, changes)):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            at = time.time()
            enqueued[await side.enqueue_one(key, change)] = at
        behind_s = time.monotonic() - started - (changes - 1) / rate
        await wait_until(
            lambda: side.settled(rig.probe, WARMUP_CHANGES + changes),
            within=rig.timeout(60),
            interval=0.02,
            what=f"{changes} {side.name} changes to finish",
        )
        delta = await window.close()
        used = cpu.stop()
    finally:
        rig.stop_worker(worker)
    rig.check_exit(worker)
    finished = await side.finish_times(list(enqueued))
    completions = {h: Completion(enqueued[h], finished[h]) for h in enqueued}
    return {
        "changes": changes,
        "rate_per_s": rate,
        # How late the enqueue loop ended against its schedule: large values void the figures.
        "schedule_slip_ms": round(behind_s * 1000, 1),
        **latency_ms(completions),
        "commands": _commands(delta, changes),
        "cpu": _cpu(used, changes),
    }


async def run_bulk(rig: Rig, side: Side, *, changes: int, tag: str) -> dict[str, Any]:
    """Enqueue ``changes`` at once with no worker running: enqueue rate and memory per queued change."""
    await rig.reset()
    items = workload.changes(tag, changes)
    memory_before = await rig.probe.used_memory()
    window = CommandWindow(rig.probe)
    await window.open()
    cpu = CpuMeter(dict(rig.cpu_pids))
    cpu.start()
    producer_cpu = time.process_time()
    started = time.perf_counter()
    handles = await side.enqueue_bulk(items)
    elapsed = time.perf_counter() - started
    # The producer is this process: its CPU is the client side of the enqueue, Redis's the server side.
    used = {"producer": time.process_time() - producer_cpu, **cpu.stop()}
    delta = await window.close()
    memory_after = await rig.probe.used_memory()
    if len(handles) != changes:
        raise BenchError(f"{side.name} enqueued {len(handles)} of {changes} changes")
    return {
        "changes": changes,
        "seconds": round(elapsed, 3),
        "changes_per_s": round(changes / elapsed, 1),
        "used_memory_delta_bytes": memory_after - memory_before,
        "bytes_per_queued_change": round((memory_after - memory_before) / changes, 1),
        "commands": _commands(delta, changes),
        "cpu": _cpu(used, changes),
    }


#: Runs of each start-up command per round of the cli phase (interleaved; the median is reported).
STARTUP_RUNS = 20
#: The floors a start-up is measured against in the same runs: the interpreter alone, and redis-py's
#: import (which every command that talks to Redis pays, whatever the product does).
STARTUP_BASELINES = {"python_s": ["-c", "pass"], "import_redis_s": ["-c", "import redis"]}


async def run_cli(rig: Rig, side: Side, *, changes: int, tag: str) -> dict[str, Any]:
    """Bulk through the command, start-up included: ``leadstage enqueue --file`` of ``changes``
    lines as a user runs it (the product), against a loop of arq's ``enqueue_job`` (the baseline,
    which has no command). The product also times ``leadstage --help`` and a single enqueue, each
    beside ``python -c pass`` and ``python -c "import redis"`` in the same runs.

    The project's modules are compiled to bytecode first, as ``pip install`` does for an installed
    ``leadstage``: a checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every
    module at every start (about twice the start-up of a single enqueue on the 2-core VM)."""
    await rig.reset()
    items = workload.changes(tag, changes)
    if side.name == "baseline":
        started = time.perf_counter()
        await side.enqueue_bulk(items)
        elapsed = time.perf_counter() - started
        return {"changes": changes, "seconds": round(elapsed, 3), "changes_per_s": round(changes / elapsed, 1)}
    for package in ("worker", "producers"):
        compileall.compile_dir(REPO_ROOT / package, quiet=1)
    env = {**rig.worker_env, "LEADSTAGE_METRICS_PORT": "0"}
    path = rig.group.log_dir / f"{tag}.jsonl"
    with path.open("wb") as out:
        for key, change in items:
            out.write(orjson.dumps({**change, "idempotency_key": key}) + b"\n")
    elapsed = await _timed_command(["-m", "worker.cli", "enqueue", "--file", str(path)], env)
    queued = await rig.probe.zcard(keys.queue_key(side.queue_name, DEFAULT_ACCOUNT))  # the file's one account
    if queued != changes:
        raise BenchError(f"leadstage enqueue --file enqueued {queued} of {changes}")

    def startup_commands(run: int) -> dict[str, list[str]]:
        single = ["enqueue", "--name", f"Single {tag} {run}", "--apply-to", "lead"]  # a new change each run
        return {
            **STARTUP_BASELINES,
            "help_s": ["-m", "worker.cli", "--help"],
            "single_enqueue_s": ["-m", "worker.cli", *single],
        }

    times: dict[str, list[float]] = {}
    for run in range(STARTUP_RUNS):
        for name, args in startup_commands(run).items():
            times.setdefault(name, []).append(await _timed_command(args, env))
    return {
        "changes": changes,
        "seconds": round(elapsed, 3),
        "changes_per_s": round(changes / elapsed, 1),
        **{name: round(statistics.median(runs), 3) for name, runs in times.items()},
    }


async def _timed_command(args: list[str], env: Mapping[str, str]) -> float:
    """Wall seconds of one ``python ARGS`` run (``-m worker.cli ...``: leadstage), from exec to exit
    (output discarded)."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=dict(env), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise BenchError(f"python {' '.join(args[:4])} failed: {stderr.decode().strip()[-300:]}")
    return elapsed
