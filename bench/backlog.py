"""The product's phases that have no bare-arq counterpart (arq has no per-account rate limit):

=============  ===============================================================================
backlog        N changes of one account ("busy", LEADSTAGE's rate limit 20/s, batch mode off) enqueued first,
               then one worker; over its first 10 s, a trickle of 10 changes of a second account
               ("quiet", also 20/s), one a second. The busy account's rate in those 10 s (target:
               at least 95 % of its limit), the quiet one's p99 from enqueue to terminal event
               (target: under 200 ms), and Redis commands and worker CPU per change in the
               window. Run at several sizes (``--backlog-changes 3000,30000,300000``): the cost
               per change must not grow with the backlog.
idle           one worker with nothing to do for 20 s: its CPU (share of a core) and the Redis
               commands it sends per second (targets: under 1 % and under 2/s)
=============  ===============================================================================
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench import workload
from bench.infra import BenchError
from bench.measure import CommandWindow, CpuMeter, percentile, wait_until
from bench.phases import Rig
from bench.product import ProductSide
from worker.core.change import parse_change, parse_envelope
from worker.core.ledger import Ledger
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Settings
from worker.core.states import TERMINAL

BUSY, QUIET = "busy", "quiet"
#: Each account's rate limit in the backlog phase (requests per second).
ACCOUNT_RATE = 20.0
#: The window the backlog phase measures, from the worker's first terminal event (seconds).
WINDOW_S = 10.0
#: The quiet account's changes, one per second from the start of the window.
TRICKLE = 10
#: How long the idle phase watches an idle worker (seconds).
IDLE_S = 20.0
#: The targets (issue 13): the busy account's share of its limit, the quiet one's p99, idle costs.
TARGETS = {"busy_share": 0.95, "quiet_p99_ms": 200.0, "idle_cpu_percent": 1.0, "idle_commands_per_s": 2.0}


def _accounts_side(rig: Rig, settings: Settings) -> ProductSide:
    """The product worker with the two accounts of the backlog phase (LEADSTAGE_ACCOUNTS_FILE)."""
    path = rig.group.log_dir / "backlog-accounts.json"
    account = {"base_url": rig.fake_url, "api_key": DEMO_API_KEY, "api_secret": DEMO_API_SECRET}
    path.write_bytes(orjson.dumps({name: {**account, "rate_limit": ACCOUNT_RATE} for name in (BUSY, QUIET)}))
    # One request per change: the phase measures the schedule against the accounts' rate limits
    # (batch mode would send 200 of the busy account's changes in one request; the real-ivvy
    # phase measures that).
    env = {"LEADSTAGE_ACCOUNTS_FILE": str(path), "LEADSTAGE_BATCH": "off"}
    return ProductSide(settings, name="product-backlog", worker_env=env)


async def run_backlog(rig: Rig, settings: Settings, *, changes: int) -> dict[str, Any]:
    """One size of the backlog phase (see the module docstring)."""
    await rig.reset()
    side = _accounts_side(rig, settings)
    client = aioredis.Redis.from_url(settings.redis_url)
    ledger = Ledger(client, settings)
    tag = f"backlog{changes}"
    try:
        items = [
            (parse_change(change), parse_envelope(idempotency_key=key, account=BUSY))
            for key, change in workload.changes(tag, changes)
        ]
        await ledger.enqueue_many(items)
        window = CommandWindow(rig.probe)
        await window.open()
        worker = rig.start_worker(side, tag)
        try:

            async def first_done() -> bool:
                if not worker.alive():
                    raise BenchError(f"the backlog worker exited:\n{worker.log_tail()}")
                return await rig.probe.xlen(settings.results_stream) > 0

            await wait_until(first_done, within=rig.timeout(60), interval=0.005, what="a first backlog completion")
            cpu = CpuMeter({"worker": worker.pid, **rig.cpu_pids})
            cpu.start()
            started = time.monotonic()
            enqueued: dict[str, float] = {}
            for i, (key, change) in enumerate(workload.changes(f"{tag}-quiet", TRICKLE)):
                await asyncio.sleep(max(0.0, started + i * WINDOW_S / TRICKLE - time.monotonic()))
                enqueued[key] = time.time()
                await ledger.enqueue_many([(parse_change(change), parse_envelope(idempotency_key=key, account=QUIET))])
            await asyncio.sleep(max(0.0, started + WINDOW_S - time.monotonic()))
            used = cpu.stop()
            delta = await window.close()
            events = await _terminal_events(client, settings.results_stream)

            async def quiet_done() -> bool:
                return set(enqueued) <= (await _terminal_events(client, settings.results_stream)).keys()

            await wait_until(quiet_done, within=rig.timeout(10), interval=0.05, what="the quiet account's changes")
            events = await _terminal_events(client, settings.results_stream)
        finally:
            rig.stop_worker(worker)
        rig.check_exit(worker)
    finally:
        await client.aclose()
    first = min(at for account, at in events.values() if account == BUSY)
    busy = sum(1 for account, at in events.values() if account == BUSY and at < first + WINDOW_S)
    quiet_ms = [(events[key][1] - at) * 1000 for key, at in enqueued.items()]
    done_in_window = busy + sum(1 for key in enqueued if events[key][1] < first + WINDOW_S)
    return {
        "changes": changes,
        "busy_per_s": round(busy / WINDOW_S, 2),
        "busy_share": round(busy / WINDOW_S / ACCOUNT_RATE, 3),
        "quiet_p50_ms": round(percentile(quiet_ms, 0.5), 1),
        "quiet_p99_ms": round(percentile(quiet_ms, 0.99), 1),
        "commands_per_change": round(delta.calls / done_in_window, 2),
        "commands": delta.per_change(done_in_window),
        "worker_cpu_ms_per_change": round(used["worker"] * 1000 / done_in_window, 3),
        "redis_cpu_ms_per_change": round(used.get("redis-server", 0.0) * 1000 / done_in_window, 3),
    }


async def _terminal_events(client: aioredis.Redis, stream: str) -> dict[str, tuple[str, float]]:
    """idempotency key -> (account, when its terminal event was added: its entry id, epoch s)."""
    found: dict[str, tuple[str, float]] = {}
    for entry_id, fields in await client.xrange(stream):
        if fields[b"event"].decode() in TERMINAL:
            at = int(entry_id.split(b"-")[0]) / 1000
            found[fields[b"idempotency_key"].decode()] = (fields[b"account"].decode(), at)
    return found


async def run_idle(rig: Rig, settings: Settings) -> dict[str, Any]:
    """One worker with nothing to do for ``IDLE_S``: CPU share of a core and Redis commands per second."""
    await rig.reset()
    side = ProductSide(settings, name="product-idle")
    worker = rig.start_worker(side, "idle")
    try:
        await rig.wait_ready(side, worker)
        await asyncio.sleep(1.0)  # its start-up (migration check, resync) is not idle cost
        window = CommandWindow(rig.probe)
        await window.open()
        cpu = CpuMeter({"worker": worker.pid})
        cpu.start()
        await asyncio.sleep(IDLE_S)
        used = cpu.stop()
        delta = await window.close()
    finally:
        rig.stop_worker(worker)
    rig.check_exit(worker)
    return {
        "seconds": IDLE_S,
        "cpu_percent": round(used["worker"] / IDLE_S * 100, 3),
        "commands_per_s": round(delta.calls / IDLE_S, 2),
        "commands": {name: round(calls * 1.0 / IDLE_S, 3) for name, calls in delta.per_change(1).items()},
    }


def table(backlog: Sequence[Mapping[str, Any]], idle: Mapping[str, Any] | None) -> str:
    """The backlog phase's figures per size, and the idle phase's, with their targets."""
    lines: list[str] = []
    if backlog:
        header = (
            f"{'backlog (busy 20/s)':<20} {'busy/s':>7} {'share':>6} {'quiet p99 ms':>13} "
            f"{'commands/change':>16} {'worker CPU ms/change':>21}"
        )
        lines += [header, "-" * len(header)]
        for run in backlog:
            lines.append(
                f"{run['changes']:<20,} {run['busy_per_s']:>7} {run['busy_share']:>6.0%} {run['quiet_p99_ms']:>13} "
                f"{run['commands_per_change']:>16} {run['worker_cpu_ms_per_change']:>21}"
            )
        lines.append(
            f"targets: share >= {TARGETS['busy_share']:.0%}, quiet p99 < {TARGETS['quiet_p99_ms']:g} ms, "
            "cost per change flat across sizes"
        )
    if idle:
        if lines:
            lines.append("")
        lines.append(
            f"idle worker over {idle['seconds']:g} s: {idle['cpu_percent']}% of a core, "
            f"{idle['commands_per_s']} Redis commands/s (targets < {TARGETS['idle_cpu_percent']:g}%, "
            f"< {TARGETS['idle_commands_per_s']:g}/s)"
        )
    return "\n".join(lines)
