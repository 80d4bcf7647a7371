"""The soak's child processes: a restartable Redis with the append-only file on, the fake iVvy and
the workers, all on loopback, each stopped by its own pid when the run ends (also on Ctrl-C).

Workers and the fake run as ``python -m worker.cli ...`` (what ``leadstage`` runs), so a SIGKILL
is a real crash of a real process, and Redis is a real ``redis-server`` that can be crashed and
started again on the same port and data directory.
"""

from __future__ import annotations

import contextlib
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

LOOPBACK = "127.0.0.1"
#: The checkout: children import ``worker`` from here whatever the current directory.
REPO_ROOT = Path(__file__).resolve().parent.parent


class SoakError(RuntimeError):
    """The run cannot go on (a process does not start, Redis does not come back)."""


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Until ``port`` accepts connections; fails early if ``process`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
            return
        if process.poll() is not None:
            raise SoakError(f"the process for port {port} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise SoakError(f"nothing listens on {LOOPBACK}:{port} after {timeout:g}s")
        time.sleep(0.05)


@dataclass
class Child:
    """One child process, restartable: ``start`` runs ``argv`` again, appending to the same log."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    #: How many times it was started.
    starts: int = 0

    @property
    def pid(self) -> int:
        return -1 if self.popen is None else self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- soak: start #{self.starts} of {self.name}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(  # noqa: S603 - our interpreter or redis-server, fixed arguments
                list(self.argv), env=dict(self.env), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None when still running after ``timeout``."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL, and reap it (a crash: nothing of it runs after this returns)."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        self.signal(signal.SIGTERM)
        if self.wait(grace) is None:
            self.kill()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Children:
    """Every child of the run; ``close`` stops them, newest first (workers before their Redis)."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def add(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
        child = Child(name, list(argv), child_env, self.log_dir / f"{name}.log")
        self.children.append(child)
        return child

    def leadstage(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> Child:
        """``python -m worker.cli ARGS``: what the ``leadstage`` command runs, with this interpreter."""
        return self.add(name, [sys.executable, "-m", "worker.cli", *args], env)

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop(grace=5.0)


class RedisServer:
    """A private redis-server with ``appendonly yes`` and ``appendfsync always`` in a directory of its
    own: every write Redis acknowledged is on disk, so it survives a crash and a restart."""

    def __init__(self, children: Children, data_dir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SoakError("redis-server is not on PATH (apt-get install redis-server)")
        self.port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.child = children.add(
            "redis-server",
            [
                binary, "--bind", LOOPBACK, "--port", str(self.port), "--dir", str(data_dir),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--protected-mode", "yes",
            ],
        )  # fmt: skip
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        self.child.start()
        assert self.child.popen is not None
        wait_for_port(self.port, 30, self.child.popen)

    def restart(self, *, crash: bool, down_s: float) -> None:
        """Crash (SIGKILL) or shut down (SIGTERM: Redis's graceful SHUTDOWN), stay down, start again."""
        if crash:
            self.child.kill()
        else:
            self.child.stop(grace=30)
        time.sleep(down_s)
        self.start()
        self.restarts += 1


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds the run as Ctrl-C does, so that the ``finally`` blocks stop every child."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
