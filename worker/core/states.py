"""The ledger's states, phases and the decisions of its scripts, defined once (docs/architecture.md).

The Lua scripts write and compare the same strings; ``worker.core.ledger`` parses their replies into
these enums, so no other module compares bare strings.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where a change stands (the ledger's ``state`` field)."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded"


#: States a change never leaves (but by a replay of a failed one, as a new generation); the same
#: strings are the terminal events of the results stream (``Outcome``). The one terminal check:
#: typed as strings, so that a ``State``, an ``Outcome`` and a field read from Redis all compare.
TERMINAL: frozenset[str] = frozenset({State.SUCCEEDED, State.FAILED, State.SUPERSEDED})


class Phase(StrEnum):
    """What is known about the change's requests to iVvy (the ledger's ``phase`` field)."""

    #: No request of this change can be in flight or unaccounted for.
    NONE = ""
    #: A POST may be in flight right now (the recovery point, written just before the POST).
    POSTING = "posting"
    #: An attempt ended without knowing whether iVvy applied it (timeout, dropped, 5xx of an add).
    UNKNOWN = "unknown"


#: Phases after which an add must be reconciled with getLeadStageList before it is posted again.
UNACCOUNTED: frozenset[Phase] = frozenset({Phase.POSTING, Phase.UNKNOWN})


class Decision(StrEnum):
    """start.lua's decision about a due job (or an account's next one)."""

    SKIP = "skip"  # not due any more: another worker has it, or it was rescheduled
    MISSING = "missing"  # the ledger entry is gone (expired): reported as failed, never silently
    DONE = "done"  # already terminal: dropped from the queue
    WAIT = "wait"  # rescheduled (see WaitReason)
    SUPERSEDED = "superseded"  # every field overtaken by newer changes
    EXHAUSTED = "exhausted"  # out of attempts or too old
    GO = "go"  # may talk to iVvy now; the job is hidden for one lease


#: Decisions that give a job work to do (a task is started for it).
RUNS: frozenset[Decision] = frozenset({Decision.SUPERSEDED, Decision.EXHAUSTED, Decision.GO})


class WaitReason(StrEnum):
    BACKOFF = "backoff"
    IN_FLIGHT = "in_flight"
    LOCKED = "locked"
    PAUSED = "paused"
    RATE = "rate"


class Outcome(StrEnum):
    """What finish.lua records: a retry, or one of the terminal states."""

    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded"
