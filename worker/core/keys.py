"""Every Redis key and name leadstage-sync uses, defined once.

Each account has its own queue (a sorted set: member the job id ``{account}:{key}``, score when
it may run next, in server ms), and every key of an account carries the hash tag ``{account}``:
its queue, ledger entries, stage hashes, locks, claims and rate limiter live in one Redis Cluster
slot, so that each script about a change touches one slot. The ledger hash of a job is its record
and the source of truth for where the change stands; there is no separate job payload. While a
job runs, its score is pushed one lease ahead (a visibility timeout), so a crashed worker's job
becomes due again by itself.

Which account to serve next is a second sorted set, the schedule (``ready_key``: member the
account, score the server ms from which it may have a change to send: the later of its queue's
head and its rate limiter's next free slot); idle workers block on ``wake_key``. Those keys share
the queue name's hash tag. Python passes the keys to the scripts as KEYS; the names a script
reads from a ledger entry (``stage_key``, ``lock_key``) were made here and stored at enqueue, and
start.lua's claim of an account's next job puts its idempotency key after ``ledger_prefix``.
"""

from __future__ import annotations

#: The function name arq registers for the change job.
JOB_FUNCTION = "apply_lead_stage_change"

#: Hash worker id -> "running|last seen (ms)", refreshed by each worker's heartbeat.
WORKERS = "leadstage:workers"

LEDGER_PREFIX = "leadstage:ledger:"
STAGE_PREFIX = "leadstage:stage:"
#: In a stage hash, the field prefix of its pending updates (``stage_key``); no change field starts so.
PENDING_FIELD_PREFIX = "j"
STAGE_LOCK_PREFIX = "leadstage:stage-lock:"
CLAIMS_PREFIX = "leadstage:claims:"
NEWEST_CLAIM_PREFIX = "leadstage:newest-claim:"
RATE_PREFIX = "leadstage:rate:"
#: (Not the names of the previous batch lists: an entry left by an older worker is never read as a record.)
BATCHES_PREFIX = "leadstage:batches-sent:"
BATCH_PREFIX = "leadstage:batch-record:"
#: Hash account -> changes enqueued and not yet terminal (the backlog behind a new change); on a Redis
#: Cluster each account has its own such hash in its slot (``pending_key``).
PENDING = "leadstage:pending"
#: On a Redis Cluster, the stream of an account's events not yet published (``outbox_key``).
OUTBOX_PREFIX = "leadstage:outbox:"
#: Set to the layout version once a queue of the single-queue layout has been migrated.
LAYOUT = "leadstage:layout"
LAYOUT_VERSION = "2"
#: Hash job id -> "label change" of the keys a bulk enqueue has checked so far (ledger.BulkCheck).
STAGING_PREFIX = "leadstage:staging:"


def job_id(account: str, idempotency_key: str) -> str:
    """The job id of a change; account names never contain ':' so it splits back."""
    return f"{account}:{idempotency_key}"


def split_job_id(job: str) -> tuple[str, str]:
    account, _, idempotency_key = job.partition(":")
    return account, idempotency_key


def tag(account: str) -> str:
    """The account's hash tag: every key with it lives in one cluster slot."""
    return "{" + account + "}"


def ledger_key(job: str) -> str:
    account, idempotency_key = split_job_id(job)
    return ledger_prefix(account) + idempotency_key


def job_of_ledger_key(key: str) -> str:
    """The job id whose ledger entry this is (``ledger_key`` backwards)."""
    account, _, idempotency_key = key.removeprefix(LEDGER_PREFIX).partition(":")
    return job_id(account.removeprefix("{").removesuffix("}"), idempotency_key)


def queue_key(queue_name: str, account: str) -> str:
    """The account's queue: job id -> when it may run next (server ms)."""
    return f"{queue_name}:{tag(account)}"


def ready_key(queue_name: str) -> str:
    """The schedule: account -> from when (server ms) it may have a change to send."""
    return "{" + queue_name + "}:ready"


def wake_key(queue_name: str) -> str:
    """The list idle workers block on (BLPOP): pushed when an account becomes due sooner."""
    return "{" + queue_name + "}:wake"


def epoch_key(queue_name: str) -> str:
    """Hash account -> notices of new work, so that a claim's verdict never hides a newer notice."""
    return "{" + queue_name + "}:epoch"


def ledger_prefix(account: str) -> str:
    """What ``ledger_key`` puts before the idempotency key, for start.lua's claim of a queued job."""
    return f"{LEDGER_PREFIX}{tag(account)}:"


def stage_key(account: str, stage_id: int) -> str:
    """Hash field -> sequence number of the newest enqueued change that sets it, plus ``seq``, and
    for each update of the stage not yet terminal ``PENDING_FIELD_PREFIX`` + its seq -> its job id
    (what coalescing gathers from)."""
    return f"{STAGE_PREFIX}{tag(account)}:{stage_id}"


def lock_subject(stage_id: int | None, name: str | None) -> str:
    """What a change locks: an update its stage id; an add its name, case-insensitively, so that an
    add being reconciled never races another add of the same name."""
    return str(stage_id) if stage_id is not None else "add:" + (name or "").casefold()


def stage_lock_key(account: str, subject: str) -> str:
    """Held by the one job that may talk to iVvy about this subject right now."""
    return f"{STAGE_LOCK_PREFIX}{tag(account)}:{subject}"


def claims_key(account: str) -> str:
    """Hash stage id -> job id of the add that created it (used to reconcile unknown adds)."""
    return CLAIMS_PREFIX + tag(account)


def newest_claim_key(account: str) -> str:
    """The highest stage id an add of this account has claimed: stages at or below it existed
    before any later add was first posted, so a reconcile never adopts them (iVvy's ids grow)."""
    return NEWEST_CLAIM_PREFIX + tag(account)


def rate_key(account: str) -> str:
    """The account's shared rate limiter state (GCRA theoretical arrival time, pause)."""
    return RATE_PREFIX + tag(account)


def pending_key(account: str, *, cluster: bool) -> str:
    """The hash that counts the account's changes not yet terminal (field: the account): the shared
    ``PENDING`` on a single Redis, the account's own in its slot on a Redis Cluster."""
    return f"{PENDING}:{tag(account)}" if cluster else PENDING


def outbox_key(account: str) -> str:
    """On a Redis Cluster: the account's events written with their terminal state (finish.lua,
    lost.lua), in its slot, until a worker has published them to the results and dead-letter
    streams (``worker.core.outbox``)."""
    return OUTBOX_PREFIX + tag(account)


def staging_key(token: str, account: str | None) -> str:
    """A bulk enqueue's staging hash (``token``: the bulk's); on a Redis Cluster one per account of
    the bulk, in its slot."""
    return STAGING_PREFIX + token if account is None else f"{STAGING_PREFIX}{tag(account)}:{token}"


def batches_key(account: str) -> str:
    """Sorted set batch record key (``batch_key``) -> until when (server ms) the account's batch may
    be collected by another worker (batch.lua: its worker died after its run was answered)."""
    return BATCHES_PREFIX + tag(account)


def batch_key(account: str, batch_id: str) -> str:
    """A batch's record: the hash of what its changes share, once (batch.lua: its run's posted_at,
    asyncId and job ids in job order); each change's ledger entry names it (``batch_key``)."""
    return f"{BATCH_PREFIX}{tag(account)}:{batch_id}"
