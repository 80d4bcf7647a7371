"""``leadstage``: the one command of leadstage-sync (docs/contract.md: The command ``leadstage``).

Subcommands: worker, enqueue, results, status, dlq list / dlq replay, stats, webhook, fake-ivvy,
demo, console. ``main(argv)`` runs one and returns the exit status, which ``python -m worker.cli``
and the console script pass to the shell. The package, by job:

* ``parser``: every command, its flags and help (``build_parser``, ``parse_command``);
* ``common``: exit statuses, the output (JSON lines on stdout, notes and errors on stderr), the
  settings and the Redis client every command uses;
* ``enqueue``: one change from flags; ``bulk``: a file or stdin, all or nothing, streamed;
* ``reads``: results, status, dlq list / replay, stats;
* ``servers``: worker, webhook, console, fake-ivvy, demo.

A command's module, and what it needs, is imported only when that command runs, so that
``leadstage --help`` and a single enqueue start fast (they load neither the worker, nor aiohttp,
nor prometheus-client).

A failure is one line, ``leadstage: error: ...``, never a traceback (a bulk enqueue lists its bad
lines first, one per line). The exit status follows ``worker.core.errors``: ``PermanentError`` (bad
input, a refusal, a bad setting) is 2, any other failure 1, SIGINT 130 (``parser.EXIT_STATUS_HELP``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import cast

from worker.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, error_line, load_settings
from worker.cli.parser import build_parser, parse_command
from worker.core.errors import LeadstageError, PermanentError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main", "parse_command"]

#: Exit status of a command stopped by SIGINT (128 + the signal's number, as shells report it).
EXIT_INTERRUPTED = 130


def _command(run: str) -> Callable[..., int]:
    """The function a parsed command names (``"module:function"`` in this package), imported now."""
    module, _, function = run.partition(":")
    return cast("Callable[..., int]", getattr(importlib.import_module(f"{__name__}.{module}"), function))


def _redis_failure(exc: LeadstageError, *, written: bool) -> str:
    """What a Redis failure means for the user: where, which timeout, and whether anything was enqueued."""
    from worker.core.redis_url import printable_url

    settings = load_settings()
    where = f"REDIS_URL {printable_url(settings.redis_url)}"
    cause = exc.__cause__
    if type(cause).__name__ == "TimeoutError":
        # The setting that ran out: redis-py says "Timeout connecting to server" for the connection's.
        if "connecting" in str(cause):
            where += f", LEADSTAGE_REDIS_CONNECT_TIMEOUT {settings.redis_connect_timeout_s:g} s"
        else:
            where += f", LEADSTAGE_REDIS_TIMEOUT {settings.redis_timeout_s:g} s"
    return f"{exc} ({where})" + ("" if written else "; nothing enqueued")


def main(argv: list[str] | None = None) -> int:
    """Run ``leadstage`` with ``argv`` (default: the process's arguments); returns the exit status."""
    args = parse_command(sys.argv[1:] if argv is None else argv)
    from worker.core import tracing
    from worker.core.errors import EnqueueOutcomeUnknown, RedisNotReplicated, RedisUnavailable

    try:
        tracing.setup()
        status = _command(args.run)(args)
    except PermanentError as exc:
        error_line(str(exc))
        return EXIT_USAGE
    except RedisUnavailable as exc:
        # A change written but not confirmed by the replicas is not "nothing enqueued" either.
        unknown = isinstance(exc, EnqueueOutcomeUnknown | RedisNotReplicated)
        error_line(_redis_failure(exc, written=unknown or args.command != "enqueue"))
        return EXIT_FAILURE
    except LeadstageError as exc:
        error_line(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``leadstage results | head``): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback, as for every failure
        error_line(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    return status
