"""A bulk enqueue's wire: enqueue.lua calls pipelined on one connection, chunk by chunk (the check of a
whole bulk before its first write, then its writes), and the changes encoded as the script takes them."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from worker.core import keys, tracing
from worker.core.change import Envelope, LeadStageChange
from worker.core.errors import (
    EnqueueOutcomeUnknown,
    IdempotencyConflict,
    RedisUnavailable,
    redis_errors,
    reply_or_error,
)
from worker.core.replies import Receipt, parse_enqueue
from worker.core.scripts import Part, evalsha, not_run, notice_args, round_trip
from worker.core.settings import Settings

if TYPE_CHECKING:  # redis-py at run time only with a client: the one-shot enqueue uses this module without it
    from redis.asyncio.connection import Connection
    from redis.typing import EncodableT

    from worker.core.enqueue import Enqueuing

#: Changes per enqueue.lua call when enqueuing in bulk (Redis runs each call in one go: ~10 ms).
ENQUEUE_CHUNK = 1000
#: A bulk check's staging hash expires this long after its last chunk (an interrupted producer's).
STAGING_TTL_MS = 3_600_000


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
    the replicas that have this connection's writes), in the same round trip.

    On a Redis Cluster a script call names one slot: a chunk is sent as one call per account in it
    (``_by_account``, each all or nothing, with its WAIT on the account's master and its notice),
    during ``send``; ``receive`` hands their answers back in the chunk's order.
    """

    def __init__(self, ledger: Enqueuing) -> None:
        self.ledger = ledger
        self._connection: Connection | None = None
        self._give_back: Callable[[], Awaitable[None]] | None = None
        self._request: list[Part] | None = None  # sent, its answers not read yet
        self._confirm = False  # a WAIT follows the request
        #: On a cluster: the answers of the chunk sent, the backlog and the replicas that confirmed it.
        self._answered: tuple[list[list[bytes]], dict[str, int], int | None] | None = None

    async def open(self) -> None:
        """Connect: a failure here has sent nothing."""
        if self.ledger.cluster:
            return  # a connection per account's master, taken by each call
        from worker.core.redis_connection import acquire_connection

        with redis_errors():
            self._connection, self._give_back = await acquire_connection(self.ledger.client, "")

    async def close(self) -> None:
        if self._connection is None:
            return
        connection, self._connection = self._connection, None
        if self._request is not None:  # an answer nobody will read: the connection cannot be used again
            with contextlib.suppress(RedisUnavailable), redis_errors():
                await connection.disconnect()
        assert self._give_back is not None
        await self._give_back()

    @property
    def busy(self) -> bool:
        return self._request is not None or self._answered is not None

    async def send(self, mode: Literal["enqueue", "check"], changes: bytes, staging: tuple[str, bytes] | None) -> None:
        assert not self.busy, "one request at a time"
        ledger = self.ledger
        if ledger.cluster:
            self._answered = await self._by_account(mode, changes, staging)
            return
        assert self._connection is not None, "open() first"
        script_keys, args = enqueue_arguments(ledger.settings, mode, changes, staging=staging)
        self._confirm = mode == "enqueue" and ledger.settings.redis_min_replicas > 0
        notice = None
        if mode == "enqueue":
            # The schedule hears of the accounts written to in the same round trip (idle workers wake).
            accounts = [account for account, _ in Chunk(changes, ()).envelopes()]
            notice = evalsha(ledger._ready, ledger._ready_keys, notice_args(accounts))
        call = evalsha(ledger._enqueue, script_keys, args)
        self._request = request = round_trip(call, ledger.settings, confirm=mode == "enqueue", notice=notice)
        with redis_errors():
            await self._send_commands([command for _, command in request])

    async def _send_commands(self, commands: Sequence[tuple[EncodableT, ...]]) -> None:
        """Commands of one request (the script call, its WAIT, the schedule's notice): one write."""
        assert self._connection is not None
        await self._connection.send_packed_command(self._connection.pack_commands(commands))

    async def _replies(self, count: int) -> list[Any]:
        """The replies to ``count`` commands sent (an error reply as its exception), in order."""
        assert self._connection is not None
        replies: list[Any] = []
        for _ in range(count):
            replies.append(await reply_or_error(self._connection))
        return replies

    async def _by_account(
        self, mode: Literal["enqueue", "check"], changes: bytes, staging: tuple[str, bytes] | None
    ) -> tuple[list[list[bytes]], dict[str, int], int | None]:
        """On a cluster: the chunk as one enqueue.lua call per account (``staging``: the bulk's
        staging key, made the account's with ``keys.staging_key``), in the chunk's order."""
        ledger, entries = self.ledger, orjson.loads(changes)
        labels = orjson.loads(staging[1]) if staging is not None else []
        places: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            places.setdefault(entry[5], []).append(i)
        answers: list[list[bytes]] = [[] for _ in entries]
        backlog: dict[str, int] = {}
        confirmed: int | None = None
        for account, at in places.items():
            its_staging = None
            if staging is not None:
                its_staging = (keys.staging_key(staging[0], account), orjson.dumps([labels[i] for i in at]))
            script_keys, args = enqueue_arguments(
                ledger.settings,
                mode,
                orjson.dumps([entries[i] for i in at]),
                cluster=True,
                account=account,
                staging=its_staging,
            )
            notify = [account] if mode == "enqueue" else []
            reply, acked = await ledger._call(
                ledger._enqueue, script_keys, args, confirm=mode == "enqueue", notify=notify
            )
            its_answers, its_backlog = parse_enqueue(reply)
            for i, answer in zip(at, its_answers, strict=True):
                answers[i] = answer
            backlog.update(its_backlog)
            confirmed = acked if confirmed is None or acked is None else min(confirmed, acked)
        return answers, backlog, confirmed

    async def receive(self) -> tuple[list[list[bytes]], dict[str, int], int | None]:
        """The answers of the request sent, the backlog of each account it wrote to, and how many
        replicas confirmed it (None: not asked)."""
        if self._answered is not None:
            answered, self._answered = self._answered, None
            return answered
        assert self._connection is not None, "open() first"
        assert self._request is not None, "send() first"
        connection, request = self._connection, self._request
        with redis_errors():
            replies = await self._replies(len(request))
            missing, again = not_run(request, replies)
            if again:  # a Redis without these scripts: load them, send again only what did not run
                for script in missing:
                    await connection.send_command("SCRIPT", "LOAD", script.script)
                    await connection.read_response()
                await self._send_commands([request[i][1] for i in again])
                for i, reply in zip(again, await self._replies(len(again)), strict=True):
                    replies[i] = reply
            for error in replies:
                if isinstance(error, Exception):
                    raise error
        reply = replies[0]
        acked = int(replies[1]) if self._confirm else None
        self._request = None
        answers, backlog = parse_enqueue(reply)
        return answers, backlog, acked


class BulkCheck:
    """Checks a bulk enqueue chunk by chunk before its first write: every key against the ledger
    and against the keys checked before it (a staging hash in Redis, so the producer's memory
    stays bounded by a chunk). Nothing is enqueued; the staging hash is removed at the end.

    ``send(chunk)``, then ``receive()`` (which raises ``IdempotencyConflict`` for the first key of
    the chunk that cannot be enqueued); between the two, prepare the next chunk.
    """

    def __init__(self, ledger: Enqueuing, token: str) -> None:
        self.ledger = ledger
        #: The staging hash (keys.staging_key); on a cluster, the token of each account's.
        self.staging_key = token if ledger.cluster else keys.staging_key(token, None)
        self._accounts: set[str] = set()
        self._pipe = _Pipe(ledger)
        self._chunk: Chunk | None = None

    async def __aenter__(self) -> BulkCheck:
        await self._pipe.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pipe.close()
        with contextlib.suppress(RedisUnavailable), redis_errors():
            # Or they expire after STAGING_TTL_MS. On a cluster one per account checked, in its slot.
            if self.ledger.cluster:
                staged = [keys.staging_key(self.staging_key, account) for account in sorted(self._accounts)]
            else:
                staged = [self.staging_key]
            for key in staged:
                await self.ledger.client.unlink(key)

    @property
    def busy(self) -> bool:
        """Whether a chunk was sent and its answer is not received yet."""
        return self._pipe.busy

    async def send(self, chunk: Chunk) -> None:
        self._chunk = chunk
        if self.ledger.cluster:
            self._accounts.update(account for account, _ in chunk.envelopes())
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

    def __init__(self, ledger: Enqueuing) -> None:
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
        ledger = self._pipe.ledger
        written = receipts(ledger.settings, envelopes, self._chunk.labels, answers, backlog, self.enqueued)
        ledger._require_replicas(acked, "the enqueued changes")
        self.enqueued += len(answers)
        return written


def receipts(
    settings: Settings,
    envelopes: Sequence[tuple[str, str]],
    labels: Sequence[str],
    answers: Sequence[list[bytes]],
    backlog: dict[str, int],
    enqueued_before: int,
) -> list[Receipt]:
    """The receipts of a chunk's write (its changes' envelopes and labels: ``Chunk``) from
    enqueue.lua's answers and backlog, or the ``IdempotencyConflict`` of its first conflict
    (nothing of the chunk written; ``enqueued_before`` were, before it)."""
    for (account, key), label, answer in zip(envelopes, labels, answers, strict=True):
        if answer[0] == b"conflict":
            raise IdempotencyConflict(account, key, label=label, enqueued_before=enqueued_before)
    # The backlog a queued change joins: the account's count after the chunk, less the changes
    # of the chunk queued behind it.
    behind = Counter(account for (account, _), answer in zip(envelopes, answers, strict=True) if answer[0] == b"queued")
    written = []
    for (account, key), answer in zip(envelopes, answers, strict=True):
        job = keys.job_id(account, key)
        if answer[0] != b"queued":
            written.append(Receipt(job, key, account, "duplicate"))
            continue
        position = backlog.get(account, 0) - behind[account] + 1
        behind[account] -= 1
        written.append(Receipt(job, key, account, "queued", position, position / settings.rate_limit_for(account)))
    return written


def enqueue_arguments(
    settings: Settings,
    mode: Literal["enqueue", "check", "replay"],
    changes: bytes,
    *,
    cluster: bool = False,
    account: str | None = None,
    replay_of: tuple[str, str] = ("", ""),
    staging: tuple[str, bytes] | None = None,
) -> tuple[list[str], list[bytes | str | int]]:
    """enqueue.lua's keys and arguments; ``staging`` (check only): the staging hash and the
    changes' labels as a JSON array. On a Redis Cluster the changes are all ``account``'s, and the
    dead letter of a replay is deleted by the caller (another slot): the pending hash stands in
    for the stream, never touched."""
    if cluster:
        assert account is not None, "on a Redis Cluster a call is one account's"
        pending = keys.pending_key(account, cluster=True)
        script_keys = [pending, pending]
        replay_of = ("", replay_of[1])
    else:
        script_keys = [settings.dlq_stream, keys.PENDING]
    args: list[bytes | str | int] = [mode, settings.ledger_retention_s * 1000, *replay_of, changes]
    if staging is not None:
        script_keys.append(staging[0])
        args += [staging[1], STAGING_TTL_MS]
    return script_keys, args


def encode_changes(items: Sequence[tuple[LeadStageChange, Envelope]], queue_name: str) -> bytes:
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
