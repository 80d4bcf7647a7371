"""worker.core.redis_connection: every REDIS_URL form, parsed once for the worker, the library, the CLI, the webhook."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from worker.core.errors import ConfigError, RedisCredentialsRefused, RedisUnavailable
from worker.core.processes import free_port
from worker.core.redis_connection import RedisTarget, connect_redis, parse_redis_url, ping, printable_url
from worker.runner import redis_settings

URLS = [
    ("redis://localhost", RedisTarget("redis", (("localhost", 6379),))),
    ("redis://", RedisTarget("redis", (("localhost", 6379),))),
    ("redis://cache:6380/2", RedisTarget("redis", (("cache", 6380),), 2)),
    ("redis://cache?db=4", RedisTarget("redis", (("cache", 6379),), 4)),
    ("redis://:pa%40ss@cache/1", RedisTarget("redis", (("cache", 6379),), 1, None, "pa@ss")),
    ("redis://user:pw@cache", RedisTarget("redis", (("cache", 6379),), 0, "user", "pw")),
    ("redis://[::1]:7000/0", RedisTarget("redis", (("::1", 7000),))),
    ("rediss://:pw@cache.example:6380/3", RedisTarget("rediss", (("cache.example", 6380),), 3, None, "pw")),
    ("unix:///run/redis.sock", RedisTarget("unix", (), 0, socket_path="/run/redis.sock")),
    ("unix://:pw@/run/redis.sock?db=5", RedisTarget("unix", (), 5, None, "pw", socket_path="/run/redis.sock")),
    (
        "redis+sentinel://s1,s2:26380/cache",
        RedisTarget("redis+sentinel", (("s1", 26379), ("s2", 26380)), service="cache"),
    ),
    (
        "redis+sentinel://:pw@s1:5000/cache/2",
        RedisTarget("redis+sentinel", (("s1", 5000),), 2, None, "pw", service="cache"),
    ),
    ("redis+sentinel://s1", RedisTarget("redis+sentinel", (("s1", 26379),), service="mymaster")),
]


@pytest.mark.parametrize(("url", "target"), URLS)
def test_every_form_is_parsed(url: str, target: RedisTarget) -> None:
    assert parse_redis_url(url) == target


BAD = [
    ("http://cache:6379", r"REDIS_URL must be a redis://, rediss://, unix:// or redis\+sentinel:// URL"),
    ("cache:6379", r"must be a redis://"),
    ("redis://cache:port/0", r"the port must be a number 1..65535, not 'port'"),
    ("redis://cache:0", r"the port must be a number 1..65535, not '0'"),
    ("redis://cache:70000", r"the port must be a number 1..65535"),
    ("redis://cache/first", r"the database must be a whole number, not 'first'"),
    ("redis://a,b/0", r"names several hosts; only redis\+sentinel:// URLs may"),
    ("unix://relative.sock", r"must name the socket's absolute path"),
    ("redis+sentinel:///cache", r"names no Sentinel host"),
]


@pytest.mark.parametrize(("url", "message"), BAD)
def test_a_bad_url_is_a_config_error_without_its_password(url: str, message: str) -> None:
    with_password = url.replace("://", "://:hunter2@", 1) if "://" in url else url
    with pytest.raises(ConfigError, match=message) as refusal:
        parse_redis_url(with_password)
    assert "hunter2" not in str(refusal.value)


@pytest.mark.parametrize(
    ("url", "printable"),
    [
        ("redis://:pw@cache:6379/0", "redis://cache:6379/0"),
        ("rediss://user:pw@cache/1", "rediss://cache/1"),
        ("redis+sentinel://:pw@s1,s2/cache", "redis+sentinel://s1,s2/cache"),
        ("unix://:pw@/run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_printable_url_drops_the_credentials(url: str, printable: str) -> None:
    assert printable_url(url) == printable


def test_the_worker_reads_the_same_url_as_everyone() -> None:
    plain = redis_settings("rediss://user:pw@cache:6380/3")
    assert (plain.host, plain.port, plain.database, plain.username, plain.password, plain.ssl) == (
        "cache",
        6380,
        3,
        "user",
        "pw",
        True,
    )
    sentinel = redis_settings("redis+sentinel://:pw@s1,s2:26380/cache/2")
    assert (sentinel.host, sentinel.sentinel, sentinel.sentinel_master, sentinel.password, sentinel.database) == (
        [("s1", 26379), ("s2", 26380)],
        True,
        "cache",
        "pw",
        2,
    )
    socket = redis_settings("unix:///run/redis.sock?db=1")
    assert (socket.unix_socket_path, socket.database) == ("/run/redis.sock", 1)


async def test_a_client_for_each_form_is_made_without_io() -> None:
    for url in ("redis://cache/1", "rediss://cache/1", "unix:///run/redis.sock", "redis+sentinel://s1/cache"):
        client = connect_redis(url)
        assert isinstance(client, aioredis.Redis)
        await client.aclose()


async def test_ping_translates_redis_errors(redis_url: str) -> None:
    client = connect_redis(redis_url)
    try:
        await ping(client, 5)
    finally:
        await client.aclose()
    down = connect_redis(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(RedisUnavailable):
            await ping(down, 5)
    finally:
        await down.aclose()
    wrong = connect_redis(redis_url.replace("redis://", "redis://nobody:wrong@"))
    try:
        with pytest.raises(RedisCredentialsRefused, match="refused the credentials"):
            await ping(wrong, 5)
    finally:
        await wrong.aclose()
