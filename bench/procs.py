"""The child processes of a run: ``python -m bench.procs {fake-ivvy|product-worker|baseline-worker}``.

Each runs in a process of its own so that it has a core's worth of event loop to itself and
none of them competes inside another's loop: the fake iVvy would otherwise share the worker's
loop and make both sides look slower than they are. Workers read their settings from the
environment (``Settings.from_env``), as ``leadstage worker`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from worker.core.settings import Settings


def _fake_ivvy(rest: Sequence[str]) -> int:
    """The fake iVvy on uvloop when installed: the fake is infrastructure, and the less CPU it
    takes on a two-core machine, the less it takes away from the worker being measured."""
    from worker.devtools import fake_ivvy

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    parser = argparse.ArgumentParser(prog="bench.procs fake-ivvy")
    fake_ivvy.add_arguments(parser)
    return fake_ivvy.run_from_args(parser.parse_args(list(rest)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.procs", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    sub.add_parser("fake-ivvy", help="the fake iVvy; the rest of the arguments are leadstage fake-ivvy's")
    product = sub.add_parser("product-worker", help="leadstage worker")
    product.add_argument("--no-uvloop", action="store_true", help="the standard asyncio loop instead of uvloop")
    sub.add_parser("baseline-worker", help="the bare arq worker of bench.baseline")
    args, rest = parser.parse_known_args(argv)
    if args.role == "fake-ivvy":
        return _fake_ivvy(rest)
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    settings = Settings.from_env()
    if args.role == "product-worker":
        from bench.product import run_product_worker

        return run_product_worker(settings, uvloop=not args.no_uvloop)
    from bench.baseline import run_baseline_worker

    return run_baseline_worker(settings)


if __name__ == "__main__":
    sys.exit(main())
