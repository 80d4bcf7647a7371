"""Redis servers of a test's own, on free loopback ports: for tests that refuse writes, stall,
replicate or fail over a Redis, which must not disturb the shared test Redis."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.infra import free_port


@dataclass
class RedisServer:
    """One redis-server process (or sentinel) and how to reach it."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def pause(self) -> None:
        """Stop the process (SIGSTOP): connections stay open and nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.resume()
        self.process.kill()
        self.process.wait(10)


def start_redis(directory: Path, *args: str, sentinel: bool = False, port: int | None = None) -> RedisServer:
    """A redis-server on ``port`` (a free one by default), in ``directory``, answering PING before
    it is returned; with ``sentinel``, ``args`` are lines of its config file."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (scripts/setup.sh installs it)"
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    command = [binary]
    if sentinel:
        config = directory / "sentinel.conf"
        config.write_text("\n".join((f"port {port}", "bind 127.0.0.1", f"dir {directory}", *args)) + "\n")
        command += [str(config), "--sentinel"]
    else:
        command += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory), *args]
    log = (directory / f"redis-{port}.log").open("ab")
    process = subprocess.Popen(command, stdout=log, stderr=log)  # noqa: S603 - our own redis-server, fixed arguments
    server = RedisServer(port, process)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            if sentinel or server.client().ping():
                return server
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server on port {port} did not start: see {log.name}")
        time.sleep(0.05)


@contextlib.contextmanager
def redis_servers(directory: Path, *configs: Sequence[str]) -> Iterator[list[RedisServer]]:
    """Start one server per config (its extra arguments), stop them all at the end."""
    servers: list[RedisServer] = []
    try:
        for index, args in enumerate(configs):
            servers.append(start_redis(directory / str(index), *args))
        yield servers
    finally:
        for server in servers:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                server.kill()
