"""The JSON Schemas of the HTTP producer's OpenAPI document (``producers.openapi``): a change, a
signed change, a result event and a change's status, from the change model's own constants."""

from __future__ import annotations

from typing import Any, Final

from worker.core.change import (
    ACCOUNT_PATTERN,
    ALIASES,
    APPLY_TO_LEAD,
    APPLY_TO_OPPORTUNITY,
    APPLY_TO_WORDS,
    COLOUR_PATTERN,
    ID_MAX,
    KEY_PATTERN,
    NAME_MAX_CHARS,
    NAME_PATTERN,
)
from worker.core.results import EVENTS

__all__ = [
    "ACCOUNT_FIELD",
    "ACCOUNT_SCHEMA_PATTERN",
    "COLOUR_SCHEMA_PATTERN",
    "KEY_SCHEMA_PATTERN",
    "NAME_SCHEMA_PATTERN",
    "account_property",
    "change_schema",
    "change_status_schema",
    "ref",
    "result_event_schema",
    "signed_change_schema",
]

#: The body's top-level field naming the account (signed, unlike a header).
ACCOUNT_FIELD: Final = "account"

#: The change model's rules, anchored as JSON Schema patterns are not.
ACCOUNT_SCHEMA_PATTERN: Final = f"^{ACCOUNT_PATTERN}$"
KEY_SCHEMA_PATTERN: Final = f"^{KEY_PATTERN}$"
COLOUR_SCHEMA_PATTERN: Final = f"^{COLOUR_PATTERN}$"
NAME_SCHEMA_PATTERN: Final = f"^{NAME_PATTERN}$"


def ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def change_schema() -> dict[str, Any]:
    colour = {
        "type": "string",
        "pattern": COLOUR_SCHEMA_PATTERN,
        "description": "Hex colour #rrggbb, any case; sent to iVvy in lower case.",
        "examples": ["#7ee546"],
    }
    apply_to = {
        "enum": [APPLY_TO_OPPORTUNITY, APPLY_TO_LEAD, *APPLY_TO_WORDS],
        "description": 'What the stage applies to: 1 or "opportunity", 2 or "lead". The words ignore case and '
        'surrounding spaces; "1" and "2" as strings are accepted too.',
    }
    alias_of = {alias: field for alias, field in ALIASES.items()}
    updatable = ["name", "colour", "applyTo", *alias_of]
    return {
        "type": "object",
        "description": "One addOrUpdateLeadStage request body. Without id: add a stage (name and applyTo "
        "required). With id: update that stage (at least one other field). Any other field is refused by name.",
        "properties": {
            "id": {
                "type": "integer",
                "minimum": 1,
                "maximum": ID_MAX,
                "description": "The stage to update; absent for an add. Written as a JSON integer (5, not 5.0).",
            },
            "name": {
                "type": "string",
                "minLength": 1,
                "maxLength": NAME_MAX_CHARS,
                "pattern": NAME_SCHEMA_PATTERN,
                "description": f"1..{NAME_MAX_CHARS} characters after trimming surrounding spaces; no control "
                "characters or bidi overrides, and a visible character (the pattern states the strict form: a "
                "letter or digit of a common script; names visible only through other scripts or symbols pass too).",
            },
            "colour": colour,
            "color": {**colour, "description": "Alias of colour (give one of the two)."},
            "applyTo": apply_to,
            "appliesTo": {**apply_to, "description": "Alias of applyTo (an older name in iVvy's docs)."},
        },
        "additionalProperties": False,
        "allOf": [{"not": {"required": [field, alias]}} for alias, field in alias_of.items()]
        + [
            {
                "anyOf": [
                    {"required": ["id"], "anyOf": [{"required": [f]} for f in updatable]},
                    {"required": ["name"], "anyOf": [{"required": ["applyTo"]}, {"required": ["appliesTo"]}]},
                ]
            }
        ],
    }


def account_property() -> dict[str, Any]:
    return {
        "type": "string",
        "pattern": ACCOUNT_SCHEMA_PATTERN,
        "description": "The iVvy account (default 'default'), for requests signed with a WEBHOOK_SECRET secret; "
        "with an account's own secret (LEADSTAGE_WEBHOOK_SECRETS_FILE) it may only name that account (403 otherwise).",
    }


def signed_change_schema() -> dict[str, Any]:
    """A change as a webhook body: the change's fields and the top-level ``account``."""
    schema = change_schema()
    schema["properties"][ACCOUNT_FIELD] = account_property()
    schema["description"] += f" As a whole body it may carry {ACCOUNT_FIELD}."
    return schema


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


def result_event_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "One event of the results stream, typed (worker.core.results.ResultEvent).",
        "required": ["id", "event", "idempotency_key", "job_id", "account", "attempt", "generation"],
        "properties": {
            "id": {"type": "string", "description": "The results stream's entry id."},
            "event": {"enum": sorted(EVENTS)},
            "idempotency_key": {"type": "string"},
            "job_id": {"type": "string"},
            "account": {"type": "string"},
            "operation": {"type": "string"},
            "stage_id": _nullable("integer"),
            "attempt": {"type": "integer"},
            "http_status": _nullable("integer"),
            "error_code": _nullable("string"),
            "error_message": _nullable("string"),
            "retryable": _nullable("boolean"),
            "source": {"type": "string"},
            "enqueued_at": _nullable("string"),
            "finished_at": _nullable("string"),
            "duration_ms": {"type": "integer"},
            "change": {"type": ["object", "null"], "description": "The body sent to iVvy (null: nothing sent)."},
            "generation": {"type": "integer"},
            "trace_id": {**_nullable("string"), "description": "The OpenTelemetry trace (null: not traced)."},
            "sent_as": {
                **_nullable("string"),
                "description": "How it was sent: alone, or coalesced with other changes of its stage.",
            },
            "carried_by": {
                **_nullable("string"),
                "description": "The idempotency key of the change whose request carried it (null: nothing sent).",
            },
        },
    }


def change_status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["job_id", "idempotency_key", "account", "state", "attempts", "generation", "event"],
        "properties": {
            "job_id": {"type": "string"},
            "idempotency_key": {"type": "string"},
            "account": {"type": "string"},
            "state": {"enum": ["queued", "running", "retrying", "succeeded", "failed", "superseded"]},
            "operation": {"type": "string"},
            "stage_id": _nullable("integer"),
            "change": {"type": ["object", "null"]},
            "source": {"type": "string"},
            "attempts": {"type": "integer"},
            "generation": {"type": "integer"},
            "enqueued_at": _nullable("string"),
            "last_attempt_at": _nullable("string"),
            "next_attempt_at": _nullable("string"),
            "finished_at": _nullable("string"),
            "history": {"type": "array", "items": {"type": "object"}, "description": "One object per attempt."},
            "event": {
                "oneOf": [ref("schemas", "ResultEvent"), {"type": "null"}],
                "description": "The terminal event; null while the change is not finished.",
            },
        },
    }
