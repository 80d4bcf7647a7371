"""Redis connections from ``REDIS_URL``: one parser for every form, one client factory, one probe.

The forms (docs/contract.md, Configuration)::

    redis://[[user]:password@]host[:port][/db]           plain TCP (port 6379, database 0)
    rediss://[[user]:password@]host[:port][/db]          TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]  a Unix socket
    redis+sentinel://[:password@]host[:port][,host[:port]...]/service[/db]
                                                         Sentinel (port 26379, service mymaster)

The worker (arq's settings, ``worker.runner``), the producer library, the command line and the
webhook all connect through here, so a URL means the same to each of them. Messages name
``REDIS_URL`` and never repeat its password (``printable_url``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from worker.core.errors import ConfigError, RedisUnavailable, redis_errors

if TYPE_CHECKING:
    from worker.core.settings import Settings

__all__ = ["RedisTarget", "connect_redis", "parse_redis_url", "ping", "printable_url"]

SCHEMES: Final = ("redis", "rediss", "unix", "redis+sentinel")
DEFAULT_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379
DEFAULT_SENTINEL_SERVICE: Final = "mymaster"
#: A connection attempt to Redis gives up after this long (an unroutable host would hang otherwise).
CONNECT_TIMEOUT_S: Final = 5.0
#: How long a command waits for its answer by default (LEADSTAGE_REDIS_TIMEOUT): a hung Redis is an
#: error, not a hang. Blocking reads must block for less (the readers block 2 s at a time).
TIMEOUT_S: Final = 5.0


@dataclass(frozen=True)
class RedisTarget:
    """What a ``REDIS_URL`` names: the scheme, where to connect, which database, as whom."""

    scheme: str
    #: (host, port): the server for redis:// and rediss://, every Sentinel for redis+sentinel://.
    hosts: tuple[tuple[str, int], ...] = ()
    database: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: The socket of a unix:// URL.
    socket_path: str | None = None
    #: The Sentinel service (master) name of a redis+sentinel:// URL.
    service: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def sentinel(self) -> bool:
        return self.scheme == "redis+sentinel"


def printable_url(url: str) -> str:
    """A URL fit for a message or a log line: without its user and password."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def parse_redis_url(url: str, name: str = "REDIS_URL") -> RedisTarget:
    """``url`` checked and taken apart; a ``ConfigError`` naming ``name`` and what is wrong otherwise."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(
            f"{name} must be a redis://, rediss://, unix:// or redis+sentinel:// URL, not {printable_url(url)!r}"
        )
    where = f"{name} ({printable_url(url)})"
    auth, at, location = rest.rpartition("@")
    username, _, password = auth.partition(":") if at else ("", "", "")
    location, _, query = location.partition("?")
    database = _database(where, parse_qs(query).get("db", [None])[0])
    user, secret = unquote(username) or None, unquote(password) or None
    if scheme == "unix":
        if not location.startswith("/") or location == "/":
            raise ConfigError(f"{where} must name the socket's absolute path, as unix:///run/redis.sock")
        return RedisTarget(scheme, (), database or 0, user, secret, socket_path=location)
    netloc, _, path = location.partition("/")
    if scheme == "redis+sentinel":
        service, _, db = path.partition("/")
        hosts = tuple(_host_port(where, h, DEFAULT_SENTINEL_PORT) for h in netloc.split(",") if h)
        if not hosts:
            raise ConfigError(f"{where} names no Sentinel host")
        database = _database(where, db) or database or 0
        return RedisTarget(scheme, hosts, database, user, secret, service=service or DEFAULT_SENTINEL_SERVICE)
    if "," in netloc:
        raise ConfigError(f"{where} names several hosts; only redis+sentinel:// URLs may")
    host = _host_port(where, netloc or "localhost", DEFAULT_PORT)
    return RedisTarget(scheme, (host,), _database(where, path.strip("/")) or database or 0, user, secret)


def _host_port(where: str, text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not port:
        return host or "localhost", default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: the port must be a number 1..65535, not {port!r}")
    return host or "localhost", int(port)


def _database(where: str, text: str | None) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise ConfigError(f"{where}: the database must be a whole number, not {text!r}")
    return int(text)


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

    A URL that is not usable is a ``ConfigError`` naming REDIS_URL, without its password.
    """
    target = parse_redis_url(url)
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


def connect_redis_of(settings: Settings) -> aioredis.Redis:
    """``connect_redis`` with the URL and the timeouts of ``settings``."""
    return connect_redis(
        settings.redis_url, timeout_s=settings.redis_timeout_s, connect_timeout_s=settings.redis_connect_timeout_s
    )


async def ping(client: aioredis.Redis, timeout_s: float) -> None:
    """PING within ``timeout_s``; ``RedisUnavailable`` when Redis does not answer (``RedisCredentialsRefused``
    when it refuses REDIS_URL's credentials)."""
    try:
        async with asyncio.timeout(timeout_s):
            with redis_errors():
                await client.ping()
    except TimeoutError:
        raise RedisUnavailable(f"Redis did not answer within {timeout_s:g} s") from None
