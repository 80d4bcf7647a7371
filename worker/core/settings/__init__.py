"""Settings, built once from the environment (docs/contract.md: Configuration).

``Settings.from_env()`` reads every variable, checks it, and raises ``ConfigError`` naming the
first bad one; the command line turns that into one clear line on stderr. Secrets are kept in
``Secret`` so that no repr, log line or error message can show them.

By job: ``variables`` reads each kind of value from its text (``Parse``, ``Variable``, ``Secret``),
``accounts`` the iVvy accounts and per-account webhook secrets; ``Settings`` and its table of
variables are here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from worker.core.change import DEFAULT_ACCOUNT
from worker.core.errors import ConfigError
from worker.core.redis_url import CONNECT_TIMEOUT_S, TIMEOUT_S, parse_redis_url
from worker.core.settings.accounts import DEMO_API_KEY, DEMO_API_SECRET, Account, load_accounts, load_webhook_secrets
from worker.core.settings.variables import (
    LOG_LEVEL_NAMES,
    VARIABLE,
    BatchMode,
    LogFormat,
    LogLevel,
    Parse,
    Secret,
    Variable,
    setting,
    split_list,
)

__all__ = [
    "DEMO_API_KEY",
    "DEMO_API_SECRET",
    "ENVIRONMENT",
    "LOG_LEVEL_NAMES",
    "Account",
    "BatchMode",
    "LogFormat",
    "LogLevel",
    "Secret",
    "Settings",
    "split_list",
]

#: The most jobs one iVvy batch takes (more: iVvy answers 24448).
BATCH_MAX_JOBS: Final = 200


@dataclass(frozen=True)
class Settings:
    """Every setting of every program; ``from_env`` reads them (``ENVIRONMENT`` names the variables)."""

    redis_url: str = setting("REDIS_URL", Parse.redis_url, "redis://localhost:6379/0")
    accounts: Mapping[str, Account] = field(default_factory=dict)
    #: Requests per second per account, shared by every worker (the GCRA in start.lua).
    rate_limit: float = setting("LEADSTAGE_RATE_LIMIT", Parse.positive_float, "10")
    #: A claim takes a rate-limit slot that opens within this lead and its run waits for it before
    #: sending, so that waking up for the slot (the schedule's pick and the claim: 3 ms at the median,
    #: 7 ms at p90, 17 ms at p99 on the busy 2-core test host) does not make every later slot that
    #: late; 20 ms covers all but about 1 % of wake-ups (5 ms: a fifth to a quarter came later).
    rate_lead_s: float = setting("LEADSTAGE_RATE_LEAD", Parse.positive_float, "0.02")
    #: Retries: a change is dead-lettered after this many attempts or this long after its enqueue.
    max_attempts: int = setting("LEADSTAGE_MAX_ATTEMPTS", Parse.positive_int, "8")
    max_age_s: float = setting("LEADSTAGE_MAX_AGE", Parse.positive_float, "3600")
    backoff_base_s: float = setting("LEADSTAGE_BACKOFF_BASE", Parse.positive_float, "0.5")
    backoff_max_s: float = setting("LEADSTAGE_BACKOFF_MAX", Parse.positive_float, "60")
    #: Where outcomes go, how many results are kept, how long a finished key is remembered.
    results_stream: str = setting("LEADSTAGE_RESULTS_STREAM", Parse.key_name, "leadstage:results")
    dlq_stream: str = setting("LEADSTAGE_DLQ_STREAM", Parse.key_name, "leadstage:dlq")
    results_maxlen: int = setting("LEADSTAGE_RESULTS_MAXLEN", Parse.positive_int, "100000")
    ledger_retention_s: int = setting("LEADSTAGE_LEDGER_RETENTION", Parse.positive_int, "86400")
    #: The worker process: its arq queue, how many jobs at once, their timeouts, its stop.
    queue_name: str = setting("LEADSTAGE_QUEUE", Parse.key_name, "leadstage:queue")
    concurrency: int = setting("LEADSTAGE_CONCURRENCY", Parse.positive_int, "50")
    request_timeout_s: float = setting("LEADSTAGE_REQUEST_TIMEOUT", Parse.positive_float, "10")
    #: The in-flight guard (a POST of a worker that may still wait for iVvy's answer) is the request
    #: timeout plus this margin for the round trip that wrote the recovery point before the POST.
    in_flight_margin_s: float = setting("LEADSTAGE_IN_FLIGHT_MARGIN", Parse.positive_float, "1")
    job_timeout_s: float = setting("LEADSTAGE_JOB_TIMEOUT", Parse.positive_float, "120")
    poll_delay_s: float = setting("LEADSTAGE_POLL_DELAY", Parse.positive_float, "0.01")
    shutdown_grace_s: float = setting("LEADSTAGE_SHUTDOWN_GRACE", Parse.positive_float, "25")
    lease_s: float = setting("LEADSTAGE_LEASE", Parse.positive_float, "8")
    #: The most changes of one stage one request carries (coalescing, docs/contract.md; 1: never).
    coalesce_max: int = setting("LEADSTAGE_COALESCE_MAX", Parse.positive_int, "50")
    #: Batch mode (docs/contract.md: Batches): ``auto`` sends an account's due changes (updates, and
    #: adds with nothing to reconcile) through iVvy's batch namespace when more than
    #: ``batch_threshold`` of them (one per stage lock) are due, up to ``batch_max`` (at most 200)
    #: per batch, waiting up to ``batch_wait_s`` for results.
    batch_mode: BatchMode = setting("LEADSTAGE_BATCH", Parse.batch_mode, "auto")
    batch_threshold: int = setting("LEADSTAGE_BATCH_THRESHOLD", Parse.positive_int, "20")
    batch_max: int = setting("LEADSTAGE_BATCH_MAX", Parse.positive_int, "200")
    batch_wait_s: float = setting("LEADSTAGE_BATCH_WAIT", Parse.positive_float, "30")
    #: The shortest and longest pause between two polls of a batch's progress (paced by the progress
    #: between them; the longest while it reports none).
    batch_poll_min_s: float = setting("LEADSTAGE_BATCH_POLL_MIN", Parse.positive_float, "0.2")
    batch_poll_max_s: float = setting("LEADSTAGE_BATCH_POLL_MAX", Parse.positive_float, "5")
    #: Replicas that must confirm the writes that matter (enqueue, the recovery point before a POST,
    #: the terminal state) before they count as done; 0 waits for none (docs/contract.md: Durability).
    redis_min_replicas: int = setting("LEADSTAGE_REDIS_MIN_REPLICAS", Parse.whole_number, "0")
    redis_replica_timeout_s: float = setting("LEADSTAGE_REDIS_REPLICA_TIMEOUT", Parse.positive_float, "1")
    #: The longest Retry-After (and account pause) honoured; a longer one dead-letters the change.
    retry_after_max_s: float = setting("LEADSTAGE_RETRY_AFTER_MAX", Parse.positive_float, "600")
    #: Added to this host's clock (tests of clock skew only): nothing but event times and iVvy's
    #: request signature read it, every decision uses the Redis server's clock.
    clock_offset_s: float = setting("LEADSTAGE_TEST_CLOCK_OFFSET", Parse.number, "0")
    #: WEBHOOK_SECRET: one or more whsec_ secrets (several while rotating), for any account: the
    #: signed body names the account.
    webhook_secret: Secret | None = setting("WEBHOOK_SECRET", Parse.webhook_secret, "")
    #: LEADSTAGE_WEBHOOK_SECRETS_FILE: account -> its own secrets (one or more, space-separated); a
    #: request signed with one of them is for that account only.
    webhook_account_secrets: Mapping[str, Secret] = field(default_factory=dict)
    #: LEADSTAGE_PLAIN_HTTP_HOSTS: hosts besides loopback whose iVvy base URL may be http://.
    plain_http_hosts: frozenset[str] = setting("LEADSTAGE_PLAIN_HTTP_HOSTS", Parse.host_list, "")
    #: LEADSTAGE_ACCOUNT_NAMES: the account list of a producer that has no credentials (the
    #: webhook); where credentials are configured too, it must name exactly their accounts.
    account_names: frozenset[str] = setting("LEADSTAGE_ACCOUNT_NAMES", Parse.account_list, "")
    webhook_max_body_bytes: int = setting("LEADSTAGE_WEBHOOK_MAX_BODY", Parse.positive_int, "1048576")
    metrics_port: int = setting("LEADSTAGE_METRICS_PORT", Parse.port, "9464")
    log_format: LogFormat = setting("LEADSTAGE_LOG_FORMAT", Parse.log_format, "auto")
    #: None when LEADSTAGE_LOG_LEVEL is unset: info (the demo, which is read by a person: warning).
    log_level: LogLevel | None = setting("LEADSTAGE_LOG_LEVEL", Parse.log_level, "")
    #: Every Redis command of a producer or reader waits this long for its answer at most.
    redis_timeout_s: float = setting("LEADSTAGE_REDIS_TIMEOUT", Parse.positive_float, f"{TIMEOUT_S:g}")
    #: Connecting to Redis gives up after this long (an unroutable host would hang otherwise).
    redis_connect_timeout_s: float = setting(
        "LEADSTAGE_REDIS_CONNECT_TIMEOUT", Parse.positive_float, f"{CONNECT_TIMEOUT_S:g}"
    )
    #: ``leadstage console``: the token that may read and change (replay, discard); the console is
    #: off without it. The read-only token, when set, may only read.
    console_token: Secret | None = setting("LEADSTAGE_CONSOLE_TOKEN", Parse.token, "")
    console_read_token: Secret | None = setting("LEADSTAGE_CONSOLE_READ_TOKEN", Parse.token, "")
    #: Declared when a TLS-terminating proxy stands in front of the console: its login cookie is
    #: then marked Secure, and binding beyond loopback is not warned about.
    console_tls_proxy: bool = setting("LEADSTAGE_CONSOLE_TLS_PROXY", Parse.flag, "0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {name: variable.read(env) for name, variable in ENVIRONMENT.items()}
        accounts = load_accounts(env, values["rate_limit"], values["plain_http_hosts"])
        secrets = load_webhook_secrets(env, frozenset(accounts) | values["account_names"])
        settings = cls(accounts=accounts, webhook_account_secrets=secrets, **values)
        settings.check_consistency()
        return settings

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` give these settings again (for child processes).

        Holds the secrets (the child needs them): pass it to a process, never print it. Only the
        default account can be written as variables; other accounts need LEADSTAGE_ACCOUNTS_FILE.
        """
        env: dict[str, str] = {}
        for name, variable in ENVIRONMENT.items():
            value = getattr(self, name)
            if isinstance(value, frozenset):
                env[variable.name] = " ".join(sorted(value))
            elif value is not None:
                env[variable.name] = value.get() if isinstance(value, Secret) else str(value)
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
        if self.batch_max > BATCH_MAX_JOBS:
            raise ConfigError(f"LEADSTAGE_BATCH_MAX ({self.batch_max}) must be at most {BATCH_MAX_JOBS} (iVvy's limit)")
        if self.batch_max <= 1:
            raise ConfigError("LEADSTAGE_BATCH_MAX must be at least 2 (a batch of one is a single call)")
        if self.batch_mode == "auto" and self.batch_wait_s + 2 * self.request_timeout_s >= self.job_timeout_s:
            # The batch's task is one job: its run, its wait for results and one poll must fit.
            raise ConfigError(
                f"LEADSTAGE_BATCH_WAIT ({self.batch_wait_s:g}s) plus two LEADSTAGE_REQUEST_TIMEOUT "
                f"({self.request_timeout_s:g}s) must be shorter than LEADSTAGE_JOB_TIMEOUT ({self.job_timeout_s:g}s)"
            )
        if self.batch_poll_min_s > self.batch_poll_max_s:
            raise ConfigError("LEADSTAGE_BATCH_POLL_MIN must be at most LEADSTAGE_BATCH_POLL_MAX")
        if self.lease_s <= self.poll_delay_s * 3:
            raise ConfigError("LEADSTAGE_LEASE must be longer than three LEADSTAGE_POLL_DELAY")
        if self.rate_lead_s >= self.lease_margin_s:
            # A run waits for its slot on the lease its claim began, before any heartbeat renews it.
            raise ConfigError("LEADSTAGE_RATE_LEAD must be shorter than a quarter of LEADSTAGE_LEASE")
        if self.redis_min_replicas and self.redis_replica_timeout_s >= self.redis_timeout_s:
            # The WAIT for the replicas is a Redis command like any other: a socket timeout no
            # longer than its bound would cut it short and report every write unconfirmed.
            raise ConfigError(
                f"LEADSTAGE_REDIS_REPLICA_TIMEOUT ({self.redis_replica_timeout_s:g}s) must be shorter than "
                f"LEADSTAGE_REDIS_TIMEOUT ({self.redis_timeout_s:g}s) when LEADSTAGE_REDIS_MIN_REPLICAS is set"
            )
        if self.accounts and self.account_names and self.account_names != set(self.accounts):
            # Producers refuse changes outside the list and the worker dead-letters changes for an
            # account it has no credentials for: both must know the same accounts.
            raise ConfigError(
                f"LEADSTAGE_ACCOUNT_NAMES ({', '.join(sorted(self.account_names))}) must name the accounts "
                f"configured with IVVY_BASE_URL or LEADSTAGE_ACCOUNTS_FILE ({', '.join(sorted(self.accounts))})"
            )
        if self.console_read_token is not None and self.console_read_token == self.console_token:
            raise ConfigError("LEADSTAGE_CONSOLE_READ_TOKEN must differ from LEADSTAGE_CONSOLE_TOKEN")

    @property
    def lease_margin_s(self) -> float:
        """A run is given up this long before its lease is known to end: time for clocks that tick
        at slightly different rates and for a loop that is late."""
        return self.lease_s / 4

    @property
    def known_accounts(self) -> frozenset[str]:
        """The account list every producer checks a change's account against (empty: there is
        none, and any well-formed name is accepted): the accounts with credentials, those of
        LEADSTAGE_ACCOUNT_NAMES and those with their own webhook secrets."""
        return frozenset(self.accounts) | self.account_names | frozenset(self.webhook_account_secrets)

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
        values.append(parse_redis_url(self.redis_url).password or "")
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


#: Settings field -> its ``Variable`` (name, how it is read, its default text): read by ``from_env``,
#: written back by ``to_env``. The accounts are read from their own variables (``load_accounts``),
#: the per-account webhook secrets from their file.
ENVIRONMENT: Final[Mapping[str, Variable]] = {
    each.name: each.metadata[VARIABLE] for each in fields(Settings) if VARIABLE in each.metadata
}
