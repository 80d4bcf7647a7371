"""What producers and the worker share: the change, settings, errors, keys, states, the ledger.

The public surface of ``worker.core`` is ``__all__``: every name the worker (``worker``,
``worker.cli``, ``worker.console``, ``worker.devtools``) and the producers (``producers``) use of
the core, and the modules they use whole. ``tests/test_core_surface.py`` checks that it is exactly
what is exported and that nothing outside the core reaches past it.

Names are loaded on first use (PEP 562): ``leadstage --help`` must not import redis-py,
structlog or prometheus-client, so importing ``worker.core`` imports nothing by itself.
Import a name from here or from its module; both are the same object.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from worker.core import keys, metrics, readers, tracing
    from worker.core.change import (
        ACCOUNT_PATTERN,
        ALIASES,
        APPLY_TO_LEAD,
        APPLY_TO_OPPORTUNITY,
        APPLY_TO_WORDS,
        COLOUR_PATTERN,
        DEFAULT_ACCOUNT,
        ID_MAX,
        KEY_MAX_CHARS,
        KEY_PATTERN,
        NAME_MAX_CHARS,
        NAME_PATTERN,
        UPDATABLE_FIELDS,
        Envelope,
        LeadStageChange,
        parse_change,
        parse_envelope,
        parse_id_text,
        repeated_key,
        shown,
    )
    from worker.core.errors import (
        BatchGone,
        BatchNotReady,
        ConfigError,
        DemoFailed,
        EnqueueOutcomeUnknown,
        Exhausted,
        FieldError,
        IdempotencyConflict,
        Interrupted,
        InvalidChange,
        IvvyClockSkew,
        IvvyErrorDetails,
        IvvyNoAnswer,
        IvvyRateLimited,
        IvvyRejected,
        IvvyTimeout,
        IvvyUnavailable,
        LeadstageError,
        NotFound,
        PermanentError,
        RedisCredentialsRefused,
        RedisNotReplicated,
        RedisUnavailable,
        Refused,
        RetryableError,
        RetryAfterTooLong,
        StaleRun,
        UnknownAccount,
        error_for_response,
        redis_errors,
    )
    from worker.core.gather import gather_updates
    from worker.core.ledger import (
        ENQUEUE_CHUNK,
        Chunk,
        Ledger,
        Pick,
        Receipt,
        Start,
        backlog_warning,
    )
    from worker.core.logs import (
        bind_job_context,
        configure_logging,
        get_logger,
    )
    from worker.core.processes import (
        Children,
        RedisServer,
        is_loopback,
        signalled,
        until_signalled,
    )
    from worker.core.redis_connection import (
        DEFAULT_PORT,
        DEFAULT_SENTINEL_SERVICE,
        close_sentinels,
        connect_redis,
        connect_redis_of,
        parse_redis_url,
        ping,
        printable_url,
    )
    from worker.core.results import (
        EVENTS,
        TERMINAL_EVENTS,
        DeadLetter,
        Event,
        InvalidEvent,
        JobFacts,
        ResultEvent,
        build_event,
        lost_event,
    )
    from worker.core.settings import (
        DEMO_API_KEY,
        DEMO_API_SECRET,
        Account,
        Secret,
        Settings,
    )
    from worker.core.states import (
        TERMINAL,
        UNACCOUNTED,
        Decision,
        WaitReason,
    )

#: Module of ``worker.core`` -> its public names, space-separated ("": a module used whole).
SURFACE: Final[dict[str, str]] = {
    "change": (
        "ACCOUNT_PATTERN ALIASES APPLY_TO_LEAD APPLY_TO_OPPORTUNITY APPLY_TO_WORDS COLOUR_PATTERN"
        " DEFAULT_ACCOUNT Envelope ID_MAX KEY_MAX_CHARS KEY_PATTERN LeadStageChange NAME_MAX_CHARS"
        " NAME_PATTERN parse_change parse_envelope parse_id_text repeated_key shown UPDATABLE_FIELDS"
    ),
    "errors": (
        "BatchGone BatchNotReady ConfigError DemoFailed EnqueueOutcomeUnknown error_for_response Exhausted FieldError"
        " IdempotencyConflict Interrupted InvalidChange IvvyClockSkew IvvyErrorDetails IvvyNoAnswer"
        " IvvyRateLimited IvvyRejected IvvyTimeout IvvyUnavailable LeadstageError NotFound PermanentError"
        " redis_errors RedisCredentialsRefused RedisNotReplicated RedisUnavailable Refused RetryableError"
        " RetryAfterTooLong StaleRun UnknownAccount"
    ),
    "gather": "gather_updates",
    "keys": "",
    "ledger": "backlog_warning Chunk ENQUEUE_CHUNK Ledger Pick Receipt Start",
    "logs": "bind_job_context configure_logging get_logger",
    "metrics": "",
    "processes": "Children is_loopback RedisServer signalled until_signalled",
    "readers": "",
    "redis_connection": (
        "close_sentinels connect_redis connect_redis_of DEFAULT_PORT DEFAULT_SENTINEL_SERVICE parse_redis_url"
        " ping printable_url"
    ),
    "results": "build_event DeadLetter Event EVENTS InvalidEvent JobFacts lost_event ResultEvent TERMINAL_EVENTS",
    "settings": "Account DEMO_API_KEY DEMO_API_SECRET Secret Settings",
    "states": "Decision TERMINAL UNACCOUNTED WaitReason",
    "tracing": "",
}
_ORIGIN: Final[dict[str, str]] = {
    name: f"worker.core.{module}" for module, names in SURFACE.items() for name in names.split()
}
__all__ = sorted([*_ORIGIN, *(module for module, names in SURFACE.items() if not names)])


def __getattr__(name: str) -> object:
    origin = _ORIGIN.get(name)
    if origin is not None:
        return getattr(importlib.import_module(origin), name)
    if name in SURFACE:
        return importlib.import_module(f"worker.core.{name}")
    raise AttributeError(f"module 'worker.core' has no attribute {name!r} (its surface is __all__)")


def __dir__() -> list[str]:
    return list(__all__)
