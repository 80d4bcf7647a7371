"""The "real iVvy" phase: what packing requests buys against iVvy's round trip and rate limit.

The fake iVvy answers after ``LATENCY_MS`` and refuses (429) requests of one key past
``SERVER_LIMIT`` per second; the product's worker keeps to ``SERVER_LIMIT`` requests/s itself
(LEADSTAGE_RATE_LIMIT). The workload: updates spread over a number of stages (each update sets
one of name, colour and applyTo, in turn) and adds, interleaved, enqueued before one worker
starts. It runs in up to three modes, in the same run (``--ivvy-modes``; the last two unless told):
each change alone (``LEADSTAGE_COALESCE_MAX=1``),
batch mode off (``LEADSTAGE_BATCH=off``, coalescing on) and batch mode on (``LEADSTAGE_BATCH=auto``:
updates of several stages, each coalesced, and adds as one iVvy batch), and prints for each the
wall time from the worker's start to the last terminal event, the requests iVvy received per
change (a batch's run and each of its polls are requests), the 429s it answered, and the ratios of
the wall times. Every key must end with exactly one terminal event, none failed.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from bench.infra import BenchError
from bench.measure import wait_until
from bench.phases import Rig
from bench.product import ProductSide
from bench.workload import Item
from worker.core import keys
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.states import TERMINAL

#: iVvy's round trip as a client far from it sees it, and its limit per key.
LATENCY_MS = 150
SERVER_LIMIT = 10
#: The two runs of the phase: name -> the worker's environment besides the rate limit.
MODES: dict[str, dict[str, str]] = {
    "alone": {"LEADSTAGE_COALESCE_MAX": "1", "LEADSTAGE_BATCH": "off"},
    "batch-off": {"LEADSTAGE_BATCH": "off"},
    "batch-auto": {"LEADSTAGE_BATCH": "auto"},
}
FIELDS = (
    ("name", lambda i: f"Renamed {i}"),
    ("colour", lambda i: f"#{i % 0xFFFFFF:06x}"),
    ("applyTo", lambda i: 1 + i % 2),
)


async def _seed_stages(rig: Rig, count: int) -> list[int]:
    ids = []
    for n in range(count):
        async with rig.http.post(f"{rig.fake_url}/_admin/stages", json={"name": f"Real {n}", "applyTo": 1}) as answer:
            if answer.status != 200:
                raise BenchError(f"the fake iVvy refused a seeded stage: {answer.status}")
            ids.append(int((await answer.json())["id"]))
    return ids


def _workload(tag: str, stage_ids: list[int], updates: int, adds: int) -> list[Item]:
    """Updates in rounds over the stages (a field each, in turn), an add after every few."""
    items: list[Item] = []
    every = max(1, updates // max(adds, 1))
    added = 0
    for i in range(updates):
        field, value = FIELDS[(i // len(stage_ids)) % len(FIELDS)]
        items.append((f"{tag}-u{i}", {"id": stage_ids[i % len(stage_ids)], field: value(i)}))
        if i % every == every - 1 and added < adds:
            items.append((f"{tag}-a{added}", {"name": f"Real add {tag} {added}", "applyTo": 2}))
            added += 1
    items += [(f"{tag}-a{n}", {"name": f"Real add {tag} {n}", "applyTo": 2}) for n in range(added, adds)]
    return items


async def _outcomes(rig: Rig, side: ProductSide, keys: set[str]) -> dict[str, Counter[str]]:
    """Every key's terminal event, counted by event and by how it was sent; one each, none failed."""
    events: Counter[str] = Counter()
    sent_as: Counter[str] = Counter()
    seen: set[str] = set()
    for _, fields in await rig.probe.client.xrange(side.settings.results_stream):
        key, event = fields[b"idempotency_key"].decode(), fields[b"event"].decode()
        if event not in TERMINAL or key not in keys:
            continue
        if key in seen:
            raise BenchError(f"change {key} has two terminal events")
        if event == "failed":
            raise BenchError(f"change {key} failed: {fields.get(b'error_message', b'').decode()}")
        seen.add(key)
        events[event] += 1
        sent_as[fields.get(b"sent_as", b"").decode() or "nothing"] += 1
    if seen != keys:
        raise BenchError(f"{len(keys - seen)} changes have no terminal event")
    return {"events": events, "sent_as": sent_as}


async def _run_mode(rig: Rig, side: ProductSide, *, tag: str, updates: int, stages: int, adds: int) -> dict[str, Any]:
    await rig.reset()
    async with rig.http.post(
        f"{rig.fake_url}/_admin/faults", json={"latency_ms": LATENCY_MS, "rate_limit_per_s": SERVER_LIMIT}
    ) as answer:
        if answer.status != 200:
            raise BenchError(f"the fake iVvy refused its faults: {answer.status}")
    items = _workload(tag, await _seed_stages(rig, stages), updates, adds)
    await side.enqueue_bulk(items)
    worker = rig.start_worker(side, f"real-{side.name}")
    started = time.monotonic()
    try:

        async def all_terminal() -> bool:
            # The account's count of changes not yet terminal (keys.PENDING) is gone once all are:
            # the results stream's length would also count the retries.
            return not await rig.probe.client.hexists(keys.PENDING, DEFAULT_ACCOUNT)

        await wait_until(
            all_terminal,
            within=rig.timeout(max(120.0, 3 * len(items) / SERVER_LIMIT)),
            interval=0.1,
            what=f"{len(items)} {side.name} changes to finish",
        )
        wall = time.monotonic() - started
    finally:
        rig.stop_worker(worker)
    rig.check_exit(worker)
    async with rig.http.get(f"{rig.fake_url}/_admin/requests") as answer:
        requests = (await answer.json())["requests"]
    api = [r for r in requests if r["namespace"] != "_admin"]
    outcomes = await _outcomes(rig, side, {key for key, _ in items})
    return {
        "changes": len(items),
        "wall_s": round(wall, 2),
        "changes_per_s": round(len(items) / wall, 1),
        "requests": len(api),
        "requests_per_change": round(len(api) / len(items), 3),
        "http_429": sum(1 for r in api if r["status"] == 429),
        "events": dict(outcomes["events"]),
        "sent_as": dict(outcomes["sent_as"]),
    }


async def run_real_ivvy(
    rig: Rig,
    product: ProductSide,
    *,
    updates: int,
    stages: int,
    adds: int,
    tag: str,
    modes: tuple[str, ...] = tuple(MODES),
) -> dict[str, Any]:
    """The modes on the same workload (``bench.run`` runs batch-off and batch-auto unless told:
    "alone" at the issue's 11,000 changes takes 18 minutes); the ratios of their wall times."""
    runs: dict[str, Any] = {}
    for mode, env in MODES.items():
        if mode not in modes:
            continue
        side = ProductSide(
            product.settings,
            name=f"{product.name}-{mode}",
            uvloop=product.uvloop,
            use_library=product.use_library,
            worker_env={**product.worker_env, "LEADSTAGE_RATE_LIMIT": str(SERVER_LIMIT), **env},
        )
        await side.connect()
        try:
            runs[mode] = await _run_mode(
                rig, side, tag=f"{tag}{mode[0]}{mode[-1]}", updates=updates, stages=stages, adds=adds
            )
        finally:
            await side.aclose()

    def ratio(slower: str, faster: str) -> float | None:
        return round(runs[slower]["wall_s"] / runs[faster]["wall_s"], 2) if {slower, faster} <= set(runs) else None

    return {
        **runs,
        "modes": list(runs),
        "speedup": ratio("alone", "batch-off"),
        "batch_speedup": ratio("batch-off", "batch-auto"),
        "latency_ms": LATENCY_MS,
        "server_limit_per_s": SERVER_LIMIT,
        "updates": updates,
        "stages": stages,
        "adds": adds,
    }


def text(result: Any) -> str:
    """The phase's lines for the printed report."""
    header = f"real iVvy ({result['latency_ms']} ms, {result['server_limit_per_s']} requests/s per key): "
    header += f"{result['updates']} updates over {result['stages']} stages and {result['adds']} adds"
    lines = [header, f"{'mode':<12} {'wall s':>9} {'changes/s':>10} {'requests/change':>16} {'429s':>6}  sent as"]
    for mode in result.get("modes", MODES):
        run = result[mode]
        sent = ", ".join(f"{how} {count}" for how, count in sorted(run["sent_as"].items()))
        lines.append(
            f"{mode:<12} {run['wall_s']:>9.1f} {run['changes_per_s']:>10.1f} {run['requests_per_change']:>16.3f}"
            f" {run['http_429']:>6}  {sent}"
        )
    if result["speedup"] is not None:
        lines.append(f"batch-off (coalescing) is {result['speedup']:.2f}x faster than alone")
    if result["batch_speedup"] is not None:
        lines.append(f"batch-auto is {result['batch_speedup']:.2f}x faster than batch-off")
    return "\n".join(lines)
