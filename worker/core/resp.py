"""A minimal synchronous Redis client (RESP2), for the single ``leadstage enqueue`` only.

Why it exists: a shell loop runs ``leadstage enqueue`` once per change, so the command's start-up
is most of its cost, and importing redis-py (its package loads the asyncio client, the cluster
client, JWT auth and importlib.metadata) and asyncio took more than half of that start-up. A
single enqueue needs only a socket: one round trip to connect (AUTH, SELECT), one for the script
call and what goes with it (``worker.core.one_shot``).

What it does: connect to a plain, TLS or Unix-socket Redis named by ``REDIS_URL`` (TLS as
redis-py does it by default: the certificate checked against the system's CAs, or
``SSL_CERT_FILE``, the host name not), within the connect timeout; send a few commands in one
write and read their replies in order, each within the command timeout. Replies are bytes,
ints, None and lists; an error reply is a ``RespErrorReply`` in its place, not raised.

What it does not do: RESP3, Sentinel, Redis Cluster (redirections), pub/sub, pools, reconnects
or retries, nor any URL option but the database (``?ssl_ca_certs=...`` and the like): ``handles``
says no, and those URLs take redis-py's path. Its failures are ``ConnectionError`` and
``TimeoutError`` (as redis-py names them; "Timeout connecting" while connecting), and
``RespProtocolError`` when what answers is not Redis: ``worker.core.errors.redis_errors``
translates them, as it does redis-py's.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TypeAlias
from urllib.parse import parse_qs, urlsplit

from worker.core.errors import RespErrorReply, RespProtocolError
from worker.core.redis_url import RedisTarget, parse_redis_url

__all__ = ["Arg", "Reply", "RespConnection", "encode", "handles"]

#: What a command's arguments may be (an int is sent as its digits).
Arg: TypeAlias = bytes | str | int
#: A reply: a bulk or simple string (bytes), an integer, nil (None), an array, or an error reply.
Reply: TypeAlias = "bytes | int | list[Reply] | RespErrorReply | None"
#: A line of a reply longer than this is not Redis talking (a stream of bytes without CRLF).
MAX_LINE = 1 << 20


def handles(url: str) -> bool:
    """Whether this client can talk to ``REDIS_URL`` (checked by the settings) as redis-py would: a
    single Redis (not Sentinel nor a cluster) and no URL option but ``db``."""
    scheme = parse_redis_url(url).scheme
    return scheme in ("redis", "rediss", "unix") and set(parse_qs(urlsplit(url).query)) <= {"db"}


def encode(command: Sequence[Arg]) -> bytes:
    """One command as RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out += [b"$%d\r\n" % len(data), data, b"\r\n"]
    return b"".join(out)


class RespConnection:
    """One connection to a Redis (``connect``), closed by ``close`` or at the end of ``with``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    @classmethod
    def connect(cls, target: RedisTarget, *, timeout_s: float, connect_timeout_s: float) -> RespConnection:
        """Connected, authenticated and in the URL's database (their errors raised), or a failure;
        nothing but AUTH, SELECT or a PING has been sent."""
        where = target.socket_path or "{}:{}".format(*target.hosts[0])
        try:
            if target.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(connect_timeout_s)
                sock.connect(target.socket_path)
            else:
                sock = socket.create_connection(target.hosts[0], timeout=connect_timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if target.tls:
                    sock = _tls(sock, target.hosts[0][0])
        except TimeoutError:
            raise TimeoutError(f"Timeout connecting to server {where}") from None
        except OSError as exc:
            raise ConnectionError(f"Error connecting to {where}: {exc}") from exc
        sock.settimeout(timeout_s)
        connection = cls(sock)
        try:
            # The first round trip: a Redis that answers it is there before anything is written.
            for reply in connection.pipeline(_handshake(target)):
                if isinstance(reply, RespErrorReply):
                    raise reply
        except BaseException:
            connection.close()
            raise
        return connection

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """``commands`` in one write, then their replies in order (an error reply in its place)."""
        self._send(b"".join(encode(command) for command in commands))
        return [self._reply() for _ in commands]

    def close(self) -> None:
        self._sock.close()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise TimeoutError("Timeout writing to server") from None
        except OSError as exc:
            raise ConnectionError(f"Error writing to server: {exc}") from exc

    def _reply(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespErrorReply(rest.decode(errors="replace"))
        if kind in (b":", b"$", b"*") and rest.removeprefix(b"-").isdigit():
            number = int(rest)
            if kind == b":":
                return number
            if number < 0:  # nil
                return None
            if kind == b"*":
                return [self._reply() for _ in range(number)]
            data = self._exactly(number + 2)
            if data.endswith(b"\r\n"):
                return data[:-2]
        raise RespProtocolError(f"not a Redis reply: {line[:40]!r}")

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise RespProtocolError("a reply line without its end")
            self._receive()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._receive()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _receive(self) -> None:
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("Timeout reading from server") from None
        except OSError as exc:
            raise ConnectionError(f"Error reading from server: {exc}") from exc
        if not data:
            raise ConnectionError("Connection closed by server")
        self._buffer += data


def _handshake(target: RedisTarget) -> list[list[Arg]]:
    """AUTH with the URL's credentials and SELECT of its database (a PING when neither is needed)."""
    commands: list[list[Arg]] = []
    if target.password is not None:
        commands.append(["AUTH", *([target.username] if target.username else []), target.password])
    if target.database:
        commands.append(["SELECT", target.database])
    return commands or [["PING"]]


def _tls(sock: socket.socket, host: str) -> socket.socket:
    """``sock`` wrapped in TLS as redis-py's defaults do it (ssl imported only for a rediss:// URL)."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False  # redis-py's ssl_check_hostname default
    return context.wrap_socket(sock, server_hostname=host)
