"""The root of the exception tree and the errors that are neither iVvy's nor Redis's answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class LeadstageError(Exception):
    """Base of every error leadstage-sync raises.

    A class of the tree names its ``error_code`` in its header, ``class NotFound(LeadstageError,
    code="not_found")``; a class that names none (an intermediate one) keeps its parent's.
    """

    retryable: bool = False
    #: Short machine-readable name, written to the results stream as ``error_code``.
    error_code: str = "error"

    def __init_subclass__(cls, *, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.error_code = code


class PermanentError(LeadstageError):
    """Trying again cannot help."""


class RetryableError(LeadstageError):
    """A later attempt may succeed."""

    retryable = True
    #: Seconds the server asked us to wait (``Retry-After``), when it said so.
    retry_after: float | None = None
    #: Whether the next attempt of every change of the account waits too (not only this one's).
    pauses_account: bool = False


class ConfigError(PermanentError, code="config"):
    """A missing or bad setting; the message names it."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One bad field of a change: which, and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class InvalidChange(PermanentError, code="invalid_change"):
    """A change (or its envelope) broke the rules; ``errors`` names each bad field."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = tuple(errors)
        super().__init__("invalid change: " + "; ".join(str(e) for e in self.errors))


class IdempotencyConflict(PermanentError, code="idempotency_conflict"):
    """The idempotency key is already used, for a different change.

    In a batch, ``label`` names the refused item in the caller's terms (``changes[3]``, ``line 4``)
    and ``earlier_label`` the item of the same batch that used the key first, when it is one;
    ``enqueued_before`` counts the changes of the batch already written (only ever non-zero when
    another producer wrote the key between the batch's check and its write).
    """

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


class UnknownAccount(PermanentError, code="unknown_account"):
    def __init__(self, account: str) -> None:
        self.account = account
        super().__init__(f"account {account!r} is not configured (see LEADSTAGE_ACCOUNTS_FILE)")


class Exhausted(PermanentError, code="exhausted"):
    """Out of attempts or past the maximum age."""


class RetryAfterTooLong(PermanentError, code="retry_after_too_long"):
    """iVvy asked for a pause longer than the change may wait: dead-lettered with the reason, so an
    operator replays it later instead of it waiting unseen (and outliving its ledger entry)."""

    def __init__(self, retry_after_s: float, cap_s: float, answer: str) -> None:
        super().__init__(
            f"iVvy asked to wait {retry_after_s:g}s, longer than LEADSTAGE_RETRY_AFTER_MAX ({cap_s:g}s): {answer}"
        )


class NotFound(LeadstageError, code="not_found"):
    """The change or dead letter a command asks about is not known (exit status 1)."""


class Interrupted(LeadstageError, code="interrupted"):
    """Redis stopped answering in the middle of a bulk enqueue (exit status 1); says what was written."""


class Refused(PermanentError, code="refused"):
    """The command line cannot be carried out as given (exit status 2): flags, a file, a located conflict."""


class ProcessFailed(LeadstageError, code="process_failed"):
    """A child process did not start, exited early, or does not answer on its port."""


class DemoFailed(ProcessFailed, code="demo_failed"):
    """The demo cannot run (no Redis, the worker died): one line for the operator, exit 1."""


class StaleRun(LeadstageError, code="stale_run"):
    """This run no longer owns its change (its lease lapsed and another run began): it must stop."""

    def __init__(self, job_id: str, run: int) -> None:
        super().__init__(f"run {run} of {job_id} was overtaken by a newer run")


class BadFilter(PermanentError, code="bad_filter"):
    """A filter given to a reader (``since``, a page cursor) is not usable as given."""


class InvalidEvent(PermanentError, code="invalid_event"):
    """A stream entry is not an event as ``build_event`` writes it (written by something else)."""

    def __init__(self, entry_id: str, field: str, reason: str) -> None:
        self.entry_id = entry_id
        super().__init__(f"stream entry {entry_id} is not a results event: {field} {reason}")
