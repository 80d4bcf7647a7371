"""Redis's failures as exceptions, and the one place they are translated: redis-py's exceptions and
the errors of ``worker.core.resp`` (the one-shot enqueue's client) go through one classification,
by Redis's error reply where there is one (``translated``)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from worker.core.errors.base import ConfigError, LeadstageError, RetryableError

if TYPE_CHECKING:
    from redis.asyncio.connection import Connection


class RedisUnavailable(RetryableError, code="redis_unavailable"):
    """Redis did not answer (or refused the command for now: the subclasses)."""


class RedisRefused(RedisUnavailable, code="redis_refused"):
    """Redis answered with an error that says it cannot take the command now (not a bug of ours)."""


class RedisCredentialsRefused(RedisUnavailable, code="redis_credentials_refused"):
    """Redis answered, and refused the user or password of REDIS_URL (it may be rotated meanwhile)."""


class RedisNotReplicated(RedisUnavailable, code="redis_not_replicated"):
    """A write was not confirmed by enough replicas: a failover now could lose it."""

    def __init__(self, what: str, acked: int, wanted: int, timeout_s: float) -> None:
        super().__init__(
            f"{what}: written to the Redis primary but confirmed by {acked} of {wanted} replicas within "
            f"{timeout_s:g}s (LEADSTAGE_REDIS_MIN_REPLICAS); the outcome is unknown, retry with the same "
            "idempotency key"
        )


class EnqueueOutcomeUnknown(RedisUnavailable, code="outcome_unknown"):
    """Redis stopped answering while changes were written: ``unknown`` (account, idempotency key)
    may or may not be enqueued, ``enqueued`` changes before them were. Enqueuing them again with
    the same keys is safe: a change already written comes back as a duplicate."""

    def __init__(self, reason: str, *, enqueued: int, unknown: Sequence[tuple[str, str]]) -> None:
        self.enqueued = enqueued
        self.unknown = tuple(unknown)
        what = f"idempotency key {self.unknown[0][1]!r}" if len(self.unknown) == 1 else f"{len(self.unknown)} changes"
        text = f"{reason}: whether {what} got enqueued is unknown, retry with the same key"
        if len(self.unknown) > 1:
            text += "s"
        if enqueued:
            text += f" ({enqueued} earlier change(s) were enqueued)"
        super().__init__(text)


class StreamRefused(ConfigError, code="stream_refused"):
    """Redis refused a stream command: the key is not a stream, the consumer group is gone, or the
    server is too old. ``reply`` is Redis's error code (``WRONGTYPE``, ``NOGROUP``, ``BUSYGROUP``)."""

    def __init__(self, stream: str, answer: str) -> None:
        self.reply = answer.split(" ", 1)[0]
        super().__init__(f"Redis refused to read {stream!r} as a stream: {answer}")


#: Error replies with which Redis refuses a command for a while, whatever the command: out of memory,
#: a read-only replica (a demoted primary behind a plain URL), a failed snapshot, a busy script, a
#: cluster or primary link down. Anything else is a bug: not translated.
REFUSAL_CODES = frozenset({"OOM", "READONLY", "MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN"})
#: The error codes redis-py turns into classes of their own (stripping the code from the message),
#: and those classes' names, which the messages give (as they did before the RESP client).
_CLASS_OF_CODE = {
    "OOM": "OutOfMemoryError",
    "READONLY": "ReadOnlyError",
    "NOPERM": "NoPermissionError",
    "NOSCRIPT": "NoScriptError",
    "LOADING": "BusyLoadingError",
}
#: Error replies that refuse REDIS_URL's user or password (redis-py's AuthenticationError).
_CREDENTIAL_REPLIES = (
    "WRONGPASS ",
    "NOAUTH ",
    "invalid password",
    "AUTH <password> called without any password configured",
    "Client sent AUTH, but no password is set",
)
_NOT_REDIS = "REDIS_URL: what answers there is not Redis (its answer is not the Redis protocol)"


class RespErrorReply(Exception):
    """An error reply read by ``worker.core.resp`` (the one-shot enqueue's client): Redis's text, code first."""


class RespProtocolError(Exception):
    """What ``worker.core.resp`` read is not the Redis protocol (another server answers there)."""


def error_reply(exc: object) -> str | None:
    """The Redis error reply ``exc`` stands for, from either client, as redis-py words it: without
    the generic code ``ERR``, any other code first (put back where redis-py strips it, for the
    replies it gives classes of their own); None when it is not an error reply."""
    if isinstance(exc, RespErrorReply):
        return str(exc).removeprefix("ERR ")
    redis_py = sys.modules.get("redis.exceptions")  # a redis-py exception exists only once it is imported
    if redis_py is None or not isinstance(exc, redis_py.ResponseError | redis_py.BusyLoadingError):
        return None
    code = next((code for code, name in _CLASS_OF_CODE.items() if isinstance(exc, getattr(redis_py, name))), None)
    return str(exc) if code is None else f"{code} {exc}"


def translated(exc: BaseException) -> LeadstageError | None:
    """Redis's failure met by redis-py or by ``worker.core.resp``, in the tree's terms: no answer
    (``RedisUnavailable``, from a single Redis or from every node of a cluster), an answer refusing
    the command for now (``RedisRefused``) or REDIS_URL's credentials, and the answers that mean
    REDIS_URL is wrong (``ConfigError``); None for anything else (a bug: not translated)."""
    reply = error_reply(exc)
    if reply is not None:
        return _reply_failure(reply)
    if isinstance(exc, RespProtocolError):
        return ConfigError(_NOT_REDIS)
    redis_py = sys.modules.get("redis.exceptions")
    if redis_py is not None and isinstance(exc, redis_py.RedisError | redis_py.RedisClusterException):
        return _redis_py_failure(exc, redis_py)
    if isinstance(exc, OSError):  # the RESP client's, or a socket's under redis-py
        return RedisUnavailable(f"Redis is unavailable: {type(exc).__name__}")
    return None


def _reply_failure(reply: str) -> LeadstageError | None:
    code, _, text = reply.partition(" ")
    if reply.startswith(_CREDENTIAL_REPLIES):
        return RedisCredentialsRefused("Redis refused the credentials of REDIS_URL: AuthenticationError")
    if code == "NOPERM" or reply.startswith("The user executing the script can't"):  # an ACL user's refusal
        # Quoted as redis-py shows it: NOPERM without its code, a script's refusal whole.
        quoted = _cut(text if code == "NOPERM" else reply)
        return ConfigError(f"REDIS_URL: its Redis user is not allowed to do what leadstage needs: {quoted}")
    if "DB index is out of range" in reply:
        return ConfigError("REDIS_URL selects a database number this Redis does not have")
    if reply.startswith("WAIT cannot be used with replica"):  # a primary demoted under our feet
        return RedisRefused("Redis refused WAIT: the server is a replica now (a failover)")
    if code == "LOADING" or reply == "max number of clients reached":  # redis-py: ConnectionError classes
        return RedisUnavailable(f"Redis is unavailable: {_CLASS_OF_CODE.get(code, 'ConnectionError')}")
    if code in REFUSAL_CODES:  # exactly: BUSYGROUP or BUSYKEY are answers about data, not refusals
        return RedisRefused(f"Redis refused the command: {_CLASS_OF_CODE.get(code, code)}")
    return None


def _redis_py_failure(exc: Exception, redis_py: Any) -> LeadstageError | None:
    """A redis-py exception that is not an error reply."""
    if isinstance(exc, redis_py.AuthenticationError):  # a ConnectionError subclass: before it
        return _reply_failure("WRONGPASS " + str(exc))
    if isinstance(exc, redis_py.InvalidResponse):
        return ConfigError(_NOT_REDIS)
    if isinstance(exc, redis_py.ConnectionError | redis_py.TimeoutError):
        return RedisUnavailable(f"Redis is unavailable: {type(exc).__name__}")
    if isinstance(exc, redis_py.RedisClusterException):  # a cluster client that found no node to ask
        cause = exc.__cause__
        if isinstance(cause, redis_py.AuthenticationError):
            return _reply_failure("WRONGPASS " + str(cause))
        if isinstance(cause, redis_py.ConnectionError | redis_py.TimeoutError | OSError):
            return RedisUnavailable(f"no node of the Redis Cluster answers: {type(cause).__name__}")
        if "Cluster mode is not enabled" in str(exc):
            return ConfigError("REDIS_URL names a Redis Cluster, but the server there is not in cluster mode")
        if isinstance(exc, redis_py.SlotNotCoveredError) or str(exc).startswith("All slots are not covered"):
            # A state of the cluster (slots not assigned yet, or a master lost with no replica), as
            # CLUSTERDOWN is: unavailable for now, not a bug.
            return RedisUnavailable(f"the Redis Cluster does not serve every slot: {_cut(str(exc))}")
    return None  # a command whose keys span slots: a bug, not a state of Redis


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate Redis's failures (``translated``) at the boundary; a ``ConfigError`` drops the
    client's exception (its message says it all), the others keep it as their cause."""
    try:
        yield
    except Exception as exc:
        failure = translated(exc)
        if failure is None:
            raise
        raise failure from (exc if isinstance(failure, RedisUnavailable) else None)


@contextlib.contextmanager
def stream_errors(stream: str) -> Iterator[None]:
    """``redis_errors`` around a command on the stream ``stream``, with Redis's other error replies
    to it (a key that is not a stream, no such group, a group that exists) as ``StreamRefused``."""
    import redis.exceptions

    try:
        with redis_errors():
            yield
    except redis.exceptions.ResponseError as exc:
        raise StreamRefused(stream, str(exc)) from None


def script_missing(reply: object) -> bool:
    """Whether a reply of a pipeline run without raising (``raise_on_error=False``), from either
    client, is Redis's NOSCRIPT: the script is not loaded (a Redis that restarted or flushed its scripts)."""
    return (error_reply(reply) or "").startswith("NOSCRIPT ")


async def reply_or_error(connection: Connection) -> Any:
    """One reply read from a raw connection, an error reply as its exception (as a pipeline run
    without raising gives it), for the caller to raise inside ``redis_errors``."""
    import redis.exceptions

    try:
        return await connection.read_response()
    except redis.exceptions.ResponseError as exc:
        return exc


def _cut(reply: str, limit: int = 200) -> str:
    """Redis's error text, cut short: it names the command and key, never a value."""
    text = reply.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
