"""The fake iVvy's error answers and its checks of parameters (addOrUpdateLeadStage, filters).

Every error answer is iVvy's exception body (getting-started/interpreting-the-response/
exceptions), ``Content-Type: application/json``::

    {"errorCode": <HTTP status>, "message": "...", "specificCode": <int or null>,
     "additionalMessages": ["..."]}      # additionalMessages only when there are any

``specificCode`` is null where the docs give no code (401 other than stale, 404, 405, 429, 5xx).

addOrUpdateLeadStage's codes (the docs give codes, not which input causes which; these are our
choices):

=====  ======  ====================================================================
code   status  input
=====  ======  ====================================================================
23016  400     a parameter of the wrong JSON type, the first one found in the order id,
               name, colour, applyTo: id not a whole number (a string, a fraction, a
               bool, null); name or colour not a string; applyTo neither a whole number
               nor a string. additionalMessages says what was expected. Also a body that
               is not a JSON object.
24320  404     ``id`` names no stage (0 and negative ids included)
24321  400     ``id`` names a built-in stage (ids 1 Quoted, 2 Won, 3 Lost)
24323  400     the name: missing on an add, empty after trimming, or longer than 255
               characters after trimming; or applyTo missing on an add
24324  400     a value out of range: colour not ``#rrggbb`` (hex, any case), or applyTo
               not 1 (Opportunity) / 2 (Lead) (as a number or a string of digits)
24322  500     never from input: only the ``error_24322_rate`` fault ("An error has occurred")
=====  ======  ====================================================================

Only one error is reported, the first found: 23016, then 24320/24321, then 24323, then 24324.
404 for 24320 and 400 for 24321 keep both permanent for ``worker.core.errors`` (403 would read as a
credentials problem).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

NAME_MAX_CHARS: Final = 255
APPLY_TO_VALUES: Final = (1, 2)  # 1 = Opportunity, 2 = Lead

_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
DIGITS: Final = re.compile(r"[0-9]+")


class ApiError(Exception):
    """An iVvy error answer; ``field`` names the parameter at fault, when one is."""

    def __init__(
        self,
        status: int,
        message: str,
        specific_code: int | None = None,
        additional_messages: Sequence[str] = (),
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.specific_code = specific_code
        self.additional_messages = list(additional_messages)
        self.field = field
        self.headers = headers
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errorCode": self.status, "message": self.message, "specificCode": self.specific_code}
        if self.additional_messages:
            body["additionalMessages"] = self.additional_messages
        return body


def does_not_validate(name: str, why: str) -> ApiError:
    return ApiError(400, f"'{name}' does not validate", 23016, [why], field=name)


def _invalid_data(code: int, name: str, why: str) -> ApiError:
    return ApiError(400, "The request contains invalid data", code, [why], field=name)


_FILTER_FIELDS = ("id", "name", "colour", "applyTo")
_FILTER_MODIFIERS: dict[str, Callable[[str, str], bool]] = {
    "": lambda value, wanted: value == wanted,
    "__NOT": lambda value, wanted: value != wanted,
    "__CONTAINS": lambda value, wanted: wanted in value,
    "__NOTCONTAINS": lambda value, wanted: wanted not in value,
    "__BEGINS": lambda value, wanted: value.startswith(wanted),
    "__ENDS": lambda value, wanted: value.endswith(wanted),
}


def filters(raw: object) -> list[tuple[str, Callable[[object], bool]]]:
    """getLeadStageList's ``filter``: (field, test of a stage's value) pairs, compared as text."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        raise does_not_validate("filter", "Value must be an object")
    tests: list[tuple[str, Callable[[object], bool]]] = []
    for key, wanted in raw.items():
        field, modifier = next(
            ((f, key[len(f) :]) for f in _FILTER_FIELDS if key.startswith(f) and key[len(f) :] in _FILTER_MODIFIERS),
            (None, ""),
        )
        if field is None:
            raise does_not_validate("filter", f"Cannot filter by {key}")
        tests.append((field, functools.partial(_matches, _FILTER_MODIFIERS[modifier], str(wanted))))
    return tests


def _matches(compare: Callable[[str, str], bool], wanted: str, value: object) -> bool:
    return compare("" if value is None else str(value), wanted)


def whole_number(params: Mapping[str, Any], name: str) -> int | None:
    if name not in params:
        return None
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise does_not_validate(name, "Value must be a whole number")
    return value


def string(params: Mapping[str, Any], name: str) -> str | None:
    if name not in params:
        return None
    value = params[name]
    if not isinstance(value, str):
        raise does_not_validate(name, "Value must be a string")
    return value


def apply_to_type(params: Mapping[str, Any]) -> int | str | None:
    """applyTo as sent: the docs type it as a string and show a number, so both are accepted."""
    if "applyTo" not in params:
        return None
    value = params["applyTo"]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise does_not_validate("applyTo", "Value must be a whole number or a string")
    return value


def checked_values(name: str | None, colour: str | None, apply_to: int | str | None, *, adding: bool) -> dict[str, Any]:
    """The given fields, normalised; 24323 for the name and a missing applyTo, 24324 for values."""
    fields: dict[str, Any] = {}
    if name is not None:
        name = name.strip()
        if not name:
            raise _invalid_data(24323, "name", "name must not be empty")
        if len(name) > NAME_MAX_CHARS:
            raise _invalid_data(24323, "name", f"name must be at most {NAME_MAX_CHARS} characters")
        fields["name"] = name
    elif adding:
        raise _invalid_data(24323, "name", "name is required when id is missing")
    if apply_to is None and adding:
        raise _invalid_data(24323, "applyTo", "applyTo is required when id is missing")
    if colour is not None:
        if not _COLOUR.fullmatch(colour):
            raise _invalid_data(24324, "colour", "colour must be a hex colour such as #7ee546")
        fields["colour"] = colour.lower()
    if apply_to is not None:
        number = int(apply_to) if isinstance(apply_to, int) or DIGITS.fullmatch(apply_to) else None
        if number not in APPLY_TO_VALUES:
            raise _invalid_data(24324, "applyTo", "applyTo must be 1 (Opportunity) or 2 (Lead)")
        fields["applyTo"] = number
    return fields
