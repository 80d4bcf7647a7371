"""The webhook's request body: read within its limits, parsed as JSON, taken apart into changes.

``read_body`` answers 413 (over ``LEADSTAGE_WEBHOOK_MAX_BODY``, declared or inflated), 415 (not
JSON, an unknown Content-Encoding), 408 (not arrived within ``BODY_TIMEOUT_S``) or 400 (it does not
decode); ``loads`` 400 for what is not JSON or repeats a key in an object; ``changes_of`` 400 for
a bad list of changes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from producers.library import ItemError, field_errors
from producers.openapi import CONTENT_ENCODINGS, MAX_BATCH
from producers.problems import Problem, excerpt, invalid, named, not_json, unsupported_encoding
from worker.core.change import parse_envelope
from worker.core.errors import InvalidChange

__all__ = ["BODY_TIMEOUT_S", "changes_of", "check_key", "error_list", "loads", "read_body"]

#: The whole body must arrive within this once the headers have: a client that stalls or trickles
#: it (slowloris) gets 408 instead of holding a connection and a handler forever.
BODY_TIMEOUT_S: Final = 10.0

#: The header of an answer after which the connection is closed (its body was not read to the end).
_CLOSE: Final = {"Connection": "close"}


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole (decoded) body, or the 413, 415, 408 or 400 that says why not."""
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "Content Too Large", f"the body is {request.content_length} bytes; at most {limit}")
    if request.content_type != "application/json":
        raise not_json(request.content_type)
    encodings = request.headers.getall("Content-Encoding", [])
    # Exactly what aiohttp decodes for us (one coding, compared after lower()), or nothing.
    if len(encodings) > 1 or (encodings and encodings[0].lower() not in CONTENT_ENCODINGS):
        raise unsupported_encoding(", ".join(encodings))
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Problem(413, "Content Too Large", f"the body is over {limit} bytes") from None
    except TimeoutError:
        raise Problem(
            408,
            "Request Timeout",
            f"the body did not arrive within {BODY_TIMEOUT_S:g} s",
            headers=_CLOSE,
        ) from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        # Corrupt gzip/deflate, or a chunked body the parser refuses: the client's fault. The rest
        # of the connection cannot be read either: the answer says it is closed.
        if isinstance(exc.__cause__, ContentEncodingError) or isinstance(exc, ContentEncodingError):
            detail = f"the body cannot be decoded as {encodings[0].lower()}"
        else:
            detail = "the body is malformed (its length or chunked encoding)"
        raise Problem(400, "Bad Request", detail, headers=_CLOSE) from None
    except ConnectionError:
        # The client went away mid-body: its fault, not a server error (no traceback, no 500 counted).
        raise Problem(400, "Bad Request", "the connection closed before the whole body arrived") from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def loads(body: bytes) -> Any:
    """The JSON body; 400 when it is not JSON or an object repeats a key (which one would count?)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"the body is not valid JSON: {exc}") from None
    try:
        # orjson keeps the last of repeated keys silently; the standard parser can tell. orjson
        # has already refused what only it refuses (nesting over 1024, NaN, huge numbers).
        json.loads(body, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise invalid(f"the body repeats the key {excerpt(exc.key)!r} in an object") from None
    except (ValueError, RecursionError):
        raise invalid("the body is not valid JSON") from None
    return payload


def check_key(key: str, header: str) -> None:
    """The key rules, checked once on the header rather than once per item of a list."""
    try:
        parse_envelope(idempotency_key=key)
    except InvalidChange as exc:
        raise invalid("invalid idempotency key", [named(error, header) for error in exc.errors]) from None


def changes_of(payload: Any) -> list[Any] | None:
    """The items of a ``{"changes": [...]}`` body, None for a single change; 400 for a bad list."""
    if not isinstance(payload, dict) or "changes" not in payload:
        return None
    extra = sorted(set(payload) - {"changes"})
    errors: list[dict[str, object]] = [{"field": field, "reason": "is not allowed beside changes"} for field in extra]
    changes: object = payload["changes"]
    if not isinstance(changes, list) or not 1 <= len(changes) <= MAX_BATCH:
        errors.append({"field": "changes", "reason": f"must be a list of 1..{MAX_BATCH} changes"})
    elif not errors:
        return changes
    raise invalid("invalid list of changes; nothing was enqueued", errors)


def error_list(failures: Sequence[tuple[int, ItemError]], *, batch: bool) -> list[dict[str, object]]:
    errors: list[dict[str, object]] = []
    for index, failure in failures:
        for error in field_errors(failure):
            entry: dict[str, object] = {"field": error.field, "reason": error.reason}
            if batch:
                entry["index"] = index
            errors.append(entry)
    return errors
