"""The OpenAPI 3.1 document of the HTTP producer, served at ``GET /openapi.json``.

It is built from the same constants the validation uses (``worker.core.change``) and the handler's
own limits, so the document and the server cannot drift apart silently; tests run schemathesis
against it. Where the server is more lenient than a JSON Schema can say simply (the name is
trimmed before its length is checked, applyTo words ignore case), the schema states the strict
form and the description the leniency.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

from worker.core.change import (
    ACCOUNT_PATTERN,
    ALIASES,
    APPLY_TO_LEAD,
    APPLY_TO_OPPORTUNITY,
    APPLY_TO_WORDS,
    COLOUR_PATTERN,
    DEFAULT_ACCOUNT,
    ID_MAX,
    KEY_PATTERN,
    NAME_MAX_CHARS,
    NAME_PATTERN,
)
from worker.core.ledger import Receipt
from worker.core.results import EVENTS

CHANGES_PATH: Final = "/v1/lead-stage-changes"
#: Where one change's status is read (``producers.status``); the key is percent-encoded in it.
STATUS_PATH: Final = CHANGES_PATH + "/{idempotency_key}"
MAX_BATCH: Final = 1000
#: Seconds a client is asked to wait (``Retry-After``) when Redis is down.
RETRY_AFTER_S: Final = 5
#: The body's top-level field naming the account (signed, unlike a header).
ACCOUNT_FIELD: Final = "account"
#: The Content-Encodings of a request body the server decodes (415 for any other).
CONTENT_ENCODINGS: Final = ("identity", "gzip", "deflate")

#: The change model's rules, anchored as JSON Schema patterns are not.
ACCOUNT_SCHEMA_PATTERN: Final = f"^{ACCOUNT_PATTERN}$"
KEY_SCHEMA_PATTERN: Final = f"^{KEY_PATTERN}$"
COLOUR_SCHEMA_PATTERN: Final = f"^{COLOUR_PATTERN}$"
NAME_SCHEMA_PATTERN: Final = f"^{NAME_PATTERN}$"

_JSON = "application/json"
_PROBLEM = "application/problem+json"


def location(receipt: Receipt) -> str:
    """The status URL of a receipt's change (with ``?account=`` unless it is the default account)."""
    path = STATUS_PATH.format(idempotency_key=quote(receipt.idempotency_key, safe=""))
    return path if receipt.account == DEFAULT_ACCOUNT else f"{path}?account={receipt.account}"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _change_schema() -> dict[str, Any]:
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
        "allOf": [
            {"not": {"required": [field, alias]}} for alias, field in alias_of.items()
        ] + [
            {
                "anyOf": [
                    {"required": ["id"], "anyOf": [{"required": [f]} for f in updatable]},
                    {"required": ["name"], "anyOf": [{"required": ["applyTo"]}, {"required": ["appliesTo"]}]},
                ]
            }
        ],
    }  # fmt: skip


def _account_property() -> dict[str, Any]:
    return {
        "type": "string",
        "pattern": ACCOUNT_SCHEMA_PATTERN,
        "description": "The iVvy account (default 'default'), for requests signed with a WEBHOOK_SECRET secret; "
        "with an account's own secret (LEADSTAGE_WEBHOOK_SECRETS_FILE) it may only name that account (403 otherwise).",
    }


def _signed_change_schema() -> dict[str, Any]:
    """A change as a webhook body: the change's fields and the top-level ``account``."""
    schema = _change_schema()
    schema["properties"][ACCOUNT_FIELD] = _account_property()
    schema["description"] += f" As a whole body it may carry {ACCOUNT_FIELD}."
    return schema


def _header(name: str, description: str, *, required: bool, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": required, "description": description, "schema": schema}


def _account_parameters(header_description: str) -> list[dict[str, Any]]:
    """The account, as the X-Leadstage-Account header or the ``account`` query parameter."""
    schema = {"type": "string", "pattern": ACCOUNT_SCHEMA_PATTERN}
    return [
        _header("X-Leadstage-Account", header_description, required=False, schema=schema),
        {
            "name": "account",
            "in": "query",
            "required": False,
            "description": "The account when X-Leadstage-Account is absent (the header wins).",
            "schema": schema,
        },
    ]


def _problem_response(description: str, *, validation: bool = False, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {_PROBLEM: {"schema": _ref("schemas", "ValidationProblem" if validation else "Problem")}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
        }
    return response


def openapi_document(max_body_bytes: int) -> dict[str, Any]:
    """The document; ``max_body_bytes`` is the server's body limit (413 beyond it)."""
    problem = {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    }
    field_error = {
        "type": "object",
        "required": ["field", "reason"],
        "properties": {
            "field": {"type": "string", "description": "The field (or header) at fault."},
            "reason": {"type": "string"},
            "index": {"type": "integer", "minimum": 0, "description": "The item of a changes list at fault."},
        },
    }
    receipt = {
        "type": "object",
        "required": ["job_id", "idempotency_key", "status"],
        "properties": {
            "job_id": {"type": "string", "description": "{account}:{idempotency_key}"},
            "idempotency_key": {"type": "string"},
            "status": {
                "enum": ["queued", "duplicate"],
                "description": "duplicate: the key was already enqueued with the same change (nothing new queued).",
            },
            "location": {
                "type": "string",
                "format": "uri-reference",
                "description": "Where the change's status and outcome are read (GET, with a status token).",
            },
        },
    }
    post = {
        "operationId": "enqueueLeadStageChanges",
        "summary": "Enqueue one lead-stage change, or a list of them",
        "description": (
            "The body is signed per Standard Webhooks (5-minute timestamp tolerance) with a secret of "
            "WEBHOOK_SECRET or an account's own secret (LEADSTAGE_WEBHOOK_SECRETS_FILE); several secrets may be "
            "valid at once, for rotation. Everything that decides what is enqueued is signed: the idempotency "
            "key is the webhook-id (for a list, ':{index}' is appended to it per item, so a redelivered webhook "
            "answers 'duplicate' and enqueues nothing again); the account is the one whose secret verified the "
            f"request, else the body's {ACCOUNT_FIELD} field, else 'default'. "
            "Every change is validated before any is enqueued: a request is enqueued whole or not at all. "
            "Unsigned headers cannot change what is enqueued: an Idempotency-Key header, an X-Leadstage-Account "
            "header or an account query parameter is accepted only when it repeats the signed value (400 "
            f"otherwise). Content-Encoding: one of {', '.join(CONTENT_ENCODINGS)} (415 for any other, 400 for a "
            f"body that does not decode). Bodies over {max_body_bytes} bytes (after decoding) are refused (413)."
        ),
        "parameters": [
            _header(
                "webhook-id",
                "Standard Webhooks message id; it is the idempotency key (signed), so a redelivery is a duplicate.",
                required=True,
                schema={"type": "string", "pattern": KEY_SCHEMA_PATTERN},
            ),
            _header(
                "webhook-timestamp",
                "Standard Webhooks timestamp (Unix seconds), within 5 minutes of the server's clock.",
                required=True,
                schema={"type": "string"},
            ),
            _header(
                "webhook-signature",
                "Standard Webhooks signature(s): space-separated 'v1,<base64 HMAC-SHA256>'.",
                required=True,
                schema={"type": "string"},
            ),
        ],
        "requestBody": {
            "required": True,
            "content": {_JSON: {"schema": {"oneOf": [_ref("schemas", "SignedChange"), _ref("schemas", "ChangeList")]}}},
        },
        "responses": {
            "202": {
                "description": "Accepted: one receipt per change, in order, each with the location of its status.",
                "headers": {
                    "Location": {
                        "description": "For a single change: the location of its status.",
                        "schema": {"type": "string", "format": "uri-reference"},
                    }
                },
                "content": {_JSON: {"schema": _ref("schemas", "Receipts")}},
            },
            "400": _problem_response(
                "The body is not JSON (or repeats a key in an object) or cannot be decoded, or a change, the "
                "account or the key is invalid, or an unsigned header contradicts the signed request; errors "
                "name each field (and the item index for a list). Nothing was enqueued.",
                validation=True,
            ),
            "401": _problem_response("Missing, invalid or expired Standard Webhooks signature."),
            "403": _problem_response("The body names another account than the one whose secret signed it."),
            "408": _problem_response("The body did not arrive in time (a stalled or very slow client)."),
            "413": _problem_response(f"The body is larger than {max_body_bytes} bytes."),
            "415": _problem_response(
                "The body is not application/json, or its Content-Encoding is not one of "
                f"{', '.join(CONTENT_ENCODINGS)}."
            ),
            "422": _problem_response(
                "The idempotency key is already used for a different change (IETF Idempotency-Key draft). "
                "Nothing was enqueued."
            ),
            "503": _problem_response(
                "Redis is unavailable or did not answer in time; whether the changes were enqueued is unknown: "
                "retry with the same webhook-id (an enqueued change then answers as a duplicate).",
                retry_after=True,
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "leadstage-sync HTTP producer",
            "version": "1.0.0",
            "description": "Enqueues lead-stage changes for the iVvy CRM API (addOrUpdateLeadStage).",
        },
        "paths": {
            CHANGES_PATH: {"post": post},
            STATUS_PATH: {"get": _status_operation()},
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is alive",
                    "responses": {
                        "200": {"description": "Alive.", "content": {_JSON: {"schema": _ref("schemas", "Status")}}}
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Redis answers PING",
                    "responses": {
                        "200": {"description": "Ready.", "content": {_JSON: {"schema": _ref("schemas", "Status")}}},
                        "503": _problem_response("Redis is unavailable.", retry_after=True),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format, or OpenMetrics when Accept asks for it.",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/openmetrics-text": {"schema": {"type": "string"}},
                            },
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {"description": "OpenAPI 3.1.", "content": {_JSON: {"schema": {"type": "object"}}}}
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "LeadStageChange": _change_schema(),
                "SignedChange": _signed_change_schema(),
                "ChangeList": {
                    "type": "object",
                    "required": ["changes"],
                    "additionalProperties": False,
                    "properties": {
                        ACCOUNT_FIELD: _account_property(),
                        "changes": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH,
                            "items": _ref("schemas", "LeadStageChange"),
                        },
                    },
                },
                "Receipt": receipt,
                "Receipts": {
                    "type": "object",
                    "required": ["receipts"],
                    "properties": {"receipts": {"type": "array", "items": _ref("schemas", "Receipt")}},
                },
                "Problem": problem,
                "ValidationProblem": {
                    "allOf": [
                        _ref("schemas", "Problem"),
                        {"type": "object", "properties": {"errors": {"type": "array", "items": field_error}}},
                    ]
                },
                "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
                "ChangeStatus": _change_status_schema(),
                "ResultEvent": _result_event_schema(),
            },
            "securitySchemes": {
                "statusToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "base64url (no padding) of HMAC-SHA256 keyed with the webhook secret's bytes "
                    "(the base64 after whsec_, decoded) over 'leadstage-sync status v1:' + the account. It reads "
                    "only that account's changes.",
                }
            },
        },
    }


def _status_operation() -> dict[str, Any]:
    return {
        "operationId": "getLeadStageChange",
        "summary": "Where one change stands, and its terminal event once it has one",
        "description": "The location a 202 gives for each change. Poll it until event is not null: that is the "
        "change's one terminal event (succeeded, failed or superseded) of its current generation.",
        "security": [{"statusToken": []}],
        "parameters": [
            {
                "name": "idempotency_key",
                "in": "path",
                "required": True,
                "description": "The change's idempotency key, percent-encoded.",
                "schema": {"type": "string", "pattern": KEY_SCHEMA_PATTERN},
            },
            *_account_parameters(
                "The account the change was enqueued for (default 'default'); the token must be this account's."
            ),
        ],
        "responses": {
            "200": {
                "description": "Where the change stands.",
                "content": {_JSON: {"schema": _ref("schemas", "ChangeStatus")}},
            },
            "400": _problem_response("The account or the key is malformed.", validation=True),
            "401": {
                **_problem_response("No bearer token, or not one of this account's."),
                "headers": {"WWW-Authenticate": {"description": "Bearer.", "schema": {"type": "string"}}},
            },
            "404": _problem_response(
                "The account has no change with this key (never enqueued, or finished longer ago than the "
                "ledger retention)."
            ),
            "503": _problem_response("Redis is unavailable; retry later.", retry_after=True),
        },
    }


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


def _result_event_schema() -> dict[str, Any]:
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


def _change_status_schema() -> dict[str, Any]:
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
                "oneOf": [_ref("schemas", "ResultEvent"), {"type": "null"}],
                "description": "The terminal event; null while the change is not finished.",
            },
        },
    }
