"""Redis servers of a test's own, on free loopback ports: for tests that refuse writes, stall,
replicate or fail over a Redis, which must not disturb the shared test Redis.

Each is a child of the process toolkit (``worker.core.processes``), as the demo's, the benchmark's
and the soak's Redis are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from worker.core.processes import LOOPBACK, Child, free_port, wait_for_port


@dataclass
class RedisServer:
    """One redis-server process (or sentinel) and how to reach it."""

    port: int
    child: Child

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)

    def pause(self) -> None:
        """Stop the process (SIGSTOP): connections stay open and nothing answers."""
        self.child.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.child.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.resume()
        self.child.kill()


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
        config.write_text("\n".join((f"port {port}", f"bind {LOOPBACK}", f"dir {directory}", *args)) + "\n")
        command += [str(config), "--sentinel"]
    else:
        command += ["--port", str(port), "--bind", LOOPBACK, "--save", "", "--dir", str(directory), *args]
    server = RedisServer(port, Child(f"redis-{port}", command, dict(os.environ), directory / f"redis-{port}.log"))
    try:
        wait_for_port(port, 10, server.child.start().popen)
        if not sentinel:
            with server.client() as client:
                client.ping()
    except BaseException:
        server.kill()
        raise
    return server


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
            server.kill()
