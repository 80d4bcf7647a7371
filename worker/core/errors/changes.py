"""The answers about one change a producer asks after (``wait``, the consumers): unknown, late, trimmed."""

from __future__ import annotations

from collections.abc import Mapping

from worker.core.errors.base import LeadstageError, PermanentError, RetryableError


class InvalidOption(PermanentError, code="invalid_option"):
    """An argument of ``wait`` or of a consumer is unusable; the message names it."""


class UnknownChange(PermanentError, code="unknown_change"):
    """The ledger does not know the change: never enqueued, or finished before the retention."""

    def __init__(self, account: str, idempotency_key: str) -> None:
        self.account, self.idempotency_key = account, idempotency_key
        super().__init__(
            f"no change with idempotency key {idempotency_key!r} for account {account!r} "
            "(never enqueued, or finished longer ago than the ledger retention)"
        )


def _where(status: Mapping[str, object]) -> str:
    text = f"it is {status['state']} after {status['attempts']} attempt(s)"
    if status.get("next_attempt_at"):
        text += f", next attempt at {status['next_attempt_at']}"
    history = status.get("history")
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        last = history[-1]
        if last.get("error_code"):
            text += f", last error {last['error_code']}: {last.get('error_message', '')}"
    return text


class WaitTimeout(RetryableError, code="wait_timeout"):
    """No terminal event within the timeout; ``status`` is where the change stands (the ledger's)."""

    def __init__(self, status: Mapping[str, object], timeout: float) -> None:
        self.status = dict(status)
        self.timeout = timeout
        super().__init__(
            f"change {status['idempotency_key']!r} of account {status['account']!r} has no terminal event "
            f"after {timeout:g} s: {_where(status)}"
        )


class OutcomeUnavailable(LeadstageError, code="outcome_unavailable"):
    """The change ended (``status`` says how) but its event is no longer in the results stream."""

    def __init__(self, status: Mapping[str, object]) -> None:
        self.status = dict(status)
        super().__init__(
            f"change {status['idempotency_key']!r} of account {status['account']!r} is {status['state']}, "
            "but its event has been trimmed from the results stream (LEADSTAGE_RESULTS_MAXLEN)"
        )
