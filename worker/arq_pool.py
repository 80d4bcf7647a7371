"""arq's pool for ``leadstage worker``: arq's own from REDIS_URL on a single Redis, an adapter over a
cluster client on a Redis Cluster.

arq 0.28's Worker uses its pool for little once the worker replaces its poll (``worker.runner``):
the start-up line (``log_redis_info``: INFO and DBSIZE in a pipeline), its health-check key
(PSETEX, DELETE), ZCARD of its queue and ``close``. On a cluster each of those names one key or
none, so ``ClusterPool`` sends them through a ``RedisCluster``: the keyed ones to their slot's
master, INFO and DBSIZE to one node (the start-up line describes that node).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, cast

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio.cluster import RedisCluster

from worker.core.redis_connection import connect_redis_or_cluster_of
from worker.core.redis_url import DEFAULT_PORT, DEFAULT_SENTINEL_SERVICE, parse_redis_url, single_server
from worker.core.settings import Settings


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings from REDIS_URL, parsed as every other client parses it (a single
    Redis or Sentinel's primary: a cluster URL is a ``ConfigError``, its pool is ``cluster_pool``)."""
    target = single_server(url)
    if target.sentinel:
        return RedisSettings(
            host=list(target.hosts),
            sentinel=True,
            sentinel_master=target.service or DEFAULT_SENTINEL_SERVICE,
            password=target.password,
            database=target.database,
        )
    host, port = target.hosts[0] if target.hosts else ("localhost", DEFAULT_PORT)
    return RedisSettings(
        host=host,
        port=port,
        unix_socket_path=target.socket_path,
        database=target.database,
        username=target.username,
        password=target.password,
        ssl=target.tls,
    )


def cluster_pool(settings: Settings) -> ArqRedis | None:
    """For a redis+cluster:// URL, the pool arq's Worker is given (``ClusterPool``, typed as what arq
    takes); None on a single Redis (arq makes its own)."""
    if not parse_redis_url(settings.redis_url).cluster:
        return None
    cluster = connect_redis_or_cluster_of(settings)
    assert isinstance(cluster, RedisCluster)
    return cast(ArqRedis, ClusterPool(cluster))


class ClusterPool:
    """The calls arq 0.28's Worker makes on its pool, on a cluster client (``cluster``)."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster

    def pipeline(self, transaction: bool = True) -> _InfoPipeline:
        return _InfoPipeline(self.cluster)

    async def zcard(self, name: str) -> int:
        return int(await self.cluster.zcard(name))

    async def psetex(self, name: str, time_ms: int, value: bytes) -> Any:
        return await self.cluster.psetex(name, time_ms, value)

    async def delete(self, *names: str) -> int:
        return int(await self.cluster.delete(*names))

    async def close(self, close_connection_pool: bool | None = None) -> None:
        await self.cluster.aclose()


class _InfoPipeline:
    """``log_redis_info``'s pipeline: INFO sections and DBSIZE, of one node."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._sections: list[str | None] = []

    async def __aenter__(self) -> _InfoPipeline:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        return None

    def info(self, section: str | None = None) -> None:
        self._sections.append(section)

    def dbsize(self) -> None:
        self._sections.append(None)

    async def execute(self) -> list[Any]:
        node = self.cluster.get_default_node()
        replies: list[Any] = [await self.cluster.info(section, target_nodes=node) for section in self._sections[:-1]]
        replies.append(await self.cluster.dbsize(target_nodes=node))
        return replies
