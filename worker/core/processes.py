"""The process toolkit: child processes that are always stopped, free ports, and the signal wait.

Used by the demo (its own redis-server), the benchmark, the soak and the tests, so that each of
them starts, watches and stops children the same way:

* ``Children`` holds every child of a run; leaving it (normally, on an error, on Ctrl-C, or on
  SIGTERM inside ``sigterm_as_interrupt``) stops each by its own pid, newest first, SIGTERM and
  then SIGKILL after a grace period, so that a run never leaves a worker or a Redis behind.
* ``Child`` is one restartable process with its log file; ``RedisServer`` a private redis-server
  on a free loopback port (without persistence, or with every write fsynced for crash tests).
* ``until_signalled`` runs a coroutine until SIGINT or SIGTERM, the one way every long-running
  command of ``leadstage`` stops cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, TypeVar

from worker.core.errors import ProcessFailed

__all__ = [
    "LOOPBACK",
    "SOURCE_ROOT",
    "Child",
    "Children",
    "RedisServer",
    "cancel_until_done",
    "free_port",
    "python_module",
    "signalled",
    "sigterm_as_interrupt",
    "until_signalled",
    "wait_for_port",
]

LOOPBACK: Final = "127.0.0.1"
#: The directory holding the ``worker`` package: children import the same code from here
#: whatever their current directory (the checkout, when run from source).
SOURCE_ROOT: Final = Path(__file__).resolve().parents[2]
#: How long a stopped child may take after SIGTERM before it is killed.
DEFAULT_GRACE_S: Final = 5.0

_T = TypeVar("_T")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None, host: str = LOOPBACK
) -> None:
    """Until ``host:port`` accepts connections; ``ProcessFailed`` early if ``process`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        if process is not None and process.poll() is not None:
            raise ProcessFailed(f"the process for {host}:{port} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise ProcessFailed(f"nothing listens on {host}:{port} after {timeout:g} s")
        time.sleep(0.05)


def python_module(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@dataclass
class Child:
    """One child process and its log file; ``start`` runs ``argv`` again, appending to the same log."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    #: A session of its own: a Ctrl-C at the terminal reaches the parent only, which stops it in order.
    new_session: bool = False
    popen: subprocess.Popen[bytes] | None = None
    #: How many times it was started.
    starts: int = 0

    @property
    def pid(self) -> int:
        return -1 if self.popen is None else self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> Child:
        self.starts += 1
        with self.log_path.open("ab") as log:
            if self.starts > 1:
                log.write(f"--- start #{self.starts} of {self.name}\n".encode())
                log.flush()
            self.popen = subprocess.Popen(  # noqa: S603 - our interpreter or redis-server, fixed arguments
                list(self.argv),
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=SOURCE_ROOT,
                start_new_session=self.new_session,
            )
        return self

    def send_signal(self, signum: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None when still running after ``timeout``."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        """SIGKILL, and reap it (a crash: nothing of it runs after this returns)."""
        self.send_signal(signal.SIGKILL)
        return self.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its connections open and answers nothing until ``resume``."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def stop(self, grace: float = DEFAULT_GRACE_S) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status (None if it would not die)."""
        self.send_signal(signal.SIGTERM)
        status = self.wait(grace)
        return self.kill() if status is None else status

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Children:
    """Every child of a run; ``close`` (or leaving ``with``) stops them, newest first (workers before their Redis)."""

    log_dir: Path
    #: The environment children start from (default: this process's).
    env: Mapping[str, str] | None = None
    children: list[Child] = field(default_factory=list)

    def add(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *, new_session: bool = False
    ) -> Child:
        """A child, not started yet; ``env`` is added to the group's environment."""
        child_env = {**(os.environ if self.env is None else self.env), **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), child_env.get("PYTHONPATH", "")) if p)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child = Child(name, list(argv), child_env, self.log_dir / f"{name}.log", new_session=new_session)
        self.children.append(child)
        return child

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        return self.add(name, argv, env).start()

    def stop(self, child: Child, grace: float = DEFAULT_GRACE_S) -> int | None:
        """Stop one child and forget it; its exit status."""
        status = child.stop(grace)
        if child in self.children:
            self.children.remove(child)
        return status

    def close(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class RedisServer:
    """A private redis-server (or Sentinel) on a loopback port, in a directory of its own.

    ``durable`` turns on the append-only file with ``appendfsync always``: every write Redis
    acknowledged is on disk, so it survives a crash and a restart on the same port and directory.
    Without it nothing is persisted (a throw-away Redis for a demo, a benchmark or a test).
    ``args`` are added to the command line; with ``sentinel`` they are the lines of its
    configuration file instead (``sentinel monitor ...``), written to ``data_dir/sentinel.conf``.
    ``port`` is a free one unless given (a server that comes back where another was).
    """

    def __init__(
        self,
        children: Children,
        data_dir: Path,
        *,
        durable: bool = False,
        new_session: bool = False,
        args: Sequence[str] = (),
        name: str | None = None,
        port: int | None = None,
        sentinel: bool = False,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ProcessFailed("redis-server is not on PATH (apt-get install redis-server)")
        self.port = port or free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        if sentinel:
            config = data_dir / "sentinel.conf"
            config.write_text("\n".join((f"port {self.port}", f"bind {LOOPBACK}", f"dir {data_dir}", *args)) + "\n")
            argv = [binary, str(config), "--sentinel"]
        else:
            persistence = ("--appendonly", "yes", "--appendfsync", "always") if durable else ("--appendonly", "no")
            argv = [
                binary,
                "--bind",
                LOOPBACK,
                "--port",
                str(self.port),
                "--dir",
                str(data_dir),
                *persistence,
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                *args,
            ]
        self.child = children.add(name or f"redis-{self.port}", argv, new_session=new_session)
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until it accepts connections; ``ProcessFailed`` with its last log line if not."""
        self.child.start()
        try:
            wait_for_port(self.port, timeout, self.child.popen)
        except ProcessFailed as error:
            raise ProcessFailed(f"redis-server: {error}: {self.child.log_tail(1) or 'no log'}") from None

    def restart(self, *, crash: bool, down_s: float) -> None:
        """Crash (SIGKILL) or shut down (SIGTERM: Redis's graceful SHUTDOWN), stay down, start again."""
        if crash:
            self.child.kill()
        else:
            self.child.stop(grace=30)
        time.sleep(down_s)
        self.start()
        self.restarts += 1

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung Redis)."""
        self.child.pause()

    def resume(self) -> None:
        self.child.resume()

    def kill(self) -> None:
        """SIGKILL (a paused server too), and reap it."""
        self.child.kill()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind a synchronous run as Ctrl-C does, so that its ``finally`` blocks stop the children."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


async def until_signalled(work: Awaitable[_T]) -> _T | None:
    """``work`` until it ends, or until SIGINT/SIGTERM cancel it: its result, or None when a signal ended it.

    Cancelling ``work`` (rather than stopping the loop) lets its clean-up run: servers close,
    children stop, the worker finishes its requests in flight.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    stop = asyncio.Event()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        await cancel_until_done(task)
        return None if task.cancelled() else task.result()
    except asyncio.CancelledError:
        task.cancel()  # this coroutine itself was cancelled, not ``work`` by a signal: so is ``work``
        raise
    finally:
        stopped.cancel()
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def cancel_until_done(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every 0.1 s.

    redis-py (5.3, with a socket timeout) can lose a cancellation that lands while it reads: a
    single ``cancel()`` then leaves the task running (``leadstage results --follow`` ran on; a
    worker's heartbeat kept its shutdown waiting for good).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)


async def signalled() -> None:
    """Until SIGINT or SIGTERM arrives."""
    await until_signalled(asyncio.Event().wait())
