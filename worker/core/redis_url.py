"""``REDIS_URL`` taken apart: one parser for every form, without redis-py (the settings and the
one-shot enqueue of ``worker.core.resp`` use it before, or instead of, any client).

The forms (docs/contract.md, Configuration)::

    redis://[[user]:password@]host[:port][/db]           plain TCP (port 6379, database 0)
    rediss://[[user]:password@]host[:port][/db]          TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]  a Unix socket
    redis+sentinel://[:password@]host[:port][,host[:port]...]/service[/db]
                                                         Sentinel (port 26379, service mymaster)
    redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0]
    rediss+cluster://...                                 Redis Cluster (port 6379; database 0
                                                         only), plain or TLS: the hosts are where
                                                         the client first asks for the slot map

Messages name ``REDIS_URL`` and never repeat its password (``printable_url``). The clients are
``worker.core.redis_connection``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

from worker.core.errors import ConfigError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_PORT",
    "DEFAULT_SENTINEL_SERVICE",
    "TIMEOUT_S",
    "RedisTarget",
    "parse_redis_url",
    "printable_url",
    "single_server",
]

CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")
SCHEMES: Final = ("redis", "rediss", "unix", "redis+sentinel", *CLUSTER_SCHEMES)
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
    #: (host, port): the server for redis:// and rediss://, every Sentinel for redis+sentinel://,
    #: the nodes first asked for the slot map for redis+cluster://.
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
        return self.scheme in ("rediss", "rediss+cluster")

    @property
    def sentinel(self) -> bool:
        return self.scheme == "redis+sentinel"

    @property
    def cluster(self) -> bool:
        return self.scheme in CLUSTER_SCHEMES


def printable_url(url: str) -> str:
    """A URL fit for a message or a log line: without its user and password."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def parse_redis_url(url: str, name: str = "REDIS_URL") -> RedisTarget:
    """``url`` checked and taken apart; a ``ConfigError`` naming ``name`` and what is wrong otherwise."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(
            f"{name} must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL, "
            f"not {printable_url(url)!r}"
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
    if scheme in CLUSTER_SCHEMES:
        hosts = tuple(_host_port(where, h, DEFAULT_PORT) for h in netloc.split(",") if h)
        if not hosts:
            raise ConfigError(f"{where} names no cluster node")
        if _database(where, path.strip("/")) or database:
            raise ConfigError(f"{where}: a Redis Cluster has database 0 only")
        return RedisTarget(scheme, hosts, 0, user, secret)
    if "," in netloc:
        raise ConfigError(f"{where} names several hosts; only redis+sentinel:// and redis+cluster:// URLs may")
    host = _host_port(where, netloc or "localhost", DEFAULT_PORT)
    return RedisTarget(scheme, (host,), _database(where, path.strip("/")) or database or 0, user, secret)


def single_server(url: str) -> RedisTarget:
    """``parse_redis_url``, refusing a Redis Cluster: for a single server's client (``connect_redis``)
    and arq's connection settings (on a cluster arq gets ``worker.arq_pool``'s). Every command and
    service connects with ``connect_redis_or_cluster``, so only code that asked for a single Redis
    meets this refusal."""
    target = parse_redis_url(url)
    if target.cluster:
        raise ConfigError(
            f"REDIS_URL ({printable_url(url)}) names a Redis Cluster, and this client is a single Redis's "
            "(connect_redis); connect_redis_or_cluster connects to either (docs/architecture.md, Redis Cluster)"
        )
    return target


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
