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
start.lua      claim the account's next due jobs (as many as the worker has free slots) and decide
               for each whether it may talk to iVvy now (backoff, in-flight guard, ordering, lock,
               rate limit: a job that could be sent is not touched while the rate limit has no
               slot that opens within the lead, and one that goes is told when its slot opens);
               a job that runs gets a new ``run`` (its fencing token) and is hidden
               for one lease; ``go`` records the recovery point ``phase=posting`` (or, for an add
               to reconcile first, post.lua does just before its POST)
lease.lua      the heartbeat: extends the lease of each attempt that is still its change's run
adopt.lua      an add of unknown outcome adopts a listed stage no other add has claimed
finish.lua     runs' ends, those of one account that end together in one call: ledger state +
               results event (+ dead letter) + the queue, exactly once, refused for a stale run
lost.lua       a due job whose ledger entry expired: a failed event and a dead letter, never
               silence
ack.lua        on a Redis Cluster, where finish and lost write events into the account's outbox:
               the outbox entries published (``worker.core.outbox``) leave it, ``event_id`` set
=============  ==============================================================================

Each script's KEYS, ARGV and reply are written at its top; every reply has a fixed shape and is
parsed in ``worker.core.replies``, and only there, into typed results. The scripts are loaded and
called by ``worker.core.scripts``; the producers' side (enqueue, replay) is ``worker.core.enqueue``
and ``worker.core.bulk``; this module is the worker's side, with ``worker.core.endings`` (how runs
end: finish.lua, lost.lua, the outboxes). The ledger's fields and the state
machine are tabled in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence

from worker.core import keys
from worker.core.bulk import ENQUEUE_CHUNK, BulkCheck, BulkWrite, Chunk, backlog_warning
from worker.core.endings import Endings
from worker.core.errors import StaleRun, redis_errors
from worker.core.replies import (
    Claim,
    Finished,
    Pick,
    Receipt,
    Start,
    parse_adopt,
    parse_claim,
    parse_pick,
    parse_post,
)
from worker.core.scripts import RATE_WINDOW_US, now_ms, rate_interval_us

__all__ = [
    "ENQUEUE_CHUNK",
    "BulkCheck",
    "BulkWrite",
    "Chunk",
    "Claim",
    "Finished",
    "Ledger",
    "Pick",
    "Receipt",
    "Start",
    "backlog_warning",
    "now_ms",
]


class Ledger(Endings):
    """The Redis side of every state change; one instance per process, over a shared client. How
    runs end (finish.lua, lost.lua, the outboxes) is ``worker.core.endings``'."""

    async def pick(self) -> Pick:
        """The first account due now by the server's clock, hidden from other workers for one lease
        until ``reschedule`` says when it is due next (ready.lua)."""
        with redis_errors():
            return parse_pick(await self._ready(keys=self._ready_keys, args=["pick", self.lease_ms]))

    async def reschedule(self, account: str, epoch: str, next_ms: int, *, wake: bool) -> None:
        """After a claim: when the account may next have work (-1: none); ``wake`` an idle worker
        for it when the caller will not come back for it itself."""
        with redis_errors():
            await self._ready(keys=self._ready_keys, args=["set", account, epoch, next_ms, "1" if wake else "", ""])

    async def reschedule_and_pick(self, account: str, epoch: str, next_ms: int) -> Pick:
        """``reschedule``, then ``pick`` in the same call (a worker that goes on serving)."""
        with redis_errors():
            reply = await self._ready(keys=self._ready_keys, args=["set", account, epoch, next_ms, "", self.lease_ms])
        return parse_pick(reply)

    async def wait_for_work(self, timeout_s: float) -> bool:
        """Block until a notice wakes this worker or ``timeout_s`` passes (BLPOP on the wake list);
        whether a notice woke it."""
        with redis_errors():
            # BLPOP takes fractions of a second since Redis 6 (redis-py's stubs say int).
            woken = await self.client.execute_command(
                "BLPOP", keys.wake_key(self.settings.queue_name), f"{max(timeout_s, 0.001):.3f}"
            )
        return woken is not None

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

    async def claim(self, account: str, worker_id: str, rate_limit: float, jitter_ms: int, slots: int) -> Claim:
        """Claim up to ``slots`` of the account's due jobs that have work to do now (start.lua), and
        the decisions about the others it touched; none when the rate limit has no slot that opens
        within ``LEADSTAGE_RATE_LEAD`` (then nothing was touched)."""
        return await self._start_call(account, "", worker_id, rate_limit, jitter_ms, slots)

    async def start(self, job_id: str, worker_id: str, rate_limit: float, jitter_ms: int) -> Start:
        """Claim this due job and decide what it may do now (start.lua); a job that must wait is
        rescheduled in its queue."""
        account = keys.split_job_id(job_id)[0]
        [start] = (await self._start_call(account, job_id, worker_id, rate_limit, jitter_ms, 1)).starts
        return start

    async def _start_call(
        self, account: str, job_id: str, worker_id: str, rate_limit: float, jitter_ms: int, slots: int
    ) -> Claim:
        settings = self.settings
        reply, acked = await self._call(
            self._start,
            [keys.queue_key(settings.queue_name, account), keys.rate_key(account), keys.newest_claim_key(account)],
            [
                job_id,
                self.lease_ms,
                settings.max_attempts,
                int(settings.max_age_s * 1000),
                rate_interval_us(rate_limit),
                self.lock_ms,
                self.in_flight_guard_ms,
                worker_id,
                keys.ledger_prefix(account),
                jitter_ms,
                slots,
                RATE_WINDOW_US,
                int(settings.batch_wait_s * 1000),
                int(settings.rate_lead_s * 1_000_000),
            ],
            confirm=True,
        )
        return parse_claim(reply, replicated=acked is None or acked >= settings.redis_min_replicas)

    async def mark_posting(self, job_id: str, run: int) -> bool:
        """The recovery point just before a POST that follows a reconcile (post.lua); False when
        another run owns the change now (this one must not post)."""
        account = keys.split_job_id(job_id)[0]
        reply, acked = await self._call(
            self._post, [keys.ledger_key(job_id), keys.newest_claim_key(account)], [run], confirm=True
        )
        if not parse_post(reply):
            return False
        self._require_replicas(acked, "the recovery point before the POST")
        return True

    async def extend_leases(self, runs: Mapping[str, int], worker_id: str) -> set[str]:
        """The heartbeat (lease.lua): keep running attempts hidden for another lease and say that the
        worker is alive; returns the jobs extended (the others are no longer this worker's run). On a
        Redis Cluster: one call per account (its slot) and one for the workers hash, sent together."""
        groups: dict[str, list[str]] = {"": list(runs)} if not self.cluster else {}
        for job in runs if self.cluster else ():
            groups.setdefault(keys.split_job_id(job)[0], []).append(job)
        calls = [self._lease(keys=[keys.WORKERS], args=[self.lease_ms, worker_id, len(runs)])] if self.cluster else []
        for its in groups.values():
            calls.append(
                self._lease(
                    keys=[
                        self.queue_of(its[0]) if self.cluster else keys.WORKERS,
                        *(k for job in its for k in (self.queue_of(job), keys.ledger_key(job))),
                    ],
                    args=[
                        self.lease_ms,
                        worker_id,
                        "" if self.cluster else len(runs),
                        *(v for j in its for v in (j, runs[j])),
                    ],
                )
            )
        with redis_errors():
            replies = await asyncio.gather(*calls)
        extended = zip(groups.values(), replies[1:] if self.cluster else replies, strict=True)
        return {job for its, reply in extended for job, ok in zip(its, reply, strict=True) if ok}

    async def adopt(self, account: str, job_id: str, run: int, candidates: Sequence[int]) -> int | None:
        """Claim the first candidate stage no other add has claimed (adopt.lua); None when there is
        none. ``StaleRun`` when another run owns the change now."""
        if not candidates:
            return None
        with redis_errors():
            status, stage_id = parse_adopt(
                await self._adopt(
                    keys=[keys.claims_key(account), keys.ledger_key(job_id), keys.newest_claim_key(account)],
                    args=[job_id, run, *candidates],
                )
            )
        if status == "stale":
            raise StaleRun(job_id, run)
        return stage_id

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
