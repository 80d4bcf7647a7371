"""The idempotency ledger: where every change stands, in Redis, kept for the retention period.

One hash per change (``keys.ledger_key``) is the job's record and the source of truth; the queue
holds only job ids, scored by when each may run next. Each transition is one Lua script, so that
the ledger, the queue, the ordering sequence, the lock, the rate limiter and the streams change
together or not at all, in one round trip:

=============  ==============================================================================
enqueue.lua    new change (or replay of a dead letter): ledger entry + field sequence + queue
start.lua      claim a due job and decide whether it may talk to iVvy now (backoff, in-flight
               guard, ordering, lock, rate limit); records the recovery point
               ``phase=posting`` and hides the job for one lease while it runs
adopt.lua      an add of unknown outcome adopts a listed stage no other add has claimed
finish.lua     the attempt's end: ledger state + results event (+ dead letter) + the queue,
               exactly once
=============  ==============================================================================

Ledger states: queued -> running -> (retrying -> running)* -> succeeded | failed | superseded.
``phase`` is ``posting`` while a POST may be in flight and ``unknown`` after an attempt whose
outcome nobody knows (timeout, dropped connection, crash); an add in either phase is reconciled
with getLeadStageList before it is posted again.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from worker import keys
from worker.change import Envelope, LeadStageChange
from worker.errors import EnqueueOutcomeUnknown, IdempotencyConflict, RedisUnavailable, redis_errors
from worker.settings import Settings

EnqueueStatus = Literal["queued", "duplicate"]
#: Changes per enqueue.lua call when enqueuing in bulk (Redis runs each call in one go: ~10 ms).
ENQUEUE_CHUNK = 1000
#: A bulk check's staging hash expires this long after its last chunk (an interrupted producer's).
STAGING_TTL_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


def _script(client: aioredis.Redis, name: str) -> AsyncScript:
    return client.register_script(resources.files("worker").joinpath("lua", name).read_text())


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a producer gets back for one change."""

    job_id: str
    idempotency_key: str
    account: str
    status: EnqueueStatus

    def as_dict(self) -> dict[str, str]:
        return {"job_id": self.job_id, "idempotency_key": self.idempotency_key, "status": self.status}


@dataclass(frozen=True, slots=True)
class Start:
    """start.lua's decision about one job."""

    decision: Literal["skip", "missing", "done", "wait", "superseded", "exhausted", "go"]
    wait_ms: int = 0
    reason: str = ""
    attempt: int = 0
    previous_phase: str = ""
    dropped: frozenset[str] = field(default_factory=frozenset)
    #: (source, enqueued at in ms, generation) of the change, for its events.
    facts: tuple[str, int, int] = ("", 0, 0)
    #: The change's canonical JSON, from its ledger entry.
    change_json: bytes = b""

    @property
    def runs(self) -> bool:
        """Whether the job has work to do now (a task is started for it)."""
        return self.decision in ("superseded", "exhausted", "go")


class Ledger:
    """The Redis side of every state change; one instance per process, over a shared client."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._enqueue = _script(client, "enqueue.lua")
        self._start = _script(client, "start.lua")
        self._adopt = _script(client, "adopt.lua")
        self._finish = _script(client, "finish.lua")

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
        the caller's terms (``changes[3]``), for the errors.
        """
        names = [""] * len(items) if labels is None else labels
        starts = range(0, len(items), ENQUEUE_CHUNK)

        def chunk(start: int) -> Chunk:
            return Chunk.of(items[start : start + ENQUEUE_CHUNK], names[start : start + ENQUEUE_CHUNK])

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
        return receipts

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
        script_keys = [settings.queue_name, settings.dlq_stream]
        args: list[bytes | str | int] = [
            mode,
            now_ms(),
            settings.ledger_retention_s * 1000,
            *replay_of,
            keys.LEDGER_PREFIX,
            keys.STAGE_PREFIX,
            changes,
        ]
        if staging is not None:
            script_keys.append(staging[0])
            args += [staging[1], STAGING_TTL_MS]
        return script_keys, args

    async def _call_enqueue(
        self, mode: Literal["enqueue", "check", "replay"], changes: bytes, *, replay_of: tuple[str, str] = ("", "")
    ) -> list[list[bytes]]:
        """enqueue.lua over changes encoded by ``_encode``; one answer per change."""
        script_keys, args = self._enqueue_arguments(mode, changes, replay_of=replay_of)
        with redis_errors():
            answers: list[list[bytes]] = await self._enqueue(keys=script_keys, args=args)
        return answers

    async def replay(
        self, change: LeadStageChange, envelope: Envelope, *, dlq_entry_id: str, generation: str
    ) -> tuple[str, int]:
        """Put a dead-lettered change back on the queue under its key; returns (status, generation)."""
        [answer] = await self._call_enqueue(
            "replay", _encode([(change, envelope)]), replay_of=(dlq_entry_id, generation)
        )
        status = answer[0].decode()
        return status, int(answer[1]) if status == "queued" else 0

    # -- the worker ----------------------------------------------------------------------------

    async def start(self, job_id: str, worker_id: str, rate_limit: float, jitter_ms: int) -> Start:
        """Claim a due job and decide what it may do now (start.lua)."""
        settings = self.settings
        account = keys.split_job_id(job_id)[0]
        with redis_errors():
            answer = await self._start(
                keys=[settings.queue_name, keys.ledger_key(job_id), keys.rate_key(account)],
                args=[
                    job_id,
                    now_ms(),
                    time.time_ns() // 1000,
                    self.lease_ms,
                    settings.max_attempts,
                    int(settings.max_age_s * 1000),
                    max(1, round(1_000_000 / rate_limit)),
                    self.lock_ms,
                    self.in_flight_guard_ms,
                    worker_id,
                    keys.STAGE_PREFIX,
                    keys.STAGE_LOCK_PREFIX,
                    jitter_ms,
                    self.reservation_grace_us,
                ],
            )
        decision = answer[0].decode()
        if decision == "wait":
            return Start("wait", wait_ms=int(answer[1]), reason=answer[2].decode())
        if decision in ("skip", "missing"):
            return Start(decision)
        if decision == "done":
            return Start("done", reason=answer[1].decode())
        facts = (answer[4].decode(), int(answer[5]), int(answer[6]))
        if decision == "superseded":
            return Start("superseded", dropped=_fields(answer[1]), facts=facts, change_json=answer[7])
        if decision == "exhausted":
            return Start(
                "exhausted", previous_phase=answer[1].decode(), attempt=int(answer[2]), facts=facts,
                change_json=answer[7],
            )  # fmt: skip
        return Start(
            "go", attempt=int(answer[1]), previous_phase=answer[2].decode(), dropped=_fields(answer[3]), facts=facts,
            change_json=answer[7],
        )  # fmt: skip

    @property
    def lease_ms(self) -> int:
        """How long a started job stays hidden from other workers without a heartbeat."""
        return int(self.settings.lease_s * 1000)

    @property
    def reservation_grace_us(self) -> int:
        """How late a job may wake for its rate-limit slot: two polls and some scheduling slack."""
        return int((2 * self.settings.poll_delay_s + 0.05) * 1_000_000)

    @property
    def in_flight_guard_ms(self) -> int:
        """How long after an attempt began its POST may still be in flight (a crashed worker's)."""
        return int(self.settings.request_timeout_s * 1000) + 1000

    @property
    def lock_ms(self) -> int:
        """Long enough for a reconciling list and a POST, each up to the request timeout."""
        return int(self.settings.request_timeout_s * 2000) + 5000

    async def extend_leases(self, job_ids: Sequence[str]) -> None:
        """Keep running jobs hidden for another lease (the worker's heartbeat)."""
        if not job_ids:
            return
        hidden_until = now_ms() + self.lease_ms
        with redis_errors():
            await self.client.zadd(self.settings.queue_name, dict.fromkeys(job_ids, hidden_until), xx=True)

    async def adopt(self, account: str, job_id: str, candidates: Sequence[int]) -> int | None:
        """Claim the first candidate stage no other add has claimed (adopt.lua)."""
        if not candidates:
            return None
        with redis_errors():
            answer = await self._adopt(keys=[keys.claims_key(account)], args=[job_id, *candidates])
        return int(answer) if answer else None

    async def finish(
        self,
        job_id: str,
        change: LeadStageChange,
        *,
        event: Mapping[str, str],
        history: Mapping[str, object],
        next_at_ms: int = 0,
        outcome_unknown: bool = False,
        pause_until_ms: int | None = None,
        created_stage_id: int | None = None,
    ) -> bool:
        """Record an attempt's end and publish ``event``; False when the ledger was already terminal."""
        settings = self.settings
        account = keys.split_job_id(job_id)[0]
        fields: list[str] = [item for pair in event.items() for item in pair]
        with redis_errors():
            answer = await self._finish(
                keys=[
                    keys.ledger_key(job_id),
                    settings.results_stream,
                    settings.dlq_stream,
                    keys.stage_lock_key(account, keys.lock_subject(change.id, change.name)),
                    keys.claims_key(account),
                    keys.rate_key(account),
                    settings.queue_name,
                ],
                args=[
                    job_id,
                    event["event"],
                    now_ms(),
                    settings.ledger_retention_s * 1000,
                    settings.results_maxlen,
                    next_at_ms,
                    "unknown" if outcome_unknown else "",
                    self.lock_ms,
                    "" if pause_until_ms is None else pause_until_ms,
                    "" if created_stage_id is None else created_stage_id,
                    event.get("stage_id", ""),
                    orjson.dumps(history),
                    *fields,
                ],
            )
        return bool(answer[0] == b"ok")

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

    @classmethod
    def of(cls, items: Sequence[tuple[LeadStageChange, Envelope]], labels: Sequence[str]) -> Chunk:
        return cls(_encode(items), labels)

    def envelopes(self) -> list[tuple[str, str]]:
        """(account, idempotency key) of each change."""
        return [(change[5], change[6]) for change in orjson.loads(self.changes)]


class _Pipe:
    """enqueue.lua calls on one connection of their own, pipelined: a request is sent at once and
    its answer read later, so Redis runs one chunk while the producer prepares the next. At most
    one request is outstanding, so the chunks run in the order they were sent."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._connection: Connection | None = None
        self._request: tuple[Any, ...] | None = None  # sent, its answer not read yet

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
        with redis_errors():
            await self._connection.send_command("EVALSHA", self.ledger._enqueue.sha, *self._request)

    async def receive(self) -> list[list[bytes]]:
        assert self._connection is not None, "open() first"
        assert self._request is not None, "send() first"
        script = self.ledger._enqueue
        with redis_errors():
            try:
                answers: list[list[bytes]] = await self._connection.read_response()
            except NoScriptError:  # not run: load the script (a new or restarted Redis) and send again
                await self._connection.send_command("SCRIPT", "LOAD", script.script)
                script.sha = (await self._connection.read_response()).decode()
                await self._connection.send_command("EVALSHA", script.sha, *self._request)
                answers = await self._connection.read_response()
        self._request = None
        return answers


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
        for index, answer in enumerate(await self._pipe.receive()):
            if answer[0] == b"conflict":
                account, key = self._chunk.envelopes()[index]
                earlier = answer[1].decode() if len(answer) > 1 else None
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
            answers = await self._pipe.receive()
        except RedisUnavailable as exc:
            raise EnqueueOutcomeUnknown(str(exc), enqueued=self.enqueued, unknown=envelopes) from exc
        for (account, key), label, answer in zip(envelopes, self._chunk.labels, answers, strict=True):
            if answer[0] == b"conflict":
                raise IdempotencyConflict(account, key, label=label, enqueued_before=self.enqueued)
        self.enqueued += len(answers)
        return [
            Receipt(keys.job_id(account, key), key, account, "duplicate" if answer[0] == b"duplicate" else "queued")
            for (account, key), answer in zip(envelopes, answers, strict=True)
        ]


def _encode(items: Sequence[tuple[LeadStageChange, Envelope]]) -> bytes:
    """The changes as enqueue.lua takes them: one JSON array, one entry per change."""
    return orjson.dumps(
        [
            [
                keys.job_id(envelope.account, envelope.idempotency_key),
                change.canonical_json().decode(),
                change.operation,
                "" if change.id is None else str(change.id),
                ",".join(change.changed_fields()),
                envelope.account,
                envelope.idempotency_key,
                envelope.source,
                keys.lock_subject(change.id, change.name),
            ]
            for change, envelope in items
        ]
    )


def _fields(raw: bytes) -> frozenset[str]:
    return frozenset(f for f in raw.decode().split(",") if f)
