"""The classification of failures, table by table: iVvy's answers, Retry-After, backoff, Redis's errors."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import redis.exceptions

from worker.backoff import backoff_seconds
from worker.core import errors
from worker.core.errors import (
    IvvyAuthError,
    IvvyRateLimited,
    IvvyRejected,
    IvvyUnavailable,
    LeadstageError,
    RedisCredentialsRefused,
    RedisRefused,
    RedisUnavailable,
    error_for_response,
    redis_errors,
)
from worker.ivvy import parse_retry_after

#: (HTTP status, iVvy's specific code) -> (class, error_code, retryable)
ANSWERS = [
    (400, 24320, IvvyRejected, "rejected", False),
    (400, 24321, IvvyRejected, "rejected", False),
    (400, 24322, IvvyUnavailable, "unavailable", True),
    (400, 24323, IvvyRejected, "rejected", False),
    (400, 24324, IvvyRejected, "rejected", False),
    (400, 23016, IvvyRejected, "rejected", False),
    (400, 23017, IvvyRejected, "rejected", False),
    (400, None, IvvyRejected, "rejected", False),
    (404, None, IvvyRejected, "rejected", False),
    (422, None, IvvyRejected, "rejected", False),
    (401, None, IvvyAuthError, "unauthorized", False),
    (403, None, IvvyAuthError, "unauthorized", False),
    (462, None, IvvyAuthError, "unauthorized", False),
    (463, None, IvvyAuthError, "unauthorized", False),
    (460, None, IvvyUnavailable, "unavailable", True),
    (461, None, IvvyUnavailable, "unavailable", True),
    (429, None, IvvyRateLimited, "rate_limited", True),
    (500, None, IvvyUnavailable, "unavailable", True),
    (502, 24320, IvvyUnavailable, "unavailable", True),
    (503, None, IvvyUnavailable, "unavailable", True),
    (599, None, IvvyUnavailable, "unavailable", True),
]


@pytest.mark.parametrize(("status", "code", "kind", "error_code", "retryable"), ANSWERS)
def test_every_answer_is_classified(
    status: int, code: int | None, kind: type[LeadstageError], error_code: str, retryable: bool
) -> None:
    error = error_for_response(status, message="nope", specific_code=code, retry_after=3.0)
    assert type(error) is kind
    assert (error.error_code, error.retryable, error.http_status, error.specific_code) == (
        error_code,
        retryable,
        status,
        code,
    )
    assert str(error) == f"iVvy answered {status}" + (f" (specific code {code})" if code else "") + ": nope"
    if retryable:
        assert isinstance(error, IvvyUnavailable)
        assert error.retry_after == 3.0


def _http_date(offset_s: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=offset_s), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "5"}, 5.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"RETRY-AFTER": "0"}, 0.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past: now
    ],
)
def test_retry_after_in_seconds(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_retry_after_as_an_http_date_in_the_future() -> None:
    seconds = parse_retry_after({"Retry-After": _http_date(120)})
    assert seconds is not None
    assert 60 < seconds <= 120  # whole seconds on the wire; the test itself takes far less than a minute


class _Highest(random.Random):
    """Full jitter's upper end: what the delay may reach at most."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "retry_after", "ceiling"),
    [
        (0, 0.5, 60, None, 0.5),
        (1, 0.5, 60, None, 0.5),
        (2, 0.5, 60, None, 1.0),
        (3, 0.5, 60, None, 2.0),
        (8, 0.5, 60, None, 60.0),
        (30, 0.5, 60, None, 60.0),
        (2, 1.0, 1.5, None, 1.5),
        (1, 0.5, 60, 10.0, 10.0),
        (8, 0.5, 60, 5.0, 60.0),
    ],
)
def test_backoff_grows_to_its_cap_and_honours_retry_after(
    attempt: int, base: float, cap: float, retry_after: float | None, ceiling: float
) -> None:
    assert backoff_seconds(attempt, base=base, cap=cap, retry_after=retry_after, rng=_Highest()) == ceiling
    delays = [
        backoff_seconds(attempt, base=base, cap=cap, retry_after=retry_after, rng=random.Random(s)) for s in range(50)
    ]
    floor = retry_after or 0.0
    assert all(floor <= d <= max(ceiling, floor) for d in delays)
    if retry_after is None:
        assert len(set(delays)) > 1  # jittered, not one fixed delay


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (redis.exceptions.ConnectionError("refused"), RedisUnavailable),
        (redis.exceptions.TimeoutError("slow"), RedisUnavailable),
        (ConnectionResetError(), RedisUnavailable),
        (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), RedisUnavailable),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), RedisRefused),
        (redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), RedisRefused),
        (redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"), RedisRefused),
        (redis.exceptions.ResponseError("MISCONF Errors writing to the AOF file"), RedisRefused),
        (redis.exceptions.AuthenticationError("invalid username-password pair"), RedisCredentialsRefused),
    ],
)
def test_every_redis_failure_is_translated_at_the_boundary(raised: Exception, kind: type[LeadstageError]) -> None:
    with pytest.raises(kind) as translated, redis_errors():
        raise raised
    assert type(translated.value) is kind
    assert translated.value.__cause__ is raised
    assert translated.value.retryable


def test_a_command_error_is_a_bug_and_not_translated() -> None:
    with pytest.raises(redis.exceptions.ResponseError), redis_errors():
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")


@pytest.mark.parametrize(
    "reply",
    [
        "WRONGPASS invalid username-password pair or user is disabled.",
        "NOAUTH Authentication required.",
        "ERR AUTH <password> called without any password configured for the default user. Are you sure your"
        " configuration is correct?",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "READONLY You can't write against a read only replica.",
        "LOADING Redis is loading the dataset in memory",
        "MISCONF Errors writing to the AOF file",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "NOPERM User leadstage has no permissions to run the 'evalsha' command",
        "The user executing the script can't run this command or subcommand script: 0123abcd, on @user_script:1.",
        "ERR DB index is out of range",
        "ERR max number of clients reached",
        "ERR WAIT cannot be used with replica instances. Please also note that since Redis 4.0 if a replica is"
        " configured to be writable (which is not the default) writes to replicas are just local and are not"
        " propagated.",
        "NOSCRIPT No matching script. Please use EVAL.",
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "BUSYGROUP Consumer Group name already exists",
    ],
)
def test_an_error_reply_is_classified_alike_from_redis_py_and_from_the_resp_client(reply: str) -> None:
    """Issue 12: the one-shot enqueue's RESP client and redis-py go through one classification, so
    the same reply from Redis is the same error, message and all, whichever client read it
    (redis-py's own parser turns the reply into its exception, stripping some codes)."""
    from redis._parsers.base import BaseParser

    from worker.core.errors import RespErrorReply, script_missing, translated

    raised = BaseParser.parse_error(reply)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    by_redis_py, by_resp = translated(raised), translated(RespErrorReply(reply))
    assert type(by_redis_py) is type(by_resp)
    assert str(by_redis_py) == str(by_resp)
    assert script_missing(raised) == script_missing(RespErrorReply(reply))
    assert script_missing(RespErrorReply(reply)) == reply.startswith("NOSCRIPT")
    assert (by_resp is None) == reply.startswith(("NOSCRIPT", "WRONGTYPE", "BUSYGROUP"))


def test_every_raisable_class_of_the_tree_names_a_code_of_its_own() -> None:
    """The ``code=`` of a class header is its ``error_code``; no two classes share one."""
    intermediate = {errors.LeadstageError, errors.PermanentError, errors.RetryableError, errors.IvvyErrorDetails}
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.LeadstageError) and value not in intermediate
    ]
    codes = {cls.error_code: cls for cls in classes}
    assert len(codes) == len(classes), sorted(cls.__name__ for cls in classes if codes[cls.error_code] is not cls)
    assert "error" not in codes
    assert errors.NotFound.error_code == "not_found"
    assert errors.WaitTimeout.error_code == "wait_timeout"


#: The one module that names redis-py's exceptions: it translates them into the tree.
REDIS_BOUNDARY = Path(__file__).resolve().parents[1] / "worker" / "core" / "errors" / "redis_boundary.py"
_NAMES_REDIS_EXCEPTION = re.compile(
    r"\bredis\.exceptions\b|^\s*except\b[^:#\n]*\bredis\b|^\s*from redis import .*Error", re.M
)


def test_redis_exceptions_are_named_at_the_boundary_only() -> None:
    """Product code catches the tree's exceptions; redis-py's are translated in one module."""
    product = [path for top in ("worker", "producers") for path in (REDIS_BOUNDARY.parents[3] / top).rglob("*.py")]
    naming = [
        f"{path.relative_to(REDIS_BOUNDARY.parents[3])}:{text.count(chr(10), 0, match.start()) + 1}"
        for path in product
        if path != REDIS_BOUNDARY
        for text in [path.read_text()]
        for match in _NAMES_REDIS_EXCEPTION.finditer(text)
    ]
    assert len(product) > 50
    assert not naming, "redis-py exceptions named outside worker/core/errors/redis_boundary.py: " + ", ".join(naming)
