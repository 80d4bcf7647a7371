"""Learning outcomes over HTTP: ``GET /v1/lead-stage-changes/{idempotency_key}`` on the webhook server.

Every 202 of ``POST /v1/lead-stage-changes`` gives each receipt a ``location`` (and a single change
a ``Location`` header): this route (``producers.openapi.location``). It answers 200 with where the
change stands (the ledger's state, attempts and history, as ``leadstage status`` prints them) and
``event``: its terminal event once it has one (``worker.core.results.ResultEvent.as_dict``), null
before. 404 when the account has no such change (never enqueued, another account's, or finished
longer ago than the ledger retention).

Authentication is a bearer token derived from the webhook secret, per account, not a signed
request (a GET has no body to sign, and a token works from any HTTP client or browser tool)::

    Authorization: Bearer base64url(HMAC-SHA256(key, "leadstage-sync status v1:" + account))

``key`` is the secret's bytes (the base64 after ``whsec_``, decoded), the token base64url without
padding; ``status_token(secret, account)`` computes it. The account is ``X-Leadstage-Account``,
else ``?account=``, else ``default``; a token verifies only for the account it was derived for,
from a secret that may sign that account's changes (``account_secrets``), so it never shows
another account's changes. It only reads: enqueuing still takes a signed request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import orjson
from aiohttp import web

from producers.openapi import STATUS_PATH
from producers.problems import Problem, invalid, misconfigured, named, unavailable
from producers.waits import standing
from producers.webhook_auth import ACCOUNT_HEADER
from worker.core.change import DEFAULT_ACCOUNT, parse_envelope
from worker.core.errors import ConfigError, InvalidChange, RedisUnavailable
from worker.core.redis_connection import RedisClient
from worker.core.settings import Settings

__all__ = ["account_secrets", "add_status_route", "authenticated_account", "status_token"]

_TOKEN_CONTEXT: Final = b"leadstage-sync status v1:"
#: What a 401 asks for (RFC 6750).
WWW_AUTHENTICATE: Final = 'Bearer realm="leadstage-sync"'


def secret_key(secret: str) -> bytes:
    """The key of a Standard Webhooks secret (``whsec_`` + base64, padded or not); ``ConfigError`` for another form."""
    key = secret.removeprefix("whsec_")
    try:
        return base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("WEBHOOK_SECRET must be whsec_ followed by base64") from None


def status_token(secret: str | bytes, account: str = DEFAULT_ACCOUNT) -> str:
    """The bearer token that reads ``account``'s changes, from a ``whsec_`` secret (or its key bytes)."""
    key = secret_key(secret) if isinstance(secret, str) else secret
    digest = hmac.new(key, _TOKEN_CONTEXT + account.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def account_secrets(settings: Settings, account: str) -> Sequence[bytes]:
    """The keys a status token of ``account`` may be derived from: those that may sign its changes
    (``Settings.webhook_secrets``): the account's own secrets and WEBHOOK_SECRET's, which sign for
    every account, each of them while a rotation has several."""
    return tuple(secret_key(secret) for bound, secret in settings.webhook_secrets() if bound in (None, account))


def authenticated_account(settings: Settings, request: web.Request) -> str:
    """The account whose changes this request may read: 400 for a malformed one, 401 unless the
    bearer token was derived for it from one of its secrets."""
    header = request.headers.get(ACCOUNT_HEADER)
    account = header if header is not None else request.query.get("account", DEFAULT_ACCOUNT)
    try:
        parse_envelope(account=account)
    except InvalidChange as exc:
        where = ACCOUNT_HEADER if header is not None else "account"
        raise invalid("invalid account", [named(error, where) for error in exc.errors]) from None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    presented = token.strip().encode()
    # Every key is compared (in constant time), so the time taken does not tell which nearly matched.
    verified = [
        hmac.compare_digest(status_token(key, account).encode(), presented)
        for key in account_secrets(settings, account)
    ]
    if scheme.lower() != "bearer" or not any(verified):
        raise Problem(
            401,
            "Unauthorized",
            f"a bearer token derived from the webhook secret for account {account!r} is required",
            headers={"WWW-Authenticate": WWW_AUTHENTICATE},
        )
    return account


@dataclass(frozen=True, slots=True)
class _Status:
    settings: Settings
    redis: RedisClient


_STATUS: Final = web.AppKey("leadstage_status", _Status)


def add_status_route(app: web.Application, settings: Settings, redis: RedisClient) -> None:
    """Serve the status route on the webhook's application (``create_app`` calls this)."""
    app[_STATUS] = _Status(settings, redis)
    app.router.add_get(STATUS_PATH, _get_change)


async def _get_change(request: web.Request) -> web.Response:
    state = request.app[_STATUS]
    account = authenticated_account(state.settings, request)
    key = request.match_info["idempotency_key"]
    try:
        parse_envelope(idempotency_key=key)
    except InvalidChange as exc:
        raise invalid("invalid idempotency key", [named(error, "idempotency_key") for error in exc.errors]) from None
    try:
        status, event = await standing(state.redis, state.settings, account, key)
    except RedisUnavailable:
        raise unavailable("Redis is unavailable; retry later") from None
    except ConfigError as exc:
        raise misconfigured(exc) from None
    if status is None:
        raise Problem(404, "Not Found", f"account {account!r} has no change with idempotency key {key!r}")
    body = {**status, "event": None if event is None else event.as_dict()}
    return web.Response(body=orjson.dumps(body), content_type="application/json", headers={"Cache-Control": "no-store"})
