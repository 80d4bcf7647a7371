"""worker.core.resp, the one-shot enqueue's RESP client, against the test Redis and servers that are not Redis."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from worker.core.errors import ConfigError, RedisUnavailable, RespErrorReply, RespProtocolError, redis_errors
from worker.core.redis_url import parse_redis_url
from worker.core.resp import RespConnection, encode, handles


@pytest.fixture
def connection(redis_url: str) -> Iterator[RespConnection]:
    """A connection to this session's test database (SELECTed by the handshake)."""
    opened = RespConnection.connect(parse_redis_url(redis_url), timeout_s=5, connect_timeout_s=5)
    with contextlib.closing(opened):
        yield opened


def test_replies_of_every_kind_come_back_as_redis_sent_them(connection: RespConnection) -> None:
    """Nested arrays, nil (in an array and alone), integers, bulk strings holding CRLF and bytes
    that are not UTF-8, simple strings, and error replies in their place, not raised."""
    key = "leadstage-test:resp:codec"
    value = b"line one\r\nline two\r\n\x00\xff"
    script = "return {1, {2, {'deep', ARGV[1]}}, false, -7, redis.error_reply('NESTED inside an array')}"
    replies = connection.pipeline(
        [
            ("SET", key, value),
            ("GET", key),
            ("GET", key + ":absent"),
            ("INCRBY", key + ":n", -5),
            ("EVAL", script, 0, value),
            ("EVAL", "return redis.error_reply('OOPS a top-level error')", 0),
            ("HGET", key, "field"),
            ("DEL", key, key + ":n"),
        ]
    )
    assert replies[:4] == [b"OK", value, None, -5]
    deep, wrongtype = replies[4], replies[6]
    assert isinstance(deep, list)
    assert deep[:4] == [1, [2, [b"deep", value]], None, -7]
    assert isinstance(deep[4], RespErrorReply)
    assert str(deep[4]) == "NESTED inside an array"
    assert isinstance(replies[5], RespErrorReply)
    assert str(replies[5]) == "OOPS a top-level error"
    assert isinstance(wrongtype, RespErrorReply)
    assert str(wrongtype).startswith("WRONGTYPE")
    assert replies[7] == 2
    # The connection is still in step: the next reply is the next command's.
    assert connection.pipeline([("PING",), ("ECHO", "")]) == [b"PONG", b""]


def test_a_command_is_encoded_as_an_array_of_bulk_strings() -> None:
    assert encode(("SET", b"k\r\n", 12)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"
    assert encode(("ECHO", "é")) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"


def test_the_database_of_the_url_is_selected(redis_url: str, connection: RespConnection) -> None:
    database = parse_redis_url(redis_url).database
    assert database != 0  # the test sessions use 1..15
    (clients,) = connection.pipeline([("CLIENT", "INFO")])
    assert isinstance(clients, bytes)
    assert f" db={database} " in clients.decode()


@contextlib.contextmanager
def answering(answer: bytes) -> Iterator[str]:
    """A TCP server that answers every connection's first request with ``answer``; yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                with client:
                    client.recv(65536)
                    client.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"*x\r\n", b"$3\r\nabcd\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b":1.5\r\n"],
)
def test_a_server_that_is_not_redis_is_a_protocol_error_and_a_config_error(answer: bytes) -> None:
    with answering(answer) as url:
        with pytest.raises(RespProtocolError):
            RespConnection.connect(parse_redis_url(url), timeout_s=5, connect_timeout_s=5)
        with pytest.raises(ConfigError, match="what answers there is not Redis"), redis_errors():
            RespConnection.connect(parse_redis_url(url), timeout_s=5, connect_timeout_s=5)


def test_a_server_that_closes_or_is_not_there_is_redis_unavailable() -> None:
    closing = answering(b"")
    with closing as url, pytest.raises(RedisUnavailable, match="Redis is unavailable: ConnectionError"), redis_errors():
        RespConnection.connect(parse_redis_url(url), timeout_s=5, connect_timeout_s=5)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening: refused
        url = f"redis://127.0.0.1:{unused.getsockname()[1]}/0"
        with pytest.raises(RedisUnavailable, match="Redis is unavailable: ConnectionError"), redis_errors():
            RespConnection.connect(parse_redis_url(url), timeout_s=5, connect_timeout_s=5)


def test_a_server_that_says_nothing_is_a_timeout_of_the_command_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    with listener:
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        with pytest.raises(TimeoutError, match="Timeout reading"):
            RespConnection.connect(parse_redis_url(url), timeout_s=0.2, connect_timeout_s=5)


@pytest.mark.parametrize(
    ("url", "handled"),
    [
        ("redis://localhost:6379/2", True),
        ("rediss://:password@cache:6380?db=3", True),
        ("unix:///run/redis.sock?db=1", True),
        ("redis://localhost/0?ssl_cert_reqs=none", False),  # an option only redis-py knows
        ("rediss://cache/0?ssl_ca_certs=/etc/ca.pem", False),
        ("redis+sentinel://s1,s2/mymaster/0", False),
        ("redis+cluster://n1:7000,n2:7001", False),
    ],
)
def test_only_urls_the_client_can_serve_as_redis_py_would_are_handled(url: str, handled: bool) -> None:
    assert handles(url) is handled
