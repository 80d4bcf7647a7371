"""The OpenAPI 3.1 document of the HTTP producer, served at ``GET /openapi.json``.

It is built from the same constants the validation uses (``worker.core.change``) and the handler's
own limits, so the document and the server cannot drift apart silently; tests run schemathesis
against it. Where the server is more lenient than a JSON Schema can say simply (the name is
trimmed before its length is checked, applyTo words ignore case), the schema states the strict
form and the description the leniency. The schemas are ``producers.openapi_schemas``'s.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

from producers.openapi_schemas import (
    ACCOUNT_FIELD,
    ACCOUNT_SCHEMA_PATTERN,
    KEY_SCHEMA_PATTERN,
    account_property,
    change_schema,
    change_status_schema,
    ref,
    result_event_schema,
    signed_change_schema,
)
from worker.core.change import DEFAULT_ACCOUNT
from worker.core.ledger import Receipt

CHANGES_PATH: Final = "/v1/lead-stage-changes"
#: Where one change's status is read (``producers.status``); the key is percent-encoded in it.
STATUS_PATH: Final = CHANGES_PATH + "/{idempotency_key}"
MAX_BATCH: Final = 1000
#: Seconds a client is asked to wait (``Retry-After``) when Redis is down.
RETRY_AFTER_S: Final = 5
#: The Content-Encodings of a request body the server decodes (415 for any other).
CONTENT_ENCODINGS: Final = ("identity", "gzip", "deflate")

_JSON = "application/json"
_PROBLEM = "application/problem+json"


def location(receipt: Receipt) -> str:
    """The status URL of a receipt's change (with ``?account=`` unless it is the default account)."""
    path = STATUS_PATH.format(idempotency_key=quote(receipt.idempotency_key, safe=""))
    return path if receipt.account == DEFAULT_ACCOUNT else f"{path}?account={receipt.account}"


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
        "content": {_PROBLEM: {"schema": ref("schemas", "ValidationProblem" if validation else "Problem")}},
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
            "content": {_JSON: {"schema": {"oneOf": [ref("schemas", "SignedChange"), ref("schemas", "ChangeList")]}}},
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
                "content": {_JSON: {"schema": ref("schemas", "Receipts")}},
            },
            "400": _problem_response(
                "The body is not JSON (or repeats a key in an object) or cannot be decoded, or a change, the "
                "account or the key is invalid, or an unsigned header contradicts the signed request; errors "
                "name each field (and the item index for a list). Also a request the HTTP parser refuses (a bad "
                "request line, header or chunking, a header over 8 KiB: type "
                "urn:leadstage:problem:malformed-request). Nothing was enqueued.",
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
                        "200": {"description": "Alive.", "content": {_JSON: {"schema": ref("schemas", "Status")}}}
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Redis answers PING (on a Redis Cluster, every master)",
                    "responses": {
                        "200": {"description": "Ready.", "content": {_JSON: {"schema": ref("schemas", "Status")}}},
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
                "LeadStageChange": change_schema(),
                "SignedChange": signed_change_schema(),
                "ChangeList": {
                    "type": "object",
                    "required": ["changes"],
                    "additionalProperties": False,
                    "properties": {
                        ACCOUNT_FIELD: account_property(),
                        "changes": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH,
                            "items": ref("schemas", "LeadStageChange"),
                        },
                    },
                },
                "Receipt": receipt,
                "Receipts": {
                    "type": "object",
                    "required": ["receipts"],
                    "properties": {"receipts": {"type": "array", "items": ref("schemas", "Receipt")}},
                },
                "Problem": problem,
                "ValidationProblem": {
                    "allOf": [
                        ref("schemas", "Problem"),
                        {"type": "object", "properties": {"errors": {"type": "array", "items": field_error}}},
                    ]
                },
                "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
                "ChangeStatus": change_status_schema(),
                "ResultEvent": result_event_schema(),
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
                "content": {_JSON: {"schema": ref("schemas", "ChangeStatus")}},
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
