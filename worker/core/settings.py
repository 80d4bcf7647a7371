"""Settings, built once from the environment (docs/contract.md: Configuration).

``Settings.from_env()`` reads every variable, checks it, and raises ``ConfigError`` naming the
first bad one; the command line turns that into one clear line on stderr. Secrets are kept in
``Secret`` so that no repr, log line or error message can show them.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

import orjson

from worker.core.change import DEFAULT_ACCOUNT, parse_envelope
from worker.core.errors import ConfigError, InvalidChange
from worker.core.redis_connection import CONNECT_TIMEOUT_S, TIMEOUT_S, parse_redis_url

#: The fake iVvy's credentials when IVVY_API_KEY / IVVY_API_SECRET are unset (demo and tests only).
DEMO_API_KEY = "demo-key"
DEMO_API_SECRET = "demo-secret"  # noqa: S105 - the fake's published demo credential, not a real secret


_Choice = TypeVar("_Choice", bound=str)


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


@dataclass(frozen=True)
class Account:
    """One iVvy account: where to send its changes and how to sign them."""

    name: str
    base_url: str
    api_key: str
    api_secret: Secret
    rate_limit: float  # requests per second, shared by every worker


LogFormat = Literal["json", "console", "auto"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console", "auto")
LogLevel = Literal["debug", "info", "warning", "warn", "error", "critical"]
LOG_LEVEL_NAMES: tuple[LogLevel, ...] = ("debug", "info", "warning", "warn", "error", "critical")
#: The shortest console token accepted (LEADSTAGE_CONSOLE_TOKEN, LEADSTAGE_CONSOLE_READ_TOKEN).
MIN_TOKEN_LENGTH = 16

#: Settings field -> (environment variable, how ``_EnvReader`` reads it): read by ``from_env``,
#: written back by ``to_env``. The accounts are read from their own variables (``_load_accounts``).
ENVIRONMENT: Final[Mapping[str, tuple[str, str]]] = {
    "redis_url": ("REDIS_URL", "redis_url"),
    "rate_limit": ("LEADSTAGE_RATE_LIMIT", "positive_float"),
    "max_attempts": ("LEADSTAGE_MAX_ATTEMPTS", "positive_int"),
    "max_age_s": ("LEADSTAGE_MAX_AGE", "positive_float"),
    "backoff_base_s": ("LEADSTAGE_BACKOFF_BASE", "positive_float"),
    "backoff_max_s": ("LEADSTAGE_BACKOFF_MAX", "positive_float"),
    "results_stream": ("LEADSTAGE_RESULTS_STREAM", "name"),
    "dlq_stream": ("LEADSTAGE_DLQ_STREAM", "name"),
    "results_maxlen": ("LEADSTAGE_RESULTS_MAXLEN", "positive_int"),
    "ledger_retention_s": ("LEADSTAGE_LEDGER_RETENTION", "positive_int"),
    "queue_name": ("LEADSTAGE_QUEUE", "name"),
    "concurrency": ("LEADSTAGE_CONCURRENCY", "positive_int"),
    "request_timeout_s": ("LEADSTAGE_REQUEST_TIMEOUT", "positive_float"),
    "job_timeout_s": ("LEADSTAGE_JOB_TIMEOUT", "positive_float"),
    "poll_delay_s": ("LEADSTAGE_POLL_DELAY", "positive_float"),
    "shutdown_grace_s": ("LEADSTAGE_SHUTDOWN_GRACE", "positive_float"),
    "lease_s": ("LEADSTAGE_LEASE", "positive_float"),
    "coalesce_max": ("LEADSTAGE_COALESCE_MAX", "positive_int"),
    "redis_min_replicas": ("LEADSTAGE_REDIS_MIN_REPLICAS", "whole_number"),
    "redis_replica_timeout_s": ("LEADSTAGE_REDIS_REPLICA_TIMEOUT", "positive_float"),
    "retry_after_max_s": ("LEADSTAGE_RETRY_AFTER_MAX", "positive_float"),
    "clock_offset_s": ("LEADSTAGE_TEST_CLOCK_OFFSET", "number"),
    "webhook_secret": ("WEBHOOK_SECRET", "webhook_secret"),
    "plain_http_hosts": ("LEADSTAGE_PLAIN_HTTP_HOSTS", "host_list"),
    "webhook_max_body_bytes": ("LEADSTAGE_WEBHOOK_MAX_BODY", "positive_int"),
    "metrics_port": ("LEADSTAGE_METRICS_PORT", "port"),
    "log_format": ("LEADSTAGE_LOG_FORMAT", "log_format"),
    "log_level": ("LEADSTAGE_LOG_LEVEL", "log_level"),
    "redis_timeout_s": ("LEADSTAGE_REDIS_TIMEOUT", "positive_float"),
    "redis_connect_timeout_s": ("LEADSTAGE_REDIS_CONNECT_TIMEOUT", "positive_float"),
    "console_token": ("LEADSTAGE_CONSOLE_TOKEN", "token"),
    "console_read_token": ("LEADSTAGE_CONSOLE_READ_TOKEN", "token"),
    "console_tls_proxy": ("LEADSTAGE_CONSOLE_TLS_PROXY", "flag"),
}


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://localhost:6379/0"
    accounts: Mapping[str, Account] = field(default_factory=dict)
    rate_limit: float = 10.0
    max_attempts: int = 8
    max_age_s: float = 3600.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    results_stream: str = "leadstage:results"
    dlq_stream: str = "leadstage:dlq"
    results_maxlen: int = 100_000
    ledger_retention_s: int = 86_400
    queue_name: str = "leadstage:queue"
    concurrency: int = 50
    request_timeout_s: float = 10.0
    job_timeout_s: float = 120.0
    poll_delay_s: float = 0.01
    shutdown_grace_s: float = 25.0
    lease_s: float = 8.0
    #: The most changes of one stage one request carries (coalescing, docs/contract.md; 1: never).
    coalesce_max: int = 50
    #: Replicas that must confirm the writes that matter (enqueue, the recovery point before a POST,
    #: the terminal state) before they count as done; 0 waits for none (docs/contract.md: Durability).
    redis_min_replicas: int = 0
    redis_replica_timeout_s: float = 1.0
    #: The longest Retry-After (and account pause) honoured; a longer one dead-letters the change.
    retry_after_max_s: float = 600.0
    #: Added to this host's clock (tests of clock skew only): nothing but event times and iVvy's
    #: request signature read it, every decision uses the Redis server's clock.
    clock_offset_s: float = 0.0
    #: WEBHOOK_SECRET: one or more whsec_ secrets (several while rotating), for any account: the
    #: signed body names the account.
    webhook_secret: Secret | None = None
    #: LEADSTAGE_WEBHOOK_SECRETS_FILE: account -> its own secrets (one or more, space-separated); a
    #: request signed with one of them is for that account only.
    webhook_account_secrets: Mapping[str, Secret] = field(default_factory=dict)
    #: LEADSTAGE_PLAIN_HTTP_HOSTS: hosts besides loopback whose iVvy base URL may be http://.
    plain_http_hosts: frozenset[str] = frozenset()
    webhook_max_body_bytes: int = 1_048_576
    metrics_port: int = 9464
    log_format: LogFormat = "auto"
    #: None when LEADSTAGE_LOG_LEVEL is unset: info (the demo, which is read by a person: warning).
    log_level: LogLevel | None = None
    #: Every Redis command of a producer or reader waits this long for its answer at most.
    redis_timeout_s: float = TIMEOUT_S
    #: Connecting to Redis gives up after this long (an unroutable host would hang otherwise).
    redis_connect_timeout_s: float = CONNECT_TIMEOUT_S
    #: ``leadstage console``: the token that may read and change (replay, discard); the console is
    #: off without it. The read-only token, when set, may only read.
    console_token: Secret | None = None
    console_read_token: Secret | None = None
    #: Declared when a TLS-terminating proxy stands in front of the console: its login cookie is
    #: then marked Secure, and binding beyond loopback is not warned about.
    console_tls_proxy: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _EnvReader(env)
        values: dict[str, Any] = {
            name: getattr(reader, kind)(variable, getattr(cls, name)) for name, (variable, kind) in ENVIRONMENT.items()
        }
        accounts = _load_accounts(env, values["rate_limit"], values["plain_http_hosts"])
        settings = cls(accounts=accounts, webhook_account_secrets=_load_webhook_secrets(env, accounts), **values)
        settings.check_consistency()
        return settings

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` give these settings again (for child processes).

        Holds the secrets (the child needs them): pass it to a process, never print it. Only the
        default account can be written as variables; other accounts need LEADSTAGE_ACCOUNTS_FILE.
        """
        env: dict[str, str] = {}
        for name, (variable, _) in ENVIRONMENT.items():
            value = getattr(self, name)
            if isinstance(value, frozenset):
                env[variable] = " ".join(sorted(value))
            elif value is not None:
                env[variable] = value.get() if isinstance(value, Secret) else str(value)
        if self.webhook_account_secrets:
            raise ConfigError(
                "per-account webhook secrets cannot be written as variables: use LEADSTAGE_WEBHOOK_SECRETS_FILE"
            )
        for account in self.accounts.values():
            if account.name != DEFAULT_ACCOUNT:
                raise ConfigError(
                    f"account {account.name!r} cannot be written as variables: use LEADSTAGE_ACCOUNTS_FILE"
                )
            env |= {
                "IVVY_BASE_URL": account.base_url,
                "IVVY_API_KEY": account.api_key,
                "IVVY_API_SECRET": account.api_secret.get(),
            }
        return env

    def check_consistency(self) -> None:
        """Refuse settings that contradict each other (each message names both)."""
        if self.job_timeout_s <= self.request_timeout_s:
            raise ConfigError("LEADSTAGE_JOB_TIMEOUT must be longer than LEADSTAGE_REQUEST_TIMEOUT")
        if self.ledger_retention_s <= self.max_age_s + self.retry_after_max_s:
            # A change may wait up to its maximum age plus one honoured pause before it ends: its
            # ledger entry (refreshed whenever it is touched) must outlive that.
            raise ConfigError(
                f"LEADSTAGE_LEDGER_RETENTION ({self.ledger_retention_s}s) must be longer than LEADSTAGE_MAX_AGE "
                f"({self.max_age_s:g}s) plus LEADSTAGE_RETRY_AFTER_MAX ({self.retry_after_max_s:g}s)"
            )
        if self.lease_s <= self.poll_delay_s * 3:
            raise ConfigError("LEADSTAGE_LEASE must be longer than three LEADSTAGE_POLL_DELAY")
        if self.console_read_token is not None and self.console_read_token == self.console_token:
            raise ConfigError("LEADSTAGE_CONSOLE_READ_TOKEN must differ from LEADSTAGE_CONSOLE_TOKEN")

    def account(self, name: str) -> Account | None:
        return self.accounts.get(name)

    def rate_limit_for(self, account: str) -> float:
        """Requests per second the account may send: its own limit, or LEADSTAGE_RATE_LIMIT."""
        configured = self.accounts.get(account)
        return configured.rate_limit if configured is not None else self.rate_limit

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redactor."""
        values = [a.api_secret.get() for a in self.accounts.values()]
        values += [secret for _, secret in self.webhook_secrets()]
        values.extend(token.get() for token in (self.console_token, self.console_read_token) if token is not None)
        return [v for v in values if v]

    def webhook_secrets(self) -> list[tuple[str | None, str]]:
        """Every webhook secret with the account it is bound to: None for WEBHOOK_SECRET's (any
        account, named in the signed body). The one place that says which secret serves whom."""
        pairs: list[tuple[str | None, str]] = []
        if self.webhook_secret is not None:
            pairs += [(None, secret) for secret in split_list(self.webhook_secret.get())]
        for account, secrets in self.webhook_account_secrets.items():
            pairs += [(account, secret) for secret in split_list(secrets.get())]
        return pairs

    def require_accounts(self) -> None:
        """The worker needs credentials; producers do not."""
        if not self.accounts:
            raise ConfigError(
                "IVVY_BASE_URL is not set: the worker needs IVVY_BASE_URL, IVVY_API_KEY and "
                "IVVY_API_SECRET, or LEADSTAGE_ACCOUNTS_FILE"
            )


class _EnvReader:
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

    def positive_int(self, name: str, default: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{name} must be a positive whole number, not {raw!r}")
        return int(raw)

    def whole_number(self, name: str, default: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        if not (raw.isascii() and raw.isdigit()):
            raise ConfigError(f"{name} must be a whole number, 0 or more, not {raw!r}")
        return int(raw)

    def number(self, name: str, default: float) -> float:
        raw = self._raw(name)
        return default if raw is None else self._finite(name, raw, "a finite number")

    def port(self, name: str, default: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) > 65535:
            raise ConfigError(f"{name} must be a port number 0..65535 (0 turns it off), not {raw!r}")
        return int(raw)

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

    def log_level(self, name: str, default: LogLevel | None) -> LogLevel | None:
        if self._raw(name) is None:
            return default
        return self._choice(name, "info", LOG_LEVEL_NAMES)

    def redis_url(self, name: str, default: str) -> str:
        raw = self._raw(name) or default
        parse_redis_url(raw, name)
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

    def token(self, name: str, default: None) -> Secret | None:
        """A bearer token: long enough not to be guessed, and sendable in a header as is."""
        raw = self._raw(name)
        if raw is None:
            return default
        if len(raw) < MIN_TOKEN_LENGTH or not all(c.isascii() and c.isprintable() and not c.isspace() for c in raw):
            # The message never repeats the value: it is a secret, even when a bad one.
            raise ConfigError(
                f"{name} must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without spaces "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)"
            )
        return Secret(raw)

    def webhook_secret(self, name: str, default: None) -> Secret | None:
        raw = self._raw(name)
        return None if raw is None else check_webhook_secrets(name, raw)

    def host_list(self, name: str, default: frozenset[str]) -> frozenset[str]:
        raw = self._raw(name)
        return default if raw is None else frozenset(host.lower() for host in split_list(raw))


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
    return Secret(" ".join(secrets))


def _check_base_url(origin: str, url: str, plain_http_hosts: frozenset[str]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{origin} must be an http:// or https:// URL, not {url!r}")
    host = (parts.hostname or "").lower()
    if parts.scheme == "http" and host not in plain_http_hosts and not _loopback(host):
        # The API key and every request's signature would cross the network in clear text.
        raise ConfigError(
            f"{origin} must be an https:// URL, not http://{host}: plain http sends the API key and "
            "signatures in clear text (allowed for loopback hosts, and for hosts listed in "
            "LEADSTAGE_PLAIN_HTTP_HOSTS)"
        )
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    # Imported here: only an http:// URL needs it, and the process toolkit is heavy for a CLI start.
    from worker.core.processes import is_loopback

    return is_loopback(host)


def _load_accounts(env: Mapping[str, str], default_rate: float, plain_http_hosts: frozenset[str]) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    base_url = env.get("IVVY_BASE_URL", "").strip()
    if base_url:
        key = env.get("IVVY_API_KEY", "").strip()
        secret = env.get("IVVY_API_SECRET", "").strip()
        if not key:
            raise ConfigError("IVVY_API_KEY is not set (IVVY_BASE_URL is)")
        if not secret:
            raise ConfigError("IVVY_API_SECRET is not set (IVVY_BASE_URL is)")
        accounts[DEFAULT_ACCOUNT] = Account(
            DEFAULT_ACCOUNT,
            _check_base_url("IVVY_BASE_URL", base_url, plain_http_hosts),
            key,
            Secret(secret),
            default_rate,
        )
    path = env.get("LEADSTAGE_ACCOUNTS_FILE", "").strip()
    if path:
        accounts.update(_read_accounts_file(Path(path), default_rate, plain_http_hosts))
    return accounts


def _read_json_file(origin: str, path: Path) -> object:
    try:
        return orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{origin} cannot be read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{origin} is not valid JSON: {exc}") from None


def _check_account_name(where: str, name: str) -> None:
    try:
        parse_envelope(account=name)
    except InvalidChange:
        raise ConfigError(f"{where}: the name must be letters, digits, '_', '.', '-'") from None


def _load_webhook_secrets(env: Mapping[str, str], accounts: Mapping[str, Account]) -> dict[str, Secret]:
    """LEADSTAGE_WEBHOOK_SECRETS_FILE: a JSON object, account name -> a secret or a list of secrets."""
    path = env.get("LEADSTAGE_WEBHOOK_SECRETS_FILE", "").strip()
    if not path:
        return {}
    origin = f"LEADSTAGE_WEBHOOK_SECRETS_FILE ({path})"
    data = _read_json_file(origin, Path(path))
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{origin} must hold a JSON object of account name -> whsec_ secret or list of them")
    secrets: dict[str, Secret] = {}
    for name, entry in data.items():
        where = f"{origin}, account {name!r}"
        _check_account_name(where, name)
        if accounts and name not in accounts:
            raise ConfigError(f"{where} is not a configured account (IVVY_BASE_URL, LEADSTAGE_ACCOUNTS_FILE)")
        values = entry if isinstance(entry, list) else [entry]
        if not values or not all(isinstance(value, str) for value in values):
            raise ConfigError(f"{where} must be a whsec_ secret or a non-empty list of them")
        secrets[name] = check_webhook_secrets(where, " ".join(values))
    return secrets


def _read_accounts_file(path: Path, default_rate: float, plain_http_hosts: frozenset[str]) -> dict[str, Account]:
    """A JSON object: account name -> {base_url, api_key, api_secret, rate_limit?}."""
    origin = f"LEADSTAGE_ACCOUNTS_FILE ({path})"
    data = _read_json_file(origin, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a JSON object of account name -> settings")
    accounts: dict[str, Account] = {}
    for name, entry in data.items():
        where = f"{origin}, account {name!r}"
        _check_account_name(where, name)
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object with base_url, api_key, api_secret")
        unknown = set(entry) - {"base_url", "api_key", "api_secret", "rate_limit"}
        if unknown:
            raise ConfigError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
        for required in ("base_url", "api_key", "api_secret"):
            if not isinstance(entry.get(required), str) or not entry[required].strip():
                raise ConfigError(f"{where}: {required} is missing or not a string")
        rate = entry.get("rate_limit", default_rate)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0:
            raise ConfigError(f"{where}: rate_limit must be a positive number")
        accounts[name] = Account(
            name,
            _check_base_url(f"{where} base_url", entry["base_url"].strip(), plain_http_hosts),
            entry["api_key"].strip(),
            Secret(entry["api_secret"].strip()),
            float(rate),
        )
    return accounts
