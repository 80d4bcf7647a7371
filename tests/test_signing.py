"""worker.signing against the docs' worked examples and against an independent implementation.

The client and the fake iVvy share ``worker.signing``, so agreeing with each other proves
nothing; these tests pin it to the docs' own numbers and to ``independent_ivvy_signing``.
"""

from __future__ import annotations

import re
import string
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import independent_ivvy_signing as independent
from worker import signing
from worker.core.errors import SignatureRejected

# The example request of "Signing the request".
DOCS_URI = "/api/1.0/test?action=ping"
DOCS_BODY = b'{"example":"body"}'
DOCS_HEADERS = [
    ("Host", "api.ap-southeast-2.ivvy.com"),
    ("Date", "Tue, 03 Apr 2012 22:23:24 UTC"),
    ("Content-MD5", "a09f600c77a6dbd947db24c61e8935ca"),
    ("Content-Type", "application/json"),
    ("Content-Length", "18"),
    ("X-Api-Version", "1.0"),
    ("IVVY-Date", "2012-04-03 22:23:24"),
]
DOCS_STRING_TO_SIGN = (
    "posta09f600c77a6dbd947db24c61e8935caapplication/json/api/1.0/test?action=ping1.0ivvydate=2012-04-03 22:23:24"
)
DOCS_TIME = datetime(2012, 4, 3, 22, 23, 24, tzinfo=UTC)


def test_docs_example_body_has_the_docs_md5() -> None:
    assert signing.content_md5(DOCS_BODY) == independent.md5_hex(DOCS_BODY) == "a09f600c77a6dbd947db24c61e8935ca"
    assert len(DOCS_BODY) == 18  # the example's Content-Length


def test_independent_string_to_sign_is_the_docs_example() -> None:
    assert independent.string_to_sign("POST", DOCS_URI, DOCS_HEADERS, DOCS_BODY) == DOCS_STRING_TO_SIGN


def test_worker_string_to_sign_is_the_docs_example() -> None:
    built = signing.string_to_sign(
        method="POST",
        content_md5_hex=signing.content_md5(DOCS_BODY),
        content_type="application/json",
        date="",  # the IVVY-Date header is used, so the date part is empty
        request_uri=DOCS_URI,
        api_version="1.0",
        ivvy_headers=signing.ivvy_headers_part(DOCS_HEADERS),
    )
    assert built == DOCS_STRING_TO_SIGN


def test_worker_accepts_the_docs_example_signed_at_the_docs_time() -> None:
    signature = independent.hmac_sha1_hex("the secret", DOCS_STRING_TO_SIGN)
    headers = [*DOCS_HEADERS, ("X-Api-Authorization", f"IWS the-key:{signature}")]
    key = signing.verify_request(
        method="POST",
        request_uri=DOCS_URI,
        headers=headers,
        body=DOCS_BODY,
        secrets={"the-key": "the secret"},
        now=DOCS_TIME,
    )
    assert key == "the-key"


def test_hmac_sha1_docs_example() -> None:
    expected = "a993876ea1218921a1c8551923473da7b310dfae"
    assert signing.hmac_sha1_hex("my secret key", "string to sign") == expected
    assert independent.hmac_sha1_hex("my secret key", "string to sign") == expected


@pytest.mark.parametrize(
    ("text", "md5"),
    [
        (b"string to hash\n", "2fcc83d76f9b2d8ef372271d807a3364"),  # echo -e adds the newline
        (b"    string to hash    \n", "6b9202a3b05bd22803fe54767b30ee10"),  # whitespace is hashed too
        (b"", "d41d8cd98f00b204e9800998ecf8427e"),  # an empty body still has an MD5
    ],
)
def test_md5_docs_examples(text: bytes, md5: str) -> None:
    assert signing.content_md5(text) == independent.md5_hex(text) == md5


def test_signed_headers_have_the_iws_format_and_the_documented_headers() -> None:
    now = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    body = b'{"name":"Referral","applyTo":1}'
    uri = "/api/1.0/crm?action=addOrUpdateLeadStage"
    headers = signing.signed_headers(api_key="key-1", api_secret="s3cret", request_uri=uri, body=body, now=now)

    match = re.fullmatch(r"IWS (?P<key>[^:]+):(?P<signature>[0-9a-f]{40})", headers["X-Api-Authorization"])
    assert match is not None
    assert match["key"] == "key-1"
    assert headers["Content-MD5"] == independent.md5_hex(body)
    assert headers["Content-Type"] == "application/json"
    assert headers["IVVY-Date"] == "2024-05-06 07:08:09"
    assert headers["X-Api-Version"] == "1.0"
    expected = independent.hmac_sha1_hex("s3cret", independent.string_to_sign("POST", uri, list(headers.items()), body))
    assert match["signature"] == expected


# Random requests: both implementations must agree on every one of them.

_keys = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=40)
_secrets = st.text(min_size=1, max_size=60).filter(lambda s: "\x00" not in s)
_uris = st.builds(
    lambda namespace, action, extra: f"/api/1.0/{namespace}?action={action}{extra}",
    st.sampled_from(["crm", "test", "venue"]),
    st.text(string.ascii_letters, min_size=1, max_size=30),
    st.sampled_from(["", "&x=1", "&Mixed=Case"]),
)
_moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)).map(
    lambda moment: moment.replace(microsecond=0)
)
_skews = st.integers(min_value=-300, max_value=300).map(lambda s: timedelta(seconds=s))
_extra_ivvy_headers = st.lists(
    st.tuples(
        st.sampled_from(["IVVY-Trace", "Ivvy_Request-Id", "IVVY-A"]), st.text(string.ascii_letters + string.digits)
    ),
    max_size=2,
    unique_by=lambda header: header[0],
)


@given(key=_keys, secret=_secrets, uri=_uris, body=st.binary(max_size=300), sent=_moments, skew=_skews)
def test_worker_signatures_pass_the_independent_verifier(
    key: str, secret: str, uri: str, body: bytes, sent: datetime, skew: timedelta
) -> None:
    headers = signing.signed_headers(api_key=key, api_secret=secret, request_uri=uri, body=body, now=sent)
    pairs = list(headers.items())
    verified = independent.verify(
        method="POST", request_uri=uri, headers=pairs, body=body, secrets={key: secret}, now=sent + skew
    )
    assert verified == key
    with pytest.raises(independent.Refused, match="wrong signature"):
        independent.verify(
            method="POST", request_uri=uri, headers=pairs, body=body, secrets={key: secret + "x"}, now=sent
        )


@given(
    key=_keys,
    secret=_secrets,
    uri=_uris,
    body=st.binary(max_size=300),
    sent=_moments,
    skew=_skews,
    use_ivvy_date=st.booleans(),
    extra=_extra_ivvy_headers,
)
def test_independent_signatures_pass_the_worker_verifier(
    key: str,
    secret: str,
    uri: str,
    body: bytes,
    sent: datetime,
    skew: timedelta,
    use_ivvy_date: bool,
    extra: list[tuple[str, str]],
) -> None:
    headers = independent.sign(
        key=key, secret=secret, request_uri=uri, body=body, now=sent, use_ivvy_date=use_ivvy_date, extra_headers=extra
    )
    verified = signing.verify_request(
        method="POST", request_uri=uri, headers=headers, body=body, secrets={key: secret}, now=sent + skew
    )
    assert verified == key
    with pytest.raises(SignatureRejected, match="signature does not match"):
        signing.verify_request(
            method="POST", request_uri=uri, headers=headers, body=body, secrets={key: secret + "x"}, now=sent
        )


@given(
    sent=_moments,
    skew=st.integers(min_value=301, max_value=10**8).map(lambda s: timedelta(seconds=s)),
    late=st.booleans(),
)
def test_both_call_a_request_more_than_five_minutes_off_stale(sent: datetime, skew: timedelta, late: bool) -> None:
    uri, body = "/api/1.0/test?action=ping", b"{}"
    headers = independent.sign(key="k", secret="s", request_uri=uri, body=body, now=sent)
    now = sent + skew if late else sent - skew
    with pytest.raises(SignatureRejected) as worker_refusal:
        signing.verify_request(method="POST", request_uri=uri, headers=headers, body=body, secrets={"k": "s"}, now=now)
    with pytest.raises(independent.Refused) as independent_refusal:
        independent.verify(method="POST", request_uri=uri, headers=headers, body=body, secrets={"k": "s"}, now=now)
    assert worker_refusal.value.specific_code == independent_refusal.value.specific_code == 23005
