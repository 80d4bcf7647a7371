"""The long-running commands: worker, webhook, console, fake-ivvy and the demo.

Each imports what it serves only when it runs, so that the other commands do not load arq,
aiohttp or prometheus-client.
"""

from __future__ import annotations

import argparse

from worker.cli.common import configure_logging, load_settings

__all__ = ["run_console", "run_demo", "run_fake_ivvy", "run_webhook", "run_worker"]


def run_worker(args: argparse.Namespace) -> int:
    """``leadstage worker``: an arq worker until SIGTERM."""
    from worker.core.errors import redis_errors
    from worker.runner import run_worker as run

    settings = load_settings()
    settings.require_accounts()
    configure_logging(settings)
    with redis_errors():  # arq's own connection at start-up (Redis down, not Redis, a bad database)
        return run(settings)


def run_webhook(args: argparse.Namespace) -> int:
    """``leadstage webhook``: the signed HTTP producer."""
    from producers.webhook import run_webhook as run

    settings = load_settings()
    configure_logging(settings)
    return run(settings, args.host, args.port)


def run_console(args: argparse.Namespace) -> int:
    """``leadstage console``: the operations console."""
    from worker.console.app import run_console as run

    settings = load_settings()
    configure_logging(settings)
    return run(settings, args.host, args.port)


def run_fake_ivvy(args: argparse.Namespace) -> int:
    """``leadstage fake-ivvy``: the fake iVvy, with the options its own parser took."""
    from worker.devtools import fake_ivvy

    configure_logging(load_settings())
    return fake_ivvy.run_from_args(args.fake_options)


def run_demo(args: argparse.Namespace) -> int:
    """``leadstage demo``: fake iVvy, worker and sample changes, end to end."""
    from worker.devtools.demo import run_demo as run  # configures its own logging (quieter, for a readable demo)

    return run(load_settings(), keep_running=args.keep_running)
