"""Events of the results stream (docs/contract.md: The results stream), built in one place.

Every entry has the same flat string fields; empty strings stand for "not applicable".
``ResultEvent`` and ``DeadLetter`` are those entries read back, typed (for ``producers.outcomes``
and the HTTP status route).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import fields as fields_of
from datetime import UTC, datetime
from typing import Any, Required, Self, TypedDict, Unpack

import orjson

from worker.core import tracing
from worker.core.change import LeadStageChange
from worker.core.errors import InvalidEvent, IvvyErrorDetails, LeadstageError
from worker.core.states import TERMINAL, Outcome

#: The results stream's events: a retry, or one of the terminal states (``worker.core.states.TERMINAL``).
Event = Outcome
EVENTS: frozenset[Outcome] = frozenset(Outcome)


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
        "trace_id": "",
        "sent_as": "",
        "carried_by": "",
    }


class Verdict(TypedDict, total=False):
    """How a run of a change ended, beyond its event: what was posted to iVvy (None when nothing
    was), the stage it applied to, the error it ended with."""

    sent: Required[LeadStageChange | None]
    stage_id: int | None
    error: LeadstageError | None


def build_event(
    event: Event,
    facts: JobFacts,
    *,
    attempt: int,
    finished_at_ms: int,
    duration_ms: int,
    sent_as: str = "alone",
    carried_by: str | None = None,
    **verdict: Unpack[Verdict],
) -> dict[str, str]:
    """One results-stream entry: ``verdict`` says what was sent and how it ended, ``sent_as`` how it
    was sent (``alone``, ``coalesced``) and ``carried_by`` the key of the change whose request
    carried it (default: its own)."""
    sent, stage_id = verdict["sent"], verdict.get("stage_id")
    return {
        "event": event,
        "idempotency_key": facts.idempotency_key,
        "job_id": facts.job_id,
        "account": facts.account,
        "operation": facts.change.operation,
        "stage_id": "" if stage_id is None else str(stage_id),
        "attempt": str(attempt),
        **error_fields(verdict.get("error")),
        "source": facts.source,
        "enqueued_at": iso_ms(facts.enqueued_at_ms),
        "finished_at": iso_ms(finished_at_ms),
        "duration_ms": str(duration_ms),
        "change": "" if sent is None else sent.canonical_json().decode(),
        "generation": str(facts.generation),
        "trace_id": tracing.current_trace_id(),  # '' without tracing
        "sent_as": "" if sent is None else sent_as,
        "carried_by": "" if sent is None else carried_by or facts.idempotency_key,
    }


@dataclass(frozen=True, slots=True)
class ResultEvent:
    """One results-stream entry, typed: what ``build_event`` wrote, read back.

    ``id`` is the entry's stream id. Empty fields are None; ``change`` is the body sent to iVvy
    (None when nothing was sent); ``raw`` keeps the entry's own strings (what ``leadstage results``
    prints).
    """

    id: str
    event: Event
    idempotency_key: str
    job_id: str
    account: str
    operation: str
    stage_id: int | None
    attempt: int
    http_status: int | None
    error_code: str | None
    error_message: str | None
    retryable: bool | None
    source: str
    enqueued_at: datetime | None
    finished_at: datetime | None
    duration_ms: int
    change: dict[str, object] | None
    generation: int
    #: The OpenTelemetry trace of the attempt (and of its producer), None without tracing.
    trace_id: str | None
    #: How the change was sent (``alone``, ``coalesced``), and the key whose request carried it
    #: (None when nothing was sent, or written before coalescing existed).
    sent_as: str | None
    carried_by: str | None
    raw: Mapping[str, str] = field(repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        """Whether this is the change's one terminal event (of its generation)."""
        return self.event in TERMINAL

    @classmethod
    def from_entry(cls, entry_id: str, fields: Mapping[str, str]) -> Self:
        """Parse a stream entry; ``InvalidEvent`` names the first field that is wrong."""
        return cls(**_event_values(entry_id, fields))

    def as_dict(self) -> dict[str, object]:
        """The event as typed JSON (numbers, booleans, null, the change as an object)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in fields_of(self) if f.name != "raw"}


@dataclass(frozen=True, slots=True)
class DeadLetter(ResultEvent):
    """One dead-letter entry: the ``failed`` event plus the whole change as it was enqueued."""

    original_change: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry_id: str, fields: Mapping[str, str]) -> Self:
        original = _json_object(entry_id, fields, "original_change")
        if original is None:
            raise InvalidEvent(entry_id, "original_change", "is missing")
        return cls(**_event_values(entry_id, fields), original_change=original)


def _event_values(entry_id: str, fields: Mapping[str, str]) -> dict[str, Any]:
    def text(name: str) -> str:
        value = fields.get(name)
        if value is None:
            raise InvalidEvent(entry_id, name, "is missing")
        return value

    def number(name: str, *, empty: int | None = None) -> int | None:
        value = fields.get(name, "")
        if value == "":
            return empty
        try:
            return int(value)
        except ValueError:
            raise InvalidEvent(entry_id, name, f"is not a number: {value[:40]!r}") from None

    def when(name: str) -> datetime | None:
        value = fields.get(name, "")
        try:
            return datetime.fromisoformat(value) if value else None
        except ValueError:
            raise InvalidEvent(entry_id, name, f"is not an ISO 8601 time: {value[:40]!r}") from None

    event = text("event")
    if event not in EVENTS:
        raise InvalidEvent(entry_id, "event", f"is not one of {', '.join(sorted(EVENTS))}: {event[:40]!r}")
    retryable = fields.get("retryable", "")
    return {
        "id": entry_id,
        "event": Outcome(event),
        "idempotency_key": text("idempotency_key"),
        "job_id": text("job_id"),
        "account": text("account"),
        "operation": fields.get("operation", ""),
        "stage_id": number("stage_id"),
        "attempt": number("attempt", empty=0),
        "http_status": number("http_status"),
        "error_code": fields.get("error_code") or None,
        "error_message": fields.get("error_message") or None,
        "retryable": None if retryable == "" else retryable == "true",
        "source": fields.get("source", ""),
        "enqueued_at": when("enqueued_at"),
        "finished_at": when("finished_at"),
        "duration_ms": number("duration_ms", empty=0),
        "change": _json_object(entry_id, fields, "change"),
        "generation": number("generation", empty=0),
        "trace_id": fields.get("trace_id") or None,
        "sent_as": fields.get("sent_as") or None,
        "carried_by": fields.get("carried_by") or None,
        "raw": dict(fields),
    }


def _json_object(entry_id: str, fields: Mapping[str, str], name: str) -> dict[str, object] | None:
    value = fields.get(name, "")
    if not value:
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidEvent(entry_id, name, "is not a JSON object")
    return parsed


def _json_value(value: object) -> object:
    return iso_ms(int(value.timestamp() * 1000)) if isinstance(value, datetime) else value
