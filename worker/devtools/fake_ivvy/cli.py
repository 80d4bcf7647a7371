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
from worker.devtools.fake_ivvy.faults import FAULT_FIELDS, FAULT_SETTINGS, Faults, InvalidFaults, Kind
from worker.devtools.fake_ivvy.model import default_credentials
from worker.devtools.fake_ivvy.params import DIGITS

DEFAULT_PORT: Final = 8765


def _option_type(kind: Kind) -> Callable[[str], float]:
    """The option's parser: a number (whole seconds: digits only) that ``kind`` accepts."""

    def parse(text: str) -> float:
        try:
            value = int(text) if kind is Kind.WHOLE_SECONDS and DIGITS.fullmatch(text) else float(text)
        except ValueError:
            value = math.nan
        if not kind.accepts(value):
            raise argparse.ArgumentTypeError(f"{text!r} {kind.value}")
        return value

    return parse


def _credential(text: str) -> tuple[str, str]:
    key, sep, secret = text.partition(":")
    if not sep or not key or not secret:
        raise argparse.ArgumentTypeError("must be KEY:SECRET (the key without ':')")
    return key, secret


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
    for setting in FAULT_SETTINGS:
        parser.add_argument(
            "--" + setting.name.replace("_", "-"),
            dest=setting.name,
            type=_option_type(setting.kind),
            default=setting.default,
            help=f"{setting.effect} (default {setting.default})",
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
