"""The change model of docs/contract.md ("The change"), defined once for producers and worker.

``parse_change`` turns untrusted input (a JSON object, CLI flags, a JSONL line) into a
normalised, immutable ``LeadStageChange`` or raises ``InvalidChange`` naming every bad field.
``parse_envelope`` does the same for what travels around a change; ``validate`` does both, for
the producers.
"""

from __future__ import annotations

import json
import re
import secrets
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson

from worker.core.errors import FieldError, InvalidChange, UnknownAccount

APPLY_TO_OPPORTUNITY = 1
APPLY_TO_LEAD = 2
APPLY_TO_WORDS = {"opportunity": APPLY_TO_OPPORTUNITY, "lead": APPLY_TO_LEAD}
NAME_MAX_CHARS = 255
#: The largest stage id: iVvy's ids are 64-bit at most, and bigger ones cannot be serialised as JSON.
ID_MAX = 2**63 - 1
KEY_MAX_CHARS = 255
SOURCE_MAX_CHARS = 1000
DEFAULT_ACCOUNT = "default"

#: Field names as iVvy spells them, in the order they are sent.
FIELDS = ("id", "name", "colour", "applyTo")
#: Older or other spellings accepted on input.
ALIASES = {"color": "colour", "appliesTo": "applyTo"}
_ALIAS_OF = {field: alias for alias, field in ALIASES.items()}
#: The fields an update may change (everything but the id).
UPDATABLE_FIELDS = ("name", "colour", "applyTo")

#: The rules as regular expressions (whole values), also published in the webhook's OpenAPI document.
COLOUR_PATTERN = r"#[0-9a-fA-F]{6}"
ACCOUNT_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
KEY_CHARACTER_PATTERN = r"[\x20-\x7e]"  # printable ASCII
#: A whole idempotency key as given: printable ASCII, 1..KEY_MAX_CHARS once the spaces around it are
#: trimmed (the strict form: the model trims tabs too).
KEY_PATTERN = r" *[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])? *"
_COLOUR = re.compile(COLOUR_PATTERN)
_ACCOUNT = re.compile(ACCOUNT_PATTERN)
_PRINTABLE_ASCII = re.compile(KEY_CHARACTER_PATTERN + "+")
#: A stage id written as text (a flag): plain ASCII digits, as a JSON integer is written.
_ID_TEXT = re.compile(r"[1-9][0-9]*")
#: Characters no name may hold: control characters (NUL, ESC, newline, tab...) and the bidi
#: embeddings, overrides and isolates, which make a name display as something else.
_NAME_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: The name rule's strict form for JSON Schema (the OpenAPI document): no forbidden character,
#: and at least one letter or digit of the common scripts (Latin, Greek, Cyrillic, Hebrew, Arabic,
#: Devanagari, kana, CJK, Hangul). What it accepts the server accepts; the server also takes names
#: whose visible characters are only of other scripts, or symbols.
_NAME_ALLOWED = "[^\\x00-\\x1f\\x7f-\\x9f\\u202a-\\u202e\\u2066-\\u2069]"
_NAME_VISIBLE = (
    "[0-9A-Za-z\\u00c0-\\u017f\\u0391-\\u03c9\\u0410-\\u044f\\u05d0-\\u05ea\\u0621-\\u064a"
    "\\u0905-\\u0939\\u3041-\\u3096\\u30a1-\\u30fa\\u4e00-\\u9fff\\uac00-\\ud7a3]"
)
NAME_PATTERN = f"{_NAME_ALLOWED}*{_NAME_VISIBLE}{_NAME_ALLOWED}*"
#: Letters that render as nothing (Hangul fillers, the blank Braille pattern).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
#: Characters trimmed from both ends of an idempotency key and an account name, by every producer
#: (the spaces and tabs HTTP trims from a header value).
KEY_TRIM = " \t"

Operation = Literal["add", "update"]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LeadStageChange:
    """One normalised addOrUpdateLeadStage request body. ``id`` absent means add."""

    id: int | None = None
    name: str | None = None
    colour: str | None = None
    apply_to: int | None = None

    @property
    def operation(self) -> Operation:
        return "add" if self.id is None else "update"

    def body(self) -> dict[str, Any]:
        """The request body, in iVvy's field names, without absent fields."""
        values = {"id": self.id, "name": self.name, "colour": self.colour, "applyTo": self.apply_to}
        return {k: v for k, v in values.items() if v is not None}

    def without(self, fields: set[str]) -> LeadStageChange:
        """This change with some updatable fields (iVvy names) dropped."""
        return LeadStageChange(
            id=self.id,
            name=None if "name" in fields else self.name,
            colour=None if "colour" in fields else self.colour,
            apply_to=None if "applyTo" in fields else self.apply_to,
        )

    def changed_fields(self) -> list[str]:
        values = (self.name, self.colour, self.apply_to)
        return [field for field, value in zip(UPDATABLE_FIELDS, values, strict=True) if value is not None]

    def canonical_json(self) -> bytes:
        """Stable bytes for this change: equal changes give equal bytes."""
        return orjson.dumps(self.body())


def parse_change(raw: object) -> LeadStageChange:
    """Validate and normalise one change; raise ``InvalidChange`` naming every bad field."""
    if not isinstance(raw, Mapping):
        raise InvalidChange([FieldError("change", "must be a JSON object")])
    errors: list[FieldError] = []
    values: dict[str, object] = {}
    #: Each field as the input spells it (appliesTo, color), so that errors use the user's words.
    spelt: dict[str, str] = {}
    for given, value in raw.items():
        field = ALIASES.get(given, given) if isinstance(given, str) else given
        if field not in FIELDS:
            errors.append(FieldError(shown(str(given)), "is not a known field (allowed: id, name, colour, applyTo)"))
        elif field in values:
            errors.append(FieldError(field, f"is given twice (as {field} and as its alias {_ALIAS_OF[field]})"))
        else:
            values[field] = value
            spelt[field] = given

    stage_id = _check(errors, "id", values, _parse_id, spelt)
    name = _check(errors, "name", values, _parse_name, spelt)
    colour = _check(errors, "colour", values, _parse_colour, spelt)
    apply_to = _check(errors, "applyTo", values, _parse_apply_to, spelt)

    if "id" not in values:
        if "name" not in values:
            errors.append(FieldError("name", "is required when id is absent (an add)"))
        if "applyTo" not in values:
            errors.append(FieldError("applyTo", "is required when id is absent (an add)"))
    elif not any(f in values for f in UPDATABLE_FIELDS):
        errors.append(FieldError("change", "an update (with id) must change at least one of name, colour, applyTo"))
    if errors:
        raise InvalidChange(errors)
    return LeadStageChange(id=stage_id, name=name, colour=colour, apply_to=apply_to)


def _check(
    errors: list[FieldError],
    field: str,
    values: Mapping[str, object],
    parse: Callable[[object], _T | FieldError],
    spelt: Mapping[str, str],
) -> _T | None:
    if field not in values:
        return None
    value = values[field]
    if value is None:
        errors.append(FieldError(spelt[field], "must not be null (leave the field out instead)"))
        return None
    result = parse(value)
    if isinstance(result, FieldError):
        errors.append(FieldError(spelt[field], result.reason))
        return None
    return result


def _invalid(reason: str) -> FieldError:
    return FieldError("", reason)


def _parse_id(value: object) -> int | FieldError:
    if isinstance(value, bool) or not isinstance(value, int):
        return _invalid(f"must be a positive integer, not {_describe(value)}")
    if value < 1:
        return _invalid(f"must be a positive integer, not {value}")
    if value > ID_MAX:
        return _invalid(f"must be at most {ID_MAX}")
    return value


def parse_id_text(text: str) -> int:
    """A stage id written as text (``--id``): plain ASCII digits, no sign, space, ``_`` or leading 0
    (what a JSON producer may write as a number); raises ``InvalidChange`` for field ``id``."""
    if not _ID_TEXT.fullmatch(text):
        raise InvalidChange(
            [FieldError("id", f"must be a positive whole number in plain digits such as 1001, not {_quoted(text)}")]
        )
    parsed = _parse_id(int(text))
    if isinstance(parsed, FieldError):
        raise InvalidChange([FieldError("id", parsed.reason)])
    return parsed


def _parse_name(value: object) -> str | FieldError:
    if not isinstance(value, str):
        return _invalid(f"must be a string, not {_describe(value)}")
    if not _is_unicode(value):
        return _invalid("must be valid Unicode text (it holds a lone surrogate)")
    name = value.strip()
    if not name:
        return _invalid("must not be empty or only spaces")
    if len(name) > NAME_MAX_CHARS:
        return _invalid(f"must be at most {NAME_MAX_CHARS} characters, not {len(name)}")
    bad = _NAME_FORBIDDEN.search(name)
    if bad is not None:
        what = "a control character" if bad.group() < "\u0100" else "a bidirectional override"
        return _invalid(f"must not contain {what} ({shown(bad.group())} at position {bad.start() + 1})")
    if not name.isascii() and all(_invisible(c) for c in name):
        return _invalid("must have a visible character (it holds only invisible or blank characters)")
    return name


def _is_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (which no UTF-8 text, hence no JSON, can carry)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _invisible(char: str) -> bool:
    return char in _BLANK_LETTERS or unicodedata.category(char) in ("Cf", "Mn", "Me", "Zs", "Zl", "Zp")


def shown(text: str, *, limit: int = 40) -> str:
    """``text`` fit to echo in a message: cut after ``limit`` characters, and every control, format
    (bidi), separator or surrogate character escaped, so that nothing acts on a terminal."""
    cut = text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
    if cut.isprintable():  # false for control, format, separator (but space), surrogate characters
        return cut
    return "".join(c if c.isprintable() else _escaped(c) for c in cut)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _quoted(text: str) -> str:
    return "'" + shown(text) + "'"


def _parse_colour(value: object) -> str | FieldError:
    if not isinstance(value, str) or not _COLOUR.fullmatch(value):
        return _invalid(f"must be a #rrggbb hex colour such as #7ee546, not {_describe(value)}")
    return value.lower()


def _parse_apply_to(value: object) -> int | FieldError:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in APPLY_TO_WORDS:
            return APPLY_TO_WORDS[word]
        if word in ("1", "2"):
            return int(word)
    elif isinstance(value, int) and not isinstance(value, bool) and value in (1, 2):
        return value
    return _invalid(f'must be 1 (opportunity) or 2 (lead), or "opportunity" or "lead", not {_describe(value)}')


def _describe(value: object) -> str:
    text = orjson.dumps(value).decode() if _jsonable(value) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _jsonable(value: object) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


def repeated_key(data: bytes, parsed: object) -> str | None:
    """The first key that an object of the JSON text ``data`` repeats, or None; ``parsed`` is
    ``data`` already parsed by orjson, which keeps the last of repeated keys silently. Every JSON
    producer refuses a repeated key rather than guess which one counts."""
    if data.count(b":") == _key_count(parsed):
        return None  # every colon is a key's: no key can be there twice (the common case, fast)
    found: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        result = dict(items)
        if len(result) != len(items) and not found:
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    found.append(key)
                    break
                seen.add(key)
        return result

    try:
        json.loads(data, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # what orjson took and the standard parser cannot nest as deep
        return None
    return found[0] if found else None


def _key_count(value: object) -> int:
    """Keys in every object of ``value`` (scalars are skipped without a call: this runs per line)."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    count = len(value) if isinstance(value, dict) else 0
    for child in children:
        if isinstance(child, dict | list):
            count += _key_count(child)
    return count


@dataclass(frozen=True, slots=True)
class Envelope:
    """What travels around a change: who it is for and how it is deduplicated."""

    idempotency_key: str
    account: str
    source: str


def parse_envelope(*, idempotency_key: object = None, account: object = None, source: object = None) -> Envelope:
    """Validate the envelope; a missing idempotency key is generated."""
    errors: list[FieldError] = []
    if isinstance(idempotency_key, str):
        idempotency_key = idempotency_key.strip(KEY_TRIM)
    if isinstance(account, str):
        account = account.strip(KEY_TRIM)
    if idempotency_key is None:
        idempotency_key = secrets.token_hex(16)  # 128 random bits, as a UUID4's hex (and cheaper)
    elif not isinstance(idempotency_key, str) or not _PRINTABLE_ASCII.fullmatch(idempotency_key):
        got = _quoted(idempotency_key) if isinstance(idempotency_key, str) else _describe(idempotency_key)
        errors.append(FieldError("idempotency_key", f"must be 1..255 printable ASCII characters, not {got}"))
    elif len(idempotency_key) > KEY_MAX_CHARS:
        errors.append(
            FieldError("idempotency_key", f"must be at most {KEY_MAX_CHARS} characters, not {len(idempotency_key)}")
        )
    if account is None:
        account = DEFAULT_ACCOUNT
    elif not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
        got = _quoted(account) if isinstance(account, str) else _describe(account)
        errors.append(FieldError("account", f"must be 1..64 characters of letters, digits, '_', '.', '-', not {got}"))
    if source is None:
        source = ""
    elif not isinstance(source, str) or len(source) > SOURCE_MAX_CHARS:
        errors.append(FieldError("source", f"must be text of at most {SOURCE_MAX_CHARS} characters"))
    elif not _is_unicode(source):
        errors.append(FieldError("source", "must be valid Unicode text (it holds a lone surrogate)"))
    if errors:
        raise InvalidChange(errors)
    assert isinstance(idempotency_key, str)
    assert isinstance(account, str)
    assert isinstance(source, str)
    return Envelope(idempotency_key=idempotency_key, account=account, source=source)


def validate(
    change: object,
    *,
    idempotency_key: str | None,
    account: str,
    source: str,
    known_accounts: frozenset[str],
) -> tuple[LeadStageChange, Envelope]:
    """The normalised change and its envelope, their field errors reported together
    (``InvalidChange``); ``UnknownAccount`` when there is an account list (``known_accounts``) and
    the account is not on it (without one, any well-formed name is accepted: a producer-only host)."""
    errors: list[FieldError] = []
    parsed: LeadStageChange | None = None
    envelope: Envelope | None = None
    try:
        parsed = parse_change(change)
    except InvalidChange as exc:
        errors.extend(exc.errors)
    try:
        envelope = parse_envelope(idempotency_key=idempotency_key, account=account, source=source)
    except InvalidChange as exc:
        errors.extend(exc.errors)
    if errors:
        raise InvalidChange(errors)
    assert parsed is not None
    assert envelope is not None
    if known_accounts and envelope.account not in known_accounts:
        raise UnknownAccount(envelope.account)
    return parsed, envelope
