"""Redis's failures as exceptions, and the one place redis-py's exceptions are translated."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from worker.core.errors.base import ConfigError, RetryableError

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
#: cluster or primary link down. redis-py turns some into classes of their own (and strips their
#: code), the others keep it as the first word of the message. Anything else is a bug: not translated.
#: (The classes are named in ``redis_errors``, which imports redis-py only when it is used.)
REFUSAL_CODES = frozenset({"OOM", "READONLY", "MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN"})


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate redis-py's failures into ``RedisUnavailable`` (no answer, from a single Redis or from
    every node of a cluster) or ``RedisRefused`` (an answer refusing the command for now) at the
    boundary; the answers that mean REDIS_URL is wrong into ``ConfigError``."""
    import redis.exceptions  # here, not at the top: ``leadstage --help`` has no use for redis-py

    try:
        yield
    except redis.exceptions.AuthenticationError as exc:  # a ConnectionError subclass: before it
        raise RedisCredentialsRefused(f"Redis refused the credentials of REDIS_URL: {type(exc).__name__}") from exc
    except redis.exceptions.InvalidResponse:
        raise ConfigError("REDIS_URL: what answers there is not Redis (its answer is not the Redis protocol)") from None
    except (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError) as exc:  # the refusal classes
        raise RedisRefused(f"Redis refused the command: {type(exc).__name__}") from exc
    except redis.exceptions.NoPermissionError as exc:  # an ACL user without a command or key we need
        raise ConfigError(f"REDIS_URL: its Redis user is not allowed to do what leadstage needs: {_cut(exc)}") from None
    except redis.exceptions.ResponseError as exc:
        if str(exc).startswith("The user executing the script can't"):  # NOPERM inside a script
            raise ConfigError(
                f"REDIS_URL: its Redis user is not allowed to do what leadstage needs: {_cut(exc)}"
            ) from None
        if "DB index is out of range" in str(exc):
            raise ConfigError("REDIS_URL selects a database number this Redis does not have") from None
        if str(exc).startswith("WAIT cannot be used with replica"):  # a primary demoted under our feet
            raise RedisRefused("Redis refused WAIT: the server is a replica now (a failover)") from exc
        code = str(exc).split(" ", 1)[0]
        if code in REFUSAL_CODES:  # exactly: BUSYGROUP or BUSYKEY are answers about data, not refusals
            raise RedisRefused(f"Redis refused the command: {code}") from exc
        raise
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"Redis is unavailable: {type(exc).__name__}") from exc
    except redis.exceptions.RedisClusterException as exc:  # a cluster client that found no node to ask
        cause = exc.__cause__
        if isinstance(cause, redis.exceptions.AuthenticationError):
            raise RedisCredentialsRefused(
                f"Redis refused the credentials of REDIS_URL: {type(cause).__name__}"
            ) from exc
        if isinstance(cause, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | OSError):
            raise RedisUnavailable(f"no node of the Redis Cluster answers: {type(cause).__name__}") from exc
        if "Cluster mode is not enabled" in str(exc):
            raise ConfigError("REDIS_URL names a Redis Cluster, but the server there is not in cluster mode") from None
        raise  # a command whose keys span slots: a bug, not a state of Redis


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
    """Whether a reply of a pipeline run without raising (``raise_on_error=False``) is Redis's
    NOSCRIPT: the script is not loaded (a Redis that restarted or flushed its scripts)."""
    import redis.exceptions

    return isinstance(reply, redis.exceptions.NoScriptError)


async def reply_or_error(connection: Connection) -> Any:
    """One reply read from a raw connection, an error reply as its exception (as a pipeline run
    without raising gives it), for the caller to raise inside ``redis_errors``."""
    import redis.exceptions

    try:
        return await connection.read_response()
    except redis.exceptions.ResponseError as exc:
        return exc


def _cut(exc: Exception, limit: int = 200) -> str:
    """Redis's error text, cut short: it names the command and key, never a value."""
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
