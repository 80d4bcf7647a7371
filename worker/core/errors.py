"""The one exception tree of leadstage-sync.

Every error the product raises is a ``LeadstageError``. The first split is the only question
a caller usually asks: will trying again help?

::

    LeadstageError
    ├── NotFound                       a change or dead letter asked about is not known (the CLI)
    ├── Interrupted                    Redis stopped answering midway through a bulk enqueue (the CLI)
    ├── ProcessFailed                  a child process did not start or answer (``worker.core.processes``)
    │   └── DemoFailed                 ``leadstage demo`` cannot run (no Redis, the worker died)
    ├── PermanentError                 trying again cannot help; the change goes to the DLQ
    │   ├── ConfigError                a missing or bad setting (names it)
    │   ├── InvalidChange              a change broke the rules of docs/contract.md (names each field)
    │   ├── IdempotencyConflict        a known idempotency key came with a different change
    │   ├── UnknownAccount             a change names an account with no credentials
    │   ├── Exhausted                  out of attempts, or older than LEADSTAGE_MAX_AGE
    │   ├── RetryAfterTooLong          iVvy asked to wait longer than LEADSTAGE_RETRY_AFTER_MAX
    │   ├── Refused                    a command line that cannot be carried out as given (the CLI)
    │   └── IvvyRejected               iVvy refused the change: 24320, 24321, 24323, 24324,
    │       │                          23016, 23017 and any other 4xx
    │       └── IvvyAuthError          401, 403, 462, 463: the credentials are wrong or revoked
    ├── StaleRun                       a worker's run of a change was overtaken (its lease
    │                                  lapsed, another run began): it stops without recording
    └── RetryableError                 a later attempt may succeed (backoff, Retry-After)
        ├── RedisUnavailable           Redis did not answer
        │   ├── RedisRefused           Redis answered but refused the command: OOM, READONLY
        │   │                          (a demoted primary), MISCONF, LOADING, BUSY, ...
        │   ├── RedisCredentialsRefused  Redis refused REDIS_URL's user or password
        │   ├── RedisNotReplicated     fewer replicas than LEADSTAGE_REDIS_MIN_REPLICAS confirmed
        │   │                          a write in time: its fate is unknown if the primary fails
        │   └── EnqueueOutcomeUnknown  no answer while changes were written: retry with the same keys
        ├── IvvyUnavailable            iVvy answered 5xx, 460, 461 or specific code 24322
        │   └── IvvyRateLimited        iVvy answered 429 (``retry_after`` when it said so)
        ├── IvvyClockSkew              specific code 23005 (a 401, "Request is stale"): this
        │                              worker's clock is off, not the change's fault; refused
        │                              before anything was applied
        └── IvvyNoAnswer               no answer: connection refused, reset or dropped
            └── IvvyTimeout            no answer within the request timeout

``RetryableError.pauses_account`` is true for the errors that are about the account or the worker
rather than the change (429, 23005): the job pauses the whole account until its retry. iVvy's
answer is classified by its body's ``errorCode`` when it has one, whatever the HTTP status (a 200
can carry an error), as the official .NET SDK does.

``IvvyNoAnswer.outcome_unknown`` is true when the request may have reached iVvy (it was sent,
then the connection dropped or timed out): an add in that state is reconciled with
getLeadStageList before it is posted again.

aiohttp and redis exceptions are translated into this tree where they are caught (``worker.ivvy``
for HTTP, ``redis_errors`` below for Redis); nothing above those boundaries sees them.
Messages never contain secrets: they are built from status codes, iVvy's own error text and
field names only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class LeadstageError(Exception):
    """Base of every error leadstage-sync raises."""

    retryable: bool = False
    #: Short machine-readable name, written to the results stream as ``error_code``.
    error_code: str = "error"


class PermanentError(LeadstageError):
    """Trying again cannot help."""


class RetryableError(LeadstageError):
    """A later attempt may succeed."""

    retryable = True
    #: Seconds the server asked us to wait (``Retry-After``), when it said so.
    retry_after: float | None = None
    #: Whether the next attempt of every change of the account waits too (not only this one's).
    pauses_account: bool = False


class ConfigError(PermanentError):
    error_code = "config"


@dataclass(frozen=True, slots=True)
class FieldError:
    """One bad field of a change: which, and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class InvalidChange(PermanentError):
    """A change (or its envelope) broke the rules; ``errors`` names each bad field."""

    error_code = "invalid_change"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = tuple(errors)
        super().__init__("invalid change: " + "; ".join(str(e) for e in self.errors))


class IdempotencyConflict(PermanentError):
    """The idempotency key is already used, for a different change.

    In a batch, ``label`` names the refused item in the caller's terms (``changes[3]``, ``line 4``)
    and ``earlier_label`` the item of the same batch that used the key first, when it is one;
    ``enqueued_before`` counts the changes of the batch already written (only ever non-zero when
    another producer wrote the key between the batch's check and its write).
    """

    error_code = "idempotency_conflict"

    def __init__(
        self,
        account: str,
        idempotency_key: str,
        *,
        label: str = "",
        earlier_label: str | None = None,
        enqueued_before: int = 0,
    ) -> None:
        self.account = account
        self.idempotency_key = idempotency_key
        self.label = label
        self.earlier_label = earlier_label
        self.enqueued_before = enqueued_before
        text = f"idempotency key {idempotency_key!r} of account {account!r} "
        if earlier_label is not None:
            text += f"comes with a different change at {earlier_label} too"
        else:
            text += "is already used for a different change"
        if enqueued_before:
            text += f"; {enqueued_before} earlier change(s) of this batch were enqueued"
        else:
            text += "; nothing enqueued"
        super().__init__(f"{label}: {text}" if label else text)


class UnknownAccount(PermanentError):
    error_code = "unknown_account"

    def __init__(self, account: str) -> None:
        self.account = account
        super().__init__(f"account {account!r} is not configured (see LEADSTAGE_ACCOUNTS_FILE)")


class Exhausted(PermanentError):
    """Out of attempts or past the maximum age."""

    error_code = "exhausted"


class RetryAfterTooLong(PermanentError):
    """iVvy asked for a pause longer than the change may wait: dead-lettered with the reason, so an
    operator replays it later instead of it waiting unseen (and outliving its ledger entry)."""

    error_code = "retry_after_too_long"

    def __init__(self, retry_after_s: float, cap_s: float, answer: str) -> None:
        super().__init__(
            f"iVvy asked to wait {retry_after_s:g}s, longer than LEADSTAGE_RETRY_AFTER_MAX ({cap_s:g}s): {answer}"
        )


class NotFound(LeadstageError):
    """The change or dead letter a command asks about is not known (exit status 1)."""

    error_code = "not_found"


class Interrupted(LeadstageError):
    """Redis stopped answering in the middle of a bulk enqueue (exit status 1); says what was written."""

    error_code = "interrupted"


class Refused(PermanentError):
    """The command line cannot be carried out as given (exit status 2): flags, a file, a located conflict."""

    error_code = "refused"


class ProcessFailed(LeadstageError):
    """A child process did not start, exited early, or does not answer on its port."""

    error_code = "process_failed"


class DemoFailed(ProcessFailed):
    """The demo cannot run (no Redis, the worker died): one line for the operator, exit 1."""

    error_code = "demo_failed"


class IvvyErrorDetails(LeadstageError):
    """What iVvy said: HTTP status and its error body. Mixed into the iVvy exceptions."""

    http_status: int | None = None
    specific_code: int | None = None
    additional_messages: tuple[str, ...] = ()

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        specific_code: int | None = None,
        additional_messages: Sequence[str] = (),
    ) -> None:
        self.http_status = http_status
        self.specific_code = specific_code
        self.additional_messages = tuple(additional_messages)
        super().__init__(message)

    @property
    def ivvy_code(self) -> str | None:
        """iVvy's specific code as text, for the results stream's ``error_code``."""
        return None if self.specific_code is None else str(self.specific_code)


class IvvyRejected(IvvyErrorDetails, PermanentError):
    error_code = "rejected"


class IvvyAuthError(IvvyRejected):
    error_code = "unauthorized"


class StaleRun(LeadstageError):
    """This run no longer owns its change (its lease lapsed and another run began): it must stop."""

    error_code = "stale_run"

    def __init__(self, job_id: str, run: int) -> None:
        super().__init__(f"run {run} of {job_id} was overtaken by a newer run")


class RedisUnavailable(RetryableError):
    error_code = "redis_unavailable"


class RedisRefused(RedisUnavailable):
    """Redis answered with an error that says it cannot take the command now (not a bug of ours)."""

    error_code = "redis_refused"


class RedisCredentialsRefused(RedisUnavailable):
    """Redis answered, and refused the user or password of REDIS_URL (it may be rotated meanwhile)."""

    error_code = "redis_credentials_refused"


class RedisNotReplicated(RedisUnavailable):
    """A write was not confirmed by enough replicas: a failover now could lose it."""

    error_code = "redis_not_replicated"

    def __init__(self, what: str, acked: int, wanted: int, timeout_s: float) -> None:
        super().__init__(
            f"{what}: written to the Redis primary but confirmed by {acked} of {wanted} replicas within "
            f"{timeout_s:g}s (LEADSTAGE_REDIS_MIN_REPLICAS); the outcome is unknown, retry with the same "
            "idempotency key"
        )


class EnqueueOutcomeUnknown(RedisUnavailable):
    """Redis stopped answering while changes were written: ``unknown`` (account, idempotency key)
    may or may not be enqueued, ``enqueued`` changes before them were. Enqueuing them again with
    the same keys is safe: a change already written comes back as a duplicate."""

    error_code = "outcome_unknown"

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


class IvvyUnavailable(IvvyErrorDetails, RetryableError):
    error_code = "unavailable"

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        specific_code: int | None = None,
        additional_messages: Sequence[str] = (),
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(
            message, http_status=http_status, specific_code=specific_code, additional_messages=additional_messages
        )


class IvvyRateLimited(IvvyUnavailable):
    error_code = "rate_limited"
    pauses_account = True


#: iVvy's specific code for a Date/IVVY-Date more than 5 minutes from its clock (a 401).
STALE_REQUEST_CODE = 23005


class IvvyClockSkew(IvvyErrorDetails, RetryableError):
    """iVvy found the request's date stale (23005): the worker host's clock is off by more than
    iVvy's tolerance. Every change of the account would fail alike, so the account pauses and
    the change is tried again after the pause, instead of being dead-lettered as unauthorised.

    ``skew_s``: iVvy's clock (its Date header) minus ours, in seconds, when it sent one.
    """

    error_code = "clock_skew"
    pauses_account = True

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        specific_code: int | None = STALE_REQUEST_CODE,
        additional_messages: Sequence[str] = (),
        retry_after: float | None = None,
        skew_s: float | None = None,
    ) -> None:
        self.skew_s = skew_s
        self.retry_after = retry_after
        super().__init__(
            message, http_status=http_status, specific_code=specific_code, additional_messages=additional_messages
        )


class IvvyNoAnswer(IvvyErrorDetails, RetryableError):
    error_code = "connection"

    def __init__(self, message: str, *, outcome_unknown: bool) -> None:
        self.outcome_unknown = outcome_unknown
        super().__init__(message)


class IvvyTimeout(IvvyNoAnswer):
    error_code = "timeout"


class BatchNotReady(RetryableError):
    """A batch's results are not ready yet (iVvy's 24114), or were not within the wait allowed."""

    error_code = "batch_not_ready"

    def __init__(self, async_id: str, message: str = "") -> None:
        self.async_id = async_id
        super().__init__(message or f"batch {async_id}: iVvy has not finished it (24114)")


class BatchGone(LeadstageError):
    """A batch's results cannot be had: iVvy does not know the batch (24115 from results, 24105
    from progress: never accepted, or past retention), or its results do not answer its jobs.
    What the jobs did is unknown: they are reconciled, as after a request without an answer."""

    error_code = "batch_gone"

    def __init__(self, async_id: str, reason: str, *, specific_code: int | None = None) -> None:
        self.async_id = async_id
        self.specific_code = specific_code
        super().__init__(f"batch {async_id}: {reason}")


# The retry classification of docs/contract.md, defined here once.
RETRYABLE_STATUSES = frozenset({429, 460, 461})  # and every 5xx
AUTH_STATUSES = frozenset({401, 403, 462, 463})
RETRYABLE_SPECIFIC_CODES = frozenset({24322})


def error_for_response(
    http_status: int,
    *,
    message: str,
    specific_code: int | None,
    additional_messages: Sequence[str] = (),
    retry_after: float | None = None,
    clock_skew_s: float | None = None,
    stale_pause_s: float = 0.0,
) -> IvvyRejected | IvvyUnavailable | IvvyClockSkew:
    """Classify an iVvy error answer as docs/contract.md says (Retries); ``clock_skew_s`` is iVvy's clock
    minus ours when its Date header said (reported with a stale-request answer, which pauses the
    account for at least ``stale_pause_s``)."""
    text = f"iVvy answered {http_status}"
    if specific_code is not None:
        text += f" (specific code {specific_code})"
    if message:
        text += f": {message}"
    if specific_code == STALE_REQUEST_CODE:
        if clock_skew_s is not None:
            direction = "behind" if clock_skew_s > 0 else "ahead of"
            text += f"; this worker's clock is {abs(clock_skew_s):.0f} s {direction} iVvy's"
        return IvvyClockSkew(
            text,
            http_status=http_status,
            additional_messages=additional_messages,
            retry_after=max(retry_after or 0.0, stale_pause_s),
            skew_s=clock_skew_s,
        )
    if (
        http_status == 429
        or http_status >= 500
        or http_status in RETRYABLE_STATUSES
        or (specific_code in RETRYABLE_SPECIFIC_CODES)
    ):
        kind = IvvyRateLimited if http_status == 429 else IvvyUnavailable
        return kind(
            text,
            http_status=http_status,
            specific_code=specific_code,
            additional_messages=additional_messages,
            retry_after=retry_after,
        )
    kind_rejected = IvvyAuthError if http_status in AUTH_STATUSES else IvvyRejected
    return kind_rejected(
        text,
        http_status=http_status,
        specific_code=specific_code,
        additional_messages=additional_messages,
    )


#: Error replies with which Redis refuses a command for a while, whatever the command: out of memory,
#: a read-only replica (a demoted primary behind a plain URL), a failed snapshot, a busy script, a
#: cluster or primary link down. redis-py turns some into classes of their own (and strips their
#: code), the others keep it as the first word of the message. Anything else is a bug: not translated.
#: (The classes are named in ``redis_errors``, which imports redis-py only when it is used.)
REFUSAL_CODES = frozenset({"OOM", "READONLY", "MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN"})


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate redis-py's failures into ``RedisUnavailable`` (no answer) or ``RedisRefused`` (an
    answer refusing the command for now) at the boundary; the answers that mean REDIS_URL is wrong
    into ``ConfigError``."""
    import redis.exceptions  # here, not at the top: ``leadstage --help`` has no use for redis-py

    try:
        yield
    except redis.exceptions.AuthenticationError as exc:  # a ConnectionError subclass: before it
        raise RedisCredentialsRefused(f"Redis refused the credentials of REDIS_URL: {type(exc).__name__}") from exc
    except redis.exceptions.InvalidResponse:
        raise ConfigError("REDIS_URL: what answers there is not Redis (its answer is not the Redis protocol)") from None
    except (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError) as exc:  # the refusal classes
        raise RedisRefused(f"Redis refused the command: {type(exc).__name__}") from exc
    except redis.exceptions.ResponseError as exc:
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
