"""Coalescing (docs/contract.md: Coalescing): an update about to be sent gathers the other changes
of its stage that are due now (gather.lua), and one request carries them all.

The request is the merge of every change gathered with the leader's: each field at the value of
the newest change (the highest ordering sequence) that sets it, as the ordering rule says; a
field that a newer change outside the group set is left out, as for a single change (that change
sends it later). A gathered change none of whose fields survive sent nothing: ``superseded``.
Every change keeps its own run, attempt and terminal event; the events name the key whose request
carried it (``carried_by``) and say ``sent_as=coalesced`` (``worker.recording.CARRIAGE``, read
by its ``finish``, which tells how the change being finished went).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson

from worker.core import keys
from worker.core.change import UPDATABLE_FIELDS, LeadStageChange, parse_change
from worker.core.errors import PermanentError, RetryableError
from worker.core.gather import gather_updates
from worker.core.ledger import Start
from worker.core.logs import bind_job_context
from worker.core.results import JobFacts
from worker.core.states import Decision, Outcome
from worker.recording import failed_attempt, finish, outcome_unknown, permanent_failure
from worker.runtime import Lease, Runtime


@dataclass(frozen=True, slots=True)
class Member:
    """One change gathered into the leader's request."""

    facts: JobFacts
    start: Start
    #: Whether some field of the request is this change's (else it sent nothing: superseded).
    carried: bool


@dataclass(frozen=True, slots=True)
class Group:
    """The request of a leader and the changes it carries."""

    sent: LeadStageChange
    members: list[Member]
    #: Whether some field of the request is the leader's own (else the leader is superseded).
    leader_carried: bool

    @property
    def empty(self) -> bool:
        """Nothing is left to send: newer changes outside the group set every field."""
        return not self.sent.changed_fields()


def merge(
    leader: tuple[str, int, LeadStageChange], others: list[tuple[str, int, LeadStageChange]], newest: dict[str, int]
) -> tuple[LeadStageChange, set[str]]:
    """The one request for ``leader`` and ``others`` (job id, seq, change; one stage id) and the jobs
    whose fields it carries. ``newest``: the stage's newest seq per field (keys.stage_key)."""
    change = leader[2]
    values: dict[str, object] = {}
    owners: set[str] = set()
    for field in UPDATABLE_FIELDS:
        setting = [(seq, job_id, c.body()[field]) for job_id, seq, c in (leader, *others) if field in c.body()]
        if not setting:
            continue
        seq, owner, value = max(setting, key=lambda s: s[0])
        if newest.get(field, 0) > seq:
            continue  # a newer change outside the group sets it, later
        values[field] = value
        owners.add(owner)
    merged = parse_change({"id": change.id, **values}) if values else LeadStageChange(id=change.id)
    return merged, owners


async def gather_group(runtime: Runtime, facts: JobFacts, start: Start) -> Group | None:
    """Gather the due changes of the leader's stage (an update whose run holds the stage's lock)
    and merge them into one request; None when there is none to gather (``LEADSTAGE_COALESCE_MAX``
    of 1 never gathers). The changes gathered are kept alive by this worker's heartbeat until the
    leader's task ends (``release``)."""
    most = runtime.settings.coalesce_max - 1
    if most < 1 or facts.change.id is None:
        return None
    gathering = await gather_updates(runtime.ledger, facts.job_id, start.run, runtime.worker_id, most)
    if not gathering.gathered:
        return None
    task = asyncio.current_task()
    now = time.monotonic()
    members: list[tuple[JobFacts, Start, int]] = []
    for item in gathering.gathered:
        account, idempotency_key = keys.split_job_id(item.job_id)
        change = parse_change(orjson.loads(item.change_json))
        source, enqueued_at, generation = item.facts
        member_facts = JobFacts(item.job_id, idempotency_key, account, change, source, enqueued_at, generation)
        member_start = Start(
            decision=Decision.GO,
            run=item.run,
            attempt=item.attempt,
            facts=item.facts,
            change_json=item.change_json,
            job_id=item.job_id,
        )
        members.append((member_facts, member_start, item.seq))
        runtime.running[item.job_id] = Lease(item.run, now + runtime.settings.lease_s)
    if task is not None:
        jobs = [m[0].job_id for m in members]
        task.add_done_callback(lambda _: release(runtime, jobs))
    sent, owners = merge(
        (facts.job_id, gathering.leader_seq, facts.change.without(set(start.dropped))),
        [(f.job_id, seq, f.change) for f, _, seq in members],
        gathering.newest,
    )
    return Group(sent, [Member(f, s, f.job_id in owners) for f, s, _ in members], facts.job_id in owners)


def release(runtime: Runtime, jobs: list[str]) -> None:
    """The heartbeat stops keeping these gathered changes alive (their leader's task ended)."""
    for job_id in jobs:
        lease = runtime.running.get(job_id)
        if lease is not None and lease.task is None:
            del runtime.running[job_id]


async def end(
    runtime: Runtime,
    leader: JobFacts,
    leader_start: Start,
    group: Group | None,
    started: float,
    *,
    stage_id: int | None = None,
    error: RetryableError | PermanentError | None = None,
) -> bool:
    """The changes coalesced into the leader's request end as it did, each with its own attempt and
    event; one that none of the request's fields came from sent nothing: superseded, the leader too
    (then it is finished here, and True returned; after a request of unknown outcome its stage stays
    locked for the hold all the same). Before the leader's own finish, which releases the stage's
    lock."""
    if group is None:
        return False
    unknown = isinstance(error, RetryableError) and outcome_unknown(leader.change, error)
    for member in group.members:
        facts, start = member.facts, member.start
        with bind_job_context(facts.job_id, facts.idempotency_key, facts.account, start.attempt):  # its own log lines
            if not member.carried:
                await finish(runtime, facts, start, Outcome.SUPERSEDED, sent=None)
            elif error is None:
                await finish(
                    runtime, facts, start, Outcome.SUCCEEDED, sent=group.sent, stage_id=stage_id, started=started
                )
            elif isinstance(error, PermanentError):
                await permanent_failure(runtime, facts, start, group.sent, error, started)
            else:
                await failed_attempt(runtime, facts, start, group.sent, error, started, outcome_unknown=unknown)
    release(runtime, [member.facts.job_id for member in group.members])
    if group.leader_carried:
        return False
    # Its lock holds the stage: while the request may still land, for as long as the leader's own would.
    await finish(runtime, leader, leader_start, Outcome.SUPERSEDED, sent=None, outcome_unknown=unknown)
    return True
