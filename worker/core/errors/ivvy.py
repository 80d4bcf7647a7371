"""iVvy's answers as exceptions, classified once as docs/contract.md says (Retries)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict, Unpack

from worker.core.errors.base import LeadstageError, PermanentError, RetryableError


class IvvyAnswer(TypedDict, total=False):
    """What iVvy's error answer said, as ``IvvyErrorDetails`` takes it (for its subclasses)."""

    http_status: int | None
    specific_code: int | None
    additional_messages: Sequence[str]
    retry_after: float | None


class IvvyErrorDetails(LeadstageError):
    """What iVvy said: HTTP status and its error body. Mixed into the iVvy exceptions."""

    http_status: int | None = None
    specific_code: int | None = None
    additional_messages: tuple[str, ...] = ()
    #: Seconds iVvy asked us to wait (``Retry-After``), when it said so.
    retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        specific_code: int | None = None,
        additional_messages: Sequence[str] = (),
        retry_after: float | None = None,
    ) -> None:
        self.http_status = http_status
        self.specific_code = specific_code
        self.additional_messages = tuple(additional_messages)
        self.retry_after = retry_after
        super().__init__(message)

    @property
    def ivvy_code(self) -> str | None:
        """iVvy's specific code as text, for the results stream's ``error_code``."""
        return None if self.specific_code is None else str(self.specific_code)


class IvvyRejected(IvvyErrorDetails, PermanentError, code="rejected"):
    """iVvy refused the change (any 4xx but the ones below, and its refusing specific codes)."""


class IvvyAuthError(IvvyRejected, code="unauthorized"):
    """401, 403, 462, 463: the credentials are wrong or revoked."""


class IvvyUnavailable(IvvyErrorDetails, RetryableError, code="unavailable"):
    """iVvy answered 5xx, 460, 461 or specific code 24322."""


class IvvyRateLimited(IvvyUnavailable, code="rate_limited"):
    pauses_account = True


#: iVvy's specific code for a Date/IVVY-Date more than 5 minutes from its clock (a 401).
STALE_REQUEST_CODE = 23005


class IvvyClockSkew(IvvyErrorDetails, RetryableError, code="clock_skew"):
    """iVvy found the request's date stale (23005): the worker host's clock is off by more than
    iVvy's tolerance. Every change of the account would fail alike, so the account pauses and
    the change is tried again after the pause, instead of being dead-lettered as unauthorised.

    ``skew_s``: iVvy's clock (its Date header) minus ours, in seconds, when it sent one.
    """

    pauses_account = True

    def __init__(self, message: str, *, skew_s: float | None = None, **answer: Unpack[IvvyAnswer]) -> None:
        self.skew_s = skew_s
        answer.setdefault("specific_code", STALE_REQUEST_CODE)
        super().__init__(message, **answer)


class SignatureRejected(PermanentError, code="signature_rejected"):
    """Why the fake iVvy refuses a request's signature; ``specific_code`` 23005 for a stale date."""

    def __init__(self, message: str, specific_code: int | None = None) -> None:
        self.specific_code = specific_code
        super().__init__(message)


class IvvyNoAnswer(IvvyErrorDetails, RetryableError, code="connection"):
    def __init__(self, message: str, *, outcome_unknown: bool) -> None:
        self.outcome_unknown = outcome_unknown
        super().__init__(message)


class IvvyTimeout(IvvyNoAnswer, code="timeout"):
    """No answer within the request timeout."""


class BatchNotReady(RetryableError, code="batch_not_ready"):
    """A batch's results are not ready yet (iVvy's 24114), or were not within the wait allowed."""

    def __init__(self, async_id: str, message: str = "") -> None:
        self.async_id = async_id
        super().__init__(message or f"batch {async_id}: iVvy has not finished it (24114)")


class BatchGone(RetryableError, code="batch_gone"):
    """A batch's results cannot be had: iVvy does not know the batch (24115 from results, 24105
    from progress: never accepted, or past retention), or its results do not answer its jobs.
    What the jobs did is unknown: each change is attempted again (an update is resent), as after
    a request without an answer; asking about the batch again cannot help."""

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
