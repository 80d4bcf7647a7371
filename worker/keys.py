"""Every Redis key and name leadstage-sync uses, defined once.

One change is one arq job whose id is ``{account}:{idempotency_key}``; the ledger hash of that
job is the source of truth for where the change stands. arq's own keys (``arq:job:``,
``arq:in-progress:``, ``arq:retry:``) are used unchanged.
"""

from __future__ import annotations

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

#: The function name arq calls for every change.
JOB_FUNCTION = "apply_lead_stage_change"

#: arq's in-progress marker of every job being attempted now (SCAN pattern, for ``leadstage stats``).
ARQ_IN_PROGRESS_PATTERN = in_progress_key_prefix + "*"

__all__ = [
    "ARQ_IN_PROGRESS_PATTERN",
    "JOB_FUNCTION",
    "arq_in_progress_key",
    "arq_job_key",
    "arq_retry_key",
    "claims_key",
    "job_id",
    "ledger_key",
    "rate_key",
    "split_job_id",
    "stage_key",
    "stage_lock_key",
]


def job_id(account: str, idempotency_key: str) -> str:
    """The arq job id of a change; account names never contain ':' so it splits back."""
    return f"{account}:{idempotency_key}"


def split_job_id(job: str) -> tuple[str, str]:
    account, _, idempotency_key = job.partition(":")
    return account, idempotency_key


def ledger_key(job: str) -> str:
    return f"leadstage:ledger:{job}"


def stage_key(account: str, stage_id: int) -> str:
    """Hash field -> sequence number of the newest enqueued change that sets it, plus ``seq``."""
    return f"leadstage:stage:{account}:{stage_id}"


def stage_lock_key(account: str, stage_id: int | None, name: str | None) -> str:
    """Held by the one job that may talk to iVvy about this stage right now.

    An update locks its stage id; an add locks its name (case-insensitively), so that an add being
    reconciled never races another add of the same name.
    """
    subject = str(stage_id) if stage_id is not None else "add:" + (name or "").lower()
    return f"leadstage:stage-lock:{account}:{subject}"


def claims_key(account: str) -> str:
    """Hash stage id -> job id of the add that created it (used to reconcile unknown adds)."""
    return f"leadstage:claims:{account}"


def rate_key(account: str) -> str:
    """The account's shared rate limiter state (GCRA theoretical arrival time, pause)."""
    return f"leadstage:rate:{account}"


def arq_job_key(job: str) -> str:
    return job_key_prefix + job


def arq_in_progress_key(job: str) -> str:
    return in_progress_key_prefix + job


def arq_retry_key(job: str) -> str:
    return retry_key_prefix + job
