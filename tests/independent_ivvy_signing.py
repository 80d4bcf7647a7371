"""A second implementation of iVvy's request signing, written from ivvy-api-docs alone.

``worker.signing`` signs the client's requests and checks them in the fake iVvy, so a mistake
there would be made twice and agreed with itself. This module does not import ``worker``; it
follows the docs' pseudo-code step by step ("Signing the request", "Custom Headers",
"Standard Headers", "Calculating md5", "HMAC-SHA1") so the tests can check both sides of
``worker.signing`` against something that could disagree:

    contentSign := md5(body) + Content-Type
    date        := the Date header, or "" when the IVVY-Date header carries the date
    ivvyHeaders := headers starting with IVVY, '-' and '_' dropped from the name, name=value,
                   in alphabetical order, joined with '&'
    stringToSign := lowercase(method + contentSign + date + requestString + apiVersion + ivvyHeaders)
    X-Api-Authorization: IWS key:hex(HMAC-SHA1(secret, stringToSign))

Requests more than 5 minutes from the server's clock are stale (specific code 23005).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime

TIME_TO_LIVE = timedelta(minutes=5)
STALE = 23005
_IVVY_TIMESTAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?: UTC)?")
_API_VERSION_IN_URI = re.compile(r"/api/([^/?]+)/")
_AUTHORIZATION = re.compile(r"IWS ([^:]+):(.+)")

Headers = Sequence[tuple[str, str]]


def md5_hex(body: bytes) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def hmac_sha1_hex(secret: str, message: str) -> str:
    return hmac.new(secret.encode("utf-8"), message.encode("utf-8"), "sha1").hexdigest()


def _header(headers: Headers, name: str) -> str | None:
    for header_name, value in headers:
        if header_name.lower() == name.lower():
            return value
    return None


def ivvy_headers(headers: Headers) -> str:
    """The ``ivvyHeaders`` part of the string to sign."""
    entries = []
    for name, value in headers:
        if name.upper().startswith("IVVY"):
            entries.append(name.replace("-", "").replace("_", "") + "=" + value)
    return "&".join(sorted(entries, key=str.lower))


def string_to_sign(method: str, request_uri: str, headers: Headers, body: bytes) -> str:
    """The docs' ``stringToSign`` for a request as it is on the wire."""
    content_sign = md5_hex(body) + (_header(headers, "Content-Type") or "")
    date = "" if _header(headers, "IVVY-Date") is not None else (_header(headers, "Date") or "")
    version = _API_VERSION_IN_URI.match(request_uri)
    api_version = version.group(1) if version else ""
    initial = method + content_sign + date + request_uri + api_version + ivvy_headers(headers)
    return initial.lower()


def ivvy_timestamp(moment: datetime) -> str:
    """iVvy's ``yyyy-mm-dd HH:mm:ss`` in UTC (development-reference/timestamp-format)."""
    utc = moment.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d} {utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"


def sign(
    *,
    key: str,
    secret: str,
    request_uri: str,
    body: bytes,
    now: datetime,
    use_ivvy_date: bool = True,
    content_type: str = "application/json",
    extra_headers: Headers = (),
) -> list[tuple[str, str]]:
    """Every header of a signed POST; the date goes in IVVY-Date, or in Date when asked."""
    headers: list[tuple[str, str]] = [
        ("Content-Type", content_type),
        ("Content-MD5", md5_hex(body)),
        ("X-Api-Version", "1.0"),
        *extra_headers,
    ]
    if use_ivvy_date:
        headers.append(("IVVY-Date", ivvy_timestamp(now)))
    else:
        headers.append(("Date", format_datetime(now.astimezone(UTC), usegmt=True)))
    signature = hmac_sha1_hex(secret, string_to_sign("POST", request_uri, headers, body))
    headers.append(("X-Api-Authorization", f"IWS {key}:{signature}"))
    return headers


class Refused(Exception):
    """iVvy would answer 401; ``specific_code`` is 23005 for a stale request."""

    def __init__(self, reason: str, specific_code: int | None = None) -> None:
        self.specific_code = specific_code
        super().__init__(reason)


def _sent_at(headers: Headers) -> datetime:
    ivvy_date = _header(headers, "IVVY-Date")
    if ivvy_date is not None:
        parts = _IVVY_TIMESTAMP.fullmatch(ivvy_date.strip())
        if not parts:
            raise Refused("IVVY-Date is not an iVvy timestamp")
        year, month, day, hour, minute, second = (int(p) for p in parts.groups())
        try:
            return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        except ValueError:
            raise Refused("IVVY-Date is not a date") from None
    date = _header(headers, "Date")
    if date is None:
        raise Refused("no Date or IVVY-Date header")
    try:
        moment = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        raise Refused("Date is not an HTTP date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def verify(
    *,
    method: str,
    request_uri: str,
    headers: Headers,
    body: bytes,
    secrets: Mapping[str, str],
    now: datetime,
) -> str:
    """Check a request as iVvy's server would; return its key or raise ``Refused``."""
    authorization = _AUTHORIZATION.fullmatch(_header(headers, "X-Api-Authorization") or "")
    if not authorization:
        raise Refused("X-Api-Authorization is not 'IWS key:signature'")
    key, signature = authorization.groups()
    if key not in secrets:
        raise Refused("unknown key")
    if (_header(headers, "Content-MD5") or "").lower() != md5_hex(body):
        raise Refused("Content-MD5 is not the MD5 of the body")
    if abs(now - _sent_at(headers)) > TIME_TO_LIVE:
        raise Refused("stale", STALE)
    expected = hmac_sha1_hex(secrets[key], string_to_sign(method, request_uri, headers, body))
    if not hmac.compare_digest(expected.encode(), signature.lower().encode("utf-8", "surrogateescape")):
        raise Refused("wrong signature")
    return key
