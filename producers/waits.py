"""Waiting for one change's outcome: ``LeadStageProducer.wait`` and the reader all waits share.

* ``wait`` returns the change's terminal event (``worker.core.results.ResultEvent``) of its current
  generation, at once when there is one already. ``WaitTimeout`` says where the change stands
  (``status``: ``readers.change_status``) when none comes in time; ``UnknownChange`` when the
  ledger does not know the key. Every concurrent wait of one producer shares one reader: a single
  blocking XREAD on the results stream, started with the first wait and stopped after the last.
  It blocks for ``blocking_read_s(settings)`` at a time: less than LEADSTAGE_REDIS_TIMEOUT, which would
  otherwise end every blocking read as a Redis that does not answer.
* ``standing`` is where a change stands and its terminal event: what the status route answers.

The consumer groups are ``producers.outcomes``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from redis.asyncio.cluster import RedisCluster

from worker.core import keys, readers
from worker.core.change import DEFAULT_ACCOUNT, parse_envelope
from worker.core.errors import (
    InvalidEvent,
    InvalidOption,
    LeadstageError,
    OutcomeUnavailable,
    RetryableError,
    StreamRefused,
    UnknownChange,
    WaitTimeout,
    redis_errors,
    stream_errors,
)
from worker.core.ledger import Receipt
from worker.core.redis_connection import RedisClient
from worker.core.results import ResultEvent
from worker.core.settings import Settings
from worker.core.states import TERMINAL

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = [
    "BLOCK_S",
    "SharedReader",
    "Waits",
    "blocking_read_s",
    "decoded",
    "outcomes_log",
    "standing",
]


def outcomes_log() -> FilteringBoundLogger:
    """The outcomes' logger, made when first used: importing structlog costs a producer's start-up
    (``leadstage enqueue``) some 100 ms, and only a reader that retries logs."""
    from worker.core.logs import get_logger

    return get_logger("leadstage.outcomes")


#: How long one XREAD / XREADGROUP blocks before it is issued again (at most: see ``blocking_read_s``).
BLOCK_S: Final = 2.0
#: The shared reader's pause after Redis failed to answer, doubling up to the maximum.
RETRY_FIRST_S: Final = 0.1
RETRY_MAX_S: Final = 2.0


def blocking_read_s(settings: Settings, wanted: float = BLOCK_S) -> float:
    """How long a blocking read may block: ``wanted``, but at most half of LEADSTAGE_REDIS_TIMEOUT
    (a read blocked longer than the socket timeout is cut off as if Redis did not answer)."""
    return min(wanted, settings.redis_timeout_s / 2)


async def standing(
    client: RedisClient, settings: Settings, account: str, idempotency_key: str
) -> tuple[dict[str, object] | None, ResultEvent | None]:
    """Where a change stands (``readers.change_status``) and its terminal event once it has one.

    The event is the one ``finish.lua`` recorded in the ledger (``event_id``) for the current
    generation; None while the change is not finished, or when the stream no longer holds it. On a
    Redis Cluster a terminal change whose event is still in its account's outbox (not published yet:
    ``worker.core.outbox``) has ``unpublished`` True in its status, and no event yet.
    """
    for _ in range(2):
        status = await readers.change_status(client, settings, account, idempotency_key)
        if status is None or status["state"] not in TERMINAL:
            return status, None
        with redis_errors():
            event_id, unpublished = await client.hmget(  # type: ignore[misc]  # redis-py's async stubs
                keys.ledger_key(keys.job_id(account, idempotency_key)), ["event_id", "outbox"]
            )
        if unpublished and not event_id:
            return {**status, "unpublished": True}, None
        with stream_errors(settings.results_stream):
            entries = await client.xrange(settings.results_stream, min=event_id, max=event_id) if event_id else []
        if not entries:
            break  # trimmed from the stream (or finished before event ids were recorded)
        event = ResultEvent.from_entry(entries[0][0].decode(), decoded(entries[0][1]))
        if event.generation == status["generation"]:
            return status, event
        # A replay started a new generation between the two reads: read where it stands now.
    return status, None


def decoded(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


Delivery = ResultEvent | LeadstageError


class SharedReader:
    """One blocking XREAD over the results stream, handing terminal events to the waits for them."""

    def __init__(self, client: RedisClient, stream: str, *, block_s: float = BLOCK_S) -> None:
        """``block_s``: how long each XREAD blocks (``blocking_read_s``: less than the client's socket timeout)."""
        self.client, self.stream = client, stream
        self.block_ms = max(1, int(block_s * 1000))
        self._waiters: dict[str, set[asyncio.Queue[Delivery]]] = {}
        self._task: asyncio.Task[None] | None = None
        #: Set to stop the running reader between two reads: on a Redis Cluster, redis-py 5.3 loses
        #: the cancellation of a task that has just sent a blocking XREAD (docs/architecture.md).
        self._stop = asyncio.Event()
        self._cluster = isinstance(client, RedisCluster)
        self._starting = asyncio.Lock()
        #: How many times the reader was started (a test checks that concurrent waits share one).
        self.starts = 0

    async def subscribe(self, job_id: str) -> asyncio.Queue[Delivery]:
        """A queue of the job's terminal events written from now on; the reader runs when this returns."""
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._waiters.setdefault(job_id, set()).add(queue)
        try:
            async with self._starting:
                if self._task is None:
                    # The position is taken before the caller reads the ledger: any event written
                    # after that read is after this position, so the reader cannot miss it.
                    position = await self._last_id()
                    self._stop = asyncio.Event()
                    self._task = asyncio.create_task(self._run(position, self._stop), name="leadstage-outcomes-reader")
                    self.starts += 1
        except BaseException:
            self.unsubscribe(job_id, queue)
            raise
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[Delivery]) -> None:
        """Forget a wait; the reader stops with the last one."""
        queues = self._waiters.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._waiters[job_id]
        if not self._waiters and self._task is not None:
            self._end(self._task)
            self._task = None

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._end(task)
            await asyncio.gather(task, return_exceptions=True)

    def _end(self, task: asyncio.Task[None]) -> None:
        """Stop the reader: cancelled at once, or on a cluster after its current read (one block)."""
        if self._cluster:
            self._stop.set()
        else:
            task.cancel()

    async def _last_id(self) -> str:
        with stream_errors(self.stream):
            last = await self.client.xrevrange(self.stream, count=1)
        return last[0][0].decode() if last else "0-0"

    async def _run(self, position: str, stop: asyncio.Event) -> None:
        pause = RETRY_FIRST_S
        while not stop.is_set():
            try:
                with stream_errors(self.stream):
                    answer = await self.client.xread({self.stream: position}, count=readers.PAGE, block=self.block_ms)
            except RetryableError as exc:
                # Waits keep their deadlines; the reader resumes from its position, losing nothing.
                outcomes_log().warning("outcomes.reader_retry", error=str(exc), retry_in_s=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)
                continue
            except StreamRefused as exc:
                self._fail_all(exc)
                return
            pause = RETRY_FIRST_S
            for _, entries in answer:
                for raw_id, fields in entries:
                    position = raw_id.decode()
                    self._deliver(position, fields)

    def _deliver(self, entry_id: str, fields: Mapping[bytes, bytes]) -> None:
        job = fields.get(b"job_id", b"").decode()
        if job not in self._waiters or fields.get(b"event", b"").decode() not in TERMINAL:
            return
        delivery: Delivery
        try:
            delivery = ResultEvent.from_entry(entry_id, decoded(fields))
        except InvalidEvent as exc:
            delivery = exc
        for queue in self._waiters[job]:
            queue.put_nowait(delivery)

    def _fail_all(self, error: LeadstageError) -> None:
        for queues in self._waiters.values():
            for queue in queues:
                queue.put_nowait(error)


class Waits:
    """``wait``, mixed into ``LeadStageProducer``: it needs the producer's Redis, settings and reader."""

    redis: RedisClient
    settings: Settings
    #: The one reader of every wait of this producer.
    reader: SharedReader

    async def wait(
        self,
        receipt_or_key: Receipt | str,
        *,
        timeout: float,  # noqa: ASYNC109 - the deadline is part of the API, and reported in WaitTimeout
        account: str = DEFAULT_ACCOUNT,
    ) -> ResultEvent:
        """The terminal event of a change (a receipt, or a key of ``account``), waiting up to ``timeout`` s.

        ``timeout=0`` only looks. Raises ``WaitTimeout`` (with where the change stands),
        ``UnknownChange``, ``OutcomeUnavailable``, ``InvalidChange`` for a malformed key or
        account, ``InvalidOption`` for a timeout that is not a finite number >= 0.
        """
        if isinstance(receipt_or_key, Receipt):
            account, key = receipt_or_key.account, receipt_or_key.idempotency_key
        else:
            key = receipt_or_key
        parse_envelope(idempotency_key=key, account=account)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout < 0
        ):
            raise InvalidOption(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
        job = keys.job_id(account, key)
        queue = await self.reader.subscribe(job)
        try:
            try:
                async with asyncio.timeout(timeout):
                    return await self._terminal(account, key, queue)
            except TimeoutError:
                # The event may have landed at the deadline: look once more before giving up.
                status, event = await standing(self.redis, self.settings, account, key)
                if event is not None:
                    return event
                if status is None:
                    raise UnknownChange(account, key) from None
                raise WaitTimeout(status, timeout) from None
        finally:
            self.reader.unsubscribe(job, queue)

    async def _terminal(self, account: str, key: str, queue: asyncio.Queue[Delivery]) -> ResultEvent:
        status, event = await standing(self.redis, self.settings, account, key)
        if event is not None:
            return event
        if status is None:
            raise UnknownChange(account, key)
        if status["state"] in TERMINAL and not status.get("unpublished"):
            raise OutcomeUnavailable(status)
        generation = status["generation"]
        assert isinstance(generation, int)
        while True:
            delivery = await queue.get()
            if isinstance(delivery, LeadstageError):
                raise delivery
            # An older generation's event (a replayed dead letter) read late is not this one's.
            if delivery.generation >= generation:
                return delivery
