"""What the webhook's signature covers: the secrets that verify a request, and the signed routing.

Standard Webhooks signs ``webhook-id.webhook-timestamp.body`` only, so everything that decides
what is enqueued is taken from there (see ``producers.webhook``): the idempotency key is the
``webhook-id``; the account is the one whose own secret verified the request, else the body's
top-level ``account`` field, else ``default``. The unsigned ``Idempotency-Key`` and
``X-Leadstage-Account`` headers and ``?account=`` may only repeat what is signed.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

from producers.openapi_schemas import ACCOUNT_FIELD
from producers.problems import Problem, excerpt, invalid, named
from worker.core.change import DEFAULT_ACCOUNT, parse_envelope
from worker.core.errors import ConfigError, InvalidChange
from worker.core.settings import Settings

__all__ = [
    "ACCOUNT_HEADER",
    "IDEMPOTENCY_HEADER",
    "Verifier",
    "check_key_header",
    "named_account",
    "signed_account",
    "verifiers",
    "verify_signature",
]

ACCOUNT_HEADER: Final = "X-Leadstage-Account"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
#: An IETF structured-field string ("..." with \\ and \" escapes), as the Idempotency-Key draft sends it.
_SF_STRING = re.compile(r'"((?:[^"\\]|\\["\\])*)"')


@dataclass(frozen=True, slots=True)
class Verifier:
    """One valid webhook secret and the account it is bound to (None: any, named in the body)."""

    account: str | None
    webhook: Webhook


_UNSIGNED_MESSAGE: Final = (
    "WEBHOOK_SECRET is not set (nor LEADSTAGE_WEBHOOK_SECRETS_FILE): the webhook verifies every request "
    "with a Standard Webhooks secret (whsec_...)"
)


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


def named_account(payload: Any) -> tuple[object, Any]:
    """The body's top-level ``account`` field (None when absent), and the body without it."""
    if not isinstance(payload, dict) or ACCOUNT_FIELD not in payload:
        return None, payload
    rest = dict(payload)
    return rest.pop(ACCOUNT_FIELD), rest


def signed_account(request: web.Request, known_accounts: frozenset[str], *, bound: str | None, in_body: object) -> str:
    """The signed account: the verifying secret's, else the body's, else the default.

    The unsigned header and query may only repeat it; an account outside the account list (when
    there is one) is refused here, as the CLI and the library refuse it.
    """
    if in_body is not None and not isinstance(in_body, str):
        raise invalid("invalid account", [{"field": ACCOUNT_FIELD, "reason": "must be a string"}])
    try:
        # Spaces and tabs around the name are trimmed, as every producer trims them.
        named_in_body = None if in_body is None else parse_envelope(account=in_body).account
    except InvalidChange as exc:
        raise invalid("invalid account", [named(error, ACCOUNT_FIELD) for error in exc.errors]) from None
    if bound is not None and named_in_body is not None and named_in_body != bound:
        raise Problem(
            403,
            "Forbidden",
            f"the body names account {excerpt(named_in_body)!r}, but the request is signed with a secret of "
            f"account {bound!r}",
        )
    account = bound if bound is not None else named_in_body if named_in_body is not None else DEFAULT_ACCOUNT
    for where, value in (
        (ACCOUNT_HEADER, request.headers.get(ACCOUNT_HEADER)),
        ("account", request.query.get("account")),
    ):
        if value is not None and value != account:
            raise invalid(
                "invalid account",
                [
                    {
                        "field": where,
                        "reason": f"is not covered by the signature and differs from the signed account "
                        f"{excerpt(account)!r}: name the account in the body's {ACCOUNT_FIELD} field, or sign with "
                        "the account's own secret",
                    }
                ],
            )
    if known_accounts and account not in known_accounts:
        raise invalid(
            "invalid account",
            [
                {
                    "field": ACCOUNT_FIELD,
                    "reason": "is not configured (see LEADSTAGE_ACCOUNT_NAMES, LEADSTAGE_ACCOUNTS_FILE, "
                    "LEADSTAGE_WEBHOOK_SECRETS_FILE)",
                }
            ],
        )
    return account


def check_key_header(request: web.Request, webhook_id: str) -> None:
    """An Idempotency-Key header is not signed: it may only repeat the webhook-id, the signed key."""
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is not None and _unquote(header) != webhook_id:
        raise invalid(
            "invalid idempotency key",
            [
                {
                    "field": IDEMPOTENCY_HEADER,
                    "reason": "is not covered by the signature and differs from the webhook-id, which is the "
                    "idempotency key: send your key as the webhook-id",
                }
            ],
        )


def _unquote(value: str) -> str:
    """A structured-field string ``"abc"`` (IETF Idempotency-Key draft) as abc; a bare token as is."""
    match = _SF_STRING.fullmatch(value)
    return re.sub(r"\\(.)", r"\1", match.group(1)) if match else value
