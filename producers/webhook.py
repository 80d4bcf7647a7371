"""The HTTP producer (``leadstage webhook``): signed webhooks in, changes on the queue.

``create_app(settings, redis)`` builds the aiohttp application; ``run_webhook(settings, host,
port)`` serves it until SIGINT/SIGTERM. The contract is the OpenAPI document it serves at
``GET /openapi.json`` (``producers.openapi``). ``POST /v1/lead-stage-changes`` checks, in this
order, answering the first failure as RFC 9457 problem+json:

1. 413 when Content-Length is over ``LEADSTAGE_WEBHOOK_MAX_BODY`` (before reading anything; a body
   without Content-Length, or one that inflates past it, is cut off at the same size);
2. 415 unless the content type is application/json and the Content-Encoding is absent, identity,
   gzip or deflate; 408 when the body does not arrive within ``BODY_TIMEOUT_S`` (slow or stalled
   clients); 400 when it cannot be decoded (corrupt gzip);
3. 401 unless the Standard Webhooks signature verifies with one of the configured secrets
   (``standardwebhooks``, the reference library, with its 5-minute tolerance; ``producers.webhook_auth``);
4. 400 for a body that is not JSON (orjson's nesting limit included, and duplicate keys in an
   object), a bad account or key, or any invalid change: ``errors`` names each field (and the item
   ``index`` of a list); 403 when the body names another account than its secret's;
5. 422 when an idempotency key is already used for a different change (IETF Idempotency-Key
   draft); 503 with Retry-After when Redis is down or does not answer within LEADSTAGE_REDIS_TIMEOUT.
   Otherwise 202 with one receipt per change.

Everything that decides what is enqueued is covered by the signature (which signs
``webhook-id.webhook-timestamp.body``):

* the idempotency key is the ``webhook-id``; a list appends ``:{index}`` per item, so a redelivered
  webhook is a duplicate. An ``Idempotency-Key`` header is accepted only when it says the same.
* the account is the one whose own secret verified the request (LEADSTAGE_WEBHOOK_SECRETS_FILE);
  with a secret of WEBHOOK_SECRET, the body's top-level ``account`` field, else ``default``. An
  ``X-Leadstage-Account`` header or ``?account=`` is accepted only when it says the same.

Several secrets may be valid at once (rotation): each is tried in turn. Source:
``webhook:{webhook-id}``.

Every request to the changes endpoint counts in ``leadstage_webhook_requests_total`` by status,
as does every request the HTTP parser refuses (whatever its path: it may have none), and every
request is logged once at info with its status; signature headers and bodies never are,
also not for requests the HTTP parser refuses: those are answered 400 problem+json too, and
logged as one warning line naming the kind of error (``producers.serving``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from producers.library import ChangeItem, LeadStageProducer, Receipt
from producers.openapi import CHANGES_PATH, location, openapi_document
from producers.problems import Problem, from_http_exception, invalid, misconfigured, unavailable
from producers.serving import ON_REFUSED, log_malformed_requests_as_warnings, serving
from producers.webhook_auth import (
    Verifier,
    check_key_header,
    named_account,
    signed_account,
    verifiers,
    verify_signature,
)
from producers.webhook_body import changes_of, check_key, error_list, loads, read_body
from worker.core import metrics, tracing
from worker.core.errors import ConfigError, IdempotencyConflict, RedisUnavailable
from worker.core.logs import get_logger
from worker.core.processes import signalled
from worker.core.redis_connection import RedisClient, connect_redis_or_cluster_of, ping
from worker.core.settings import Settings

__all__ = ["Verifier", "create_app", "run_webhook", "verifiers", "verify_signature"]

log = get_logger("leadstage.webhook")

#: How long /readyz waits for Redis's PONG.
READY_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class _State:
    settings: Settings
    redis: RedisClient
    producer: LeadStageProducer
    verifiers: tuple[Verifier, ...]
    #: Accounts changes may be enqueued for; empty: any well-formed name (no account list).
    known_accounts: frozenset[str]
    openapi: bytes


_STATE: Final = web.AppKey("leadstage_webhook", _State)


def create_app(settings: Settings, redis: RedisClient) -> web.Application:
    """The HTTP producer over ``redis`` (the caller's client: it closes it). An enqueue that gets
    no answer within ``settings.redis_timeout_s`` (LEADSTAGE_REDIS_TIMEOUT) is a 503.

    Raises ``ConfigError`` naming WEBHOOK_SECRET when no secret is configured or one is not
    usable (an unsigned endpoint would let anyone enqueue changes), or when one secret is
    configured for two accounts (a request signed with it could be for either).
    """
    log_malformed_requests_as_warnings()
    untraced = ("/healthz", "/readyz", "/metrics", "/openapi.json")
    app = web.Application(
        client_max_size=settings.webhook_max_body_bytes,
        middlewares=[*tracing.server_middlewares(untraced=untraced), _middleware],
    )
    app[_STATE] = _State(
        settings=settings,
        redis=redis,
        producer=LeadStageProducer(settings, redis=redis, producer="webhook"),
        verifiers=verifiers(settings),
        known_accounts=settings.known_accounts,
        openapi=orjson.dumps(openapi_document(settings.webhook_max_body_bytes)),
    )
    # Refused by the HTTP parser before any route: counted whatever path they named (if any).
    app[ON_REFUSED] = _count_request
    app.router.add_post(CHANGES_PATH, _post_changes)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    from producers.status import add_status_route  # it builds on this module's signing

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
        response = from_http_exception(exc).response()
    except Exception:  # one bad request must not take the server down; it is logged with its traceback
        log.exception("webhook.error", method=request.method, path=request.path)
        response = Problem(500, "Internal Server Error", "unexpected error; see the server log").response()
    if request.path == CHANGES_PATH:
        _count_request(response.status)
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


def _count_request(status: int) -> None:
    metrics.WEBHOOK_REQUESTS.labels(str(status)).inc()


async def _post_changes(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    body = await read_body(request, state.settings.webhook_max_body_bytes)
    bound_account, webhook_id = verify_signature(state.verifiers, body, request)
    payload = loads(body)
    in_body, payload = named_account(payload)
    account = signed_account(request, state.known_accounts, bound=bound_account, in_body=in_body)
    check_key_header(request, webhook_id)
    check_key(webhook_id, "webhook-id")

    changes = changes_of(payload)
    if changes is None:
        items = [ChangeItem(payload, idempotency_key=webhook_id)]
    else:
        items = [ChangeItem(change, idempotency_key=f"{webhook_id}:{index}") for index, change in enumerate(changes)]
    valid, failures = state.producer.validate_many(items, account=account, source=f"webhook:{webhook_id}")
    if failures:
        raise invalid("invalid change; nothing was enqueued", error_list(failures, batch=changes is not None))
    receipts = await _enqueue(state, [item for _, item in valid])
    answer = {"receipts": [{**r.as_dict(), "location": location(r)} for r in receipts]}
    headers = {"Location": location(receipts[0])} if changes is None else {}
    return web.Response(status=202, body=orjson.dumps(answer), content_type="application/json", headers=headers)


async def _enqueue(state: _State, items: Sequence[Any]) -> list[Receipt]:
    try:
        async with asyncio.timeout(state.settings.redis_timeout_s):
            return await state.producer.enqueue_validated(items)
    except IdempotencyConflict as exc:
        raise Problem(
            422,
            "Unprocessable Content",
            f"{exc}; nothing was enqueued",
            kind="idempotency-conflict",
        ) from None
    except ConfigError as exc:  # nothing was written: what answers is not a usable Redis
        raise misconfigured(exc) from None
    except (TimeoutError, RedisUnavailable) as exc:
        error = f"no answer within {state.settings.redis_timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
        log.warning("webhook.redis_unavailable", error=error)
        # The request may have reached Redis before it stopped answering: say so, never "refused".
        raise unavailable(
            "Redis is unavailable; whether the changes were enqueued is unknown: retry with the same "
            "webhook-id (safe: an enqueued change answers as a duplicate)"
        ) from None


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=lambda obj: orjson.dumps(obj).decode())


async def _readyz(request: web.Request) -> web.Response:
    redis_client = request.app[_STATE].redis
    try:
        await ping(redis_client, READY_TIMEOUT_S)
    except RedisUnavailable as exc:
        raise unavailable(f"Redis does not answer: {exc}") from None
    except ConfigError as exc:
        raise misconfigured(exc) from None
    return web.json_response({"status": "ready"}, dumps=lambda obj: orjson.dumps(obj).decode())


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = metrics.render_latest(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_STATE].openapi, content_type="application/json")


def run_webhook(settings: Settings, host: str, port: int) -> int:
    """Serve the HTTP producer on host:port until SIGINT/SIGTERM; returns the exit status.

    Raises ``ConfigError`` when no webhook secret is configured or the address cannot be used.
    Redis need not be up at start: /readyz says when it is.
    """
    verifiers(settings)
    asyncio.run(_serve(settings, host, port))
    return 0


async def _serve(settings: Settings, host: str, port: int) -> None:
    redis_client = connect_redis_or_cluster_of(settings)
    try:
        async with serving(create_app(settings, redis_client), host, port, shutdown_timeout=10.0) as (_, bound):
            log.info("webhook.listening", host=host, port=bound, path=CHANGES_PATH)
            await signalled()
            log.info("webhook.stopping")
    finally:
        await redis_client.aclose()
