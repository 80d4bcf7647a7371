"""``python -m bench``: the whole comparison in one command, bounded in time, on loopback only.

1. a private redis-server on a free loopback port (or ``--redis-url``, a loopback Redis of your
   own: its INFO counters are server-wide, so nothing else may use that server meanwhile);
2. the fake iVvy in a process of its own, without faults;
3. each phase of ``bench.phases`` for the baseline, then the product;
4. optionally (``--profile``) one more product throughput run under py-spy;
5. the table on stdout, everything in ``bench/results/latest.json``.

Every child process is stopped on the way out, whatever happens (``worker.core.processes.Children``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import backlog, phases, real_ivvy, report
from bench.baseline import BaselineSide
from bench.infra import REPO_ROOT, BenchError, require_loopback_url, start_bench_process
from bench.measure import Probe
from bench.product import ProductSide, product_env
from bench.profile import RATE_HZ, summarize
from bench.side import Side
from worker.core.errors import ProcessFailed
from worker.core.processes import LOOPBACK, Children, RedisServer, free_port, sigterm_as_interrupt, wait_for_port
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Settings

RESULTS_DIR = REPO_ROOT / "bench" / "results"
PHASES = ("throughput", "latency", "bulk", "cli", "backlog", "idle", "real-ivvy")
#: Phases of the product alone (``bench.backlog``, ``bench.real_ivvy``): arq has no per-account rate
#: limit nor coalescing to compare.
PRODUCT_ONLY = ("backlog", "idle", "real-ivvy")
#: Phases short enough to run several rounds of; the latency phase already aggregates 400 samples.
REPEATED = ("throughput", "bulk")
#: Phases whose rounds are summed up by their median rather than their best (what a user sees).
MEDIAN = ("cli",)
#: Environment variables of the caller that would change either side's settings behind our back.
_FOREIGN_SETTINGS = ("REDIS_URL", "IVVY_", "LEADSTAGE_")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=5000, help="throughput phase: changes (default 5000)")
    parser.add_argument("--latency-changes", type=int, default=400, help="latency phase: changes (default 400)")
    parser.add_argument("--latency-rate", type=float, default=20.0, help="latency phase: changes/s (default 20)")
    parser.add_argument("--bulk-changes", type=int, default=50_000, help="bulk phase: changes (default 50000)")
    parser.add_argument(
        "--backlog-changes",
        default="30000",
        help="backlog phase: sizes of the busy account's backlog, comma-separated (default 30000; "
        "3000,30000,300000 shows the cost per change against the size)",
    )
    # The real-ivvy phase's defaults are issue 14's workload: 11,000 changes, batch mode off against auto.
    parser.add_argument("--ivvy-updates", type=int, default=10_000, help="real-ivvy phase: updates (default 10000)")
    parser.add_argument("--ivvy-stages", type=int, default=500, help="real-ivvy phase: stages updated (default 500)")
    parser.add_argument("--ivvy-adds", type=int, default=1000, help="real-ivvy phase: adds (default 1000)")
    parser.add_argument(
        "--ivvy-modes",
        type=lambda text: tuple(mode for mode in text.split(",") if mode),
        default=("batch-off", "batch-auto"),
        help=f"real-ivvy phase: the modes to run, of {','.join(real_ivvy.MODES)} (default batch-off,batch-auto;"
        " alone takes 18 minutes at the default size)",
    )
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--sides", default="baseline,product", help="comma-separated subset of baseline,product")
    parser.add_argument(
        "--redis-url", help="a loopback Redis to use instead of a private redis-server (it must be otherwise idle)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of the throughput phase; the fastest is kept (default 5)"
    )
    parser.add_argument(
        "--bulk-rounds", type=int, default=3, help="rounds of the bulk phase; the fastest is kept (default 3)"
    )
    parser.add_argument("--profile", action="store_true", help="add a product throughput run under py-spy")
    parser.add_argument(
        "--product-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the product worker's event loop (default uvloop, as leadstage worker runs)",
    )
    parser.add_argument(
        "--product-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for both workers (e.g. LEADSTAGE_LOG_LEVEL=warning), to price a setting",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:SETTING=VALUE[,...]",
        help="also run the product as product-NAME with its worker's environment changed (SETTING 'loop' picks "
        "uvloop/asyncio), in the same rounds as the others, e.g. quiet:LEADSTAGE_LOG_LEVEL=warning",
    )
    parser.add_argument(
        "--producer",
        choices=("library", "ledger"),
        default="library",
        help="the product's enqueue API (ledger: Ledger.enqueue_many, the library's fallback)",
    )
    parser.add_argument("--check", action="store_true", help="exit with status 3 when a target is missed")
    parser.add_argument("--budget", type=float, default=720.0, help="seconds the whole run may take (default 720)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    args.sides = [s for s in args.sides.split(",") if s]
    try:
        args.backlog_changes = [int(size) for size in args.backlog_changes.split(",") if size]
    except ValueError:
        parser.error(f"--backlog-changes wants sizes like 3000,30000, not {args.backlog_changes!r}")
    unknown = set(args.phases) - set(PHASES) | set(args.sides) - {"baseline", "product"}
    if unknown:
        parser.error(f"unknown phase or side: {', '.join(sorted(unknown))}")
    if not args.ivvy_modes or set(args.ivvy_modes) - set(real_ivvy.MODES):
        parser.error(f"--ivvy-modes wants some of {','.join(real_ivvy.MODES)}, not {','.join(args.ivvy_modes)!r}")
    for item in args.product_env:
        if "=" not in item:
            parser.error(f"--product-env wants NAME=VALUE, not {item!r}")
    try:
        args.variants = dict(parse_variant(text) for text in args.variant)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:SETTING=VALUE[,SETTING=VALUE...]`` -> (``product-NAME``, settings)."""
    name, _, rest = text.partition(":")
    pairs = [item.split("=", 1) for item in rest.split(",") if item]
    if not name.isidentifier() or not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--variant wants NAME:SETTING=VALUE[,SETTING=VALUE...], not {text!r}")
    settings = dict((key, value) for key, value in pairs)
    if settings.get("loop", "uvloop") not in ("uvloop", "asyncio"):
        raise ValueError(f"--variant {name}: loop must be uvloop or asyncio")
    return f"product-{name}", settings


def best_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest round (a real run, not an average), with every round's rate.

    On a shared machine interference only ever slows a round down, so the fastest of several
    rounds is the best estimate of what the code can do; the spread is kept in the JSON.
    """
    best = max(runs, key=lambda run: float(run["changes_per_s"]))
    rounds: dict[str, Any] = {"rounds_changes_per_s": [run["changes_per_s"] for run in runs]}
    if all("worker" in run.get("cpu", {}).get("ms_per_change", {}) for run in runs):
        rounds["rounds_worker_cpu_ms_per_change"] = [run["cpu"]["ms_per_change"]["worker"] for run in runs]
    return {**best, **rounds}


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every figure as the median of the rounds (the cli phase: what a user typically waits)."""
    return {
        key: statistics.median(run[key] for run in runs) if isinstance(value, int | float) else value
        for key, value in runs[0].items()
    } | {"rounds_changes_per_s": [run["changes_per_s"] for run in runs]}


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_SETTINGS)}


async def _run(args: argparse.Namespace, group: Children, work_dir: Path) -> dict[str, Any]:
    deadline = time.monotonic() + args.budget
    load_at_start = os.getloadavg()
    cpu_pids: dict[str, int] = {}
    if args.redis_url:
        require_loopback_url(args.redis_url, "--redis-url")
        redis_url = args.redis_url
    else:
        # A private server is what makes INFO commandstats and used_memory mean something: on a
        # shared Redis other clients' commands and keys land in the same counters.
        redis_server = RedisServer(group, work_dir / "redis")
        redis_server.start(timeout=10)
        redis_url = redis_server.url
        cpu_pids["redis-server"] = redis_server.child.pid
    credentials = {"IVVY_API_KEY": DEMO_API_KEY, "IVVY_API_SECRET": DEMO_API_SECRET}
    fake_port = free_port()
    fake = start_bench_process(
        group, "fake-ivvy", ["fake-ivvy", "--host", LOOPBACK, "--port", str(fake_port)], credentials
    )
    wait_for_port(fake_port, timeout=20, process=fake.popen)
    cpu_pids["fake-ivvy"] = fake.pid
    fake_url = f"http://{LOOPBACK}:{fake_port}"

    worker_env = {
        **product_env(redis_url, fake_url, DEMO_API_KEY, DEMO_API_SECRET),
        **dict(item.split("=", 1) for item in args.product_env),
    }
    settings = Settings.from_env(worker_env)
    use_library = args.producer == "library"
    product = ProductSide(settings, uvloop=args.product_loop == "uvloop", use_library=use_library)
    sides: dict[str, Side] = {"baseline": BaselineSide(settings), "product": product}
    for name, variant in args.variants.items():
        env = {k: v for k, v in variant.items() if k != "loop"}
        uvloop = variant.get("loop", args.product_loop) == "uvloop"
        sides[name] = ProductSide(settings, name=name, uvloop=uvloop, use_library=use_library, worker_env=env)
    side_names = [*args.sides, *args.variants]
    probe = Probe(redis_url)
    await probe.connect()
    info = await probe.client.info("server")
    results: dict[str, dict[str, Any]] = {}
    product_only: dict[str, Any] = {}
    profile: dict[str, Any] | None = None
    try:
        for name in side_names:
            await sides[name].connect()
        async with phases.Rig(probe, group, worker_env, fake_url, cpu_pids, deadline) as rig:
            runners: dict[str, Callable[[Side], Any]] = {
                "throughput": lambda side: phases.run_throughput(rig, side, changes=args.changes, tag="tp"),
                "latency": lambda side: phases.run_latency(
                    rig, side, changes=args.latency_changes, rate=args.latency_rate, tag="lat"
                ),
                "bulk": lambda side: phases.run_bulk(rig, side, changes=args.bulk_changes, tag="bulk"),
                "cli": lambda side: phases.run_cli(rig, side, changes=args.bulk_changes, tag="cli"),
            }
            for phase in (p for p in args.phases if p not in PRODUCT_ONLY):
                # Rounds alternate the sides, so a neighbour's load on this machine hits both alike.
                rounds = {"throughput": args.rounds, "bulk": args.bulk_rounds, "cli": args.bulk_rounds}.get(phase, 1)
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in side_names}
                for round_ in range(1, rounds + 1):
                    for name in side_names:
                        print(f"[bench] {phase} {round_}/{rounds}: {name} ...", file=sys.stderr, flush=True)
                        runs[name].append(await runners[phase](sides[name]))
                results[phase] = {
                    name: best_run(side_runs)
                    if phase in REPEATED
                    else median_run(side_runs)
                    if phase in MEDIAN
                    else side_runs[0]
                    for name, side_runs in runs.items()
                }
            if "backlog" in args.phases:
                for size in args.backlog_changes:
                    print(f"[bench] backlog of {size:,}: product ...", file=sys.stderr, flush=True)
                    product_only.setdefault("backlog", []).append(
                        await backlog.run_backlog(rig, settings, changes=size)
                    )
            if "idle" in args.phases:
                print("[bench] idle: product ...", file=sys.stderr, flush=True)
                product_only["idle"] = await backlog.run_idle(rig, settings)
            if "real-ivvy" in args.phases:
                # Alone, batch off (coalescing), batch auto, on one workload (bench.real_ivvy), once.
                print("[bench] real-ivvy: product alone, batch off, batch auto ...", file=sys.stderr, flush=True)
                product_only["real-ivvy"] = await real_ivvy.run_real_ivvy(
                    rig,
                    product,
                    updates=args.ivvy_updates,
                    stages=args.ivvy_stages,
                    adds=args.ivvy_adds,
                    tag="ri",
                    modes=args.ivvy_modes,
                )
            if args.profile:
                print("[bench] profile: product throughput under py-spy ...", file=sys.stderr, flush=True)
                raw = args.output.parent / "profile-product.txt"
                profiled = await phases.run_throughput(
                    rig, sides["product"], changes=args.changes, tag="prof", profile_to=raw
                )
                profile = {
                    **summarize(raw),
                    "rate_hz": RATE_HZ,
                    "changes": args.changes,
                    "raw_stacks": str(raw),
                    "run": profiled,
                }
            await rig.reset()
    finally:
        for side in sides.values():
            await side.aclose()
        await probe.aclose()
    product_side = sides["product"]
    return {
        "machine": {
            **report.machine(str(info.get("redis_version", "?"))),
            # Other work on the machine makes every figure noisy; the load says how much there was.
            "loadavg_start": [round(x, 2) for x in load_at_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "concurrency": settings.concurrency,
            "poll_delay_s": settings.poll_delay_s,
            "product_rate_limit": settings.rate_limit,
            "product_loop": args.product_loop,
            "product_env": args.product_env,
            "variants": args.variants,
            "producer_api": getattr(product_side, "producer_api", ""),
            "throughput_changes": args.changes,
            "latency_changes": args.latency_changes,
            "latency_rate": args.latency_rate,
            "bulk_changes": args.bulk_changes,
            "redis": "private redis-server" if not args.redis_url else args.redis_url,
        },
        "results": results,
        "product_only": product_only,
        "verdicts": report.verdicts(results),
        "profile": profile,
    }


def _print(document: Mapping[str, Any]) -> None:
    results = document["results"]
    config, machine = document["config"], document["machine"]
    print(
        f"\nleadstage-sync vs bare arq - {machine['nproc']} x {machine['cpu_model']}, Redis {machine['redis_server']},"
        f" Python {machine['python']}; concurrency {config['concurrency']}, poll delay {config['poll_delay_s']} s,"
        f" product loop {config['product_loop']}, producer {config['producer_api']}\n"
    )
    if machine["loadavg_start"][0] > 0.5:
        print(
            f"warning: load average {machine['loadavg_start'][0]} when the run started: other work on this "
            "machine makes the figures noisy\n"
        )
    print(report.table(results))
    if config["variants"]:
        print()
        print(report.variants_table(results, list(config["variants"])))
    if "throughput" in results:
        print()
        print(report.commands_table(results, "throughput"))
    if document.get("product_only"):
        print()
        print(backlog.table(document["product_only"].get("backlog", []), document["product_only"].get("idle")))
    if document.get("product_only", {}).get("real-ivvy"):
        print()
        print(real_ivvy.text(document["product_only"]["real-ivvy"]))
    if document.get("profile"):
        print()
        print(report.profile_text(document["profile"]))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="leadstage-bench-") as tmp:
        log_dir = args.output.parent / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for old in log_dir.glob("*.log"):
            old.unlink()
        group = Children(log_dir, _clean_environ())
        try:
            with sigterm_as_interrupt():
                # The phases check the budget while they wait; this also bounds a hung Redis call.
                document = asyncio.run(asyncio.wait_for(_run(args, group, Path(tmp)), args.budget + 30))
        except TimeoutError:
            print(f"bench: the run took longer than its budget ({args.budget:g}s + 30s); stopped", file=sys.stderr)
            return 1
        except (BenchError, ProcessFailed) as error:
            print(f"bench: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted; child processes stopped", file=sys.stderr)
            return 130
        finally:
            group.close()
    document = {**document, "wall_seconds": round(time.monotonic() - started, 1)}
    report.write_json(args.output, document)
    _print(document)
    print(f"\n{document['wall_seconds']} s; JSON: {args.output}; logs: {log_dir}")
    missed = [row["metric"] for row in document["verdicts"] if not row["pass"]]
    return 3 if args.check and missed else 0
