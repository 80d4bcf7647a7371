"""The soak's verdict once every change has ended: the checks, the dead letters replayed, the figures."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import time
from collections import Counter
from typing import TYPE_CHECKING

import orjson
import redis.asyncio as aioredis

from soak import checks
from soak.observe import FakeAdmin, ResultsTail
from worker.core import keys
from worker.core.processes import python_module
from worker.devtools.fake_ivvy import Faults

if TYPE_CHECKING:
    from soak.run import Soak

#: The guarantee of docs/contract.md: a killed worker's change is taken up again within this.
TAKEOVER_LIMIT_S = 15.0


async def verify(soak: Soak, client: aioredis.Redis, admin: FakeAdmin, results: ResultsTail) -> None:
    await _drain(soak, results, client)
    planned = soak.workload.planned
    stages = await admin.stages()
    terminal = results.terminal
    if soak.options.sentinel:
        # A failover can lose a terminal state that a live reader had already seen on the old
        # primary; the change then ends again and that reader sees two events (at least once,
        # as docs/contract.md says). The stream the product keeps must still hold exactly one.
        kept = ResultsTail(soak.settings, lambda key, stage_id: None)
        while await kept.poll(client):
            pass
        terminal = kept.terminal
        soak.figures.seen_twice_by_live_reader = sum(1 for events in results.terminal.values() if len(events) > 1)
    soak.violations += checks.nothing_lost(planned, terminal)
    soak.violations += checks.exactly_one_terminal(planned, terminal)
    soak.violations += checks.adds_once(soak.workload, terminal, stages)
    soak.violations += checks.last_value_wins(soak.workload, stages)
    async with client.pipeline(transaction=False) as pipe:
        for p in planned:
            pipe.hget(keys.ledger_key(keys.job_id("default", p.key)), "state")
        states = await pipe.execute()
    queue_depth = await client.zcard(keys.queue_key(soak.settings.queue_name, "default"))
    soak.violations += checks.ledgers_terminal(
        {p.key: (s or b"missing").decode() for p, s in zip(planned, states, strict=True)}, queue_depth
    )
    for takeover in soak.takeovers:
        late = [d for d in takeover.due_after if d > TAKEOVER_LIMIT_S]
        if takeover.stuck:
            soak.violations.append(f"takeover: {len(takeover.stuck)} changes of killed pid {takeover.pid} were "
                                   f"never taken up: {takeover.stuck[:5]}")  # fmt: skip
        if late and not _overlaps_restart(soak, takeover.killed_at, takeover.killed_at + max(late)):
            soak.violations.append(f"takeover: changes of killed pid {takeover.pid} due again only after "
                                   f"{max(late):.1f}s (> {TAKEOVER_LIMIT_S:g}s)")  # fmt: skip


def _overlaps_restart(soak: Soak, begin: float, end: float) -> bool:
    return any(b < end and e > begin for b, e in soak.restart_windows)


async def _drain(soak: Soak, results: ResultsTail, client: aioredis.Redis) -> None:
    while await results.poll(client):
        pass


async def replay_dead_letters(soak: Soak, client: aioredis.Redis, admin: FakeAdmin, results: ResultsTail) -> None:
    """Dead letters (if any) must be replayable: faults off, ``leadstage dlq replay --all``, all succeed."""
    entries = await client.xrange(soak.settings.dlq_stream)
    soak.figures.dead_letters = len(entries)
    if not entries:
        return
    for _, raw_fields in entries[:10]:
        letter = {k.decode(): v.decode() for k, v in raw_fields.items()}
        soak.figures.dead_letter_details.append(
            f"{letter['idempotency_key']} {letter['operation']} attempt {letter['attempt']}: "
            f"{letter['error_code']} {letter['error_message']}"
        )
    await admin.set_faults(Faults().as_dict())
    by_key = {p.key: p for p in soak.workload.planned}
    replay = await asyncio.to_thread(
        subprocess.run,
        python_module("worker.cli", "dlq", "replay", "--all"),
        env=soak.env(),
        capture_output=True,
        check=False,
    )
    outcomes = [orjson.loads(line) for line in replay.stdout.splitlines() if line.strip()]
    if replay.returncode != 0:
        soak.violations.append(f"dlq replay exited {replay.returncode}: {replay.stderr.decode()[-500:]}")
    replayed = [(o["idempotency_key"], str(o["generation"])) for o in outcomes if o["status"] == "queued"]
    soak.figures.replayed = len(replayed)
    for key, _ in replayed:
        soak.workload.replayed(by_key[key])
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
        soak.violations.append(f"replay: {len(failed)} replayed dead letters did not succeed: {failed[:5]}")
    stages = await admin.stages()
    soak.violations += checks.last_value_wins(soak.workload, stages)
    soak.violations += checks.adds_once(soak.workload, results.terminal, stages)


async def collect_figures(soak: Soak, admin: FakeAdmin, results: ResultsTail) -> None:
    f = soak.figures
    done = sum(results.outcomes.values())
    f.throughput_per_s = round(done / f.duration_s, 1) if f.duration_s else 0.0
    f.outcomes = dict(results.outcomes)
    f.retries_by_error_code = dict(results.retries.most_common())
    f.failed_by_error_code = dict(results.failures.most_common())
    due = [d for t in soak.takeovers for d in t.due_after]
    taken = [d for t in soak.takeovers for d in t.taken_after]
    f.orphans_measured = len(taken)
    if due:
        f.orphan_due_again_max_s = round(max(due), 2)
    if taken:
        f.takeover_max_s = round(max(taken), 2)
        f.takeover_median_s = round(statistics.median(taken), 2)
        slowest = max(soak.takeovers, key=lambda t: max(t.taken_after, default=0.0))
        f.slowest_takeover = (
            f"{max(slowest.taken_after):.1f}s after a kill with {slowest.due_backlog} changes due in the queue"
        )
    requests = await admin.requests()
    f.ivvy_requests = len(requests)
    f.ivvy_requests_by_fault = dict(Counter(str(r.get("fault")) for r in requests).most_common())
    f.ivvy_requests_by_action = dict(Counter(str(r.get("action")) for r in requests).most_common())
    f.worker_log_counts = _worker_log_counts(soak)


def _worker_log_counts(soak: Soak) -> dict[str, int]:
    """Events of interest in the workers' logs (crashed jobs are bugs: each one is a violation)."""
    counts: Counter[str] = Counter()
    wanted = (
        "job.crashed", "batch.crashed", "job.interrupted", "job.reconciled", "worker.redis_unavailable", "Traceback"
    )  # fmt: skip
    for worker in soak.workers:
        with contextlib.suppress(OSError), worker.log_path.open(errors="replace") as log:
            for line in log:
                for word in wanted:
                    if word in line:
                        counts[word] += 1
    for event, what in (("job.crashed", "jobs"), ("batch.crashed", "batches")):  # both: Runtime.guarded
        if counts[event]:
            soak.violations.append(f"workers: {counts[event]} {what} crashed (see worker-*.log, {event})")
    return dict(counts)
