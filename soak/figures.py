"""What a soak run prints at the end (and writes to ``figures.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


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


def print_figures(figures: Figures, log_dir: Path, *, interrupted: bool) -> None:
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
