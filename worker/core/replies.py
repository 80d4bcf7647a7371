"""What the ledger's scripts answer, typed: every reply has a fixed shape (written at the top of its
script in ``worker/core/lua/``) and is parsed here, and only here (states and decisions:
``worker.core.states``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.core.errors import ConfigError, StaleRun
from worker.core.states import RUNS, Decision, Phase, State, WaitReason

EnqueueStatus = Literal["queued", "duplicate"]
#: Items per decision in start.lua's reply.
START_ITEMS = 15


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a producer gets back for one change.

    ``backlog`` is how many changes of the account were waiting for a terminal state when this one
    was queued (itself included: its place in line), and ``expected_wait_s`` how long the account's rate limit
    needs to send them: when it exceeds the maximum age, the newest of them will fail as too old.
    """

    job_id: str
    idempotency_key: str
    account: str
    status: EnqueueStatus
    backlog: int = 0
    expected_wait_s: float = 0.0

    def as_dict(self) -> dict[str, str]:
        return {"job_id": self.job_id, "idempotency_key": self.idempotency_key, "status": self.status}


@dataclass(frozen=True, slots=True)
class Start:
    """start.lua's decision about one job."""

    decision: Decision
    wait_ms: int = 0
    reason: WaitReason | None = None
    #: The run this start began (the fencing token every later script of it presents).
    run: int = 0
    attempt: int = 0
    previous_phase: Phase = Phase.NONE
    dropped: frozenset[str] = field(default_factory=frozenset)
    #: (source, enqueued at in server ms, generation) of the change, for its events.
    facts: tuple[str, int, int] = ("", 0, 0)
    #: The change's canonical JSON, from its ledger entry.
    change_json: bytes = b""
    #: The terminal state a ``done`` job was found in.
    state: State | None = None
    #: False when fewer replicas than LEADSTAGE_REDIS_MIN_REPLICAS confirmed this start in time: a
    #: recovery point it wrote could be lost in a failover, so nothing may be posted on it.
    replicated: bool = True
    #: The job decided about.
    job_id: str = ""
    #: The producer's W3C traceparent stored with the change ('' when it did not trace).
    traceparent: str = ""
    #: How long after the claim (by the server's clock) a ``go``'s request may leave: the rate-limit
    #: slot it took opens then (a claim takes one up to ``LEADSTAGE_RATE_LEAD`` ahead).
    send_in_us: int = 0

    @property
    def runs(self) -> bool:
        """Whether the job has work to do now (a task is started for it)."""
        return self.decision in RUNS


@dataclass(frozen=True, slots=True)
class Claim:
    """start.lua's claim from an account: a decision per job it touched, and what comes next."""

    starts: tuple[Start, ...]
    #: When the account may next have a change to send (server ms; -1: its queue is empty).
    account_next_ms: int = -1
    #: Why the claim stopped before it had claimed all it might: no free rate-limit slot (or a
    #: pause), and for how long (ms).
    rate_reason: WaitReason | None = None
    rate_wait_ms: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    """finish.lua's answer for one run: whether its end was recorded, and when (server ms)."""

    recorded: bool
    finished_at_ms: int = 0
    #: Why not, when not: the terminal state found, ``missing`` or ``fenced`` (a newer run owns it).
    refused_because: str = ""
    #: False when fewer replicas than LEADSTAGE_REDIS_MIN_REPLICAS confirmed it in time.
    replicated: bool = True
    #: On a Redis Cluster: the outbox entry of its event, to publish (``worker.core.outbox``).
    outbox_id: str = ""


@dataclass(frozen=True, slots=True)
class Pick:
    """ready.lua's pick: the account to serve now, or how long until one is due."""

    account: str | None
    epoch: str = "0"
    #: Milliseconds until the first account is due (-1: none has work).
    wait_ms: int = -1


def text(value: bytes | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_claim(reply: Sequence[Any], *, replicated: bool) -> Claim:
    """start.lua's reply: {account next, rate reason, rate wait, decisions (15 items each)}; a
    ``ConfigError`` naming the key when one holds another kind of value (nothing was written)."""
    if len(reply) == 5:
        raise held_elsewhere(reply[4], "the claim that found it wrote nothing (the job stays due)")
    account_next, reason, wait_ms, flat = reply
    starts = tuple(
        _parse_start(flat[i : i + START_ITEMS], replicated=replicated) for i in range(0, len(flat), START_ITEMS)
    )
    reason_text = text(reason)
    return Claim(starts, int(account_next), WaitReason(reason_text) if reason_text else None, int(wait_ms))


def _parse_start(item: Sequence[bytes | int], *, replicated: bool) -> Start:
    decision, wait, reason, run, attempt, phase, dropped, source, enqueued_at, gen, change, state, job, trace, send = (
        item
    )
    words = [text(v) for v in (reason, phase, dropped, source, state, job, trace)]
    return Start(
        decision=Decision(text(decision)),
        wait_ms=int(wait),
        reason=WaitReason(words[0]) if words[0] else None,
        run=int(run),
        attempt=int(attempt),
        previous_phase=Phase(words[1]),
        dropped=frozenset(f for f in words[2].split(",") if f),
        facts=(words[3], int(enqueued_at), int(gen)),
        change_json=change if isinstance(change, bytes) else b"",
        state=State(words[4]) if words[4] else None,
        replicated=replicated,
        job_id=words[5],
        traceparent=words[6],
        send_in_us=int(send),
    )


def parse_finished(reply: Sequence[Sequence[bytes]], *, replicated: bool) -> list[Finished]:
    """finish.lua's reply: {status, detail[, outbox id]} per run, in order; a ``ConfigError`` naming
    the key when one holds another kind of value (none of the runs was recorded: their leases bring
    them back)."""
    if reply and reply[0][0] == b"kind":
        raise held_elsewhere(
            reply[0][1:], "none of these runs' ends was recorded (each change comes back when its lease ends)"
        )
    return [
        Finished(True, int(run[1]), replicated=replicated, outbox_id=text(run[2]))
        if run[0] == b"ok"
        else Finished(False, refused_because=run[1].decode())
        for run in reply
    ]


def parse_acked(reply: int) -> int:
    """ack.lua's reply: how many outbox entries it removed."""
    return int(reply)


def parse_lost(reply: int | bytes | list[bytes]) -> str | None:
    """lost.lua's reply: None when left alone; '' when reported, or on a Redis Cluster its outbox entry
    id; a ``ConfigError`` naming the key when one holds another kind of value (nothing was written)."""
    if isinstance(reply, list):
        raise held_elsewhere(
            reply, "the job whose ledger entry is gone was not reported (it stays queued until it can be)"
        )
    if reply == 0:
        return None
    return "" if reply == 1 else text(reply)


def parse_pick(reply: Sequence[bytes | int]) -> Pick:
    """ready.lua pick's reply: {account or '', its epoch, ms until the first account is due}."""
    account, epoch, wait_ms = reply
    return Pick(text(account) or None, text(epoch), int(wait_ms))


def parse_adopt(reply: Sequence[bytes]) -> tuple[str, int | None]:
    """adopt.lua's reply: its status ('adopted' | 'none' | 'stale') and the stage adopted."""
    status, stage_id = reply
    return status.decode(), int(stage_id) if status == b"adopted" else None


def parse_post(reply: Sequence[bytes]) -> bool:
    """post.lua's reply: whether the recovery point was written (False: another run owns it)."""
    return bool(reply[0] == b"ok")


def parse_enqueue(reply: Sequence[Any]) -> tuple[list[list[bytes]], dict[str, int]]:
    """enqueue.lua's reply: the answers, and account -> backlog for the accounts written to; a
    ``ConfigError`` naming the key when one holds another kind of value (the call wrote nothing)."""
    if len(reply) == 3:
        raise held_elsewhere(reply[2], "the enqueue that found it wrote nothing")
    answers, backlog = reply
    pairs = iter(backlog)
    return answers, {account.decode(): int(count) for account, count in zip(pairs, pairs, strict=True)}


def held_elsewhere(part: Sequence[bytes], outcome: str) -> ConfigError:
    """A script's {key, the kind of value it holds, the kind leadstage keeps there}: what a script
    answers instead of writing when another program's value is at one of its keys; ``outcome``
    says what became of the call."""
    key, held, kind = (item.decode() for item in part)
    return ConfigError(
        f"Redis holds a {held} at {key!r}, where leadstage keeps a {kind}: another program writes into "
        f"this database, or a setting names one of its keys; {outcome}"
    )


@dataclass(frozen=True, slots=True)
class BatchClaim:
    """batch.lua's claim: the changes claimed (a ``go`` start each), or why none was."""

    starts: list[Start]
    #: How many updates could have been sent now (one per stage), claimed or not; of a collection,
    #: how many jobs the batch has.
    candidates: int
    #: Why nothing was claimed: '' (claimed), 'collect' (a dead worker's batch to collect), 'few'
    #: (not more due jobs than the threshold: none was read), 'below' (not more sendable updates than
    #: the threshold), 'rate' (no slot opens within ``LEADSTAGE_RATE_LEAD``: none was read).
    refused: str
    rate_wait_ms: int
    #: Each start's index among the batch's jobs.
    indexes: list[int] = field(default_factory=list)
    #: The batch to collect ('' unless ``refused`` is 'collect').
    async_id: str = ""
    #: The batch's record (keys.batch_key; '' when nothing was claimed).
    record: str = ""


def parse_batch_claim(reply: Sequence[Any]) -> BatchClaim:
    """batch.lua claim's reply: {status, candidates, rate wait (ms), claimed jobs, asyncId, record}; a
    ``ConfigError`` naming the key when one holds another kind of value (nothing was claimed)."""
    if len(reply) == 7:
        raise held_elsewhere(reply[6], "the claim that found it wrote nothing (its changes stay due)")
    status, candidates, rate_wait, claimed, async_id, record = reply
    starts, indexes = [], []
    for item in claimed:
        job, run, attempt, dropped, source, enqueued_at, gen, change, trace, index = item
        starts.append(
            Start(
                decision=Decision.GO,
                run=int(run),
                attempt=int(attempt),
                dropped=frozenset(f for f in text(dropped).split(",") if f),
                facts=(text(source), int(enqueued_at), int(gen)),
                change_json=change,
                job_id=text(job),
                traceparent=text(trace),
            )
        )
        indexes.append(int(index))
    refused = text(status)
    return BatchClaim(
        starts,
        int(candidates),
        "" if refused == "ok" else refused,
        int(rate_wait),
        indexes,
        text(async_id),
        text(record),
    )


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


def parse_gather(job_id: str, run: int, reply: Sequence[Any]) -> Gathering:
    """gather.lua's reply: {status, the leader's seq, {field, newest seq, ...}, gathered changes};
    ``StaleRun`` when the leader's run is not current."""
    status, leader_seq, stage, gathered = reply
    if text(status) != "ok":
        raise StaleRun(job_id, run)
    flat = [text(v) for v in stage]
    newest = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
    items = []
    for item in gathered:
        job, run_, attempt, seq, change, source, enqueued_at, gen = item
        items.append(
            Gathered(text(job), int(run_), int(attempt), int(seq), change, (text(source), int(enqueued_at), int(gen)))
        )
    return Gathering(int(leader_seq), newest, items)


def parse_batch_sent(reply: int | list[bytes]) -> None:
    """batch.lua sent's reply: 1; a ``ConfigError`` naming the key when the batches listing holds
    another kind of value (nothing was written)."""
    if isinstance(reply, list):
        raise held_elsewhere(
            reply, "the batch's asyncId was not recorded (its changes are sent again once its wait is over)"
        )


def parse_batch_held(reply: list[Any]) -> list[bool]:
    """batch.lua unresolved's reply: whether each change's hold was written (False: not its run any
    more); a ``ConfigError`` naming the key when one holds another kind of value (none was written)."""
    if reply and reply[0] == b"kind":
        raise held_elsewhere(reply[1:], "no stage of the batch was held (nothing written)")
    return [flag == 1 for flag in reply]
