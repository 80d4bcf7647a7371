"""Secrets out of log lines: the structlog processor every line goes through (``secret_redactor``).

docs/contract.md (Configuration): no secret reaches a log line. ``worker.core.logs`` places the
processor after tracebacks are formatted and just before rendering, for our events and foreign
records alike.

Every occurrence of a secret it is given is masked, however short: the settings are what refuse a
secret shorter than ``MIN_SECRET_LENGTH`` (a short one would mask ordinary words and so spell
itself out), so that the secrets configured never cost a line its readability.
"""

from __future__ import annotations

import datetime
import functools
import re
import uuid
from collections.abc import Callable, Iterable, Mapping

from structlog.typing import EventDict, WrappedLogger

__all__ = ["REDACTED", "safe_repr", "secret_redactor"]

#: What a secret, or the value of a credential-like key, is replaced with.
REDACTED = "**********"

# A key whose (normalised) name contains one of these holds a credential: its value is masked
# whatever it is. This covers authorization, x-api-authorization, api_secret, webhook_secret,
# webhook-signature, password, access_token, cookie, set-cookie...
_CREDENTIAL_KEY_PARTS = ("authorization", "secret", "password", "passwd", "token", "signature", "cookie", "credential")

# iVvy's "IWS {key}:{signature}": the key identifies the account and stays readable; the HMAC is
# a replayable credential for that request, so it goes. Case-insensitive because a client might
# send "iws" and the signature would still be a valid HMAC.
_IWS = r"(?P<iws>\bIWS\s+[^\s:]*:)[^\s\"',;)\]}>]+"

# structlog's bookkeeping keys and the raw exception: left alone, never rendered as values.
_UNTOUCHED_KEYS = frozenset({"_record", "_from_structlog", "exc_info"})

# Values that render without repr() and cannot hold text of ours.
_PLAIN_TYPES = (bool, int, float, datetime.date, datetime.time, datetime.timedelta, uuid.UUID)
# The usual line's values, by exact type (a subclass, or a str, takes the longer way).
_FLAT_TYPES = frozenset({type(None), bool, int, float, datetime.datetime, *_PLAIN_TYPES[3:]})

# The key sets of the lines seen without a credential key (a few per event: bounded all the same).
_PLAIN_KEY_SETS: set[tuple[str, ...]] = set()
_MAX_KEY_SETS = 1024

# Deeper than this, a value is rendered with repr() and scrubbed as one string (cycles end here).
_MAX_DEPTH = 16


@functools.lru_cache(maxsize=4096)
def _is_credential_key(key: str) -> bool:
    normalised = key.lower().replace("-", "_")
    return any(part in normalised for part in _CREDENTIAL_KEY_PARTS)


def safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not take the log line (or the job) down
        return f"<unrepresentable {type(value).__name__}>"


class _Redactor:
    """The processor built by ``secret_redactor``; see there."""

    __slots__ = ("_needles", "_pattern")

    def __init__(self, pattern: re.Pattern[str], needles: tuple[str, ...] | None) -> None:
        self._pattern = pattern
        self._needles = needles

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        if self._nothing_to_hide(event_dict):
            return event_dict
        for key, value in event_dict.items():
            if key in _UNTOUCHED_KEYS or value is None:
                continue
            # Top-level keys are the event's own names (never secrets): only values change, in
            # place, which is safe because structlog hands every processor its own copy.
            if _is_credential_key(key):
                event_dict[key] = REDACTED
            else:
                event_dict[key] = self._clean(value, 0)
        return event_dict

    def _nothing_to_hide(self, event_dict: EventDict) -> bool:
        """The usual line: flat strings and numbers, no credential key, and nothing to hide in all
        its strings joined (a value holding a secret makes the joined text hold it, so this never
        misses; a match across two values only sends the line the long way)."""
        keys = tuple(event_dict)
        if keys not in _PLAIN_KEY_SETS:
            if any(_is_credential_key(key) for key in keys if key not in _UNTOUCHED_KEYS):
                return False
            if len(_PLAIN_KEY_SETS) < _MAX_KEY_SETS:
                _PLAIN_KEY_SETS.add(keys)
        texts = []
        for key, value in event_dict.items():
            kind = type(value)
            if kind is str:
                texts.append(value)
            elif kind not in _FLAT_TYPES and key not in _UNTOUCHED_KEYS:
                return False
        text = "\0".join(texts)
        if self._needles is not None and text.isascii():
            # ASCII only, on both sides: the pattern's case-insensitive match needs one of the
            # needles (each secret, and "iws") in the lower-cased text, and a substring test is a
            # fraction of the cost of the pattern's search.
            lowered = text.lower()
            for needle in self._needles:
                if needle in lowered:
                    break
            else:
                return True
        return self._pattern.search(text) is None

    def _clean_key(self, key: object) -> object:
        return self._scrub(key) if isinstance(key, str) else key

    def _clean_item(self, key: object, value: object, depth: int) -> object:
        if value is not None and isinstance(key, str) and _is_credential_key(key):
            return REDACTED
        return self._clean(value, depth)

    def _scrub(self, text: str) -> str:
        # search() first: about half the cost of sub() on the usual string, which has nothing to hide.
        return self._pattern.sub(_replacement, text) if self._pattern.search(text) else text

    def _clean(self, value: object, depth: int) -> object:
        # New containers are built rather than edited: the caller's own objects (a headers
        # dict it goes on to send, say) must not change because they were logged.
        if isinstance(value, str):
            return self._scrub(value)
        if value is None or isinstance(value, _PLAIN_TYPES):
            return value
        if depth < _MAX_DEPTH:
            if isinstance(value, Mapping):
                return {self._clean_key(k): self._clean_item(k, v, depth + 1) for k, v in value.items()}
            if isinstance(value, list | tuple | set | frozenset):
                return [self._clean(v, depth + 1) for v in value]
        # Anything else (exceptions, bytes, objects) would be rendered with repr() by both
        # renderers anyway; doing it here lets the text be scrubbed before it is written.
        return self._scrub(safe_repr(value))


def _replacement(match: re.Match[str]) -> str:
    prefix = match.group("iws")
    return REDACTED if prefix is None else prefix + REDACTED


def _secret_variants(secrets: Iterable[str]) -> set[str]:
    variants: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        variants.add(secret)
        # A Standard Webhooks secret is "whsec_" + base64 of the key; libraries strip the prefix,
        # so the bare base64 may show up in an error message on its own.
        if secret.startswith("whsec_") and len(secret) > len("whsec_"):
            variants.add(secret[len("whsec_") :])
    return variants


def secret_redactor(secrets: Iterable[str]) -> Callable[[WrappedLogger, str, EventDict], EventDict]:
    """A processor that hides secrets in every value of the event dict, however deep.

    * every occurrence of one of ``secrets`` (settings.secret_values()) in any string, nested
      dict key or value, list item, or repr() of another object becomes ``REDACTED``;
    * the value of a key whose name suggests a credential (authorization, api_secret, token,
      webhook-signature...) becomes ``REDACTED``, at any depth;
    * the signature of "IWS key:signature" becomes ``REDACTED`` (the key stays).

    Place it after ``format_exc_info`` (so traceback text is covered) and just before the
    renderer. The usual line costs one substring test per secret over its strings joined.
    """
    variants = sorted(_secret_variants(secrets), key=len, reverse=True)
    # Longest first, so a secret that contains another is replaced whole.
    pattern = re.compile("|".join([_IWS, *map(re.escape, variants)]), re.IGNORECASE)
    # Non-ASCII secrets have case-insensitive matches that lower() does not give (the long s
    # matches "s"): those lines always take the pattern.
    ascii_only = all(variant.isascii() for variant in variants)
    return _Redactor(pattern, ("iws", *(v.lower() for v in variants)) if ascii_only else None)
