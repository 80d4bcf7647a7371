"""How runs end, the worker's side of finish.lua and lost.lua: ``Endings.finish`` records a run's
end and publishes its event, sending the ends of one account that come together in one call;
``report_missing`` reports a due job whose ledger entry is gone; on a Redis Cluster both write into
the account's outbox (``worker.core.outbox``), published after the call and swept when a worker
died first. ``worker.core.ledger.Ledger`` is the rest of the worker's side.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from worker.core import keys, outbox
from worker.core.change import LeadStageChange
from worker.core.enqueue import Enqueuing
from worker.core.errors import RedisUnavailable, redis_errors
from worker.core.redis_connection import RedisClient
from worker.core.replies import Finished, parse_finished, parse_lost
from worker.core.settings import Settings
from worker.core.states import Outcome, Phase


@dataclass
class _Ending:
    """One run's end, waiting for its account's next finish.lua call."""

    job_id: str
    lock_key: str
    arguments: list[str | int | bytes]
    outcome: Outcome
    delay_ms: int
    done: asyncio.Future[Finished] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Endings(Enqueuing):
    """The ends of runs, recorded; ``Ledger`` is one (one instance per process)."""

    def __init__(self, client: RedisClient, settings: Settings) -> None:
        super().__init__(client, settings)
        #: Runs' ends waiting for their account's finish.lua call, and one call at a time per account.
        self._endings: dict[str, list[_Ending]] = {}
        self._finishing: dict[str, asyncio.Lock] = {}
        self._calls: set[asyncio.Task[list[Finished]]] = set()  # finish calls on the way (kept referenced)

    def queue_of(self, job_id: str) -> str:
        """The queue of the job's account."""
        return keys.queue_key(self.settings.queue_name, keys.split_job_id(job_id)[0])

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
        already terminal or gone, or another run owns the change.

        The runs of one account that end while its previous call is on the way are sent together
        in the next one (each still recorded or refused on its own): under load a worker pays the
        call, the clock and the queue's update once for many runs, and alone it waits for nothing.
        """
        outcome = Outcome(event["event"])
        fields = [item for pair in event.items() for item in pair]
        account = keys.split_job_id(job_id)[0]
        ending = _Ending(
            job_id,
            keys.stage_lock_key(account, keys.lock_subject(change.id, change.name)),
            [
                job_id,
                run,
                outcome,
                delay_ms,
                Phase.UNKNOWN if outcome_unknown else Phase.NONE,
                "" if pause_ms is None else pause_ms,
                "" if created_stage_id is None else created_stage_id,
                event.get("stage_id", ""),
                orjson.dumps(history),
                len(fields),
                *fields,
            ],
            outcome,
            delay_ms,
        )
        self._endings.setdefault(account, []).append(ending)
        try:
            return await self._finish_endings(account, ending)
        finally:
            # Nobody reads this run's result once its task is gone (cancelled while its end waited for
            # the account's next call): that call, sending it still, leaves it alone.
            ending.done.cancel()

    async def _finish_endings(self, account: str, ending: _Ending) -> Finished:
        """Send ``ending`` with every other end of the account waiting, unless a call on the way
        while it waited sent it already; one finish.lua call at a time per account. The call is a
        task of its own that holds the account's turn until it ends: a run cancelled while its call
        is on the way (its lease lost) leaves the call to go on, and the other runs in it hear their
        own results."""
        lock = self._finishing.setdefault(account, asyncio.Lock())
        await lock.acquire()
        if ending.done.done():
            lock.release()
        else:
            endings = self._endings.pop(account)
            call = asyncio.create_task(self._finish_call(account, endings))
            self._calls.add(call)
            call.add_done_callback(functools.partial(self._settle, lock, endings))
        return await ending.done

    def _settle(self, lock: asyncio.Lock, endings: Sequence[_Ending], call: asyncio.Task[list[Finished]]) -> None:
        """A finish call ended: each of its runs still waiting hears its result, or the call's error as
        from its own call; then the account's next call may go."""
        self._calls.discard(call)
        error = RedisUnavailable("the finish call was cancelled") if call.cancelled() else call.exception()
        if error is None:
            for ending, result in zip(endings, call.result(), strict=True):
                if not ending.done.done():
                    ending.done.set_result(result)
        else:
            unknown = error if isinstance(error, Exception) else RedisUnavailable(f"the finish call ended: {error!r}")
            for ending in endings:
                if not ending.done.done():
                    ending.done.set_exception(unknown)
        lock.release()

    async def _finish_call(self, account: str, endings: Sequence[_Ending]) -> list[Finished]:
        settings = self.settings
        script_keys = [
            *self._streams(account),
            keys.pending_key(account, cluster=self.cluster),
            keys.queue_key(settings.queue_name, account),
            keys.claims_key(account),
            keys.rate_key(account),
            keys.newest_claim_key(account),
        ]
        for ending in endings:
            script_keys += [keys.ledger_key(ending.job_id), ending.lock_key]
        args: list[str | int | bytes] = [
            account,
            settings.ledger_retention_s * 1000,
            settings.results_maxlen,
            self.late_commit_ms,
            self.lock_ms,
        ]
        for ending in endings:
            args += ending.arguments
        confirm = any(ending.outcome is not Outcome.RETRYING for ending in endings)
        reply, acked = await self._call(self._finish, script_keys, args, confirm=confirm)
        finished = parse_finished(reply, replicated=acked is None or acked >= settings.redis_min_replicas)
        if self.cluster:
            await outbox.publish(self, account, (result.outbox_id for result in finished))
        retries = [
            result.finished_at_ms + ending.delay_ms
            for ending, result in zip(endings, finished, strict=True)
            if result.recorded and ending.outcome is Outcome.RETRYING
        ]
        if retries:
            await self.notify([account], min(retries))
        return finished

    async def report_missing(self, job_id: str, event: Mapping[str, str]) -> bool:
        """A due job whose ledger entry is gone: its failed event and a dead letter, and it leaves the
        queue (lost.lua); False when it was not reported here (another worker did, or its key was
        enqueued again)."""
        settings = self.settings
        fields = [item for pair in event.items() for item in pair]
        account = keys.split_job_id(job_id)[0]
        with redis_errors():
            reported = parse_lost(
                await self._lost(
                    keys=[
                        *self._streams(account),
                        keys.pending_key(account, cluster=self.cluster),
                        self.queue_of(job_id),
                        keys.ledger_key(job_id),
                    ],
                    args=[account, settings.results_maxlen, job_id, *fields],
                )
            )
        if reported:
            await outbox.publish(self, account, [reported])
        return reported is not None

    def _streams(self, account: str) -> tuple[str, str]:
        """Where finish.lua and lost.lua write events and dead letters: the streams, or on a Redis
        Cluster the account's outbox (``worker.core.outbox``)."""
        if self.cluster:
            return keys.outbox_key(account), keys.outbox_key(account)
        return self.settings.results_stream, self.settings.dlq_stream

    async def sweep_outboxes(self, accounts: Iterable[str]) -> int:
        """On a Redis Cluster: publish the outbox entries older than a lease (a worker died before
        publishing them); how many. Nothing to do on a single Redis."""
        return await outbox.sweep(self, accounts, self.lease_ms) if self.cluster else 0
