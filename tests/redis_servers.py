"""Redis servers of a test's own, on free loopback ports: for tests that refuse writes, stall,
replicate or fail over a Redis, which must not disturb the shared test Redis; and a Redis Cluster
of three masters, with or without replicas (``redis_cluster``), for the tests of ``redis+cluster://``.

Each is the process toolkit's ``RedisServer`` (``worker.core.processes``), as the demo's, the
benchmark's and the soak's Redis are; this module adds a client and starting it in one call.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from worker.core import processes
from worker.core.processes import LOOPBACK, Children, free_port


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


#: How long a new cluster may take until every node says cluster_state:ok.
CLUSTER_READY_S = 30.0


@dataclass
class RedisCluster:
    """A Redis Cluster on loopback, every slot assigned; ``replicas``: master port -> its replicas."""

    masters: list[RedisServer]
    replicas: dict[int, list[RedisServer]] = field(default_factory=dict)

    @property
    def servers(self) -> list[RedisServer]:
        return self.masters + [replica for replicas in self.replicas.values() for replica in replicas]

    @property
    def url(self) -> str:
        """``REDIS_URL`` naming every master (a client needs one that answers to find the rest)."""
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{server.port}" for server in self.masters) + "/"

    def flush(self) -> None:
        """Empty every master (FLUSHALL of this cluster's own servers, never of the shared Redis)."""
        for server in self.masters:
            with server.client() as client:
                client.flushall()


def start_redis_cluster(directory: Path, masters: int = 3, replicas: int = 0) -> RedisCluster:
    """``masters`` redis-servers, and ``replicas`` more for each, with ``--cluster-enabled yes`` on
    free ports (their cluster bus on free ports too), joined by ``redis-cli --cluster create``;
    returned once every node reports ``cluster_state:ok`` and knows every other, and every replica's
    link to its master is up."""
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli is not installed (it comes with redis-server: scripts/setup.sh)"
    servers: list[RedisServer] = []
    try:
        for index in range(masters * (1 + replicas)):
            port = free_port()
            servers.append(
                start_redis(
                    directory / f"node-{index}",
                    *("--cluster-enabled", "yes", "--cluster-port", str(free_port())),
                    *("--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000"),
                    port=port,
                )
            )
        create = [cli, "--cluster", "create", *(f"{LOOPBACK}:{s.port}" for s in servers)]
        subprocess.run(  # noqa: S603 - redis-cli with fixed arguments
            [*create, "--cluster-replicas", str(replicas), "--cluster-yes"], check=True, capture_output=True, timeout=60
        )
        _wait_for_cluster(servers)
        # redis-cli chooses which servers become masters: each says what it is.
        cluster = RedisCluster([])
        for server in servers:
            with server.client() as client:
                role = client.execute_command("ROLE")
            if role[0] == b"master":
                cluster.masters.append(server)
            else:
                cluster.replicas.setdefault(int(role[2]), []).append(server)
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return cluster


def _wait_for_cluster(servers: Sequence[RedisServer]) -> None:
    deadline = time.monotonic() + CLUSTER_READY_S
    while True:
        views = []
        for server in servers:
            with server.client() as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
                known = sum(1 for line in client.execute_command("CLUSTER", "NODES").decode().splitlines() if line)
                link = client.info("replication").get("master_link_status", "up")  # a master has none
            views.append("cluster_state:ok" in info and known == len(servers) and link == "up")
        if all(views):
            return
        assert time.monotonic() < deadline, f"the cluster was not ready within {CLUSTER_READY_S:g} s: {views}"
        time.sleep(0.1)


@contextlib.contextmanager
def redis_cluster(directory: Path, masters: int = 3, replicas: int = 0) -> Iterator[RedisCluster]:
    """A cluster of ``masters`` with ``replicas`` each (``start_redis_cluster``), every server
    stopped at the end."""
    cluster = start_redis_cluster(directory, masters, replicas)
    try:
        yield cluster
    finally:
        for server in cluster.servers:
            server.kill()
