"""The producers' side of the ledger: enqueue (all or nothing for a whole call, in pipelined chunks)
and the replay of a dead letter, both through enqueue.lua."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Literal

from worker.core.bulk import ENQUEUE_CHUNK, BulkCheck, BulkWrite, Chunk, encode_changes, enqueue_arguments
from worker.core.change import Envelope, LeadStageChange
from worker.core.errors import redis_errors
from worker.core.replies import Receipt, parse_enqueue
from worker.core.scripts import Scripts


class Enqueuing(Scripts):
    """What producers run: ``enqueue_many`` and ``replay`` (the worker's side is ``worker.core.ledger``)."""

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
        one chunk (on a Redis Cluster, of more than one account) is checked whole first
        (``BulkCheck``), then written ``ENQUEUE_CHUNK`` changes
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

        # On a Redis Cluster a chunk is one call per account, each atomic on its own: several accounts
        # are checked whole first too.
        if len(starts) > 1 or (self.cluster and len({envelope.account for _, envelope in items}) > 1):
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

    def chunk(self, items: Sequence[tuple[LeadStageChange, Envelope]], labels: Sequence[str]) -> Chunk:
        """Up to ``ENQUEUE_CHUNK`` changes encoded for enqueue.lua, with their labels."""
        return Chunk(encode_changes(items, self.settings.queue_name), labels)

    def bulk_check(self) -> BulkCheck:
        """A check of a bulk enqueue, chunk by chunk, before its first write (``async with``)."""
        return BulkCheck(self, secrets.token_hex(8))

    def bulk_write(self) -> BulkWrite:
        """The writes of a bulk enqueue, chunk by chunk, after its check (``async with``)."""
        return BulkWrite(self)

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
        script_keys, args = enqueue_arguments(
            self.settings,
            mode,
            changes,
            cluster=self.cluster,
            account=accounts[0] if accounts else None,
            replay_of=replay_of,
        )
        reply, acked = await self._call(self._enqueue, script_keys, args, confirm=mode != "check", notify=accounts)
        answers, backlog = parse_enqueue(reply)
        if mode != "check" and not any(answer[0] in (b"conflict", b"not_failed") for answer in answers):
            self._require_replicas(acked, "the enqueued changes")
        return answers, backlog

    async def replay(
        self, change: LeadStageChange, envelope: Envelope, *, dlq_entry_id: str, generation: str
    ) -> tuple[str, int]:
        """Put a dead-lettered change back on the queue under its key; returns (status, generation)."""
        [answer], _ = await self._call_enqueue(
            "replay",
            encode_changes([(change, envelope)], self.settings.queue_name),
            replay_of=(dlq_entry_id, generation),
            accounts=[envelope.account],
        )
        status = answer[0].decode()
        if self.cluster and dlq_entry_id:
            # The dead letter is another slot's: deleted once the replay is queued. A crash in between
            # leaves it, and its next replay (``not_failed``) deletes it.
            with redis_errors():
                await self.client.xdel(self.settings.dlq_stream, dlq_entry_id)
        return status, int(answer[1]) if status == "queued" else 0
