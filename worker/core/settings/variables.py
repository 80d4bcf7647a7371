"""Reading one environment variable: each kind of value, its check, and the message naming it."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, Literal, NamedTuple, TypeVar

from worker.core.change import parse_envelope
from worker.core.errors import ConfigError, InvalidChange
from worker.core.redis_url import parse_redis_url

_Choice = TypeVar("_Choice", bound=str)
_Value = TypeVar("_Value")


class Secret:
    """A string that never shows itself in repr or str."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


LogFormat = Literal["json", "console", "auto"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console", "auto")
BatchMode = Literal["auto", "off"]
BATCH_MODES: tuple[BatchMode, ...] = ("auto", "off")
LogLevel = Literal["debug", "info", "warning", "warn", "error", "critical"]
LOG_LEVEL_NAMES: tuple[LogLevel, ...] = ("debug", "info", "warning", "warn", "error", "critical")
#: The shortest secret accepted, of every kind (docs/contract.md: Configuration): an iVvy API
#: secret, a console token, a webhook secret's key (after whsec_), the password in REDIS_URL. Every
#: secret goes to the log redactor, which masks each occurrence of it in every line: a shorter one
#: would mask ordinary words (and so show itself), and is weak anyway.
MIN_SECRET_LENGTH = 16


class Parse:
    """How each kind of setting is read from its text: ``kind(variable, text) -> value``, raising a
    ``ConfigError`` that names the variable. ``text`` is the variable's value, stripped, or the
    setting's default text when it is unset or blank; "" (the default of an optional setting) is
    the value's absence."""

    @staticmethod
    def positive_float(name: str, text: str) -> float:
        value = _finite(name, text, "a positive number")
        if value <= 0:
            raise ConfigError(f"{name} must be a positive number, not {text!r}")
        return value

    @staticmethod
    def number(name: str, text: str) -> float:
        return _finite(name, text, "a finite number")

    @staticmethod
    def positive_int(name: str, text: str) -> int:
        return _whole(name, text, "a positive whole number", lambda value: value >= 1)

    @staticmethod
    def whole_number(name: str, text: str) -> int:
        return _whole(name, text, "a whole number, 0 or more", lambda value: True)

    @staticmethod
    def port(name: str, text: str) -> int:
        return _whole(name, text, "a port number 0..65535 (0 turns it off)", lambda value: value <= 65535)

    @staticmethod
    def key_name(name: str, text: str) -> str:
        if not text or any(c.isspace() for c in text):
            raise ConfigError(f"{name} must be a Redis key name without spaces, not {text!r}")
        return text

    @staticmethod
    def log_format(name: str, text: str) -> LogFormat:
        return _choice(name, text, LOG_FORMATS)

    @staticmethod
    def batch_mode(name: str, text: str) -> BatchMode:
        return _choice(name, text, BATCH_MODES)

    @staticmethod
    def log_level(name: str, text: str) -> LogLevel | None:
        return _choice(name, text, LOG_LEVEL_NAMES) if text else None

    @staticmethod
    def redis_url(name: str, text: str) -> str:
        password = parse_redis_url(text, name).password
        if password is not None:
            check_secret_length(f"{name}'s password", password)
        return text

    @staticmethod
    def flag(name: str, text: str) -> bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be 1/true/yes/on or 0/false/no/off, not {text!r}")

    @staticmethod
    def token(name: str, text: str) -> Secret | None:
        """A bearer token: long enough not to be guessed, and sendable in a header as is."""
        if not text:
            return None
        if len(text) < MIN_SECRET_LENGTH or not all(c.isascii() and c.isprintable() and not c.isspace() for c in text):
            # The message never repeats the value: it is a secret, even when a bad one.
            raise ConfigError(
                f"{name} must be at least {MIN_SECRET_LENGTH} printable ASCII characters without spaces "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)"
            )
        return Secret(text)

    @staticmethod
    def webhook_secret(name: str, text: str) -> Secret | None:
        return check_webhook_secrets(name, text) if text else None

    @staticmethod
    def host_list(name: str, text: str) -> frozenset[str]:
        return frozenset(host.lower() for host in split_list(text))

    @staticmethod
    def account_list(name: str, text: str) -> frozenset[str]:
        """Account names (not their credentials), separated by spaces or commas."""
        for account in split_list(text):
            check_account_name(f"{name}, account {account!r}", account)
        return frozenset(split_list(text))


def _finite(name: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be {what}, not {text!r}")
    return value


def _whole(name: str, text: str, what: str, fits: Callable[[int], bool]) -> int:
    """A whole number written in ASCII digits (``int`` also reads "٤" and chokes on "²")."""
    if not (text.isascii() and text.isdigit()) or not fits(int(text)):
        raise ConfigError(f"{name} must be {what}, not {text!r}")
    return int(text)


def _choice(name: str, text: str, choices: tuple[_Choice, ...]) -> _Choice:
    for choice in choices:
        if text.lower() == choice:
            return choice
    raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {text!r}")


class Variable(NamedTuple):
    """A setting's environment variable, how its text is read, and its text when it is unset."""

    name: str
    parse: Callable[[str, str], Any]
    default: str

    def read(self, env: Mapping[str, str]) -> Any:
        return self.parse(self.name, env.get(self.name, "").strip() or self.default)


#: The key of a settings field's metadata that holds its ``Variable``.
VARIABLE = "variable"


def setting(variable: str, parse: Callable[[str, str], _Value], default: str) -> _Value:
    """A ``Settings`` field read from ``variable`` by ``parse`` (a ``Parse`` kind, so that the
    field's type and its reader's agree), from the text ``default`` when it is unset: each
    setting's variable is named once, beside its field, and its default is written as the variable
    would be (the contract's table shows the same text) and goes through the same check."""
    # dataclasses sees the Field; type checkers see the parsed default's type (the usual field() wrapper).
    return field(default=parse(variable, default), metadata={VARIABLE: Variable(variable, parse, default)})


def check_account_name(where: str, name: str) -> None:
    """``ConfigError`` at ``where`` unless ``name`` is an account name a change may carry."""
    try:
        parse_envelope(account=name)
    except InvalidChange:
        raise ConfigError(f"{where}: the name must be letters, digits, '_', '.', '-'") from None


def check_secret_length(where: str, secret: str) -> None:
    """``ConfigError`` at ``where`` if ``secret`` is shorter than ``MIN_SECRET_LENGTH``; the message
    names ``where`` and the minimum, never the value (nor its length, which would narrow a guess)."""
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{where} is too short: a secret must be at least {MIN_SECRET_LENGTH} characters "
            "(the log redactor masks every occurrence of it, so a short one would mask ordinary text)"
        )


def split_list(raw: str) -> list[str]:
    """The items of a list setting, separated by spaces or commas (neither is in base64 or a host name)."""
    return [item for item in re.split(r"[\s,]+", raw) if item]


def check_webhook_secrets(origin: str, raw: str) -> Secret:
    """One or more Standard Webhooks secrets (whsec_ + base64 of a non-empty key), as one Secret.

    The message names ``origin``, never the value: a broken secret is still a secret.
    """
    secrets = split_list(raw)
    if not secrets:
        raise ConfigError(f"{origin} must hold at least one Standard Webhooks secret (whsec_...)")
    for number, secret in enumerate(secrets, 1):
        which = f"{origin} (secret {number} of {len(secrets)})" if len(secrets) > 1 else origin
        if not secret.startswith("whsec_"):
            raise ConfigError(f"{which} must be a Standard Webhooks secret starting with whsec_")
        key = secret.removeprefix("whsec_")
        try:
            # Strict, unlike the reference library, which drops characters outside base64 silently.
            decoded = base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if not decoded:
            raise ConfigError(f"{which} must be a Standard Webhooks secret: whsec_ and the base64 of a non-empty key")
        # The redactor masks the base64 after whsec_ on its own too: that is what must be long enough.
        check_secret_length(f"{which} (after whsec_)", key)
    return Secret(" ".join(secrets))
