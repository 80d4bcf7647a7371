"""RFC 9457 problem+json: the one shape of every 4xx and 5xx the webhook and the console give.

Handlers raise ``Problem``; the applications' middlewares render it, and turn aiohttp's own
``HTTPException`` (404, 405, 413) into one too (``from_http_exception``). Requests that aiohttp's
parser refuses before any handler runs are answered by ``producers.serving``, in the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import orjson
from aiohttp import web

from producers.openapi import CONTENT_ENCODINGS, RETRY_AFTER_S
from worker.core.errors import ConfigError, FieldError
from worker.core.logs import get_logger

__all__ = [
    "PROBLEM_TYPE",
    "Problem",
    "excerpt",
    "from_http_exception",
    "invalid",
    "misconfigured",
    "named",
    "not_json",
    "unavailable",
]

PROBLEM_TYPE: Final = "urn:leadstage:problem:"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"


class Problem(Exception):
    """An RFC 9457 answer; raised by handlers, rendered by the middleware."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        kind: str | None = None,
        errors: Sequence[Mapping[str, object]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.kind = kind
        self.errors = list(errors)
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body: dict[str, object] = {
            "type": PROBLEM_TYPE + self.kind if self.kind else "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        response = web.Response(
            status=self.status, body=orjson.dumps(body), content_type=PROBLEM_CONTENT_TYPE, headers=self.headers
        )
        if self.headers.get("Connection", "").lower() == "close":
            response.force_close()  # as the header says: the server closes the connection after it
        return response


def from_http_exception(exc: web.HTTPException) -> Problem:
    """aiohttp's own error answer (a 404, a 405 with its Allow header, a 413) as a problem."""
    allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return Problem(exc.status, exc.reason, exc.text or exc.reason, headers=allow)


def not_json(content_type: str) -> Problem:
    """415 for a body of another content type than JSON."""
    return Problem(415, "Unsupported Media Type", f"the body must be application/json, not {excerpt(content_type)!r}")


def unsupported_encoding(given: str | None = None) -> Problem:
    """415 for a Content-Encoding the service does not decode (``given``, when known), naming those it does."""
    wanted = ", ".join(CONTENT_ENCODINGS)
    detail = f"Content-Encoding must be one of {wanted}" + (f", not {excerpt(given)}" if given is not None else "")
    accepted = ", ".join(coding for coding in CONTENT_ENCODINGS if coding != "identity")
    return Problem(415, "Unsupported Media Type", detail, headers={"Accept-Encoding": accepted})


def unavailable(detail: str) -> Problem:
    """503 with Retry-After: Redis is down or does not answer in time."""
    return Problem(503, "Service Unavailable", detail, headers={"Retry-After": str(RETRY_AFTER_S)})


def misconfigured(error: ConfigError) -> Problem:
    """503 for a Redis the service cannot use as configured (REDIS_URL names something that is not
    Redis, or a database it does not have): the operator's to fix, so the reason goes to the log
    (it names the setting, never its password) and the client is told to retry later."""
    get_logger("leadstage.http").error("http.redis_misconfigured", error=str(error))
    return unavailable("the service cannot use its Redis as configured; see the server log")


def invalid(detail: str, errors: Sequence[Mapping[str, object]] = ()) -> Problem:
    """400 for an invalid change, account or key; ``errors`` name each field."""
    return Problem(400, "Bad Request", detail, kind="invalid-change", errors=errors)


def named(error: FieldError, field: str) -> dict[str, object]:
    """A field error of the change model, under the name the client used (a header, a query field)."""
    return {"field": field, "reason": error.reason}


def excerpt(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: what a client sent is never echoed whole."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
