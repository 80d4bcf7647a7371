"""The verdicts against issue 6's targets, the printed tables and the JSON file.

The targets compare the product with the baseline measured in the same run (throughput, bulk
enqueue, commands) or hold absolutely (latency, memory), as the issue states them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.infra import REPO_ROOT

Results = Mapping[str, Mapping[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class Target:
    """One line of the table: where its two figures come from, how they compare, and the bar."""

    label: str
    phase: str
    figure: Callable[[Mapping[str, Any]], float]
    #: "ratio" (product / baseline), "difference" (product - baseline) or "absolute" (product).
    compare: str
    bar: float
    #: True when higher is better (the bar is a minimum).
    at_least: bool
    bar_text: str
    unit: str = ""

    def judge(self, baseline: float, product: float) -> tuple[float, bool]:
        if self.compare == "ratio":
            value = product / baseline if baseline else float("inf")
        elif self.compare == "difference":
            value = product - baseline
        else:
            value = product
        return value, (value >= self.bar if self.at_least else value <= self.bar)


TARGETS = (
    Target(
        "(a) throughput, 1 worker (changes/s)",
        "throughput",
        lambda r: r["changes_per_s"],
        "ratio",
        1.0,
        True,
        ">= 1.0x",
    ),
    Target("(b) latency p50 at 20/s (ms)", "latency", lambda r: r["p50_ms"], "absolute", 20.0, False, "<= 20 ms"),
    Target("(b) latency p99 at 20/s (ms)", "latency", lambda r: r["p99_ms"], "absolute", 100.0, False, "<= 100 ms"),
    Target(
        "(c) Redis commands / change",
        "throughput",
        lambda r: r["commands"]["total_per_change"],
        "difference",
        3.0,
        False,
        "<= baseline + 3",
    ),
    Target("(d) bulk enqueue (changes/s)", "bulk", lambda r: r["changes_per_s"], "ratio", 10.0, True, ">= 10x"),
    Target(
        "(f) bulk via the CLI, start-up incl. (ch/s)",
        "cli",
        lambda r: r["changes_per_s"],
        "ratio",
        10.0,
        True,
        ">= 10x",
    ),
    Target(
        "(f) bulk via the CLI, absolute (changes/s)",
        "cli",
        lambda r: r["changes_per_s"],
        "absolute",
        25_000.0,
        True,
        ">= 25,000",
    ),
    Target(
        "(e) Redis memory / queued change (B)",
        "bulk",
        lambda r: r["bytes_per_queued_change"],
        "absolute",
        1024.0,
        False,
        "<= 1 KiB",
    ),
)

#: Targets of the product alone (arq has no command): (label, phase, figure, bar in s, floor). The
#: baseline column shows the floor measured in the same runs: ``python -c pass`` for --help, and
#: ``python -c "import redis"`` for an enqueue (redis-py's import, which any Redis client pays).
STARTUP_TARGETS: tuple[tuple[str, str, Callable[[Mapping[str, Any]], float], float, str], ...] = (
    ("(g) leadstage --help, median (s)", "cli", lambda r: r["help_s"], 0.15, "python_s"),
    ("(g) leadstage enqueue of one change, median (s)", "cli", lambda r: r["single_enqueue_s"], 0.15, "import_redis_s"),
)

#: Figures printed for context, without a target: (label, phase, figure).
CONTEXT: tuple[tuple[str, str, Callable[[Mapping[str, Any]], float]], ...] = (
    ("    latency max at 20/s (ms)", "latency", lambda r: r["max_ms"]),
    ("    commands / change, latency phase", "latency", lambda r: r["commands"]["total_per_change"]),
    ("    commands / change, bulk enqueue only", "bulk", lambda r: r["commands"]["total_per_change"]),
    ("    producer CPU µs / change (bulk)", "bulk", lambda r: r["cpu"]["ms_per_change"]["producer"] * 1000),
    ("    Redis CPU µs / change (bulk)", "bulk", lambda r: r["cpu"]["ms_per_change"]["redis-server"] * 1000),
    ("    Redis round trips / change (throughput)", "throughput", lambda r: r["commands"]["round_trips_per_change"]),
    ("    Redis CPU ms / change (throughput)", "throughput", lambda r: r["cpu"]["ms_per_change"]["redis-server"]),
    ("    worker CPU ms / change (throughput)", "throughput", lambda r: r["cpu"]["ms_per_change"]["worker"]),
    # Changes one worker could do with a whole core to itself: robust to a neighbour's load.
    ("    worker capacity (changes / CPU-second)", "throughput", lambda r: 1000 / r["cpu"]["ms_per_change"]["worker"]),
    ("    fake iVvy CPU ms / change (throughput)", "throughput", lambda r: r["cpu"]["ms_per_change"]["fake-ivvy"]),
    ("    worker CPU ms / change (latency)", "latency", lambda r: r["cpu"]["ms_per_change"]["worker"]),
)


def verdicts(results: Results) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for target in TARGETS:
        phase = results.get(target.phase)
        if not phase or "baseline" not in phase or "product" not in phase:
            continue
        baseline, product = target.figure(phase["baseline"]), target.figure(phase["product"])
        value, passed = target.judge(baseline, product)
        rows.append(
            {
                "metric": target.label,
                "baseline": baseline,
                "product": product,
                "compare": target.compare,
                "value": round(value, 3),
                "target": target.bar_text,
                "pass": passed,
            }
        )
    for label, phase_name, figure, bar, floor in STARTUP_TARGETS:
        product_run = results.get(phase_name, {}).get("product")
        if product_run is None or "baseline" not in results[phase_name]:
            continue
        value = figure(product_run)
        rows.append(
            {
                "metric": label,
                "baseline": product_run.get(floor, 0.0),
                "product": value,
                "compare": "absolute",
                "value": value,
                "target": f"<= {bar:g} s",
                "pass": value <= bar,
            }
        )
    return rows


def _number(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.2f}"


def _value_text(row: Mapping[str, Any]) -> str:
    if row["compare"] == "ratio":
        return f"{row['value']:.2f}x"
    if row["compare"] == "difference":
        return f"{row['value']:+.1f}"
    ratio = row["product"] / row["baseline"] if row["baseline"] else float("inf")
    return f"{ratio:.2f}x"


def table(results: Results) -> str:
    """The main table: metric, baseline, product, product/baseline, target, verdict."""
    header = f"{'metric':<44} {'baseline':>11} {'product':>11} {'prod/base':>10}  {'target':<16} verdict"
    lines = [header, "-" * len(header)]
    for row in verdicts(results):
        lines.append(
            f"{row['metric']:<44} {_number(row['baseline']):>11} {_number(row['product']):>11} "
            f"{_value_text(row):>10}  {row['target']:<16} {'PASS' if row['pass'] else 'FAIL'}"
        )
    for label, phase_name, figure in CONTEXT:
        phase = results.get(phase_name)
        if not phase or "baseline" not in phase or "product" not in phase:
            continue
        try:
            baseline, product = figure(phase["baseline"]), figure(phase["product"])
        except KeyError:  # a figure this run did not take (Redis CPU with --redis-url)
            continue
        ratio = f"{product / baseline:.2f}x" if baseline else "-"
        lines.append(f"{label:<44} {_number(baseline):>11} {_number(product):>11} {ratio:>10}")
    return "\n".join(lines)


#: Figures compared between the product and its variants: (label, phase, figure).
VARIANT_FIGURES: tuple[tuple[str, str, Callable[[Mapping[str, Any]], float]], ...] = (
    ("throughput (changes/s)", "throughput", lambda r: r["changes_per_s"]),
    ("worker CPU ms / change", "throughput", lambda r: r["cpu"]["ms_per_change"]["worker"]),
    ("worker capacity (changes / CPU-second)", "throughput", lambda r: 1000 / r["cpu"]["ms_per_change"]["worker"]),
    ("latency p50 (ms)", "latency", lambda r: r["p50_ms"]),
    ("latency p99 (ms)", "latency", lambda r: r["p99_ms"]),
    ("commands / change", "throughput", lambda r: r["commands"]["total_per_change"]),
)


def variants_table(results: Results, variants: Sequence[str]) -> str:
    """Each variant against the product, measured in the same rounds."""
    header = f"{'variant figure':<44} {'product':>11} " + " ".join(f"{v:>18}" for v in variants)
    lines = [header, "-" * len(header)]
    for label, phase_name, figure in VARIANT_FIGURES:
        phase = results.get(phase_name, {})
        if "product" not in phase:
            continue
        product = figure(phase["product"])
        cells = []
        for variant in variants:
            value = figure(phase[variant]) if variant in phase else float("nan")
            cells.append(f"{_number(value)} ({value / product:.2f}x)" if product else _number(value))
        lines.append(f"{label:<44} {_number(product):>11} " + " ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def commands_table(results: Results, phase_name: str = "throughput") -> str:
    """Redis commands per change by command (Lua-internal calls included), both sides."""
    phase = results.get(phase_name, {})
    per_side = {side: phase[side]["commands"]["per_change"] for side in ("baseline", "product") if side in phase}
    names = sorted({n for counts in per_side.values() for n in counts}, key=lambda n: -max(
        per_side.get(s, {}).get(n, 0.0) for s in per_side
    ))  # fmt: skip
    header = f"{'command (' + phase_name + ' phase)':<30} {'baseline':>9} {'product':>9}"
    lines = [header, "-" * len(header)]
    for name in names:
        cells = [per_side.get(side, {}).get(name, 0.0) for side in ("baseline", "product")]
        lines.append(f"{name:<30} {cells[0]:>9.2f} {cells[1]:>9.2f}")
    totals = [phase[side]["commands"]["total_per_change"] if side in phase else 0.0 for side in ("baseline", "product")]
    lines.append(f"{'total':<30} {totals[0]:>9.2f} {totals[1]:>9.2f}")
    return "\n".join(lines)


def profile_text(profile: Mapping[str, Any]) -> str:
    run = profile.get("run") or {}
    lines = [
        f"worker CPU samples: {profile['samples']} (py-spy at {profile.get('rate_hz', '?')} Hz, "
        f"{profile.get('changes', '?')} changes; the profiled round ran at {run.get('changes_per_s', '?')} changes/s)",
        "by component (leaf frame):",
    ]
    lines += [f"  {pct:5.1f}%  {name}" for name, pct in profile["by_component_pct"].items()]
    lines.append("libraries anywhere on the stack (inclusive):")
    lines += [f"  {pct:5.1f}%  {name}" for name, pct in profile["by_component_inclusive_pct"].items()]
    lines.append("the product's functions (inclusive):")
    lines += [f"  {pct:5.1f}%  {name}" for name, pct in profile["product_functions_pct"].items()]
    lines.append("top functions (self):")
    lines += [f"  {pct:5.1f}%  {name}" for name, pct in profile["top_self_pct"].items()]
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - fixed git arguments
            ["git", *args],  # noqa: S607 - git from PATH, as a developer runs it
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(redis_version: str) -> dict[str, Any]:
    """What the figures depend on: the machine, the versions, the code that ran."""
    versions = {}
    for package in ("arq", "redis", "hiredis", "aiohttp", "uvloop", "orjson", "structlog"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": redis_version,
        "packages": versions,
        "git_head": _git("rev-parse", "--short", "HEAD"),
        # The owners edit worker/ and producers/ while benchmarks run: say what was measured.
        "uncommitted_in_product": _git("status", "--porcelain", "--", "worker", "producers").splitlines(),
    }


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
