"""gather.lua for the worker (coalescing, docs/contract.md: Coalescing): the script's call and the
one place its reply is parsed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.core import keys
from worker.core.errors import StaleRun
from worker.core.ledger import Ledger
from worker.core.replies import text


@dataclass(frozen=True, slots=True)
class Gathered:
    """A change gathered into another's request: the run it began and what its events need."""

    job_id: str
    run: int
    attempt: int
    #: Its ordering sequence among the changes of its stage (worker.core.keys.stage_key).
    seq: int
    change_json: bytes
    #: (source, enqueued at in server ms, generation), as ``Start.facts``.
    facts: tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Gathering:
    """gather.lua's answer: the leader's seq, the stage's newest seq per field, the changes gathered."""

    leader_seq: int
    newest: dict[str, int]
    gathered: list[Gathered]


def _parse(job_id: str, run: int, reply: Sequence[object]) -> Gathering:
    status, leader_seq, stage, gathered = reply
    if text(status) != "ok":  # type: ignore[arg-type]  # a Redis reply: bytes or int
        raise StaleRun(job_id, run)
    flat = [text(v) for v in stage]  # type: ignore[attr-defined]  # a Redis array reply
    newest = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
    items = []
    for item in gathered:  # type: ignore[attr-defined]  # a Redis array reply
        job, run_, attempt, seq, change, source, enqueued_at, gen = item
        items.append(
            Gathered(text(job), int(run_), int(attempt), int(seq), change, (text(source), int(enqueued_at), int(gen)))
        )
    return Gathering(int(leader_seq), newest, items)  # type: ignore[call-overload]  # an int reply


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
    gathering = _parse(job_id, run, reply)
    if gathering.gathered:
        ledger._require_replicas(acked, "the recovery point of the changes gathered")
    return gathering
