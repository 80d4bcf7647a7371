"""Every Redis key and name leadstage-sync uses, defined once.

One change is one job on the arq queue (a sorted set: member the job id ``{account}:{key}``,
score when it may run next, in ms). The ledger hash of that job is its record and the source of
truth for where the change stands; there is no separate job payload. While a job runs, its score
is pushed one lease ahead (a visibility timeout), so a crashed worker's job becomes due again by
itself. Lua scripts build a few keys from the prefixes below plus ledger fields; Python builds the
same keys with the functions below, from the same prefixes.
"""

from __future__ import annotations

#: The function name arq registers for the change job.
JOB_FUNCTION = "apply_lead_stage_change"

#: Hash worker id -> "running|last seen (ms)", refreshed by each worker's heartbeat.
WORKERS = "leadstage:workers"

LEDGER_PREFIX = "leadstage:ledger:"
STAGE_PREFIX = "leadstage:stage:"
STAGE_LOCK_PREFIX = "leadstage:stage-lock:"
CLAIMS_PREFIX = "leadstage:claims:"
NEWEST_CLAIM_PREFIX = "leadstage:newest-claim:"
RATE_PREFIX = "leadstage:rate:"
#: Hash account -> changes enqueued and not yet terminal (the backlog behind a new change).
PENDING = "leadstage:pending"
#: Hash job id -> "label change" of the keys a bulk enqueue has checked so far (ledger.BulkCheck).
STAGING_PREFIX = "leadstage:staging:"


def job_id(account: str, idempotency_key: str) -> str:
    """The job id of a change; account names never contain ':' so it splits back."""
    return f"{account}:{idempotency_key}"


def split_job_id(job: str) -> tuple[str, str]:
    account, _, idempotency_key = job.partition(":")
    return account, idempotency_key


def ledger_key(job: str) -> str:
    return LEDGER_PREFIX + job


def stage_key(account: str, stage_id: int) -> str:
    """Hash field -> sequence number of the newest enqueued change that sets it, plus ``seq``."""
    return f"{STAGE_PREFIX}{account}:{stage_id}"


def lock_subject(stage_id: int | None, name: str | None) -> str:
    """What a change locks: an update its stage id; an add its name, case-insensitively, so that an
    add being reconciled never races another add of the same name."""
    return str(stage_id) if stage_id is not None else "add:" + (name or "").casefold()


def stage_lock_key(account: str, subject: str) -> str:
    """Held by the one job that may talk to iVvy about this subject right now."""
    return f"{STAGE_LOCK_PREFIX}{account}:{subject}"


def claims_key(account: str) -> str:
    """Hash stage id -> job id of the add that created it (used to reconcile unknown adds)."""
    return CLAIMS_PREFIX + account


def newest_claim_key(account: str) -> str:
    """The highest stage id an add of this account has claimed: stages at or below it existed
    before any later add was first posted, so a reconcile never adopts them (iVvy's ids grow)."""
    return NEWEST_CLAIM_PREFIX + account


def rate_key(account: str) -> str:
    """The account's shared rate limiter state (GCRA theoretical arrival time, pause)."""
    return RATE_PREFIX + account
