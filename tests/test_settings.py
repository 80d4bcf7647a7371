"""Settings.from_env, table by table: every variable, its default, good values and the error for bad ones."""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path

import orjson
import pytest

from tests.conftest import TEST_API_SECRET, TEST_REDIS_PASSWORD, TEST_WEBHOOK_SECRET
from worker.core.errors import ConfigError
from worker.core.settings import ENVIRONMENT, Account, Secret, Settings
from worker.core.settings.variables import MIN_SECRET_LENGTH

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Settings()

#: (variable, raw value, field, parsed value)
GOOD = [
    (
        "REDIS_URL",
        f"rediss://:{TEST_REDIS_PASSWORD}@cache:6380/2",
        "redis_url",
        f"rediss://:{TEST_REDIS_PASSWORD}@cache:6380/2",
    ),
    ("REDIS_URL", "  ", "redis_url", DEFAULTS.redis_url),
    ("LEADSTAGE_RATE_LIMIT", "2.5", "rate_limit", 2.5),
    ("LEADSTAGE_RATE_LEAD", "0.01", "rate_lead_s", 0.01),
    ("LEADSTAGE_MAX_ATTEMPTS", " 3 ", "max_attempts", 3),
    ("LEADSTAGE_MAX_AGE", "60", "max_age_s", 60.0),
    ("LEADSTAGE_BACKOFF_BASE", "0.1", "backoff_base_s", 0.1),
    ("LEADSTAGE_BACKOFF_MAX", "5", "backoff_max_s", 5.0),
    ("LEADSTAGE_RESULTS_STREAM", "r:s", "results_stream", "r:s"),
    ("LEADSTAGE_DLQ_STREAM", "d:s", "dlq_stream", "d:s"),
    ("LEADSTAGE_RESULTS_MAXLEN", "10", "results_maxlen", 10),
    ("LEADSTAGE_LEDGER_RETENTION", "7200", "ledger_retention_s", 7200),
    ("LEADSTAGE_QUEUE", "q", "queue_name", "q"),
    ("LEADSTAGE_CONCURRENCY", "4", "concurrency", 4),
    ("LEADSTAGE_REQUEST_TIMEOUT", "2", "request_timeout_s", 2.0),
    ("LEADSTAGE_IN_FLIGHT_MARGIN", "0.25", "in_flight_margin_s", 0.25),
    ("LEADSTAGE_BATCH_POLL_MIN", "0.5", "batch_poll_min_s", 0.5),
    ("LEADSTAGE_BATCH_POLL_MAX", "2", "batch_poll_max_s", 2.0),
    ("LEADSTAGE_JOB_TIMEOUT", "60", "job_timeout_s", 60.0),
    ("LEADSTAGE_POLL_DELAY", "0.5", "poll_delay_s", 0.5),
    ("LEADSTAGE_SHUTDOWN_GRACE", "3", "shutdown_grace_s", 3.0),
    ("LEADSTAGE_LEASE", "4", "lease_s", 4.0),
    ("LEADSTAGE_COALESCE_MAX", "1", "coalesce_max", 1),
    ("LEADSTAGE_BATCH", "Auto", "batch_mode", "auto"),
    ("LEADSTAGE_BATCH", "off", "batch_mode", "off"),
    ("LEADSTAGE_BATCH_THRESHOLD", "5", "batch_threshold", 5),
    ("LEADSTAGE_BATCH_MAX", "200", "batch_max", 200),
    ("LEADSTAGE_BATCH_WAIT", "30", "batch_wait_s", 30.0),
    ("LEADSTAGE_REDIS_MIN_REPLICAS", "0", "redis_min_replicas", 0),
    ("LEADSTAGE_REDIS_MIN_REPLICAS", "2", "redis_min_replicas", 2),
    ("LEADSTAGE_REDIS_REPLICA_TIMEOUT", "0.5", "redis_replica_timeout_s", 0.5),
    ("LEADSTAGE_REDIS_TIMEOUT", "0.5", "redis_timeout_s", 0.5),
    ("LEADSTAGE_REDIS_CONNECT_TIMEOUT", "2", "redis_connect_timeout_s", 2.0),
    ("LEADSTAGE_RETRY_AFTER_MAX", "30", "retry_after_max_s", 30.0),
    ("LEADSTAGE_TEST_CLOCK_OFFSET", "-2.5", "clock_offset_s", -2.5),
    ("WEBHOOK_SECRET", TEST_WEBHOOK_SECRET, "webhook_secret", Secret(TEST_WEBHOOK_SECRET)),
    ("LEADSTAGE_PLAIN_HTTP_HOSTS", "fake-ivvy, Other", "plain_http_hosts", frozenset({"fake-ivvy", "other"})),
    ("LEADSTAGE_ACCOUNT_NAMES", "acme, eu  default", "account_names", frozenset({"acme", "eu", "default"})),
    ("LEADSTAGE_WEBHOOK_MAX_BODY", "1024", "webhook_max_body_bytes", 1024),
    ("LEADSTAGE_METRICS_PORT", "0", "metrics_port", 0),
    ("LEADSTAGE_METRICS_PORT", "65535", "metrics_port", 65535),
    ("LEADSTAGE_LOG_FORMAT", "JSON", "log_format", "json"),
    ("LEADSTAGE_LOG_LEVEL", "Warning", "log_level", "warning"),
    ("LEADSTAGE_CONSOLE_TOKEN", " console-token-0123456789 ", "console_token", Secret("console-token-0123456789")),
    ("LEADSTAGE_CONSOLE_READ_TOKEN", "read-token-0123456789", "console_read_token", Secret("read-token-0123456789")),
    ("LEADSTAGE_CONSOLE_TLS_PROXY", "Yes", "console_tls_proxy", True),
    ("LEADSTAGE_CONSOLE_TLS_PROXY", "0", "console_tls_proxy", False),
]

#: (variable, raw value, what the error says)
BAD = [
    (
        "REDIS_URL",
        "http://cache:6379",
        r"REDIS_URL must be a redis://, rediss://, unix://, redis\+sentinel:// or redis\+cluster:// URL",
    ),
    ("REDIS_URL", "redis://:hunter2@cache:notaport/0", r"REDIS_URL \(redis://cache:notaport/0\): the port must be"),
    ("LEADSTAGE_RATE_LIMIT", "0", r"LEADSTAGE_RATE_LIMIT must be a positive number, not '0'"),
    ("LEADSTAGE_RATE_LIMIT", "nan", r"LEADSTAGE_RATE_LIMIT must be a positive number, not 'nan'"),
    ("LEADSTAGE_RATE_LIMIT", "inf", r"LEADSTAGE_RATE_LIMIT must be a positive number, not 'inf'"),
    ("LEADSTAGE_MAX_AGE", "-1", r"LEADSTAGE_MAX_AGE must be a positive number"),
    ("LEADSTAGE_MAX_ATTEMPTS", "1.5", r"LEADSTAGE_MAX_ATTEMPTS must be a positive whole number, not '1.5'"),
    ("LEADSTAGE_CONCURRENCY", "0", r"LEADSTAGE_CONCURRENCY must be a positive whole number, not '0'"),
    ("LEADSTAGE_COALESCE_MAX", "0", r"LEADSTAGE_COALESCE_MAX must be a positive whole number, not '0'"),
    ("LEADSTAGE_BATCH", "on", r"LEADSTAGE_BATCH must be one of auto, off, not 'on'"),
    ("LEADSTAGE_BATCH_THRESHOLD", "0", r"LEADSTAGE_BATCH_THRESHOLD must be a positive whole number, not '0'"),
    ("LEADSTAGE_BATCH_MAX", "201", r"LEADSTAGE_BATCH_MAX \(201\) must be at most 200 \(iVvy's limit\)"),
    ("LEADSTAGE_BATCH_MAX", "1", r"LEADSTAGE_BATCH_MAX must be at least 2"),
    # Digits that are not ASCII: int() reads the first as 4 and fails on the second with a ValueError.
    ("LEADSTAGE_CONCURRENCY", "\u0664", r"LEADSTAGE_CONCURRENCY must be a positive whole number, not '\u0664'"),
    ("LEADSTAGE_METRICS_PORT", "\u00b2", r"LEADSTAGE_METRICS_PORT must be a port number 0..65535"),
    ("LEADSTAGE_METRICS_PORT", "65536", r"LEADSTAGE_METRICS_PORT must be a port number 0..65535"),
    ("LEADSTAGE_METRICS_PORT", "-1", r"LEADSTAGE_METRICS_PORT must be a port number"),
    ("LEADSTAGE_QUEUE", "my queue", r"LEADSTAGE_QUEUE must be a Redis key name without spaces, not 'my queue'"),
    ("LEADSTAGE_LOG_FORMAT", "xml", r"LEADSTAGE_LOG_FORMAT must be one of json, console, auto, not 'xml'"),
    ("LEADSTAGE_LOG_LEVEL", "loud", r"LEADSTAGE_LOG_LEVEL must be one of debug, info, warning, warn, error, critical"),
    ("WEBHOOK_SECRET", "plain", r"WEBHOOK_SECRET must be a Standard Webhooks secret starting with whsec_"),
    ("WEBHOOK_SECRET", "whsec_!!!!", r"WEBHOOK_SECRET must be a Standard Webhooks secret"),
    ("LEADSTAGE_REDIS_TIMEOUT", "0", r"LEADSTAGE_REDIS_TIMEOUT must be a positive number"),
    ("LEADSTAGE_IN_FLIGHT_MARGIN", "0", r"LEADSTAGE_IN_FLIGHT_MARGIN must be a positive number"),
    ("LEADSTAGE_BATCH_POLL_MIN", "6", r"LEADSTAGE_BATCH_POLL_MIN must be at most LEADSTAGE_BATCH_POLL_MAX"),
    ("WEBHOOK_SECRET", "whsec_", r"WEBHOOK_SECRET must be a Standard Webhooks secret"),
    ("LEADSTAGE_REDIS_MIN_REPLICAS", "-1", r"LEADSTAGE_REDIS_MIN_REPLICAS"),
    ("LEADSTAGE_JOB_TIMEOUT", "5", r"LEADSTAGE_JOB_TIMEOUT must be longer than LEADSTAGE_REQUEST_TIMEOUT"),
    (
        "LEADSTAGE_LEDGER_RETENTION",
        "3600",
        r"LEADSTAGE_LEDGER_RETENTION \(3600s\) must be longer than LEADSTAGE_MAX_AGE",
    ),
    ("LEADSTAGE_LEASE", "0.02", r"LEADSTAGE_LEASE must be longer than three LEADSTAGE_POLL_DELAY"),
    ("LEADSTAGE_RATE_LEAD", "2", r"LEADSTAGE_RATE_LEAD must be shorter than a quarter of LEADSTAGE_LEASE"),
    ("LEADSTAGE_RATE_LEAD", "0", r"LEADSTAGE_RATE_LEAD must be a positive number"),
    (
        "LEADSTAGE_ACCOUNT_NAMES",
        "acme e\u00fc",
        r"LEADSTAGE_ACCOUNT_NAMES, account 'e\u00fc': the name must be letters",
    ),
    ("LEADSTAGE_CONSOLE_TOKEN", "hunter2", r"LEADSTAGE_CONSOLE_TOKEN must be at least 16 printable ASCII characters"),
    ("LEADSTAGE_CONSOLE_READ_TOKEN", "hunter2 hunter2 hunter2", r"LEADSTAGE_CONSOLE_READ_TOKEN must be at least 16"),
    ("LEADSTAGE_CONSOLE_TLS_PROXY", "maybe", r"LEADSTAGE_CONSOLE_TLS_PROXY must be 1/true/yes/on or 0/false/no/off"),
]


def test_a_replica_wait_as_long_as_the_redis_timeout_is_refused() -> None:
    """The WAIT for replicas runs under the Redis timeout: as long a bound would be cut short,
    and every write reported unconfirmed."""
    replicas = {"LEADSTAGE_REDIS_MIN_REPLICAS": "1", "LEADSTAGE_REDIS_TIMEOUT": "2"}
    for wait in ("2", "3"):
        with pytest.raises(
            ConfigError,
            match=r"LEADSTAGE_REDIS_REPLICA_TIMEOUT \(\d+s\) must be shorter than LEADSTAGE_REDIS_TIMEOUT \(2s\)",
        ):
            Settings.from_env({**replicas, "LEADSTAGE_REDIS_REPLICA_TIMEOUT": wait})
    assert Settings.from_env({**replicas, "LEADSTAGE_REDIS_REPLICA_TIMEOUT": "1.5"}).redis_replica_timeout_s == 1.5
    # Without replicas to wait for there is no WAIT: a short Redis timeout alone is fine.
    assert Settings.from_env({"LEADSTAGE_REDIS_TIMEOUT": "0.5"}).redis_timeout_s == 0.5


def test_the_account_names_must_be_the_accounts_with_credentials(tmp_path: Path) -> None:
    ivvy = {"IVVY_BASE_URL": "https://ivvy.example", "IVVY_API_KEY": "k", "IVVY_API_SECRET": TEST_API_SECRET}
    assert Settings.from_env({**ivvy, "LEADSTAGE_ACCOUNT_NAMES": "default"}).known_accounts == {"default"}
    for names in ("default acme", "acme"):
        with pytest.raises(ConfigError, match=r"LEADSTAGE_ACCOUNT_NAMES \(.*\) must name the accounts .*\(default\)"):
            Settings.from_env({**ivvy, "LEADSTAGE_ACCOUNT_NAMES": names})
    # Without credentials (a producer host) the names are the account list.
    assert Settings.from_env({"LEADSTAGE_ACCOUNT_NAMES": "acme eu"}).known_accounts == {"acme", "eu"}
    assert Settings.from_env({}).known_accounts == frozenset()


def test_the_defaults_without_any_variable() -> None:
    assert Settings.from_env({}) == DEFAULTS


def test_the_contract_lists_every_variable_with_its_default() -> None:
    """docs/contract.md's Configuration table: a row names one or more variables and as many
    defaults (— for none), written as the variable would hold them."""
    documented: dict[str, str] = {}
    for row in (ROOT / "docs" / "contract.md").read_text().splitlines():
        cells = row.split(" | ")
        if row.startswith("| `") and len(cells) >= 3:
            names, defaults = re.findall(r"`([A-Z_]+)`", cells[0]), cells[1].split(", ")
            if len(defaults) == 1:  # one default (— mostly) for all the row's variables
                defaults *= len(names)
            documented |= dict(zip(names, [text.strip("`").replace("—", "") for text in defaults], strict=True))
    assert {variable.name: documented.get(variable.name) for variable in ENVIRONMENT.values()} == {
        variable.name: variable.default for variable in ENVIRONMENT.values()
    }
    # And nothing documented that the settings do not read (these five: worker/core/settings/accounts.py).
    accounts = {
        "IVVY_BASE_URL",
        "IVVY_API_KEY",
        "IVVY_API_SECRET",
        "LEADSTAGE_ACCOUNTS_FILE",
        "LEADSTAGE_WEBHOOK_SECRETS_FILE",
    }
    assert documented.keys() - {variable.name for variable in ENVIRONMENT.values()} == accounts


def test_every_variable_is_in_a_table() -> None:
    assert {variable for variable, *_ in GOOD} == {variable.name for variable in ENVIRONMENT.values()}


@pytest.mark.parametrize(("variable", "raw", "name", "expected"), GOOD)
def test_a_good_value_is_read(variable: str, raw: str, name: str, expected: object) -> None:
    assert getattr(Settings.from_env({variable: raw}), name) == expected


@pytest.mark.parametrize(("variable", "raw", "message"), BAD)
def test_a_bad_value_is_a_config_error_naming_the_variable(variable: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refusal:
        Settings.from_env({variable: raw})
    assert "hunter2" not in str(refusal.value)


def test_a_batch_wait_that_does_not_fit_in_the_job_timeout_is_refused_in_batch_mode() -> None:
    env = {"LEADSTAGE_BATCH_WAIT": "101", "LEADSTAGE_JOB_TIMEOUT": "120"}
    off = {**env, "LEADSTAGE_BATCH": "off"}
    assert Settings.from_env(off).batch_wait_s == 101.0  # batch mode off: the wait is never used
    message = r"LEADSTAGE_BATCH_WAIT \(101s\) plus two LEADSTAGE_REQUEST_TIMEOUT \(10s\) must be shorter than"
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)  # batch mode is auto by default


ACCOUNT_ERRORS = [
    ({"IVVY_BASE_URL": "http://ivvy"}, r"IVVY_API_KEY is not set \(IVVY_BASE_URL is\)"),
    ({"IVVY_BASE_URL": "http://ivvy", "IVVY_API_KEY": "k"}, r"IVVY_API_SECRET is not set"),
    (
        {"IVVY_BASE_URL": "ftp://ivvy", "IVVY_API_KEY": "k", "IVVY_API_SECRET": TEST_API_SECRET},
        r"IVVY_BASE_URL must be an http",
    ),
]


@pytest.mark.parametrize(("env", "message"), ACCOUNT_ERRORS)
def test_the_default_account_needs_all_three_variables(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


ACCOUNTS_FILES = [
    (b"[]", r"must hold a JSON object"),
    (b"{", r"is not valid JSON"),
    (b'{"bad name": {}}', r"account 'bad name'.*letters, digits"),
    (b'{"a": {"base_url": "http://x", "api_key": "k"}}', r"account 'a'.*api_secret is missing"),
    (
        orjson.dumps({"a": {"base_url": "http://x", "api_key": "k", "api_secret": TEST_API_SECRET, "extra": 1}}),
        r"unknown fields: extra",
    ),
    (
        orjson.dumps(
            {"a": {"base_url": "http://x", "api_key": "k", "api_secret": TEST_API_SECRET, "rate_limit": True}}
        ),
        r"rate_limit must be",
    ),
]


@pytest.mark.parametrize(("content", "message"), ACCOUNTS_FILES)
def test_a_bad_accounts_file_names_the_file_and_the_account(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"LEADSTAGE_ACCOUNTS_FILE \(.*accounts.json\).*" + message):
        Settings.from_env({"LEADSTAGE_ACCOUNTS_FILE": str(path)})


def test_accounts_come_from_the_variables_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    path.write_bytes(
        orjson.dumps({"eu": {"base_url": "https://eu.ivvy/", "api_key": "ke", "api_secret": TEST_API_SECRET + "-eu"}})
    )
    env = {
        "IVVY_BASE_URL": "https://ivvy",
        "IVVY_API_KEY": "k",
        "IVVY_API_SECRET": TEST_API_SECRET,
        "LEADSTAGE_RATE_LIMIT": "3",
    }
    settings = Settings.from_env({**env, "LEADSTAGE_ACCOUNTS_FILE": str(path)})
    assert settings.accounts == {
        "default": Account("default", "https://ivvy", "k", Secret(TEST_API_SECRET), 3.0),
        "eu": Account("eu", "https://eu.ivvy", "ke", Secret(TEST_API_SECRET + "-eu"), 3.0),
    }


def test_to_env_gives_the_same_settings_back() -> None:
    account = Account("default", "http://127.0.0.1:8765", "key", Secret(TEST_API_SECRET), 7.0)
    changed: dict[str, object] = {
        "redis_url": "redis://127.0.0.1:6379/3",
        "rate_limit": 7.0,
        "max_attempts": 3,
        "max_age_s": 12.5,
        "backoff_base_s": 0.05,
        "results_stream": "s:results",
        "ledger_retention_s": 7200,
        "redis_min_replicas": 1,
        "retry_after_max_s": 30.0,
        "request_timeout_s": 1.5,
        "job_timeout_s": 9.0,
        "batch_wait_s": 5.0,
        "webhook_secret": Secret(TEST_WEBHOOK_SECRET),
        "metrics_port": 0,
        "log_format": "json",
        "log_level": "debug",
    }
    settings = dataclasses.replace(DEFAULTS, accounts={"default": account}, **changed)  # type: ignore[arg-type]  # Settings' fields
    assert Settings.from_env(settings.to_env()) == settings
    assert Settings.from_env(DEFAULTS.to_env()) == DEFAULTS


def test_to_env_refuses_accounts_it_cannot_write() -> None:
    other = Account("eu", "http://127.0.0.1:8765", "key", Secret(TEST_API_SECRET), 7.0)
    with pytest.raises(ConfigError, match="account 'eu' cannot be written as variables"):
        dataclasses.replace(DEFAULTS, accounts={"eu": other}).to_env()


#: One character short of the minimum, and distinctive, so that an error repeating it would show.
SHORT = "sh0rt-s3cr3t-x9"
#: whsec_ and 15 characters of base64 (a key of 11 bytes, unpadded).
SHORT_WEBHOOK = "whsec_" + base64.b64encode(b"short-key-1").decode().rstrip("=")
assert len(SHORT) == len(SHORT_WEBHOOK.removeprefix("whsec_")) == MIN_SECRET_LENGTH - 1
WITH_IVVY = {"IVVY_BASE_URL": "https://ivvy.example", "IVVY_API_KEY": "k"}

#: (environment without the files, accounts file, webhook secrets file, what the error names)
TOO_SHORT = [
    ({**WITH_IVVY, "IVVY_API_SECRET": SHORT}, None, None, r"^IVVY_API_SECRET is too short"),
    (
        {},
        {"a": {"base_url": "https://x", "api_key": "k", "api_secret": SHORT}},
        None,
        r"account 'a': api_secret is too",
    ),
    ({"WEBHOOK_SECRET": SHORT_WEBHOOK}, None, None, r"^WEBHOOK_SECRET \(after whsec_\) is too short"),
    (
        {"WEBHOOK_SECRET": f"{TEST_WEBHOOK_SECRET} {SHORT_WEBHOOK}"},
        None,
        None,
        r"^WEBHOOK_SECRET \(secret 2 of 2\) \(after whsec_\) is too short",
    ),
    (
        {},
        None,
        {"acme": SHORT_WEBHOOK},
        r"LEADSTAGE_WEBHOOK_SECRETS_FILE \(.*\), account 'acme' \(after whsec_\) is too",
    ),
    ({"LEADSTAGE_CONSOLE_TOKEN": SHORT}, None, None, r"^LEADSTAGE_CONSOLE_TOKEN must be at least 16"),
    ({"LEADSTAGE_CONSOLE_READ_TOKEN": SHORT}, None, None, r"^LEADSTAGE_CONSOLE_READ_TOKEN must be at least 16"),
    ({"REDIS_URL": f"redis://:{SHORT}@cache:6379/0"}, None, None, r"^REDIS_URL's password is too short"),
    ({"REDIS_URL": f"rediss://user:{SHORT}@cache"}, None, None, r"^REDIS_URL's password is too short"),
    ({"REDIS_URL": f"redis+sentinel://:{SHORT}@s1,s2/mymaster"}, None, None, r"^REDIS_URL's password is too short"),
    ({"REDIS_URL": f"redis+cluster://:{SHORT}@n1:7000,n2:7001"}, None, None, r"^REDIS_URL's password is too short"),
]


@pytest.mark.parametrize(("env", "accounts", "webhook_secrets", "message"), TOO_SHORT)
def test_a_too_short_secret_is_refused_naming_the_variable_not_the_value(
    env: dict[str, str], accounts: object, webhook_secrets: object, message: str, tmp_path: Path
) -> None:
    env = dict(env)
    if accounts is not None:
        (tmp_path / "accounts.json").write_bytes(orjson.dumps(accounts))
        env["LEADSTAGE_ACCOUNTS_FILE"] = str(tmp_path / "accounts.json")
    if webhook_secrets is not None:
        (tmp_path / "webhook.json").write_bytes(orjson.dumps(webhook_secrets))
        env["LEADSTAGE_WEBHOOK_SECRETS_FILE"] = str(tmp_path / "webhook.json")
    with pytest.raises(ConfigError, match=message) as refusal:
        Settings.from_env(env)
    assert f"at least {MIN_SECRET_LENGTH}" in str(refusal.value)
    for shown in (SHORT, SHORT_WEBHOOK, SHORT_WEBHOOK.removeprefix("whsec_")):
        assert shown not in str(refusal.value)


def test_a_secret_of_the_minimum_length_is_accepted_and_given_to_the_redactor() -> None:
    exact = SHORT + "z"
    exact_webhook = "whsec_" + base64.b64encode(b"twelve bytes").decode()
    assert len(exact) == len(exact_webhook.removeprefix("whsec_")) == MIN_SECRET_LENGTH
    settings = Settings.from_env(
        {
            **WITH_IVVY,
            "IVVY_API_SECRET": exact,
            "WEBHOOK_SECRET": exact_webhook,
            "LEADSTAGE_CONSOLE_TOKEN": exact + "-console",
            "REDIS_URL": f"redis://:{exact}-redis@cache:6379/0",
        }
    )
    assert sorted(settings.secret_values()) == sorted([exact, exact_webhook, exact + "-console", exact + "-redis"])
