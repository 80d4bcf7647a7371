"""The HTTP producer (``leadstage webhook``): signed webhooks in, changes on the queue.

``create_app(settings, redis)`` builds the aiohttp application; ``run_webhook(settings, host,
port)`` serves it until SIGINT/SIGTERM. The contract is the OpenAPI document it serves at
``GET /openapi.json`` (``producers.openapi``). ``POST /v1/lead-stage-changes`` checks, in this
order, answering the first failure as RFC 9457 problem+json:

1. 413 when Content-Length is over ``LEADSTAGE_WEBHOOK_MAX_BODY`` (before reading anything; a body
   without Content-Length is cut off at the same size by ``client_max_size``);
2. 415 unless the content type is application/json; 408 when the body does not arrive within
   ``BODY_TIMEOUT_S`` (slow or stalled clients);
3. 401 unless the Standard Webhooks signature verifies with WEBHOOK_SECRET (``standardwebhooks``,
   the reference library, with its 5-minute tolerance);
4. 400 for a body that is not JSON (orjson's nesting limit included), a bad account or key, or any
   invalid change: ``errors`` names each field (and the item ``index`` of a list);
5. 422 when an idempotency key is already used for a different change (IETF Idempotency-Key
   draft); 503 with Retry-After when Redis is down. Otherwise 202 with one receipt per change.

A request is enqueued whole or not at all. Keys: the ``Idempotency-Key`` header, else
``webhook-id``; a list appends ``:{index}`` per item, so a redelivered webhook is a duplicate.
Account: the ``X-Leadstage-Account`` header, else ``?account=``, else ``default``. Source:
``webhook:{webhook-id}``.

Every request to the changes endpoint counts in ``leadstage_webhook_requests_total`` by status,
and every request is logged once at info with its status; signature headers and bodies never are.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from producers.library import ChangeItem, ItemError, LeadStageProducer, Receipt, field_errors
from producers.openapi import CHANGES_PATH, MAX_BATCH, RETRY_AFTER_S, location, openapi_document
from worker import metrics
from worker.change import DEFAULT_ACCOUNT, parse_envelope
from worker.errors import (
    ConfigError,
    FieldError,
    IdempotencyConflict,
    InvalidChange,
    RedisUnavailable,
    UnknownAccount,
)
from worker.logs import get_logger
from worker.processes import signalled
from worker.redis_connection import connect_redis, ping
from worker.settings import Settings

__all__ = ["create_app", "run_webhook"]

log = get_logger("leadstage.webhook")

ACCOUNT_HEADER: Final = "X-Leadstage-Account"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
#: How long /readyz waits for Redis's PONG.
READY_TIMEOUT_S: Final = 2.0
#: The whole body must arrive within this once the headers have: a client that stalls or trickles
#: it (slowloris) gets 408 instead of holding a connection and a handler forever.
BODY_TIMEOUT_S: Final = 10.0
#: An idle connection, or one still sending its request line and headers, is closed after this
#: (aiohttp's default is an hour). 75 s, nginx's default, stays above the 60 s idle timeout usual
#: in load balancers, which reuse connections and must not find them closed under them.
KEEPALIVE_TIMEOUT_S: Final = 75.0
#: An IETF structured-field string ("..." with \\ and \" escapes), as the Idempotency-Key draft sends it.
_SF_STRING = re.compile(r'"((?:[^"\\]|\\["\\])*)"')
_PROBLEM_TYPE = "urn:leadstage:problem:"


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
            "type": _PROBLEM_TYPE + self.kind if self.kind else "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        return web.Response(
            status=self.status, body=orjson.dumps(body), content_type="application/problem+json", headers=self.headers
        )


def _unavailable(detail: str) -> Problem:
    return Problem(503, "Service Unavailable", detail, headers={"Retry-After": str(RETRY_AFTER_S)})


def _invalid(detail: str, errors: Sequence[Mapping[str, object]] = ()) -> Problem:
    return Problem(400, "Bad Request", detail, kind="invalid-change", errors=errors)


@dataclass(frozen=True, slots=True)
class _State:
    settings: Settings
    redis: aioredis.Redis
    producer: LeadStageProducer
    webhook: Webhook
    openapi: bytes


_STATE: Final = web.AppKey("leadstage_webhook", _State)


def create_app(settings: Settings, redis: aioredis.Redis) -> web.Application:
    """The HTTP producer over ``redis`` (the caller's client: it closes it).

    Raises ``ConfigError`` naming WEBHOOK_SECRET when it is unset or not a usable secret: an
    unsigned endpoint would let anyone enqueue changes.
    """
    if settings.webhook_secret is None:
        raise ConfigError("WEBHOOK_SECRET is not set: the webhook verifies every request with it (whsec_...)")
    try:
        webhook = Webhook(settings.webhook_secret.get())
    except (binascii.Error, ValueError):
        raise ConfigError("WEBHOOK_SECRET must be whsec_ followed by base64") from None
    app = web.Application(client_max_size=settings.webhook_max_body_bytes, middlewares=[_middleware])
    app[_STATE] = _State(
        settings=settings,
        redis=redis,
        producer=LeadStageProducer(settings, redis=redis, producer="webhook"),
        webhook=webhook,
        openapi=orjson.dumps(openapi_document(settings.webhook_max_body_bytes)),
    )
    app.router.add_post(CHANGES_PATH, _post_changes)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    from producers.status import add_status_route  # it builds on this module's problems

    add_status_route(app, settings, redis)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Problems (ours and aiohttp's 404/405/413) as problem+json; the metric and one log line per request."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = Problem(exc.status, exc.reason, exc.text or exc.reason, headers=allow).response()
    except Exception:  # one bad request must not take the server down; it is logged with its traceback
        log.exception("webhook.error", method=request.method, path=request.path)
        response = Problem(500, "Internal Server Error", "unexpected error; see the server log").response()
    if request.path == CHANGES_PATH:
        metrics.WEBHOOK_REQUESTS.labels(str(response.status)).inc()
    log.info(
        "webhook.request",
        method=request.method,
        path=request.path,
        status=response.status,
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        webhook_id=request.headers.get("webhook-id"),
        remote=request.remote,
    )
    return response


async def _post_changes(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    limit = state.settings.webhook_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "Content Too Large", f"the body is {request.content_length} bytes; at most {limit}")
    if request.content_type != "application/json":
        raise Problem(415, "Unsupported Media Type", f"the body must be application/json, not {request.content_type}")
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Problem(413, "Content Too Large", f"the body is over {limit} bytes") from None
    except TimeoutError:
        raise Problem(
            408,
            "Request Timeout",
            f"the body did not arrive within {BODY_TIMEOUT_S:g} s",
            headers={"Connection": "close"},
        ) from None
    except ConnectionError:
        # The client went away mid-body: its fault, not a server error (no traceback, no 500 counted).
        raise Problem(400, "Bad Request", "the connection closed before the whole body arrived") from None
    webhook_id = _verify(state.webhook, body, request)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"the body is not valid JSON: {exc}") from None

    account = _account(request, state.producer)
    key_header = IDEMPOTENCY_HEADER if IDEMPOTENCY_HEADER in request.headers else "webhook-id"
    base_key = _unquote(request.headers[IDEMPOTENCY_HEADER]) if key_header == IDEMPOTENCY_HEADER else webhook_id
    _check_key(base_key, key_header)

    changes = _changes_of(payload)
    if changes is None:
        items = [ChangeItem(payload, idempotency_key=base_key)]
    else:
        items = [ChangeItem(change, idempotency_key=f"{base_key}:{index}") for index, change in enumerate(changes)]
    valid, failures = state.producer.validate_many(items, account=account, source=f"webhook:{webhook_id}")
    if failures:
        raise _invalid("invalid change; nothing was enqueued", _error_list(failures, batch=changes is not None))
    receipts = await _enqueue(state.producer, [item for _, item in valid])
    answer = {"receipts": [{**r.as_dict(), "location": location(r)} for r in receipts]}
    headers = {"Location": location(receipts[0])} if changes is None else {}
    return web.Response(status=202, body=orjson.dumps(answer), content_type="application/json", headers=headers)


def _verify(webhook: Webhook, body: bytes, request: web.Request) -> str:
    """The verified webhook-id; 401 otherwise (bad, missing, expired or future signatures)."""
    try:
        webhook.verify(body, dict(request.headers), json_parse=False)
    except WebhookVerificationError as exc:
        raise Problem(401, "Unauthorized", f"the webhook signature does not verify: {exc}") from None
    except ValueError:
        # The reference library raises ValueError for a malformed signature list or a body that is
        # not UTF-8 (it signs text): neither can carry a valid signature.
        raise Problem(
            401, "Unauthorized", "the webhook signature does not verify: malformed signature or body"
        ) from None
    return request.headers["webhook-id"]


def _unquote(value: str) -> str:
    """A structured-field string ``"abc"`` (IETF Idempotency-Key draft) as abc; a bare token as is."""
    match = _SF_STRING.fullmatch(value)
    return re.sub(r"\\(.)", r"\1", match.group(1)) if match else value


def _account(request: web.Request, producer: LeadStageProducer) -> str:
    """The header's account, else the query's, else the default."""
    header = request.headers.get(ACCOUNT_HEADER)
    query = request.query.get("account")
    account = header if header is not None else query if query is not None else DEFAULT_ACCOUNT
    try:
        return producer.check_account(account)
    except (InvalidChange, UnknownAccount) as exc:
        where = ACCOUNT_HEADER if header is not None else "account"
        raise _invalid("invalid account", [_named(error, where) for error in field_errors(exc)]) from None


def _check_key(key: str, header: str) -> None:
    """The key rules, checked once on the header rather than once per item of a list."""
    try:
        parse_envelope(idempotency_key=key)
    except InvalidChange as exc:
        raise _invalid("invalid idempotency key", [_named(error, header) for error in exc.errors]) from None


def _named(error: FieldError, field: str) -> dict[str, object]:
    return {"field": field, "reason": error.reason}


def _changes_of(payload: Any) -> list[Any] | None:
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
    raise _invalid("invalid list of changes; nothing was enqueued", errors)


def _error_list(failures: Sequence[tuple[int, ItemError]], *, batch: bool) -> list[dict[str, object]]:
    errors: list[dict[str, object]] = []
    for index, failure in failures:
        for error in field_errors(failure):
            entry: dict[str, object] = {"field": error.field, "reason": error.reason}
            if batch:
                entry["index"] = index
            errors.append(entry)
    return errors


async def _enqueue(producer: LeadStageProducer, items: Sequence[Any]) -> list[Receipt]:
    try:
        return await producer.enqueue_validated(items)
    except IdempotencyConflict as exc:
        raise Problem(
            422,
            "Unprocessable Content",
            f"{exc}; nothing was enqueued",
            kind="idempotency-conflict",
        ) from None
    except RedisUnavailable as exc:
        log.warning("webhook.redis_unavailable", error=str(exc))
        raise _unavailable("Redis is unavailable; nothing was enqueued, retry later") from None


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=lambda obj: orjson.dumps(obj).decode())


async def _readyz(request: web.Request) -> web.Response:
    redis_client = request.app[_STATE].redis
    try:
        await ping(redis_client, READY_TIMEOUT_S)
    except RedisUnavailable as exc:
        raise _unavailable(f"Redis does not answer: {exc}") from None
    return web.json_response({"status": "ready"}, dumps=lambda obj: orjson.dumps(obj).decode())


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = metrics.render_latest(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_STATE].openapi, content_type="application/json")


def _malformed_requests_as_warnings(record: logging.LogRecord) -> bool:
    """aiohttp logs a request its parser refuses (a client's fault: a bad Content-Length, a header
    over 8 KiB) at error level with a traceback; any client could fill the log with them. One
    warning line instead, the parser's message without the traceback."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "malformed request from %s: %s", (remote, error.message)
        record.exc_info = record.exc_text = None
    return True


def run_webhook(settings: Settings, host: str, port: int) -> int:
    """Serve the HTTP producer on host:port until SIGINT/SIGTERM; returns the exit status.

    Raises ``ConfigError`` when WEBHOOK_SECRET is missing or the address cannot be used. Redis
    need not be up at start: /readyz says when it is.
    """
    if settings.webhook_secret is None:
        raise ConfigError("WEBHOOK_SECRET is not set: the webhook verifies every request with it (whsec_...)")
    asyncio.run(_serve(settings, host, port))
    return 0


async def _serve(settings: Settings, host: str, port: int) -> None:
    logging.getLogger("aiohttp.server").addFilter(_malformed_requests_as_warnings)
    redis_client = connect_redis(settings.redis_url)
    try:
        runner = web.AppRunner(
            create_app(settings, redis_client),
            access_log=None,
            handle_signals=False,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, shutdown_timeout=10.0)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            log.info("webhook.listening", host=host, port=port, path=CHANGES_PATH)
            await signalled()
            log.info("webhook.stopping")
        finally:
            await runner.cleanup()
    finally:
        await redis_client.aclose()
