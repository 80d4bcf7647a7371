"""Reading one environment variable: each kind of value, its check, and the message naming it."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Literal, TypeVar

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


class EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def positive_float(self, name: str, default: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        value = self._finite(name, raw, "a positive number")
        if value <= 0:
            raise ConfigError(f"{name} must be a positive number, not {raw!r}")
        return value

    @staticmethod
    def _finite(name: str, raw: str, what: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be {what}, not {raw!r}")
        return value

    def _whole(self, name: str, default: int, what: str, fits: Callable[[int], bool]) -> int:
        """A whole number written in ASCII digits (``int`` also reads "٤" and chokes on "²")."""
        raw = self._raw(name)
        if raw is None:
            return default
        if not (raw.isascii() and raw.isdigit()) or not fits(int(raw)):
            raise ConfigError(f"{name} must be {what}, not {raw!r}")
        return int(raw)

    def positive_int(self, name: str, default: int) -> int:
        return self._whole(name, default, "a positive whole number", lambda value: value >= 1)

    def whole_number(self, name: str, default: int) -> int:
        return self._whole(name, default, "a whole number, 0 or more", lambda value: True)

    def number(self, name: str, default: float) -> float:
        raw = self._raw(name)
        return default if raw is None else self._finite(name, raw, "a finite number")

    def port(self, name: str, default: int) -> int:
        return self._whole(name, default, "a port number 0..65535 (0 turns it off)", lambda value: value <= 65535)

    def name(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if any(c.isspace() for c in raw):
            raise ConfigError(f"{name} must be a Redis key name without spaces, not {raw!r}")
        return raw

    def _choice(self, name: str, default: _Choice, choices: tuple[_Choice, ...]) -> _Choice:
        raw = self._raw(name)
        if raw is None:
            return default
        for choice in choices:
            if raw.lower() == choice:
                return choice
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")

    def log_format(self, name: str, default: LogFormat) -> LogFormat:
        return self._choice(name, default, LOG_FORMATS)

    def batch_mode(self, name: str, default: BatchMode) -> BatchMode:
        return self._choice(name, default, BATCH_MODES)

    def log_level(self, name: str, default: LogLevel | None) -> LogLevel | None:
        if self._raw(name) is None:
            return default
        return self._choice(name, "info", LOG_LEVEL_NAMES)

    def redis_url(self, name: str, default: str) -> str:
        raw = self._raw(name) or default
        password = parse_redis_url(raw, name).password
        if password is not None:
            check_secret_length(f"{name}'s password", password)
        return raw

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be 1/true/yes/on or 0/false/no/off, not {raw!r}")

    def token(self, name: str, default: Secret | None) -> Secret | None:
        """A bearer token: long enough not to be guessed, and sendable in a header as is."""
        raw = self._raw(name)
        if raw is None:
            return default
        if len(raw) < MIN_SECRET_LENGTH or not all(c.isascii() and c.isprintable() and not c.isspace() for c in raw):
            # The message never repeats the value: it is a secret, even when a bad one.
            raise ConfigError(
                f"{name} must be at least {MIN_SECRET_LENGTH} printable ASCII characters without spaces "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)"
            )
        return Secret(raw)

    def webhook_secret(self, name: str, default: Secret | None) -> Secret | None:
        raw = self._raw(name)
        return default if raw is None else check_webhook_secrets(name, raw)

    def host_list(self, name: str, default: frozenset[str]) -> frozenset[str]:
        raw = self._raw(name)
        return default if raw is None else frozenset(host.lower() for host in split_list(raw))

    def account_list(self, name: str, default: frozenset[str]) -> frozenset[str]:
        """Account names (not their credentials), separated by spaces or commas."""
        raw = self._raw(name)
        if raw is None:
            return default
        for account in split_list(raw):
            check_account_name(f"{name}, account {account!r}", account)
        return frozenset(split_list(raw))


#: The key of a settings field's metadata that holds its variable and how it is read.
VARIABLE = "variable"


def setting(variable: str, read: Callable[[EnvReader, str, _Value], _Value], default: _Value) -> _Value:
    """A ``Settings`` field read from ``variable`` by ``read`` (an ``EnvReader`` method, so that the
    field's type and its reader's agree), ``default`` when it is unset: each setting's variable is
    named once, beside its field."""
    # dataclasses sees the Field; type checkers see the default's type (the usual field() wrapper).
    return field(default=default, metadata={VARIABLE: (variable, read)})


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
