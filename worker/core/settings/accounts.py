"""The iVvy accounts and the per-account webhook secrets: from IVVY_* or their JSON files, checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from worker.core.change import DEFAULT_ACCOUNT
from worker.core.errors import ConfigError
from worker.core.hosts import is_loopback
from worker.core.settings.variables import Secret, check_account_name, check_secret_length, check_webhook_secrets

#: The fake iVvy's credentials when IVVY_API_KEY / IVVY_API_SECRET are unset (demo and tests only).
DEMO_API_KEY = "demo-key"
DEMO_API_SECRET = "demo-secret-of-the-fake-ivvy"  # noqa: S105 - the fake's published demo credential, not a real secret


@dataclass(frozen=True)
class Account:
    """One iVvy account: where to send its changes and how to sign them."""

    name: str
    base_url: str
    api_key: str
    api_secret: Secret
    rate_limit: float  # requests per second, shared by every worker


def _check_base_url(origin: str, url: str, plain_http_hosts: frozenset[str]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{origin} must be an http:// or https:// URL, not {url!r}")
    host = (parts.hostname or "").lower()
    if parts.scheme == "http" and host not in plain_http_hosts and not is_loopback(host):
        # The API key and every request's signature would cross the network in clear text.
        raise ConfigError(
            f"{origin} must be an https:// URL, not http://{host}: plain http sends the API key and "
            "signatures in clear text (allowed for loopback hosts, and for hosts listed in "
            "LEADSTAGE_PLAIN_HTTP_HOSTS)"
        )
    return url.rstrip("/")


def load_accounts(env: Mapping[str, str], default_rate: float, plain_http_hosts: frozenset[str]) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    base_url = env.get("IVVY_BASE_URL", "").strip()
    if base_url:
        key = env.get("IVVY_API_KEY", "").strip()
        secret = env.get("IVVY_API_SECRET", "").strip()
        if not key:
            raise ConfigError("IVVY_API_KEY is not set (IVVY_BASE_URL is)")
        if not secret:
            raise ConfigError("IVVY_API_SECRET is not set (IVVY_BASE_URL is)")
        check_secret_length("IVVY_API_SECRET", secret)
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


def load_webhook_secrets(env: Mapping[str, str], accounts: frozenset[str]) -> dict[str, Secret]:
    """LEADSTAGE_WEBHOOK_SECRETS_FILE: a JSON object, account name -> a secret or a list of secrets,
    each of ``accounts`` (the account list; empty: none)."""
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
        check_account_name(where, name)
        if accounts and name not in accounts:
            raise ConfigError(
                f"{where} is not a configured account (IVVY_BASE_URL, LEADSTAGE_ACCOUNTS_FILE, LEADSTAGE_ACCOUNT_NAMES)"
            )
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
        check_account_name(where, name)
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object with base_url, api_key, api_secret")
        unknown = set(entry) - {"base_url", "api_key", "api_secret", "rate_limit"}
        if unknown:
            raise ConfigError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
        for required in ("base_url", "api_key", "api_secret"):
            if not isinstance(entry.get(required), str) or not entry[required].strip():
                raise ConfigError(f"{where}: {required} is missing or not a string")
        check_secret_length(f"{where}: api_secret", entry["api_secret"].strip())
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
