"""What producers and the worker share: the change, settings, errors, keys, states, the ledger.

The public surface of ``worker.core`` is ``__all__``: every name the worker (``worker``,
``worker.cli``, ``worker.console``, ``worker.devtools``) and the producers (``producers``) use of
the core, and the modules they use whole. ``tests/test_core_surface.py`` checks that it is exactly
what is exported and that nothing outside the core reaches past it.

Names are loaded on first use (PEP 562): ``leadstage --help`` must not import redis-py,
structlog or prometheus-client, so importing ``worker.core`` imports nothing by itself.
Import a name from here or from its module; both are the same object, and the module is where
type checkers see its type (the project imports from the modules).
"""

from __future__ import annotations

import importlib
from typing import Any, Final

#: Module of ``worker.core`` -> its public names, space-separated ("": a module used whole).
SURFACE: Final[dict[str, str]] = {
    "batch_claim": "BatchClaim claim_batch end_batch hold_unresolved record_sent take_rate_slot take_run_slot",
    "bulk": "backlog_warning Chunk ENQUEUE_CHUNK",
    "change": (
        "ACCOUNT_PATTERN ALIASES APPLY_TO_LEAD APPLY_TO_OPPORTUNITY APPLY_TO_WORDS COLOUR_PATTERN"
        " DEFAULT_ACCOUNT Envelope ID_MAX KEY_MAX_CHARS KEY_PATTERN LeadStageChange NAME_MAX_CHARS"
        " NAME_PATTERN parse_change parse_envelope parse_id_text repeated_key shown UPDATABLE_FIELDS validate"
    ),
    "errors": (
        "BadFilter BatchGone BatchNotReady ConfigError DemoFailed EnqueueOutcomeUnknown error_for_response"
        " Exhausted FieldError IdempotencyConflict Interrupted InvalidChange InvalidEvent IvvyClockSkew"
        " IvvyErrorDetails IvvyNoAnswer IvvyRateLimited IvvyRejected IvvyTimeout IvvyUnavailable LeadstageError"
        " NotFound PermanentError redis_errors RedisCredentialsRefused RedisNotReplicated RedisUnavailable Refused"
        " RetryableError RetryAfterTooLong StaleRun UnknownAccount InvalidOption OutcomeUnavailable UnknownChange"
        " WaitTimeout SignatureRejected STALE_REQUEST_CODE StreamRefused stream_errors"
    ),
    "gather": "gather_updates",
    "hosts": "is_loopback",
    "keys": "",
    "ledger": "Ledger Pick Receipt Start",
    "logs": "bind_job_context configure_logging get_logger",
    "metrics": "",
    "one_shot": "enqueue_once",
    "processes": "cancel_until_done Children RedisServer signalled until_signalled",
    "readers": "",
    "redis_connection": (
        "close_sentinels connect_redis connect_redis_of connect_redis_or_cluster connect_redis_or_cluster_of"
        " ping RedisClient"
    ),
    "redis_url": "DEFAULT_PORT DEFAULT_SENTINEL_SERVICE parse_redis_url printable_url single_server",
    "resp": "handles",
    "results": "build_event DeadLetter Event EVENTS JobFacts lost_event ResultEvent Verdict",
    "settings": "Account BATCH_MAX_JOBS DEMO_API_KEY DEMO_API_SECRET Secret Settings",
    "states": "Decision Outcome TERMINAL UNACCOUNTED WaitReason",
    "tracing": "",
}
_ORIGIN: Final[dict[str, str]] = {
    name: f"worker.core.{module}" for module, names in SURFACE.items() for name in names.split()
}
__all__ = sorted([*_ORIGIN, *(module for module, names in SURFACE.items() if not names)])


def __getattr__(name: str) -> Any:  # what the name is: its module says (and types it)
    origin = _ORIGIN.get(name)
    if origin is not None:
        return getattr(importlib.import_module(origin), name)
    if name in SURFACE:
        return importlib.import_module(f"worker.core.{name}")
    raise AttributeError(f"module 'worker.core' has no attribute {name!r} (its surface is __all__)")


def __dir__() -> list[str]:
    return list(__all__)
