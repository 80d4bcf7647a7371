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
   (``standardwebhooks``, the reference library, with its 5-minute tolerance);
4. 400 for a body that is not JSON (orjson's nesting limit included, and duplicate keys in an
   object), a bad account or key, or any invalid change: ``errors`` names each field (and the item
   ``index`` of a list); 403 when the body names another account than its secret's;
5. 422 when an idempotency key is already used for a different change (IETF Idempotency-Key
   draft); 503 with Retry-After when Redis is down or does not answer within ``redis_timeout_s``.
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
and every request is logged once at info with its status; signature headers and bodies never are,
also not for requests the HTTP parser refuses (one warning line naming the kind of error).
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

from producers.library import ChangeItem, ItemError, LeadStageProducer, Receipt, field_errors
from producers.openapi import (
    ACCOUNT_FIELD,
    CHANGES_PATH,
    CONTENT_ENCODINGS,
    MAX_BATCH,
    RETRY_AFTER_S,
    location,
    openapi_document,
)
from worker.core import metrics, tracing
from worker.core.change import DEFAULT_ACCOUNT, parse_envelope
from worker.core.errors import ConfigError, FieldError, IdempotencyConflict, InvalidChange, RedisUnavailable
from worker.core.logs import get_logger
from worker.core.processes import signalled
from worker.core.redis_connection import connect_redis, ping
from worker.core.settings import Settings

__all__ = ["Verifier", "create_app", "run_webhook", "verifiers", "verify_signature"]

log = get_logger("leadstage.webhook")

ACCOUNT_HEADER: Final = "X-Leadstage-Account"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
#: How long /readyz waits for Redis's PONG.
READY_TIMEOUT_S: Final = 2.0
#: How long one request's enqueue may wait for Redis (create_app's default): a Redis that hangs
#: (stopped, partitioned) gets a 503 instead of holding the client for as long as TCP does.
REDIS_TIMEOUT_S: Final = 5.0
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
class Verifier:
    """One valid webhook secret and the account it is bound to (None: any, named in the body)."""

    account: str | None
    webhook: Webhook


@dataclass(frozen=True, slots=True)
class _State:
    settings: Settings
    redis: aioredis.Redis
    producer: LeadStageProducer
    verifiers: tuple[Verifier, ...]
    #: Accounts changes may be enqueued for; empty: any well-formed name (no account list).
    known_accounts: frozenset[str]
    redis_timeout_s: float
    openapi: bytes


_STATE: Final = web.AppKey("leadstage_webhook", _State)
_UNSIGNED_MESSAGE: Final = (
    "WEBHOOK_SECRET is not set (nor LEADSTAGE_WEBHOOK_SECRETS_FILE): the webhook verifies every request "
    "with a Standard Webhooks secret (whsec_...)"
)


def create_app(
    settings: Settings, redis: aioredis.Redis, *, redis_timeout_s: float = REDIS_TIMEOUT_S
) -> web.Application:
    """The HTTP producer over ``redis`` (the caller's client: it closes it).

    Raises ``ConfigError`` naming WEBHOOK_SECRET when no secret is configured or one is not
    usable (an unsigned endpoint would let anyone enqueue changes), or when one secret is
    configured for two accounts (a request signed with it could be for either).
    """
    logging.getLogger("aiohttp.server").addFilter(_malformed_requests_as_warnings)  # added once, however often
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
        known_accounts=frozenset(settings.accounts) | frozenset(settings.webhook_account_secrets),
        redis_timeout_s=redis_timeout_s,
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


def verifiers(settings: Settings) -> tuple[Verifier, ...]:
    """A verifier per configured secret (``Settings.webhook_secrets``); ``ConfigError`` as create_app says."""
    owners: dict[str, str | None] = {}
    for account, secret in settings.webhook_secrets():
        if secret in owners and owners[secret] != account:
            names = sorted(repr(name or "WEBHOOK_SECRET") for name in (owners[secret], account))
            raise ConfigError(f"one webhook secret is configured for both {' and '.join(names)}")
        owners[secret] = account
    if not owners:
        raise ConfigError(_UNSIGNED_MESSAGE)
    try:
        return tuple(Verifier(account, Webhook(secret)) for secret, account in owners.items())
    except (binascii.Error, ValueError, EmptyWebhookSecretError):
        raise ConfigError(
            "WEBHOOK_SECRET must be a Standard Webhooks secret: whsec_ and the base64 of a non-empty key"
        ) from None


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
    body = await _read_body(request, state.settings.webhook_max_body_bytes)
    bound_account, webhook_id = verify_signature(state.verifiers, body, request)
    payload = _loads(body)
    named_account, payload = _named_account(payload)
    account = _account(request, state, bound=bound_account, named=named_account)
    _check_key_header(request, webhook_id)
    _check_key(webhook_id, "webhook-id")

    changes = _changes_of(payload)
    if changes is None:
        items = [ChangeItem(payload, idempotency_key=webhook_id)]
    else:
        items = [ChangeItem(change, idempotency_key=f"{webhook_id}:{index}") for index, change in enumerate(changes)]
    valid, failures = state.producer.validate_many(items, account=account, source=f"webhook:{webhook_id}")
    if failures:
        raise _invalid("invalid change; nothing was enqueued", _error_list(failures, batch=changes is not None))
    receipts = await _enqueue(state, [item for _, item in valid])
    answer = {"receipts": [{**r.as_dict(), "location": location(r)} for r in receipts]}
    headers = {"Location": location(receipts[0])} if changes is None else {}
    return web.Response(status=202, body=orjson.dumps(answer), content_type="application/json", headers=headers)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole (decoded) body, or the 413, 415, 408 or 400 that says why not."""
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "Content Too Large", f"the body is {request.content_length} bytes; at most {limit}")
    if request.content_type != "application/json":
        raise Problem(415, "Unsupported Media Type", f"the body must be application/json, not {request.content_type}")
    encodings = request.headers.getall("Content-Encoding", [])
    # Exactly what aiohttp decodes for us (one coding, compared after lower()), or nothing.
    if len(encodings) > 1 or (encodings and encodings[0].lower() not in CONTENT_ENCODINGS):
        raise Problem(
            415,
            "Unsupported Media Type",
            f"Content-Encoding must be one of {', '.join(CONTENT_ENCODINGS)}, not {_excerpt(', '.join(encodings))}",
            headers={"Accept-Encoding": ", ".join(c for c in CONTENT_ENCODINGS if c != "identity")},
        )
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
            headers={"Connection": "close"},
        ) from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        # Corrupt gzip/deflate, or a chunked body the parser refuses: the client's fault.
        if isinstance(exc.__cause__, ContentEncodingError) or isinstance(exc, ContentEncodingError):
            raise Problem(400, "Bad Request", f"the body cannot be decoded as {encodings[0].lower()}") from None
        raise Problem(400, "Bad Request", "the body is malformed (its length or chunked encoding)") from None
    except ConnectionError:
        # The client went away mid-body: its fault, not a server error (no traceback, no 500 counted).
        raise Problem(400, "Bad Request", "the connection closed before the whole body arrived") from None


def verify_signature(verifiers: Sequence[Verifier], body: bytes, request: web.Request) -> tuple[str | None, str]:
    """The account bound to the secret that verified the request (None: a WEBHOOK_SECRET secret,
    valid for any account), and the verified webhook-id; a 401 ``Problem`` otherwise (bad,
    missing, expired or future signatures). Any route that takes signed requests uses this."""
    headers: dict[str, str] = {}
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        values = request.headers.getall(name, [])
        if len(values) > 1:
            # The library would verify one of them and we would read another.
            raise Problem(401, "Unauthorized", f"the webhook signature does not verify: {name} is given twice")
        if values:
            headers[name] = values[0]
    reason = "no signature matches"
    for verifier in verifiers:
        try:
            verifier.webhook.verify(body, headers, json_parse=False)
        except WebhookVerificationError as exc:
            reason = str(exc)
            continue
        except ValueError:
            # The reference library raises ValueError for a malformed signature list or a body that is
            # not UTF-8 (it signs text): neither can carry a valid signature, whatever the secret.
            reason = "malformed signature or body"
            break
        return verifier.account, headers["webhook-id"]
    raise Problem(401, "Unauthorized", f"the webhook signature does not verify: {reason}")


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


def _loads(body: bytes) -> Any:
    """The JSON body; 400 when it is not JSON or an object repeats a key (which one would count?)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"the body is not valid JSON: {exc}") from None
    try:
        # orjson keeps the last of repeated keys silently; the standard parser can tell. orjson
        # has already refused what only it refuses (nesting over 1024, NaN, huge numbers).
        json.loads(body, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise _invalid(f"the body repeats the key {_excerpt(exc.key)!r} in an object") from None
    except (ValueError, RecursionError):
        raise _invalid("the body is not valid JSON") from None
    return payload


def _named_account(payload: Any) -> tuple[object, Any]:
    """The body's top-level ``account`` field (None when absent), and the body without it."""
    if not isinstance(payload, dict) or ACCOUNT_FIELD not in payload:
        return None, payload
    rest = dict(payload)
    return rest.pop(ACCOUNT_FIELD), rest


def _account(request: web.Request, state: _State, *, bound: str | None, named: object) -> str:
    """The signed account: the verifying secret's, else the body's, else the default.

    The unsigned header and query may only repeat it; an account outside the account list (when
    there is one) is refused here, as the CLI and the library refuse it.
    """
    if named is not None and not isinstance(named, str):
        raise _invalid("invalid account", [{"field": ACCOUNT_FIELD, "reason": "must be a string"}])
    if bound is not None and named is not None and named != bound:
        raise Problem(
            403,
            "Forbidden",
            f"the body names account {_excerpt(named)!r}, but the request is signed with a secret of account {bound!r}",
        )
    account = bound if bound is not None else named if named is not None else DEFAULT_ACCOUNT
    for where, value in (
        (ACCOUNT_HEADER, request.headers.get(ACCOUNT_HEADER)),
        ("account", request.query.get("account")),
    ):
        if value is not None and value != account:
            raise _invalid(
                "invalid account",
                [
                    {
                        "field": where,
                        "reason": f"is not covered by the signature and differs from the signed account "
                        f"{account!r}: name the account in the body's {ACCOUNT_FIELD} field, or sign with "
                        "the account's own secret",
                    }
                ],
            )
    try:
        parse_envelope(account=account)
    except InvalidChange as exc:
        raise _invalid("invalid account", [_named(error, ACCOUNT_FIELD) for error in exc.errors]) from None
    if state.known_accounts and account not in state.known_accounts:
        raise _invalid(
            "invalid account",
            [
                {
                    "field": ACCOUNT_FIELD,
                    "reason": "is not configured (see LEADSTAGE_ACCOUNTS_FILE, LEADSTAGE_WEBHOOK_SECRETS_FILE)",
                }
            ],
        )
    return account


def _check_key_header(request: web.Request, webhook_id: str) -> None:
    """An Idempotency-Key header is not signed: it may only repeat the webhook-id, the signed key."""
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is not None and _unquote(header) != webhook_id:
        raise _invalid(
            "invalid idempotency key",
            [
                {
                    "field": IDEMPOTENCY_HEADER,
                    "reason": "is not covered by the signature and differs from the webhook-id, which is the "
                    "idempotency key: send your key as the webhook-id",
                }
            ],
        )


def _excerpt(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unquote(value: str) -> str:
    """A structured-field string ``"abc"`` (IETF Idempotency-Key draft) as abc; a bare token as is."""
    match = _SF_STRING.fullmatch(value)
    return re.sub(r"\\(.)", r"\1", match.group(1)) if match else value


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


async def _enqueue(state: _State, items: Sequence[Any]) -> list[Receipt]:
    try:
        async with asyncio.timeout(state.redis_timeout_s):
            return await state.producer.enqueue_validated(items)
    except IdempotencyConflict as exc:
        raise Problem(
            422,
            "Unprocessable Content",
            f"{exc}; nothing was enqueued",
            kind="idempotency-conflict",
        ) from None
    except (TimeoutError, RedisUnavailable) as exc:
        error = f"no answer within {state.redis_timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
        log.warning("webhook.redis_unavailable", error=error)
        # The request may have reached Redis before it stopped answering: say so, never "refused".
        raise _unavailable(
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
    if isinstance(error, RequestPayloadError):
        # aiohttp drains the rest of a body after the handler; one that failed to decode fails
        # again there, for a request already answered (400) and logged.
        return False
    if isinstance(error, HttpProcessingError):
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        # The kind of error only: the parser's message quotes the offending line, which may be a
        # signature header or a piece of the body.
        record.msg, record.args = "malformed request from %s: %s (%s)", (remote, type(error).__name__, error.code)
        record.exc_info = record.exc_text = None
    return True


def run_webhook(settings: Settings, host: str, port: int) -> int:
    """Serve the HTTP producer on host:port until SIGINT/SIGTERM; returns the exit status.

    Raises ``ConfigError`` when no webhook secret is configured or the address cannot be used.
    Redis need not be up at start: /readyz says when it is.
    """
    verifiers(settings)
    asyncio.run(_serve(settings, host, port))
    return 0


async def _serve(settings: Settings, host: str, port: int) -> None:
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
