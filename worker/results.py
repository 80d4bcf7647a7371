"""Events of the results stream (SPEC.md: Results stream), built in one place.

Every entry has the same flat string fields; empty strings stand for "not applicable".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from worker.change import LeadStageChange
from worker.errors import IvvyErrorDetails, LeadstageError

Event = Literal["succeeded", "failed", "superseded", "retrying"]
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "superseded"})


def iso_ms(epoch_ms: int) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-28T03:14:40.123Z."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True, slots=True)
class JobFacts:
    """What an event says about the change itself, whatever the outcome."""

    job_id: str
    idempotency_key: str
    account: str
    change: LeadStageChange
    source: str
    enqueued_at_ms: int
    generation: int


def error_fields(error: LeadstageError | None) -> dict[str, str]:
    """http_status, error_code, error_message and retryable of an error (all empty for none)."""
    if error is None:
        return {"http_status": "", "error_code": "", "error_message": "", "retryable": ""}
    status = ivvy_code = None
    if isinstance(error, IvvyErrorDetails):
        status, ivvy_code = error.http_status, error.ivvy_code
    return {
        "http_status": "" if status is None else str(status),
        "error_code": ivvy_code or error.error_code,
        "error_message": str(error),
        "retryable": "true" if error.retryable else "false",
    }


def lost_event(job_id: str, *, finished_at_ms: int) -> dict[str, str]:
    """The failed event of a change whose ledger entry vanished (expired while it waited): the
    fields of every event, with what is still known (its key and account) and why."""
    account, _, idempotency_key = job_id.partition(":")
    return {
        "event": "failed",
        "idempotency_key": idempotency_key,
        "job_id": job_id,
        "account": account,
        "operation": "",
        "stage_id": "",
        "attempt": "0",
        "http_status": "",
        "error_code": "ledger_missing",
        "error_message": "the change's ledger entry expired before it was done (LEADSTAGE_LEDGER_RETENTION); "
        "the change itself is lost and cannot be replayed",
        "retryable": "false",
        "source": "",
        "enqueued_at": "",
        "finished_at": iso_ms(finished_at_ms),
        "duration_ms": "0",
        "change": "",
        "generation": "0",
    }


def build_event(
    event: Event,
    facts: JobFacts,
    *,
    attempt: int,
    finished_at_ms: int,
    duration_ms: int,
    sent: LeadStageChange | None,
    stage_id: int | None = None,
    error: LeadstageError | None = None,
) -> dict[str, str]:
    """One results-stream entry. ``sent`` is the body posted to iVvy (None when nothing was sent)."""
    return {
        "event": event,
        "idempotency_key": facts.idempotency_key,
        "job_id": facts.job_id,
        "account": facts.account,
        "operation": facts.change.operation,
        "stage_id": "" if stage_id is None else str(stage_id),
        "attempt": str(attempt),
        **error_fields(error),
        "source": facts.source,
        "enqueued_at": iso_ms(facts.enqueued_at_ms),
        "finished_at": iso_ms(finished_at_ms),
        "duration_ms": str(duration_ms),
        "change": "" if sent is None else sent.canonical_json().decode(),
        "generation": str(facts.generation),
    }
