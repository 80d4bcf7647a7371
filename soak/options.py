"""The soak's options (``python -m soak --help``) and the faults it runs with by default."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
    # Only batches draw these (LEADSTAGE_BATCH=auto sends them): a run's answer dropped after it
    # was accepted, a batch that never completes, a job answered 24322 instead of applied.
    batch_run_drop_rate=0.02,
    batch_never_ready_rate=0.01,
    batch_job_24322_rate=0.03,
)


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
    batch_mode: str
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
    parser.add_argument("--settle-timeout", dest="settle_timeout_s", type=float, default=420.0, metavar="SECONDS",
                        help="seconds to wait after the last enqueue")  # fmt: skip
    parser.add_argument("--fault", action="append", default=[], metavar="NAME=VALUE",
                        help=f"override a fault setting ({', '.join(FAULT_FIELDS)}); 'none' turns all off")  # fmt: skip
    parser.add_argument("--max-attempts", type=int, default=50, help="LEADSTAGE_MAX_ATTEMPTS of the workers")
    parser.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=1.5, metavar="SECONDS",
                        help="LEADSTAGE_REQUEST_TIMEOUT of the workers")  # fmt: skip
    parser.add_argument("--lease", dest="lease_s", type=float, default=3.0, metavar="SECONDS",
                        help="LEADSTAGE_LEASE of the workers")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=50, help="LEADSTAGE_CONCURRENCY of each worker")
    parser.add_argument("--batch-mode", choices=("off", "auto"), default="auto",
                        help="LEADSTAGE_BATCH of the workers (auto: the batch faults are drawn too)")  # fmt: skip
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
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if hasattr(args, f.name)}
    seed_stages = args.seed_stages if args.seed_stages is not None else max(20, args.changes // 40)
    return Options(**{**given, "seed_stages": seed_stages, "kill_every": tuple(args.kill_every), "faults": faults})
