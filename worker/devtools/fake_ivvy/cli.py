"""``leadstage fake-ivvy``: the fake's command-line options and its serve-until-signalled loop.

``worker.cli`` and ``bench.procs`` call ``add_arguments`` and ``run_from_args``; every fault
setting is an option of its own (``--latency-ms``, ``--batch-delay-s``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Callable
from typing import Final

from worker.core.hosts import is_loopback
from worker.core.processes import signalled
from worker.devtools.fake_ivvy.app import DEFAULT_HOST, FakeOptions, running_fake_ivvy
from worker.devtools.fake_ivvy.faults import FAULT_FIELDS, Faults, InvalidFaults
from worker.devtools.fake_ivvy.model import default_credentials
from worker.devtools.fake_ivvy.params import DIGITS

DEFAULT_PORT: Final = 8765


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number 0 or more")
    return value


def _seconds(text: str) -> int:
    if not DIGITS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of seconds")
    return int(text)


def _credential(text: str) -> tuple[str, str]:
    key, sep, secret = text.partition(":")
    if not sep or not key or not secret:
        raise argparse.ArgumentTypeError("must be KEY:SECRET (the key without ':')")
    return key, secret


_FAULT_HELP = {
    "latency_ms": "added latency of every API request, in ms",
    "error_rate": "share of requests answered 500/502/503",
    "rate_limit_rate": "share of requests answered 429 with Retry-After",
    "retry_after_s": "the Retry-After of those 429s, in whole seconds",
    "hang_rate": "share of requests held open unanswered (not applied) for --hang-s, then closed",
    "hang_s": "how long a hung request is held, in seconds",
    "drop_rate": "share of requests applied, then dropped without an answer",
    "error_24322_rate": "share of addOrUpdateLeadStage answered 500 with specific code 24322",
    "gateway_5xx_rate": "share of addOrUpdateLeadStage committed, then answered 504",
    "late_commit_rate": "share of addOrUpdateLeadStage held for --late-commit-s, then committed and answered",
    "late_commit_s": "how long a late commit is held, in seconds",
    "batch_delay_s": "seconds a batch takes: its jobs are applied one by one over it",
    "batch_results_s": "seconds a batch's results are kept after its run (iVvy: 2 days)",
    "batch_run_drop_rate": "share of batch runs accepted, then dropped without an answer",
    "batch_never_ready_rate": "share of batches that never complete (progress 0, results 24114)",
    "batch_job_24322_rate": "share of batch jobs answered 500/24322 instead of applied",
    "rate_limit_per_s": "the server's own limit per API key: requests past it in a window get 429 (0: off)",
    "rate_limit_window_s": "the window of --rate-limit-per-s, in seconds (also the Retry-After of its 429s)",
    "errors_as_200_rate": "share of error answers sent with HTTP status 200 (the error body unchanged)",
    "clock_offset_s": "seconds the fake's clock is ahead of the host's (negative: behind); beyond 300: 23005",
}
_FAULT_TYPES: dict[str, Callable[[str], float]] = {
    "clock_offset_s": float,
    "latency_ms": _non_negative,
    "retry_after_s": _seconds,
    "hang_s": _non_negative,
    "late_commit_s": _non_negative,
    "batch_delay_s": _non_negative,
    "batch_results_s": _non_negative,
    "rate_limit_per_s": _non_negative,
    "rate_limit_window_s": _non_negative,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fake's options to ``parser`` (``leadstage fake-ivvy``)."""
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument(
        "--credentials",
        type=_credential,
        action="append",
        default=[],
        metavar="KEY:SECRET",
        help="accept this API key and secret too (repeatable); IVVY_API_KEY/IVVY_API_SECRET or the demo pair always",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault draws, for repeatable runs")
    parser.add_argument("--log-requests", action="store_true", help="print every API request as a JSON line")
    defaults = Faults()
    for name in FAULT_FIELDS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_FAULT_TYPES.get(name, _rate),
            default=getattr(defaults, name),
            help=f"{_FAULT_HELP[name]} (default {getattr(defaults, name)})",
        )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the exit status (2: bad options, 1: cannot listen)."""
    try:
        faults = Faults(**{name: getattr(args, name) for name in FAULT_FIELDS})
    except InvalidFaults as exc:
        print(f"leadstage fake-ivvy: {exc}", file=sys.stderr)
        return 2
    options: FakeOptions = {
        "credentials": {**default_credentials(), **dict(args.credentials)},
        "faults": faults,
        "seed": args.seed,
        "log_requests": args.log_requests,
    }
    try:
        asyncio.run(_serve_until_signalled(args.host, args.port, options))
    except OSError as exc:
        print(f"leadstage fake-ivvy: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signalled(host: str, port: int, options: FakeOptions) -> None:
    async with running_fake_ivvy(host, port, **options) as server:
        keys = ", ".join(sorted(server.fake.credentials))
        print(f"fake iVvy listening on {server.url} (API keys: {keys})", flush=True)
        if not is_loopback(host):
            print("warning: the /_admin endpoints are reachable from other hosts", file=sys.stderr, flush=True)
        await signalled()
