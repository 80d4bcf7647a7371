"""Redis servers of a test's own, on free loopback ports: for tests that refuse writes, stall,
replicate or fail over a Redis, which must not disturb the shared test Redis.

Each is the process toolkit's ``RedisServer`` (``worker.core.processes``), as the demo's, the
benchmark's and the soak's Redis are; this module adds a client and starting it in one call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis

from worker.core import processes
from worker.core.processes import LOOPBACK, Children


class RedisServer(processes.RedisServer):
    """A redis-server (or Sentinel) of the test's own, with a synchronous client."""

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)


def start_redis(directory: Path, *args: str, sentinel: bool = False, port: int | None = None) -> RedisServer:
    """A redis-server on ``port`` (a free one by default), in ``directory``, answering PING before
    it is returned; with ``sentinel``, ``args`` are lines of its config file."""
    server = RedisServer(Children(directory), directory, args=args, sentinel=sentinel, port=port)
    try:
        server.start(timeout=10)
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
