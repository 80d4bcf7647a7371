"""What every command of ``leadstage`` shares: exit statuses, output, settings, the Redis client.

Output: what a command produces goes to stdout as JSON (one line per item, so it pipes into jq or
another program; a single object is indented on a terminal). Progress, summaries and errors go to
stderr, an error as one line, ``leadstage: error: ...``.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import orjson  # worker.core.change needs it anyway

from worker.core.change import shown

if TYPE_CHECKING:
    from worker.core.redis_connection import RedisClient
    from worker.core.settings import Settings

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "configure_logging",
    "emit",
    "emit_object",
    "error_line",
    "load_settings",
    "note",
    "with_redis",
    "write_out",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

PROG = "leadstage"

_T = TypeVar("_T")
_Client = TypeVar("_Client", bound="RedisClient")


def write_out(data: bytes) -> None:
    """Every byte of ``data`` on stdout, flushed (``results --follow`` is read as it is written).

    With PYTHONUNBUFFERED=1 (the image sets it) stdout's binary layer is the raw file, whose write
    may take only part of a large block: a signal while a pipe is full ends the system call early.
    """
    out = sys.stdout.buffer
    view = memoryview(data)
    while view:
        view = view[out.write(view) or 0 :]
    out.flush()


def emit(obj: object) -> None:
    """One JSON line on stdout."""
    write_out(orjson.dumps(obj) + b"\n")


def emit_object(obj: object) -> None:
    """One JSON object: indented for a person at a terminal, one line for a program."""
    write_out(orjson.dumps(obj, option=orjson.OPT_INDENT_2 if sys.stdout.isatty() else 0) + b"\n")


def note(text: str) -> None:
    """A line for the person on stderr (progress, summaries, warnings)."""
    print(text, file=sys.stderr, flush=True)


def error_line(text: str) -> None:
    """The one line of a failure on stderr."""
    # Messages may carry what the user gave (a key, a file name): no control character reaches the terminal.
    note(f"{PROG}: error: {shown(text, limit=2000)}")


def load_settings() -> Settings:
    """The settings from the environment (``ConfigError`` names a bad one)."""
    from worker.core.settings import Settings

    return Settings.from_env()


def configure_logging(settings: Settings) -> None:
    """The logging of the long-running commands (a one-shot command logs nothing)."""
    from worker.core.logs import configure_logging as configure

    configure(settings)


async def with_redis(settings: Settings, use: Callable[[RedisClient], Awaitable[_T]]) -> _T:
    """``use`` a client of ``REDIS_URL`` with the Redis timeouts of ``settings``, closed after: a
    single Redis or a Redis Cluster (the read commands)."""
    from worker.core.redis_connection import connect_redis_or_cluster_of

    return await _using(connect_redis_or_cluster_of(settings), use)


async def _using(client: _Client, use: Callable[[_Client], Awaitable[_T]]) -> _T:
    try:
        return await use(client)
    finally:
        await client.aclose()
