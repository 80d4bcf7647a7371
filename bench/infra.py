"""The processes a run needs (Redis, the fake iVvy, workers), started on loopback and always stopped.

Every process is a child of the benchmark and is registered with a ``ProcessGroup``; leaving
the group (normally, on an error, on Ctrl-C or SIGTERM) stops each of them by its own pid,
SIGTERM first and SIGKILL after a grace period, so a run never leaves a worker or a Redis behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

#: Where the repository lives: worker processes import ``worker`` and ``bench`` from here.
REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """A run cannot go on (a process did not start, a phase timed out, a result is wrong)."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``host:port`` accepts connections; fail early if ``process`` died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        if process is not None and process.poll() is not None:
            raise BenchError(f"the process listening on {host}:{port} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listens on {host}:{port} after {timeout:g}s")
        time.sleep(0.05)


def require_loopback_url(url: str, what: str) -> None:
    """The benchmark only ever talks to this machine: refuse any other host."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
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


@dataclass
class Proc:
    """One child process, its log file, and how to stop it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status (None if it would not die)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Every child of the run; ``close`` stops them all (newest first: workers before their Redis)."""

    log_dir: Path
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        child_env = {**self.env, **(env or {})}
        # Children import ``worker`` and ``bench`` from the checkout, whatever the current directory.
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(  # noqa: S603 - our own interpreter or redis-server, fixed arguments
                list(argv), env=child_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_python(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        """``python -m bench.procs ARGS`` with this interpreter (see ``bench.procs``)."""
        return self.start(name, [sys.executable, "-m", "bench.procs", *args], env)

    def stop(self, proc: Proc, grace: float = 10.0) -> int | None:
        status = proc.stop(grace)
        if proc in self.procs:
            self.procs.remove(proc)
        return status

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, grace=5.0)


def start_redis_server(group: ProcessGroup, data_dir: Path) -> tuple[str, Proc]:
    """A private redis-server on a free loopback port, without persistence; returns (URL, process).

    A private server is what makes INFO commandstats and used_memory mean something: on a shared
    Redis other clients' commands and keys land in the same counters.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not on PATH; install it, or pass --redis-url redis://127.0.0.1:PORT/DB")
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = group.start(
        "redis-server",
        [
            binary,
            "--bind", LOOPBACK, "--port", str(port), "--protected-mode", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(data_dir), "--daemonize", "no",
        ],
    )  # fmt: skip
    wait_for_port(LOOPBACK, port, timeout=10, process=proc.popen)
    return f"redis://{LOOPBACK}:{port}/0", proc


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind the run like Ctrl-C does, so the ``finally`` blocks stop the children."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
