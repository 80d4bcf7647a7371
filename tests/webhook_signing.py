"""Standard Webhooks headers for a test's request, signed by the reference library (not by our code)."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

from standardwebhooks.webhooks import Webhook


def signed_headers(
    body: bytes,
    secret: str | bytes,
    *,
    msg_id: str | None = None,
    at: datetime | None = None,
    content_type: str | None = "application/json",
) -> dict[str, str]:
    """The webhook-id (``msg_id``, a fresh one by default), webhook-timestamp (``at``, now by
    default) and webhook-signature of ``body`` under ``secret`` (a ``whsec_`` secret or raw key
    bytes), and the Content-Type unless it is None."""
    msg_id = msg_id or f"msg_{uuid4().hex}"
    at = at or datetime.now(UTC)
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers
