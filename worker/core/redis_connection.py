"""Redis clients from ``REDIS_URL``: one client factory, one probe (the URL's parser is
``worker.core.redis_url``).

The worker (arq's settings, ``worker.runner``), the producer library, the command line, the
webhook, the console and the demo all connect through here, so a URL means the same to each of
them; only the single ``leadstage enqueue`` talks to a plain or TLS Redis without redis-py
(``worker.core.resp``), from the same parsed URL.

Two factories, so that the type checker knows which code may meet a cluster: ``connect_redis``
gives a single-server client (``aioredis.Redis``) and refuses a cluster URL with a ``ConfigError``
(for code that needs one server: the soak's topologies, the tests of a failover); ``connect_redis_or_cluster``
gives a ``RedisClient``, a cluster client for a cluster URL, to everything the product runs (the
worker, the producer library, every command, the webhook, the console, the demo, the readers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import Sentinel

from worker.core.errors import ConfigError, RedisUnavailable, redis_errors
from worker.core.redis_url import (
    CONNECT_TIMEOUT_S,
    DEFAULT_SENTINEL_SERVICE,
    TIMEOUT_S,
    parse_redis_url,
    single_server,
)

if TYPE_CHECKING:
    from worker.core.settings import Settings

__all__ = [
    "RedisClient",
    "acquire_connection",
    "connect_redis",
    "connect_redis_or_cluster",
    "connect_redis_or_cluster_of",
    "ping",
]

#: A client of a single Redis (plain, TLS, socket, Sentinel's primary) or of a Redis Cluster.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster


async def close_sentinels(client: aioredis.Redis) -> None:
    """Close the connections to the Sentinels a Sentinel-managed client asked for its primary
    (redis-py's ``aclose`` closes only the primary's pool; arq's pool is one of these too)."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


class SentinelManagedRedis(aioredis.Redis):
    """A client of the Sentinels' current primary that closes its Sentinel connections with itself."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await close_sentinels(self)


def connect_redis(
    url: str, *, timeout_s: float = TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> aioredis.Redis:
    """A Redis client for ``url`` (any form above); lazy, no I/O. Responses stay bytes. Every
    command waits ``timeout_s`` for its answer at most, a connection ``connect_timeout_s``.

    A URL that is not usable is a ``ConfigError`` naming REDIS_URL, without its password; so is a
    Redis Cluster's (``connect_redis_or_cluster`` connects to one).
    """
    target = single_server(url)
    if target.sentinel:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            list(target.hosts),
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            password=target.password,
            db=target.database,
        )
        client: aioredis.Redis = sentinel.master_for(
            target.service or DEFAULT_SENTINEL_SERVICE, redis_class=SentinelManagedRedis
        )
        return client
    try:
        plain: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s
        )
    except ValueError as exc:  # a query option redis-py does not know
        reason = str(exc)
        if target.password:
            reason = reason.replace(target.password, "***")
        raise ConfigError(f"REDIS_URL is not a usable Redis URL: {reason}") from None
    return plain


def connect_redis_or_cluster(
    url: str, *, timeout_s: float = TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> RedisClient:
    """``connect_redis``, or for a redis+cluster:// URL a cluster client: it asks the first node
    that answers for the slot map (on its first command: no I/O here), sends each command to the
    master of its key's slot and follows MOVED and ASK redirections. Responses stay bytes."""
    target = parse_redis_url(url)
    if not target.cluster:
        return connect_redis(url, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    cluster: RedisCluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        username=target.username,
        password=target.password,
        ssl=target.tls,
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_timeout_s,
    )
    cluster.nodes_manager = _SeededNodes(target.hosts, cluster.nodes_manager)
    return cluster


class _SeededNodes(NodesManager):
    """redis-py's map of a cluster's nodes, which asks REDIS_URL's nodes for the slot map again when
    it has forgotten every node it knew.

    redis-py 5.3 drops a node from those it asks for the slot map when a command to it fails to
    connect, and closes every connection; the commands in flight to the other masters then fail the
    same way and drop theirs (a PING of every master, as /readyz sends, does it at once). Once none
    is left, every later command is "Redis Cluster cannot be connected" without asking anyone: a
    master killed and back would leave the client dead for good.
    """

    __slots__ = ("seeds",)

    def __init__(self, seeds: tuple[tuple[str, int], ...], manager: NodesManager) -> None:
        super().__init__(
            list(manager.startup_nodes.values()),
            manager.require_full_coverage,
            manager.connection_kwargs,
            address_remap=manager.address_remap,
            event_dispatcher=manager._event_dispatcher,  # the client's own, shared with its nodes
        )
        self.seeds = seeds

    async def initialize(self) -> None:
        if not self.startup_nodes:
            for host, port in self.seeds:
                node = ClusterNode(host, port, **self.connection_kwargs)
                self.startup_nodes[node.name] = node
        await super().initialize()


def connect_redis_of(settings: Settings) -> aioredis.Redis:
    """``connect_redis`` with the URL and the timeouts of ``settings``."""
    return connect_redis(
        settings.redis_url, timeout_s=settings.redis_timeout_s, connect_timeout_s=settings.redis_connect_timeout_s
    )


def connect_redis_or_cluster_of(settings: Settings) -> RedisClient:
    """``connect_redis_or_cluster`` with the URL and the timeouts of ``settings``."""
    return connect_redis_or_cluster(
        settings.redis_url, timeout_s=settings.redis_timeout_s, connect_timeout_s=settings.redis_connect_timeout_s
    )


async def ping(client: RedisClient, timeout_s: float) -> None:
    """PING within ``timeout_s`` (on a cluster, every master: one that does not answer leaves its
    accounts' slots unserved); ``RedisUnavailable`` when Redis does not answer (``RedisCredentialsRefused``
    when it refuses REDIS_URL's credentials)."""
    try:
        async with asyncio.timeout(timeout_s):
            with redis_errors():
                if isinstance(client, RedisCluster):
                    await client.ping(target_nodes=RedisCluster.PRIMARIES)
                else:
                    await client.ping()
    except TimeoutError:
        raise RedisUnavailable(f"Redis did not answer within {timeout_s:g} s") from None


async def acquire_connection(client: RedisClient, key: str) -> tuple[Connection, Callable[[], Awaitable[None]]]:
    """A connection of its own to the server that holds ``key`` (a single Redis: one of its pool's; a
    cluster: one of the key's master's), for commands that must share one connection (``WAIT`` counts
    the replicas of its own connection's writes; a pipelined bulk); and how to give it back."""
    if not isinstance(client, RedisCluster):
        pool = client.connection_pool
        connection = await pool.get_connection()

        async def give_back() -> None:
            await pool.release(connection)  # type: ignore[misc]  # redis-py types it sync or async

        return connection, give_back
    await client.initialize()  # the slot map, asked once
    node = client.get_node_from_key(key)
    assert node is not None  # a master, never None (only a replica may be missing)
    plain = node.acquire_connection()

    async def release() -> None:
        node._free.append(plain)  # what ClusterNode.execute_command does with its connection

    return plain, release
