"""The idempotency ledger: where every change stands, in Redis, kept for the retention period.

One hash per change (``keys.ledger_key``) is the job's record and the source of truth; each
account's queue holds only job ids, scored by when each may run next. Each transition is one Lua script, so that
the ledger, the queue, the ordering sequence, the lock, the rate limiter and the streams change
together or not at all, in one round trip. Every time that decides anything (due times, leases,
the in-flight guard, the rate limiter, pauses, ``enqueued_at``) is the Redis server's clock
(``TIME`` inside the scripts): hosts whose clocks disagree cannot disagree about a change.

=============  ==============================================================================
enqueue.lua    new change (or replay of a dead letter): ledger entry + field sequence + the
               account's queue
ready.lua      the schedule of accounts (keys.ready_key): a worker picks the first account that
               is due, by the server's clock; enqueues and retries notify it and wake idle workers
start.lua      claim the account's next due job and decide whether it may talk to iVvy now
               (backoff, in-flight guard, ordering, lock, rate limit: a job that could be sent is
               not touched while the rate limit has no free slot); a job that runs gets a new
               ``run`` (its fencing token) and is hidden for one lease; ``go`` records the
               recovery point ``phase=posting`` (or, for an add to reconcile first, post.lua does
               just before its POST)
lease.lua      the heartbeat: extends the lease of each attempt that is still its change's run
adopt.lua      an add of unknown outcome adopts a listed stage no other add has claimed
finish.lua     the run's end: ledger state + results event (+ dead letter) + the queue, exactly
               once, refused for a stale run
lost.lua       a due job whose ledger entry expired: a failed event and a dead letter, never
               silence
=============  ==============================================================================

Each script's KEYS, ARGV and reply are written at its top; every reply has a fixed shape and is
parsed here, and only here, into the types below (states and decisions: ``worker.core.states``). The
ledger's fields and the state machine are tabled in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT

from worker.core import keys, tracing
from worker.core.change import Envelope, LeadStageChange
from worker.core.errors import (
    EnqueueOutcomeUnknown,
    IdempotencyConflict,
    RedisNotReplicated,
    RedisUnavailable,
    StaleRun,
    redis_errors,
)
from worker.core.settings import Settings
from worker.core.states import RUNS, Decision, Outcome, Phase, State, WaitReason

EnqueueStatus = Literal["queued", "duplicate"]
#: Changes per enqueue.lua call when enqueuing in bulk (Redis runs each call in one go: ~10 ms).
ENQUEUE_CHUNK = 1000
#: A bulk check's staging hash expires this long after its last chunk (an interrupted producer's).
STAGING_TTL_MS = 3_600_000


def now_ms() -> int:
    """This host's clock, for what is only reported (event times, durations), never decided."""
    return int(time.time() * 1000)


def _script(client: aioredis.Redis, name: str) -> AsyncScript:
    return client.register_script(resources.files("worker.core").joinpath("lua", name).read_text())


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
    #: The job decided about ('' when the account had none to claim).
    job_id: str = ""
    #: When the account may next have a change to send (server ms; -1: its queue is empty).
    account_next_ms: int = -1

    @property
    def runs(self) -> bool:
        """Whether the job has work to do now (a task is started for it)."""
        return self.decision in RUNS


@dataclass(frozen=True, slots=True)
class Finished:
    """finish.lua's answer: whether this run's end was recorded, and when (server ms)."""

    recorded: bool
    finished_at_ms: int = 0
    #: Why not, when not: the terminal state found, ``missing`` or ``fenced`` (a newer run owns it).
    refused_because: str = ""
    #: False when fewer replicas than LEADSTAGE_REDIS_MIN_REPLICAS confirmed it in time.
    replicated: bool = True


def backlog_warning(receipts: Sequence[Receipt], settings: Settings) -> str | None:
    """One line for the newest receipt of each account whose backlog outlasts LEADSTAGE_MAX_AGE: its
    changes will fail as too old before they are sent (counted in ``ENQUEUED_PAST_MAX_AGE``)."""
    newest: dict[str, Receipt] = {}
    for receipt in receipts:
        if receipt.expected_wait_s > settings.max_age_s:
            newest[receipt.account] = receipt
    if not newest:
        return None
    return "; ".join(
        f"account {account!r} has {r.backlog} changes waiting, about {r.expected_wait_s:,.0f}s at its rate limit: "
        f"past LEADSTAGE_MAX_AGE ({settings.max_age_s:g}s), the newest will fail as too old"
        for account, r in sorted(newest.items())
    )


@dataclass(frozen=True, slots=True)
class Pick:
    """ready.lua's pick: the account to serve now, or how long until one is due."""

    account: str | None
    epoch: str = "0"
    #: Milliseconds until the first account is due (-1: none has work).
    wait_ms: int = -1


def _parse_start(reply: Sequence[bytes | int]) -> Start:
    """start.lua's 14-item reply (see the script's header)."""
    decision, wait_ms, reason, run, attempt, phase, dropped, source, enqueued_at, gen, change, state, job, after = reply
    text = [v.decode() if isinstance(v, bytes) else str(v) for v in (reason, phase, dropped, source, state, job)]
    return Start(
        decision=Decision(_text(decision)),
        wait_ms=int(wait_ms),
        reason=WaitReason(text[0]) if text[0] else None,
        run=int(run),
        attempt=int(attempt),
        previous_phase=Phase(text[1]),
        dropped=frozenset(f for f in text[2].split(",") if f),
        facts=(text[3], int(enqueued_at), int(gen)),
        change_json=change if isinstance(change, bytes) else b"",
        state=State(text[4]) if text[4] else None,
        job_id=text[5],
        account_next_ms=int(after),
    )


def _text(value: bytes | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Ledger:
    """The Redis side of every state change; one instance per process, over a shared client."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._enqueue = _script(client, "enqueue.lua")
        self._ready = _script(client, "ready.lua")
        queue = settings.queue_name
        self._ready_keys = [keys.ready_key(queue), keys.wake_key(queue), keys.epoch_key(queue)]
        self._start = _script(client, "start.lua")
        self._lease = _script(client, "lease.lua")
        self._post = _script(client, "post.lua")
        self._adopt = _script(client, "adopt.lua")
        self._finish = _script(client, "finish.lua")
        self._lost = _script(client, "lost.lua")

    # -- producers -----------------------------------------------------------------------------

    async def enqueue_many(
        self,
        items: Sequence[tuple[LeadStageChange, Envelope]],
        *,
        labels: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Receipt]:
        """Enqueue changes, all or nothing for the whole call; ``duplicate`` for a known key and change.

        A key already used for a different change, or given twice in ``items`` with different
        changes, raises ``IdempotencyConflict`` before anything is written: a batch of more than
        one chunk is checked whole first (``BulkCheck``), then written ``ENQUEUE_CHUNK`` changes
        per script call. Only a concurrent producer writing a conflicting change between the
        check and the write can make a later chunk fail after earlier ones were written; the
        error then says how many were enqueued. ``progress`` is called with the size of each
        chunk once it is enqueued (a bulk producer's progress bar). ``labels`` name each item in
        the caller's terms (``changes[3]``), for the errors. With ``LEADSTAGE_REDIS_MIN_REPLICAS``
        set, each chunk is confirmed by that many replicas, or ``RedisNotReplicated`` says that
        its fate is unknown (retry with the same keys).
        """
        names = [""] * len(items) if labels is None else labels
        starts = range(0, len(items), ENQUEUE_CHUNK)

        def chunk(start: int) -> Chunk:
            return self.chunk(items[start : start + ENQUEUE_CHUNK], names[start : start + ENQUEUE_CHUNK])

        if len(starts) > 1:
            async with self.bulk_check() as check:
                for start in starts:
                    next_chunk = chunk(start)  # encoded while Redis checks the one before
                    if check.busy:
                        await check.receive()
                    await check.send(next_chunk)
                await check.receive()
        receipts: list[Receipt] = []
        async with self.bulk_write() as write:
            for start in starts:
                next_chunk = chunk(start)
                if write.busy:
                    receipts.extend(done := await write.receive())
                    if progress is not None:
                        progress(len(done))
                await write.send(next_chunk)
            receipts.extend(done := await write.receive())
            if progress is not None:
                progress(len(done))
        past = [receipt.account for receipt in receipts if receipt.expected_wait_s > self.settings.max_age_s]
        if past:
            from worker.core import metrics  # only here: a producer process (the CLI) need not load prometheus-client

            for account in past:
                metrics.ENQUEUED_PAST_MAX_AGE.labels(account).inc()
        return receipts

    def expected_wait_s(self, account: str, backlog: int) -> float:
        """How long the account's rate limit needs to send ``backlog`` changes."""
        return backlog / self.settings.rate_limit_for(account)

    def chunk(self, items: Sequence[tuple[LeadStageChange, Envelope]], labels: Sequence[str]) -> Chunk:
        """Up to ``ENQUEUE_CHUNK`` changes encoded for enqueue.lua, with their labels."""
        return Chunk(_encode(items, self.settings.queue_name), labels)

    def bulk_check(self) -> BulkCheck:
        """A check of a bulk enqueue, chunk by chunk, before its first write (``async with``)."""
        return BulkCheck(self, keys.STAGING_PREFIX + secrets.token_hex(8))

    def bulk_write(self) -> BulkWrite:
        """The writes of a bulk enqueue, chunk by chunk, after its check (``async with``)."""
        return BulkWrite(self)

    def _enqueue_arguments(
        self,
        mode: Literal["enqueue", "check", "replay"],
        changes: bytes,
        *,
        replay_of: tuple[str, str] = ("", ""),
        staging: tuple[str, bytes] | None = None,
    ) -> tuple[list[str], list[bytes | str | int]]:
        """enqueue.lua's keys and arguments; ``staging`` (check only): the staging hash and the
        changes' labels as a JSON array."""
        settings = self.settings
        script_keys = [settings.dlq_stream, keys.PENDING]
        args: list[bytes | str | int] = [mode, settings.ledger_retention_s * 1000, *replay_of, changes]
        if staging is not None:
            script_keys.append(staging[0])
            args += [staging[1], STAGING_TTL_MS]
        return script_keys, args

    async def _call_enqueue(
        self,
        mode: Literal["enqueue", "check", "replay"],
        changes: bytes,
        *,
        replay_of: tuple[str, str] = ("", ""),
        accounts: Sequence[str] = (),
    ) -> tuple[list[list[bytes]], dict[str, int]]:
        """enqueue.lua over changes encoded by ``_encode``: one answer per change, and the backlog of
        each account written to; the schedule is told about ``accounts`` in the same round trip."""
        script_keys, args = self._enqueue_arguments(mode, changes, replay_of=replay_of)
        reply, acked = await self._call(self._enqueue, script_keys, args, confirm=mode != "check", notify=accounts)
        answers, backlog = _enqueue_reply(reply)
        if mode != "check" and not any(answer[0] in (b"conflict", b"not_failed") for answer in answers):
            self._require_replicas(acked, "the enqueued changes")
        return answers, backlog

    async def replay(
        self, change: LeadStageChange, envelope: Envelope, *, dlq_entry_id: str, generation: str
    ) -> tuple[str, int]:
        """Put a dead-lettered change back on the queue under its key; returns (status, generation)."""
        [answer], _ = await self._call_enqueue(
            "replay",
            _encode([(change, envelope)], self.settings.queue_name),
            replay_of=(dlq_entry_id, generation),
            accounts=[envelope.account],
        )
        status = answer[0].decode()
        return status, int(answer[1]) if status == "queued" else 0

    async def _call(
        self,
        script: AsyncScript,
        keys_: Sequence[str],
        args: Sequence[EncodableT],
        *,
        confirm: bool,
        notify: Sequence[str] = (),
    ) -> tuple[Any, int | None]:
        """Run a script; with ``LEADSTAGE_REDIS_MIN_REPLICAS`` and ``confirm``, followed by ``WAIT`` on
        the same connection (WAIT counts the replicas that have this connection's writes), and then
        by the schedule's notice for the accounts in ``notify``, in one round trip. Returns the
        script's reply and how many replicas confirmed (None: not asked)."""
        settings = self.settings
        wait = confirm and settings.redis_min_replicas > 0
        with redis_errors():
            if not wait and not notify:
                return await script(keys=keys_, args=args), None
            for _ in range(2):
                # EVALSHA by hand: a pipeline of Script objects asks SCRIPT EXISTS first, a round trip more.
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.evalsha(script.sha, len(keys_), *keys_, *args)  # type: ignore[arg-type]  # redis-py types ARGV as str only
                    if wait:
                        pipe.execute_command(
                            "WAIT", settings.redis_min_replicas, int(settings.redis_replica_timeout_s * 1000)
                        )
                    if notify:
                        pipe.evalsha(self._ready.sha, 3, *self._ready_keys, "notify", "", *sorted(set(notify)))
                    replies = await pipe.execute(raise_on_error=False)
                missing = [r for r in replies if isinstance(r, NoScriptError)]
                if not missing:
                    break
                # A Redis that restarted or flushed its scripts: load them, then once more.
                await self.client.script_load(script.script)
                await self.client.script_load(self._ready.script)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies[0], int(replies[1]) if wait else None

    def _require_replicas(self, acked: int | None, what: str) -> None:
        """``RedisNotReplicated`` when fewer replicas than required confirmed ``what``."""
        settings = self.settings
        if acked is not None and acked < settings.redis_min_replicas:
            raise RedisNotReplicated(what, acked, settings.redis_min_replicas, settings.redis_replica_timeout_s)

    # -- the worker ----------------------------------------------------------------------------

    async def notify(self, accounts: Iterable[str], at_ms: int | None = None) -> None:
        """Tell the schedule that these accounts have work from ``at_ms`` (server ms; None: now), and
        wake an idle worker when that is sooner than anything scheduled (ready.lua)."""
        names = sorted(set(accounts))
        if not names:
            return
        with redis_errors():
            await self._ready(keys=self._ready_keys, args=["notify", "" if at_ms is None else at_ms, *names])

    async def pick(self) -> Pick:
        """The first account due now by the server's clock, hidden from other workers for one lease
        until ``reschedule`` says when it is due next (ready.lua)."""
        with redis_errors():
            account, epoch, wait_ms = await self._ready(keys=self._ready_keys, args=["pick", self.lease_ms])
        return Pick(account.decode() or None, _text(epoch), int(wait_ms))

    async def reschedule(self, account: str, epoch: str, next_ms: int, *, wake: bool) -> None:
        """After a claim: when the account may next have work (-1: none); ``wake`` an idle worker
        for it when the caller will not come back for it itself."""
        with redis_errors():
            await self._ready(keys=self._ready_keys, args=["set", account, epoch, next_ms, "1" if wake else ""])

    async def wait_for_work(self, timeout_s: float) -> None:
        """Block until a notice wakes this worker or ``timeout_s`` passes (BLPOP on the wake list)."""
        with redis_errors():
            # BLPOP takes fractions of a second since Redis 6 (redis-py's stubs say int).
            await self.client.execute_command(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                "BLPOP", keys.wake_key(self.settings.queue_name), f"{max(timeout_s, 0.001):.3f}"
            )

    async def resync(self, accounts: Iterable[str]) -> None:
        """Put every account with a queued change back on the schedule (at start-up, and now and
        then): a producer that died between its enqueue and its notice leaves no change stranded."""
        queue = self.settings.queue_name
        names = sorted(set(accounts))
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for account in names:
                    pipe.zrange(keys.queue_key(queue, account), 0, 0, withscores=True)
                heads = await pipe.execute()
        for account, head in zip(names, heads, strict=True):
            if head:
                await self.notify([account], int(head[0][1]))

    async def claim(self, account: str, worker_id: str, rate_limit: float, jitter_ms: int) -> Start:
        """Claim the account's next due job that has work to do now (start.lua); ``idle`` when none
        has, the rate limit allowing (then nothing was touched)."""
        return await self._start_call(account, "", worker_id, rate_limit, jitter_ms)

    async def start(self, job_id: str, worker_id: str, rate_limit: float, jitter_ms: int) -> Start:
        """Claim this due job and decide what it may do now (start.lua); a job that must wait is
        rescheduled in its queue."""
        return await self._start_call(keys.split_job_id(job_id)[0], job_id, worker_id, rate_limit, jitter_ms)

    async def _start_call(self, account: str, job_id: str, worker_id: str, rate_limit: float, jitter_ms: int) -> Start:
        settings = self.settings
        reply, acked = await self._call(
                self._start,
                [keys.queue_key(settings.queue_name, account), keys.rate_key(account), keys.newest_claim_key(account)],
                [
                    job_id, self.lease_ms, settings.max_attempts, int(settings.max_age_s * 1000),
                    max(1, round(1_000_000 / rate_limit)), self.lock_ms, self.in_flight_guard_ms, worker_id,
                    keys.ledger_prefix(account), jitter_ms, settings.ledger_retention_s * 1000,
                ],
                confirm=True,
            )  # fmt: skip
        start = _parse_start(reply)
        if acked is not None and acked < settings.redis_min_replicas:
            start = dataclasses.replace(start, replicated=False)
        return start

    async def mark_posting(self, job_id: str, run: int) -> bool:
        """The recovery point just before a POST that follows a reconcile (post.lua); False when
        another run owns the change now (this one must not post)."""
        account = keys.split_job_id(job_id)[0]
        (status, _), acked = await self._call(
            self._post, [keys.ledger_key(job_id), keys.newest_claim_key(account)], [run], confirm=True
        )
        if status != b"ok":
            return False
        self._require_replicas(acked, "the recovery point before the POST")
        return True

    def queue_of(self, job_id: str) -> str:
        """The queue of the job's account."""
        return keys.queue_key(self.settings.queue_name, keys.split_job_id(job_id)[0])

    @property
    def lease_ms(self) -> int:
        """How long a started job stays hidden from other workers without a heartbeat."""
        return int(self.settings.lease_s * 1000)

    @property
    def in_flight_guard_ms(self) -> int:
        """How long after its recovery point a POST may still be in flight (a crashed worker's): the
        request timeout, and a second for the round trip that wrote the recovery point."""
        return int(self.settings.request_timeout_s * 1000) + 1000

    @property
    def late_commit_ms(self) -> int:
        """How long after an unknown outcome iVvy may still apply the request: the stage stays locked
        for that long whatever becomes of the change."""
        return int(self.settings.request_timeout_s * 1000)

    @property
    def lock_ms(self) -> int:
        """Long enough for a reconciling list and a POST, each up to the request timeout."""
        return int(self.settings.request_timeout_s * 2000) + 5000

    async def extend_leases(self, runs: Mapping[str, int], worker_id: str) -> set[str]:
        """The heartbeat (lease.lua): keep running attempts hidden for another lease and say that the
        worker is alive; returns the jobs extended (the others are no longer this worker's run)."""
        jobs = list(runs)
        with redis_errors():
            extended: list[int] = await self._lease(
                keys=[
                    keys.WORKERS,
                    *(k for job in jobs for k in (self.queue_of(job), keys.ledger_key(job))),
                ],
                args=[self.lease_ms, worker_id, len(jobs), *(v for job in jobs for v in (job, runs[job]))],
            )
        return {job for job, ok in zip(jobs, extended, strict=True) if ok}

    async def adopt(self, account: str, job_id: str, run: int, candidates: Sequence[int]) -> int | None:
        """Claim the first candidate stage no other add has claimed (adopt.lua); None when there is
        none. ``StaleRun`` when another run owns the change now."""
        if not candidates:
            return None
        with redis_errors():
            status, stage_id = await self._adopt(
                keys=[keys.claims_key(account), keys.ledger_key(job_id), keys.newest_claim_key(account)],
                args=[job_id, run, *candidates],
            )
        if status == b"stale":
            raise StaleRun(job_id, run)
        return int(stage_id) if status == b"adopted" else None

    async def finish(
        self,
        job_id: str,
        run: int,
        change: LeadStageChange,
        *,
        event: Mapping[str, str],
        history: Mapping[str, object],
        delay_ms: int = 0,
        outcome_unknown: bool = False,
        pause_ms: int | None = None,
        created_stage_id: int | None = None,
    ) -> Finished:
        """Record a run's end and publish ``event`` (finish.lua); not recorded when the ledger was
        already terminal or gone, or another run owns the change."""
        settings = self.settings
        account = keys.split_job_id(job_id)[0]
        outcome = Outcome(event["event"])
        fields: list[str] = [item for pair in event.items() for item in pair]
        (status, detail), acked = await self._call(
                self._finish,
                [
                    keys.ledger_key(job_id), settings.results_stream, settings.dlq_stream,
                    keys.stage_lock_key(account, keys.lock_subject(change.id, change.name)),
                    keys.claims_key(account), keys.rate_key(account), keys.queue_key(settings.queue_name, account),
                    keys.newest_claim_key(account), keys.PENDING,
                ],
                args=[
                    job_id, run, outcome, settings.ledger_retention_s * 1000, settings.results_maxlen, delay_ms,
                    Phase.UNKNOWN if outcome_unknown else Phase.NONE, self.late_commit_ms,
                    "" if pause_ms is None else pause_ms, "" if created_stage_id is None else created_stage_id,
                    event.get("stage_id", ""), orjson.dumps(history), account, *fields,
                ],
                confirm=outcome is not Outcome.RETRYING,
            )  # fmt: skip
        if status != b"ok":
            return Finished(False, refused_because=detail.decode())
        if outcome is Outcome.RETRYING:
            await self.notify([account], int(detail) + delay_ms)
        return Finished(True, int(detail), replicated=acked is None or acked >= settings.redis_min_replicas)

    async def report_missing(self, job_id: str, event: Mapping[str, str]) -> None:
        """A due job whose ledger entry is gone: its failed event and a dead letter (lost.lua)."""
        settings = self.settings
        fields = [item for pair in event.items() for item in pair]
        with redis_errors():
            await self._lost(
                keys=[settings.results_stream, settings.dlq_stream, keys.PENDING],
                args=[keys.split_job_id(job_id)[0], settings.results_maxlen, *fields],
            )

    async def id_floor(self, job_id: str) -> int:
        """The highest stage id claimed before this add was first posted (see keys.newest_claim_key)."""
        with redis_errors():
            raw = await self.client.hget(keys.ledger_key(job_id), "id_floor")  # type: ignore[misc]  # redis-py's async stubs
        return int(raw or 0)

    # -- readers -------------------------------------------------------------------------------

    async def entry(self, job_id: str) -> dict[str, str] | None:
        """The ledger entry of one change, decoded, or None when unknown or expired."""
        with redis_errors():
            raw = await self.client.hgetall(keys.ledger_key(job_id))  # type: ignore[misc]  # redis-py's async stubs
        return {k.decode(): v.decode() for k, v in raw.items()} if raw else None


@dataclass(frozen=True, slots=True)
class Chunk:
    """Up to ``ENQUEUE_CHUNK`` validated changes as enqueue.lua takes them, each with a label: its
    place in the bulk in the caller's terms (``changes[3]``, ``line 4``; no newline), for errors."""

    changes: bytes
    labels: Sequence[str]

    def envelopes(self) -> list[tuple[str, str]]:
        """(account, idempotency key) of each change."""
        return [(change[5], change[6]) for change in orjson.loads(self.changes)]


class _Pipe:
    """enqueue.lua calls on one connection of their own, pipelined: a request is sent at once and
    its answer read later, so Redis runs one chunk while the producer prepares the next. At most
    one request is outstanding, so the chunks run in the order they were sent. A write is followed
    by ``WAIT`` on the same connection when LEADSTAGE_REDIS_MIN_REPLICAS asks for it (WAIT counts
    the replicas that have this connection's writes), in the same round trip."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._connection: Connection | None = None
        self._request: tuple[Any, ...] | None = None  # sent, its answer not read yet
        self._confirm = False  # a WAIT follows the request
        self._notify: list[str] = []  # then the schedule's notice for these accounts

    async def open(self) -> None:
        """Connect: a failure here has sent nothing."""
        with redis_errors():
            self._connection = await self.ledger.client.connection_pool.get_connection()

    async def close(self) -> None:
        if self._connection is None:
            return
        connection, self._connection = self._connection, None
        if self._request is not None:  # an answer nobody will read: the connection cannot be used again
            with contextlib.suppress(RedisUnavailable), redis_errors():
                await connection.disconnect()
        await self.ledger.client.connection_pool.release(connection)

    @property
    def busy(self) -> bool:
        return self._request is not None

    async def send(self, mode: Literal["enqueue", "check"], changes: bytes, staging: tuple[str, bytes] | None) -> None:
        assert self._connection is not None, "open() first"
        assert self._request is None, "one request at a time"
        script_keys, args = self.ledger._enqueue_arguments(mode, changes, staging=staging)
        self._request = (len(script_keys), *script_keys, *args)
        self._confirm = mode == "enqueue" and self.ledger.settings.redis_min_replicas > 0
        # The schedule hears of the accounts written to in the same round trip (idle workers wake).
        self._notify = sorted({account for account, _ in Chunk(changes, ()).envelopes()}) if mode == "enqueue" else []
        with redis_errors():
            await self._send_request()

    async def _send_request(self) -> None:
        """The script call, its WAIT and the schedule's notice: one write on the connection."""
        assert self._connection is not None
        assert self._request is not None
        ledger = self.ledger
        commands: list[tuple[EncodableT, ...]] = [("EVALSHA", ledger._enqueue.sha, *self._request)]
        if self._confirm:
            settings = ledger.settings
            commands.append(("WAIT", settings.redis_min_replicas, int(settings.redis_replica_timeout_s * 1000)))
        if self._notify:
            commands.append(("EVALSHA", ledger._ready.sha, 3, *ledger._ready_keys, "notify", "", *self._notify))
        await self._connection.send_packed_command(self._connection.pack_commands(commands))

    async def _replies(self) -> list[Any]:
        """The replies to the commands of one request (an error reply as its exception), in order."""
        assert self._connection is not None
        replies: list[Any] = []
        for _ in range(1 + self._confirm + bool(self._notify)):
            try:
                replies.append(await self._connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def receive(self) -> tuple[list[list[bytes]], dict[str, int], int | None]:
        """The answers of the request sent, the backlog of each account it wrote to, and how many
        replicas confirmed it (None: not asked)."""
        assert self._connection is not None, "open() first"
        assert self._request is not None, "send() first"
        connection, ledger = self._connection, self.ledger
        with redis_errors():
            replies = await self._replies()
            if any(isinstance(r, NoScriptError) for r in replies):  # none ran: load them, send again
                for script in (ledger._enqueue, ledger._ready):
                    await connection.send_command("SCRIPT", "LOAD", script.script)
                    script.sha = (await connection.read_response()).decode()
                await self._send_request()
                replies = await self._replies()
            for error in replies:
                if isinstance(error, Exception):
                    raise error
        reply = replies[0]
        acked = int(replies[1]) if self._confirm else None
        self._request = None
        answers, backlog = _enqueue_reply(reply)
        return answers, backlog, acked


class BulkCheck:
    """Checks a bulk enqueue chunk by chunk before its first write: every key against the ledger
    and against the keys checked before it (a staging hash in Redis, so the producer's memory
    stays bounded by a chunk). Nothing is enqueued; the staging hash is removed at the end.

    ``send(chunk)``, then ``receive()`` (which raises ``IdempotencyConflict`` for the first key of
    the chunk that cannot be enqueued); between the two, prepare the next chunk.
    """

    def __init__(self, ledger: Ledger, staging_key: str) -> None:
        self.ledger = ledger
        self.staging_key = staging_key
        self._pipe = _Pipe(ledger)
        self._chunk: Chunk | None = None

    async def __aenter__(self) -> BulkCheck:
        await self._pipe.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pipe.close()
        with contextlib.suppress(RedisUnavailable), redis_errors():
            await self.ledger.client.unlink(self.staging_key)  # or it expires after STAGING_TTL_MS

    @property
    def busy(self) -> bool:
        """Whether a chunk was sent and its answer is not received yet."""
        return self._pipe.busy

    async def send(self, chunk: Chunk) -> None:
        self._chunk = chunk
        await self._pipe.send("check", chunk.changes, (self.staging_key, orjson.dumps(list(chunk.labels))))

    async def receive(self) -> None:
        assert self._chunk is not None
        answers, _, _ = await self._pipe.receive()
        for index, answer in enumerate(answers):
            if answer[0] in (b"conflict", b"twice"):
                account, key = self._chunk.envelopes()[index]
                earlier = answer[1].decode() if answer[0] == b"twice" else None
                raise IdempotencyConflict(account, key, label=self._chunk.labels[index], earlier_label=earlier)


class BulkWrite:
    """Writes checked chunks, each one atomically, pipelined like ``BulkCheck``: ``send(chunk)``,
    then ``receive()`` its receipts.

    A conflict (only possible when another producer wrote the key after the check) raises
    ``IdempotencyConflict``, with nothing of the chunk written; no answer raises
    ``EnqueueOutcomeUnknown`` naming the chunk's changes as unknown. Either way the error counts
    the changes written before (``enqueued``).
    """

    def __init__(self, ledger: Ledger) -> None:
        self._pipe = _Pipe(ledger)
        self._chunk: Chunk | None = None
        self.enqueued = 0

    async def __aenter__(self) -> BulkWrite:
        await self._pipe.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pipe.close()

    @property
    def busy(self) -> bool:
        return self._pipe.busy

    async def send(self, chunk: Chunk) -> None:
        self._chunk = chunk
        try:
            await self._pipe.send("enqueue", chunk.changes, None)
        except RedisUnavailable as exc:
            raise EnqueueOutcomeUnknown(str(exc), enqueued=self.enqueued, unknown=chunk.envelopes()) from exc

    async def receive(self) -> list[Receipt]:
        assert self._chunk is not None
        envelopes = self._chunk.envelopes()
        try:
            answers, backlog, acked = await self._pipe.receive()
        except RedisUnavailable as exc:
            raise EnqueueOutcomeUnknown(str(exc), enqueued=self.enqueued, unknown=envelopes) from exc
        for (account, key), label, answer in zip(envelopes, self._chunk.labels, answers, strict=True):
            if answer[0] == b"conflict":
                raise IdempotencyConflict(account, key, label=label, enqueued_before=self.enqueued)
        ledger = self._pipe.ledger
        ledger._require_replicas(acked, "the enqueued changes")
        self.enqueued += len(answers)
        # The backlog a queued change joins: the account's count after the chunk, less the changes
        # of the chunk queued behind it.
        behind = Counter(
            account for (account, _), answer in zip(envelopes, answers, strict=True) if answer[0] == b"queued"
        )
        receipts = []
        for (account, key), answer in zip(envelopes, answers, strict=True):
            job = keys.job_id(account, key)
            if answer[0] != b"queued":
                receipts.append(Receipt(job, key, account, "duplicate"))
                continue
            position = backlog.get(account, 0) - behind[account] + 1
            behind[account] -= 1
            receipts.append(Receipt(job, key, account, "queued", position, ledger.expected_wait_s(account, position)))
        return receipts


def _enqueue_reply(reply: list[Any]) -> tuple[list[list[bytes]], dict[str, int]]:
    """enqueue.lua's reply: the answers, and account -> backlog for the accounts written to."""
    answers, backlog = reply
    pairs = iter(backlog)
    return answers, {account.decode(): int(count) for account, count in zip(pairs, pairs, strict=True)}


def _encode(items: Sequence[tuple[LeadStageChange, Envelope]], queue_name: str) -> bytes:
    """The changes as enqueue.lua takes them: one JSON array, one entry per change, with the names of
    its keys (worker.core.keys)."""
    trace = tracing.current_traceparent()  # the producer's span, stored with each change
    return orjson.dumps(
        [
            [
                (job := keys.job_id(envelope.account, envelope.idempotency_key)),
                change.canonical_json().decode(),
                change.operation,
                "" if change.id is None else str(change.id),
                ",".join(change.changed_fields()),
                envelope.account,
                envelope.idempotency_key,
                envelope.source,
                keys.ledger_key(job),
                "" if change.id is None else keys.stage_key(envelope.account, change.id),
                keys.stage_lock_key(envelope.account, keys.lock_subject(change.id, change.name)),
                keys.queue_key(queue_name, envelope.account),
                trace,
            ]
            for change, envelope in items
        ]
    )
