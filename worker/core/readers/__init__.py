"""Reading what the product wrote, for the ``leadstage`` commands results, status, dlq and stats,
and for the console (``worker.console``: overview, failures, a change's timeline).

Everything here reads Redis the way the worker writes it (``worker.core.keys``, ``worker.core.ledger``,
``worker.core.results``, the heartbeats of ``worker.runner``) and changes nothing, except ``replay``, which goes
through ``Ledger.replay`` like every other enqueue, and ``discard``, which deletes one dead letter. Streams are read
in pages, so a stream of 100,000 entries costs a hundred round trips and bounded memory, not one huge reply.

Every reader takes a ``RedisClient``: a single Redis or a Redis Cluster. Each command names one key, and a
pipeline (never a transaction) may name keys of several slots: the cluster client sends each command to its
slot's master. ``replay`` enqueues in the account's slot, then deletes the dead letter (``Ledger.replay``).

By job: ``streams`` (paged reads, time filters), ``changes`` (one change: status, timeline, replay), ``stats``
(``leadstage stats``), ``console`` (the console's overview and failures); import every name from here.
"""

from __future__ import annotations

from worker.core.errors import BadFilter
from worker.core.readers.changes import ReplayOutcome, change_status, change_timeline, replay
from worker.core.readers.console import DEAD_LETTER_FIELDS, RateHistory, discard, failures, overview
from worker.core.readers.stats import RATE_WINDOWS_S, stats
from worker.core.readers.streams import (
    PAGE,
    Entry,
    Selection,
    dead_letters,
    parse_duration,
    redis_now_ms,
    results,
    selected_dead_letters,
    since_as_ms,
)

__all__ = [
    "DEAD_LETTER_FIELDS",
    "PAGE",
    "RATE_WINDOWS_S",
    "BadFilter",
    "Entry",
    "RateHistory",
    "ReplayOutcome",
    "Selection",
    "change_status",
    "change_timeline",
    "dead_letters",
    "discard",
    "failures",
    "overview",
    "parse_duration",
    "redis_now_ms",
    "replay",
    "results",
    "selected_dead_letters",
    "since_as_ms",
    "stats",
]
