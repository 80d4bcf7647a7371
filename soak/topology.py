"""The soak's Redis: one durable server, or a primary with two replicas behind a Sentinel.

With Sentinel the product waits for both replicas (``LEADSTAGE_REDIS_MIN_REPLICAS=2``): Sentinel
promotes the replica it last saw furthest ahead, which need not be one that confirmed a write, so
waiting for fewer than all of them can lose an acknowledged write (the soak found an add posted
twice that way).

Both answer the same questions (the URL the product is given, a client of the current primary,
a restart), so the run does not care which it has. With Sentinel, a "restart" is a failover: the
primary is SIGKILLed, Sentinel promotes a replica, the old primary comes back (its append-only
file intact) and Sentinel makes it a replica of the new one.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis
import redis.asyncio as aioredis
import redis.exceptions

from worker.core.processes import LOOPBACK, Children, RedisServer
from worker.core.redis_connection import connect_redis

#: The Sentinel's name for the soak's primary.
SERVICE = "leadstage-soak"
#: A full sync starts at once instead of waiting 5 s for more replicas (Redis' default).
FAST_SYNC = ("--repl-diskless-sync-delay", "0")


class SingleRedis:
    """One durable redis-server (``appendfsync always``), restarted by a crash or a SHUTDOWN."""

    def __init__(self, children: Children, data_dir: Path) -> None:
        self.server = RedisServer(children, data_dir, durable=True)
        self.restarts = 0

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.start()

    def client(self) -> aioredis.Redis:
        return connect_redis(self.url)

    def restart(self, *, crash: bool, down_s: float) -> str:
        self.server.restart(crash=crash, down_s=down_s)
        self.restarts += 1
        return "SIGKILL" if crash else "SIGTERM (SHUTDOWN)"


class ReplicatedRedis:
    """A durable primary, two durable replicas and one Sentinel (quorum 1) on loopback."""

    def __init__(self, children: Children, data_dir: Path) -> None:
        self.servers = [RedisServer(children, data_dir / "primary", durable=True, args=FAST_SYNC, name="redis-0")]
        primary = self.servers[0].port
        for index in (1, 2):
            self.servers.append(
                RedisServer(
                    children, data_dir / f"replica-{index}", durable=True, name=f"redis-{index}",
                    args=(*FAST_SYNC, "--replicaof", LOOPBACK, str(primary)),
                )
            )  # fmt: skip
        self.sentinel = RedisServer(
            children,
            data_dir / "sentinel",
            name="sentinel",
            sentinel=True,
            args=(
                f"sentinel monitor {SERVICE} {LOOPBACK} {primary} 1",
                f"sentinel down-after-milliseconds {SERVICE} 1000",
                f"sentinel failover-timeout {SERVICE} 5000",
            ),
        )
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis+sentinel://{LOOPBACK}:{self.sentinel.port}/{SERVICE}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        self.sentinel.start()
        deadline = time.monotonic() + 30
        while self._synced() < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the soak's replicas did not sync with their primary")
            time.sleep(0.1)

    def client(self) -> aioredis.Redis:
        return connect_redis(self.url)

    def restart(self, *, crash: bool, down_s: float) -> str:
        """A failover: the current primary dies; it comes back as a replica after ``down_s``."""
        old = self._primary()
        old.child.kill()
        deadline = time.monotonic() + 60
        while self._primary() is old:
            if time.monotonic() > deadline:
                raise RuntimeError("Sentinel did not promote a replica within 60 s")
            time.sleep(0.1)
        time.sleep(down_s)
        old.start()
        new = self._primary()
        # At once, not when Sentinel gets round to it (about 10 s): until then the product's writes
        # are not confirmed by every replica and wait (LEADSTAGE_REDIS_MIN_REPLICAS).
        deadline = time.monotonic() + 30
        with redis.Redis(host=LOOPBACK, port=old.port) as rejoined:
            while True:
                try:
                    rejoined.replicaof(LOOPBACK, new.port)
                    break
                except redis.exceptions.BusyLoadingError:  # still reading its append-only file
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        self.restarts += 1
        return f"failover from port {old.port} to {new.port}"

    def _primary(self) -> RedisServer:
        with redis.Redis(host=LOOPBACK, port=self.sentinel.port) as sentinel:
            address = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        port = int(address[1])
        return next(server for server in self.servers if server.port == port)

    def _synced(self) -> int:
        with redis.Redis(host=LOOPBACK, port=self.servers[0].port) as primary:
            info = primary.info("replication")
        return sum(1 for key, value in info.items() if key.startswith("slave") and value.get("state") == "online")
