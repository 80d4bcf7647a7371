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
    │   │   └── StreamRefused          Redis refused a stream command (WRONGTYPE, NOGROUP, BUSYGROUP)
    │   ├── InvalidChange              a change broke the rules of docs/contract.md (names each field)
    │   ├── IdempotencyConflict        a known idempotency key came with a different change
    │   ├── UnknownAccount             a change names an account with no credentials
    │   ├── Exhausted                  out of attempts, or older than LEADSTAGE_MAX_AGE
    │   ├── RetryAfterTooLong          iVvy asked to wait longer than LEADSTAGE_RETRY_AFTER_MAX
    │   ├── Refused                    a command line that cannot be carried out as given (the CLI)
    │   ├── BadFilter                  a reader's filter (``since``, a page cursor) is not usable
    │   ├── InvalidOption              an argument of ``wait`` or of a consumer is unusable (names it)
    │   ├── UnknownChange              the ledger does not know the change a producer asks after
    │   ├── SignatureRejected          the fake iVvy refuses a request's signature (23005: stale date)
    │   ├── InvalidEvent               a results-stream entry is not an event ``build_event`` wrote
    │   └── IvvyRejected               iVvy refused the change: 24320, 24321, 24323, 24324,
    │       │                          23016, 23017 and any other 4xx
    │       └── IvvyAuthError          401, 403, 462, 463: the credentials are wrong or revoked
    ├── OutcomeUnavailable             a change ended, but its event was trimmed from the results stream
    ├── StaleRun                       a worker's run of a change was overtaken (its lease
    │                                  lapsed, another run began): it stops without recording
    └── RetryableError                 a later attempt may succeed (backoff, Retry-After)
        ├── WaitTimeout                no terminal event within a wait's timeout (``status``: where it stands)
        ├── RedisUnavailable           Redis did not answer
        │   ├── RedisRefused           Redis answered but refused the command: OOM, READONLY
        │   │                          (a demoted primary), MISCONF, LOADING, BUSY, ...
        │   ├── RedisCredentialsRefused  Redis refused REDIS_URL's user or password
        │   ├── RedisNotReplicated     fewer replicas than LEADSTAGE_REDIS_MIN_REPLICAS confirmed
        │   │                          a write in time: its fate is unknown if the primary fails
        │   └── EnqueueOutcomeUnknown  no answer while changes were written: retry with the same keys
        ├── BatchNotReady              a batch is not done yet (24114), or not within the wait
        ├── BatchGone                  a batch's results cannot be had (24115, 24105, results
        │                              that do not answer its jobs): its jobs' outcome is unknown
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
for HTTP, ``redis_errors`` and ``stream_errors`` for Redis, whether redis-py or the one-shot
enqueue's RESP client met them: ``RespErrorReply``, ``RespProtocolError``); nothing above those
boundaries sees them.
Messages never contain secrets: they are built from status codes, iVvy's own error text and
field names only.

The tree lives in four modules by job: ``base`` (the root and the errors of our own making),
``changes`` (what a producer asking after one change hears), ``ivvy`` (iVvy's answers, their
classification and the fake's signature refusal), ``redis_boundary`` (Redis's failures and
``redis_errors``); import every name from here. A class names its ``error_code`` in its header:
``class NotFound(LeadstageError, code="not_found")``.
"""

from __future__ import annotations

from worker.core.errors.base import (
    BadFilter,
    ConfigError,
    DemoFailed,
    Exhausted,
    FieldError,
    IdempotencyConflict,
    Interrupted,
    InvalidChange,
    InvalidEvent,
    LeadstageError,
    NotFound,
    PermanentError,
    ProcessFailed,
    Refused,
    RetryableError,
    RetryAfterTooLong,
    StaleRun,
    UnknownAccount,
)
from worker.core.errors.changes import InvalidOption, OutcomeUnavailable, UnknownChange, WaitTimeout
from worker.core.errors.ivvy import (
    AUTH_STATUSES,
    RETRYABLE_SPECIFIC_CODES,
    RETRYABLE_STATUSES,
    STALE_REQUEST_CODE,
    BatchGone,
    BatchNotReady,
    IvvyAuthError,
    IvvyClockSkew,
    IvvyErrorDetails,
    IvvyNoAnswer,
    IvvyRateLimited,
    IvvyRejected,
    IvvyTimeout,
    IvvyUnavailable,
    SignatureRejected,
    error_for_response,
)
from worker.core.errors.redis_boundary import (
    REFUSAL_CODES,
    EnqueueOutcomeUnknown,
    RedisCredentialsRefused,
    RedisNotReplicated,
    RedisRefused,
    RedisUnavailable,
    RespErrorReply,
    RespProtocolError,
    StreamRefused,
    redis_errors,
    reply_or_error,
    script_missing,
    stream_errors,
    translated,
)

__all__ = [
    "AUTH_STATUSES",
    "REFUSAL_CODES",
    "RETRYABLE_SPECIFIC_CODES",
    "RETRYABLE_STATUSES",
    "STALE_REQUEST_CODE",
    "BadFilter",
    "BatchGone",
    "BatchNotReady",
    "ConfigError",
    "DemoFailed",
    "EnqueueOutcomeUnknown",
    "Exhausted",
    "FieldError",
    "IdempotencyConflict",
    "Interrupted",
    "InvalidChange",
    "InvalidEvent",
    "InvalidOption",
    "IvvyAuthError",
    "IvvyClockSkew",
    "IvvyErrorDetails",
    "IvvyNoAnswer",
    "IvvyRateLimited",
    "IvvyRejected",
    "IvvyTimeout",
    "IvvyUnavailable",
    "LeadstageError",
    "NotFound",
    "OutcomeUnavailable",
    "PermanentError",
    "ProcessFailed",
    "RedisCredentialsRefused",
    "RedisNotReplicated",
    "RedisRefused",
    "RedisUnavailable",
    "Refused",
    "RespErrorReply",
    "RespProtocolError",
    "RetryAfterTooLong",
    "RetryableError",
    "SignatureRejected",
    "StaleRun",
    "StreamRefused",
    "UnknownAccount",
    "UnknownChange",
    "WaitTimeout",
    "error_for_response",
    "redis_errors",
    "reply_or_error",
    "script_missing",
    "stream_errors",
    "translated",
]
