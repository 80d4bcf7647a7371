"""iVvy request signing, exactly as ivvy-api-docs "Signing the request" describes.

    stringToSign = lower({method}{contentMd5}{contentType}{date}{requestUri}{apiVersion}{ivvyHeaders})
    signature    = hex(HMAC-SHA1(secret, stringToSign))
    X-Api-Authorization: IWS {key}:{signature}

``date`` is the Date header's value, or empty when the IVVY-Date header carries the date (we
always send IVVY-Date); ``ivvyHeaders`` are all headers starting with IVVY, with '-' and '_'
removed from their names, as ``name=value``, sorted and joined by '&'. The same functions sign
(the client) and verify (the fake iVvy), so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from worker.core.errors import STALE_REQUEST_CODE, SignatureRejected

API_VERSION = "1.0"
CONTENT_TYPE = "application/json"
#: iVvy's timestamp format (development-reference/timestamp-format); " UTC" is optional on input.
IVVY_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
#: Requests older or newer than this are stale (standard-headers: Date).
MAX_CLOCK_SKEW = timedelta(minutes=5)


def content_md5(body: bytes) -> str:
    """Hex MD5 of the exact body bytes (an empty body has an MD5 too)."""
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def format_ivvy_date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(IVVY_DATE_FORMAT)


def parse_ivvy_date(text: str) -> datetime:
    """Parse ``yyyy-mm-dd HH:mm:ss[ UTC]``; raise ValueError otherwise."""
    text = text.strip()
    if text.upper().endswith(" UTC"):
        text = text[:-4].rstrip()
    return datetime.strptime(text, IVVY_DATE_FORMAT).replace(tzinfo=UTC)


def parse_http_date(text: str) -> datetime:
    """Parse a Date header (RFC 7231, or the docs' ``Tue, 03 Apr 2012 22:23:24 UTC``)."""
    moment = parsedate_to_datetime(text.replace(" UTC", " GMT"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def ivvy_headers_part(headers: Iterable[tuple[str, str]]) -> str:
    """The ``ivvyHeaders`` part: headers starting with IVVY, '-' and '_' removed, sorted, '&'-joined."""
    parts = sorted(
        (name.replace("-", "").replace("_", "").lower(), value)
        for name, value in headers
        if name.lower().startswith("ivvy")
    )
    return "&".join(f"{name}={value}" for name, value in parts)


def string_to_sign(
    *,
    method: str,
    content_md5_hex: str,
    content_type: str,
    date: str,
    request_uri: str,
    api_version: str,
    ivvy_headers: str,
) -> str:
    return (f"{method}{content_md5_hex}{content_type}{date}{request_uri}{api_version}{ivvy_headers}").lower()


def hmac_sha1_hex(secret: str, message: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha1).hexdigest()


def signed_headers(
    *,
    api_key: str,
    api_secret: str,
    request_uri: str,
    body: bytes,
    now: datetime,
    content_type: str = CONTENT_TYPE,
) -> dict[str, str]:
    """Every header a signed POST needs. ``request_uri`` is path and query, as sent."""
    md5 = content_md5(body)
    ivvy_date = format_ivvy_date(now)
    to_sign = string_to_sign(
        method="POST",
        content_md5_hex=md5,
        content_type=content_type,
        date="",
        request_uri=request_uri,
        api_version=API_VERSION,
        ivvy_headers=ivvy_headers_part([("IVVY-Date", ivvy_date)]),
    )
    return {
        "Content-Type": content_type,
        "Content-MD5": md5,
        "IVVY-Date": ivvy_date,
        "X-Api-Version": API_VERSION,
        "X-Api-Authorization": f"IWS {api_key}:{hmac_sha1_hex(api_secret, to_sign)}",
    }


def _same_text(received: str, expected: str) -> bool:
    """Constant-time equality; as bytes, because compare_digest raises on non-ASCII str (a forged header)."""
    return hmac.compare_digest(received.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def verify_request(
    *,
    method: str,
    request_uri: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes,
    secrets: Mapping[str, str],
    now: datetime,
) -> str:
    """Check a request's signature the way iVvy's server does; return the key it was signed with.

    ``headers`` may repeat names (pairs); lookups are case-insensitive.
    """
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    lookup = {name.lower(): value for name, value in pairs}
    auth = lookup.get("x-api-authorization", "")
    scheme, _, credentials = auth.partition(" ")
    key, _, signature = credentials.partition(":")
    if scheme != "IWS" or not key or not signature:
        raise SignatureRejected("X-Api-Authorization must be 'IWS key:signature'")
    secret = secrets.get(key)
    if secret is None:
        raise SignatureRejected("Unknown API key")
    md5 = lookup.get("content-md5", "")
    if not _same_text(md5.lower(), content_md5(body)):
        raise SignatureRejected("Content-MD5 does not match the body")
    ivvy_date = lookup.get("ivvy-date")
    try:
        if ivvy_date is not None:
            sent_at, date_part = parse_ivvy_date(ivvy_date), ""
        elif "date" in lookup:
            sent_at, date_part = parse_http_date(lookup["date"]), lookup["date"]
        else:
            raise SignatureRejected("The Date or IVVY-Date header is required")
    except (ValueError, TypeError):
        raise SignatureRejected("The Date or IVVY-Date header is not a valid date") from None
    if abs(now - sent_at) > MAX_CLOCK_SKEW:
        raise SignatureRejected("Request is stale", specific_code=STALE_REQUEST_CODE)
    expected = hmac_sha1_hex(
        secret,
        string_to_sign(
            method=method,
            content_md5_hex=md5,
            content_type=lookup.get("content-type", ""),
            date=date_part,
            request_uri=request_uri,
            api_version=lookup.get("x-api-version", API_VERSION),
            ivvy_headers=ivvy_headers_part(pairs),
        ),
    )
    if not _same_text(expected, signature.lower()):
        raise SignatureRejected("The signature does not match")
    return key
