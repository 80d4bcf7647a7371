"""What a run needs beyond the process toolkit (``worker.core.processes``): its error, loopback checks, CPU time.

Every process of a run is a child in one ``worker.core.processes.Children``; leaving it (normally, on
an error, on Ctrl-C or SIGTERM) stops each of them by its own pid, so a run never leaves a worker
or a Redis behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from worker.core.hosts import is_loopback
from worker.core.processes import SOURCE_ROOT, Child, Children, python_module

#: Where the repository lives: worker processes import ``worker`` and ``bench`` from here.
REPO_ROOT = SOURCE_ROOT


class BenchError(RuntimeError):
    """A run cannot go on (a process did not start, a phase timed out, a result is wrong)."""


def require_loopback_url(url: str, what: str) -> None:
    """The benchmark only ever talks to this machine: refuse any other host."""
    host = urlsplit(url).hostname or ""
    if not is_loopback(host):
        raise BenchError(f"{what} must be on loopback (127.0.0.1 / localhost), not {host!r}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc); 0.0 where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    # Fields after the command name: state is [0], utime [11], stime [12] (proc(5), 14 and 15).
    return (int(fields[11]) + int(fields[12])) / ticks


def start_bench_process(group: Children, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Child:
    """``python -m bench.procs ARGS`` with this interpreter (see ``bench.procs``), started."""
    return group.start(name, python_module("bench.procs", *args), env)
