"""gather.lua for the worker (coalescing, docs/contract.md: Coalescing): the script's call (its
reply is parsed in ``worker.core.replies``)."""

from __future__ import annotations

from worker.core import keys
from worker.core.ledger import Ledger
from worker.core.replies import Gathering, parse_gather


async def gather_updates(ledger: Ledger, job_id: str, run: int, worker_id: str, most: int) -> Gathering:
    """Gather up to ``most`` due changes of the stage of ``job_id`` (an update whose run ``run`` holds
    the stage's lock) into this worker's runs; ``StaleRun`` when that run is not current."""
    settings = ledger.settings
    account = keys.split_job_id(job_id)[0]
    reply, acked = await ledger._call(
        ledger._gather,
        [keys.queue_key(settings.queue_name, account), keys.ledger_key(job_id)],
        [
            job_id,
            run,
            ledger.lease_ms,
            worker_id,
            keys.ledger_prefix(account),
            most,
            keys.PENDING_FIELD_PREFIX,
            settings.max_attempts,
            int(settings.max_age_s * 1000),
        ],
        confirm=True,
    )
    gathering = parse_gather(job_id, run, reply)
    if gathering.gathered:
        ledger._require_replicas(acked, "the recovery point of the changes gathered")
    return gathering
