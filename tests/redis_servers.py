"""Redis servers of a test's own, on free loopback ports: for tests that refuse writes, stall,
replicate or fail over a Redis, which must not disturb the shared test Redis; and a Redis Cluster
of three masters (``redis_cluster``) for the tests of ``redis+cluster://``.

Each is a child of the process toolkit (``worker.core.processes``), as the demo's, the benchmark's
and the soak's Redis are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
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


#: How long a new cluster may take until every node says cluster_state:ok.
CLUSTER_READY_S = 30.0


@dataclass
class RedisCluster:
    """A Redis Cluster of masters without replicas on loopback, every slot assigned."""

    masters: list[RedisServer]

    @property
    def url(self) -> str:
        """``REDIS_URL`` naming every master (a client needs one that answers to find the rest)."""
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{server.port}" for server in self.masters) + "/"

    def flush(self) -> None:
        """Empty every master (FLUSHALL of this cluster's own servers, never of the shared Redis)."""
        for server in self.masters:
            with server.client() as client:
                client.flushall()


def start_redis_cluster(directory: Path, masters: int = 3) -> RedisCluster:
    """``masters`` redis-servers with ``--cluster-enabled yes`` on free ports (their cluster bus on
    free ports too), joined by ``redis-cli --cluster create``; returned once every node reports
    ``cluster_state:ok`` and knows every master."""
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli is not installed (it comes with redis-server: scripts/setup.sh)"
    servers: list[RedisServer] = []
    try:
        for index in range(masters):
            port = free_port()
            servers.append(
                start_redis(
                    directory / f"node-{index}",
                    *("--cluster-enabled", "yes", "--cluster-port", str(free_port())),
                    *("--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000"),
                    *("--appendonly", "no"),
                    port=port,
                )
            )
        create = [cli, "--cluster", "create", *(f"{LOOPBACK}:{s.port}" for s in servers)]
        subprocess.run(  # noqa: S603 - redis-cli with fixed arguments
            [*create, "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60
        )
        _wait_for_cluster(servers)
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return RedisCluster(servers)


def _wait_for_cluster(servers: Sequence[RedisServer]) -> None:
    deadline = time.monotonic() + CLUSTER_READY_S
    while True:
        views = []
        for server in servers:
            with server.client() as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
                known = sum(1 for line in client.execute_command("CLUSTER", "NODES").decode().splitlines() if line)
            views.append("cluster_state:ok" in info and known == len(servers))
        if all(views):
            return
        assert time.monotonic() < deadline, f"the cluster was not ready within {CLUSTER_READY_S:g} s: {views}"
        time.sleep(0.1)


@contextlib.contextmanager
def redis_cluster(directory: Path, masters: int = 3) -> Iterator[RedisCluster]:
    """A cluster of ``masters`` (``start_redis_cluster``), every server stopped at the end."""
    cluster = start_redis_cluster(directory, masters)
    try:
        yield cluster
    finally:
        for server in cluster.masters:
            server.kill()
