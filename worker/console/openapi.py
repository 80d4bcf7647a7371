"""The OpenAPI document of the console's JSON API (served at ``/api/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from worker.core.change import KEY_MAX_CHARS, KEY_PATTERN
from worker.core.readers import DEAD_LETTER_FIELDS

API = "/api/v1"
#: Dead letters per page of ``GET /failures``: the default, and the most a request may ask for.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: The most keys one replay or discard request may name.
MAX_KEYS = 1000

_NULLABLE_STRING = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_ACCOUNT_QUERY = {"name": "account", "in": "query", "required": False, "schema": {"type": "string"}}
#: What the server takes (worker.core.change's rules), so that a document-valid request is accepted.
_KEY = {"type": "string", "minLength": 1, "maxLength": KEY_MAX_CHARS, "pattern": f"^{KEY_PATTERN}$"}
_ACCOUNT = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}
_NOT_BLANK = {"type": "string", "pattern": "\\S"}
_DURATION = {
    "type": "string",
    "pattern": "^(?:0*[1-9][0-9]{0,8}[smhd])+$",
    "maxLength": 32,
    "description": "a duration: 90s, 15m, 2h, 7d, or a sum such as 1h30m",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(
    properties: dict[str, Any], *, required: list[str] | None = None, description: str | None = None
) -> dict[str, Any]:
    """A JSON object schema: its properties, those it must have, what it is."""
    schema: dict[str, Any] = {"type": "object"}
    if description is not None:
        schema["description"] = description
    if required is not None:
        schema["required"] = required
    return {**schema, "properties": properties}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


_ERRORS = {
    "401": _problem("no token, or not a valid one (WWW-Authenticate: Bearer)"),
    "503": _problem("Redis is unavailable"),
}
_CHANGING_ERRORS = {
    **_ERRORS,
    "400": _problem("the body is not valid JSON or not as described; names what is wrong"),
    "403": _problem("the read-only token, or a cookie session without its CSRF token"),
    "415": _problem("the body is not application/json"),
}

_SCHEMAS: dict[str, Any] = {
    "Problem": _object(
        {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object"}},
        },
        required=["type", "title", "status", "detail"],
        description="RFC 9457 problem details",
    ),
    "AccountOverview": _object(
        {
            "account": {"type": "string"},
            "queued": {"type": "integer", "description": "changes on the queue (not finished)"},
            "due": {"type": "integer", "description": "queued changes due now, not taken yet"},
            "in_progress": {"type": "integer", "description": "changes a worker is attempting"},
            "retrying": {"type": "integer", "description": "changes waiting for a later attempt"},
            "dead_letters": {"type": "integer"},
            "paused_until": {**_NULLABLE_STRING, "description": "paused by iVvy's 429 until then (ISO 8601)"},
            "rate_limit": _object(
                {
                    "per_s": {"type": "number", "description": "the configured requests per second"},
                    "used_per_s": {"type": "number", "description": "requests per second over about a minute"},
                },
                required=["per_s", "used_per_s"],
            ),
        },
        required=[
            "account",
            "queued",
            "due",
            "in_progress",
            "retrying",
            "dead_letters",
            "paused_until",
            "rate_limit",
        ],
    ),
    "Worker": _object(
        {
            "id": {"type": "string"},
            "running": {"type": "integer"},
            "heartbeat_age_s": {"type": "number"},
            "alive": {"type": "boolean", "description": "heard from within one lease"},
        },
        required=["id", "running", "heartbeat_age_s", "alive"],
    ),
    "Rates": _object(
        {
            "bucket_s": {"type": "integer"},
            "start": {"type": "string"},
            **{event: {"type": "array", "items": {"type": "number"}} for event in ("succeeded", "failed", "retrying")},
            **{f"{event}_last_hour": {"type": "integer"} for event in ("succeeded", "failed", "retrying")},
        },
        required=["bucket_s", "start", "succeeded", "failed", "retrying"],
        description="events per second in each bucket of the last hour, oldest first",
    ),
    "Overview": _object(
        {
            "now": {"type": "string"},
            "accounts": {"type": "array", "items": _ref("AccountOverview")},
            "workers": {"type": "array", "items": _ref("Worker")},
            "rates": _ref("Rates"),
        },
        required=["now", "accounts", "workers", "rates"],
    ),
    "DeadLetter": _object(
        {
            "id": {"type": "string", "description": "the dead-letter stream id"},
            "dead_lettered_at": {"type": "string"},
            **{name: {"type": "string"} for name in DEAD_LETTER_FIELDS},
            "original_change": {"type": ["object", "null"]},
        },
        required=["id", "dead_lettered_at", "account", "idempotency_key", "error_code", "original_change"],
    ),
    "Failures": _object(
        {
            "dead_letters_matching": {"type": "integer"},
            "recent_since": {"type": "string"},
            "groups": {
                "type": "array",
                "items": _object(
                    {
                        "account": {"type": "string"},
                        "error_code": {"type": "string"},
                        "dead_letters": {"type": "integer"},
                        "recent_failed": {"type": "integer"},
                        "recent_retrying": {"type": "integer"},
                    },
                    required=["account", "error_code", "dead_letters", "recent_failed", "recent_retrying"],
                ),
            },
            "dead_letters": {"type": "array", "items": _ref("DeadLetter")},
            "next": {**_NULLABLE_STRING, "description": "pass as ?before= for the next page"},
        },
        required=["dead_letters_matching", "recent_since", "groups", "dead_letters", "next"],
    ),
    "TimelineItem": _object(
        {
            "kind": {"enum": ["enqueued", "attempt"]},
            "at": _NULLABLE_STRING,
            "generation": {"type": "integer"},
            "event": {"type": "string"},
            "attempt": {"type": "integer"},
            "http_status": _NULLABLE_INT,
            "error_code": _NULLABLE_STRING,
            "error_message": _NULLABLE_STRING,
            "duration_ms": _NULLABLE_INT,
            "stage_id": _NULLABLE_INT,
            "result": {"type": ["object", "null"], "description": "the results-stream event, while kept"},
        },
        required=["kind", "at"],
    ),
    "Change": _object(
        {
            "change": {"type": "object", "description": "as leadstage status prints it"},
            "timeline": {"type": "array", "items": _ref("TimelineItem")},
        },
        required=["change", "timeline"],
    ),
    "Selection": {
        "type": "object",
        "description": "either keys (of one account) or a filter; a filter without fields matches every dead letter",
        "properties": {
            "keys": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_KEYS},
            "account": {**_NOT_BLANK, "description": "the account of keys (default: default)"},
            "filter": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"account": _NOT_BLANK, "error_code": _NOT_BLANK, "since": _DURATION},
            },
        },
        "additionalProperties": False,
        "oneOf": [
            {"required": ["keys"], "not": {"required": ["filter"]}},
            {"required": ["filter"], "not": {"anyOf": [{"required": ["keys"]}, {"required": ["account"]}]}},
        ],
    },
    "Outcomes": _object(
        {
            "action": {"enum": ["replay", "discard"]},
            "results": {
                "type": "array",
                "items": _object(
                    {
                        "idempotency_key": {"type": "string"},
                        "account": {"type": "string"},
                        "dead_letter_id": _NULLABLE_STRING,
                        "status": {
                            "enum": ["queued", "not_failed", "discarded", "not_found", "error"],
                            "description": "queued (replayed), not_failed (left alone: the ledger says it is "
                            "not failed), discarded, not_found (no such dead letter), error (see message)",
                        },
                        "generation": {"type": "integer"},
                        "message": {"type": "string"},
                    },
                    required=["idempotency_key", "account", "status"],
                ),
            },
        },
        required=["action", "results"],
    ),
}


def _selection_operation(action: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": f"{action}DeadLetters",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Selection")}}},
            "responses": {"200": _json(_ref("Outcomes"), "what was done, key by key"), **_CHANGING_ERRORS},
        }
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "leadstage-sync console API",
            "version": "1",
            "description": "What the console's pages show and do, for scripts. Every request needs "
            "Authorization: Bearer with LEADSTAGE_CONSOLE_TOKEN (or LEADSTAGE_CONSOLE_READ_TOKEN for GET).",
        },
        "security": [{"bearer": []}],
        "paths": {
            f"{API}/overview": {
                "get": {
                    "summary": "Per account: queue, dead letters, pause, rate limit; workers; rates",
                    "operationId": "overview",
                    "responses": {"200": _json(_ref("Overview"), "the overview"), **_ERRORS},
                }
            },
            f"{API}/failures": {
                "get": {
                    "summary": "Dead letters and recent failures by account and error code; a page of dead letters",
                    "operationId": "failures",
                    "parameters": [
                        _ACCOUNT_QUERY,
                        {"name": "error_code", "in": "query", "required": False, "schema": {"type": "string"}},
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "description": "default: every dead letter; recent failures are those of the last "
                            "hour, or of since when shorter",
                            "schema": _DURATION,
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                        },
                        {
                            "name": "before",
                            "in": "query",
                            "required": False,
                            "description": "the previous page's next",
                            "schema": {"type": "string", "pattern": "^[0-9]{1,15}-[0-9]{1,15}$"},
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("Failures"), "groups and one page of dead letters, newest first"),
                        "400": _problem("a bad filter; names it"),
                        **_ERRORS,
                    },
                }
            },
            f"{API}/changes/{{idempotency_key}}": {
                "get": {
                    "summary": "One change and its timeline",
                    "operationId": "change",
                    "parameters": [
                        {"name": "idempotency_key", "in": "path", "required": True, "schema": _KEY},
                        {**_ACCOUNT_QUERY, "schema": _ACCOUNT, "description": "default: default"},
                    ],
                    "responses": {
                        "200": _json(_ref("Change"), "the change and its timeline"),
                        "400": _problem("a bad key or account; names it"),
                        "404": _problem("no such change (never enqueued, or past the ledger retention)"),
                        **_ERRORS,
                    },
                }
            },
            f"{API}/dead-letters/replay": _selection_operation("replay", "Put dead letters back on the queue"),
            f"{API}/dead-letters/discard": _selection_operation("discard", "Delete dead letters"),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
        },
    }
