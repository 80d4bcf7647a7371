"""Learning outcomes in Python: wait for one change, or consume every event with a consumer group.

Public API (re-exported by ``producers``)::

    receipt = await producer.enqueue(change, idempotency_key="crm-42")
    event = await producer.wait(receipt, timeout=30)            # or wait("crm-42", account=...)
    event.event, event.stage_id                                 # "succeeded", 1042

    async with ResultsConsumer("billing", "billing-1", settings=settings) as consumer:
        async for event in consumer:                            # typed ResultEvent, oldest first
            handle(event)
            await consumer.ack(event)                           # explicit: unacked ones come again

* ``wait`` returns the change's terminal event (``worker.core.results.ResultEvent``) of its current
  generation, at once when there is one already. ``WaitTimeout`` says where the change stands
  (``status``: ``readers.change_status``) when none comes in time; ``UnknownChange`` when the
  ledger does not know the key. Every concurrent wait of one producer shares one reader: a single
  blocking XREAD on the results stream, started with the first wait and stopped after the last.
* ``ResultsConsumer`` (results) and ``DeadLetterConsumer`` (dead letters, ``DeadLetter``) read a
  Redis consumer group: at least once, each entry until it is acked. At start a consumer first
  gets its own pending entries back (a restart under the same name resumes), then entries other
  consumers have left unacked for ``claim_idle_s`` (XAUTOCLAIM: a dead consumer's batch is taken
  over), then new ones. ``start`` places a new group: ``"new"`` (entries added from now on),
  ``"all"`` (everything still in the stream) or a stream id (the entries after it); an existing
  group keeps its place.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Generic, Literal, Self, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from worker.core import keys, readers
from worker.core.change import DEFAULT_ACCOUNT, parse_envelope
from worker.core.errors import ConfigError, LeadstageError, PermanentError, RetryableError, redis_errors
from worker.core.ledger import Receipt
from worker.core.redis_connection import RedisClient, connect_redis_or_cluster
from worker.core.results import TERMINAL_EVENTS, DeadLetter, InvalidEvent, ResultEvent
from worker.core.settings import Settings
from worker.core.states import TERMINAL

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = [
    "DeadLetterConsumer",
    "InvalidOption",
    "OutcomeUnavailable",
    "ResultsConsumer",
    "SharedReader",
    "UnknownChange",
    "WaitTimeout",
    "Waits",
    "standing",
]


def _log() -> FilteringBoundLogger:
    """The module's logger, made when first used: importing structlog costs a producer's start-up
    (``leadstage enqueue``) some 100 ms, and only a reader that retries logs."""
    from worker.core.logs import get_logger

    return get_logger("leadstage.outcomes")


#: How long one XREAD / XREADGROUP blocks before it is issued again.
BLOCK_S: Final = 2.0
#: The shared reader's pause after Redis failed to answer, doubling up to the maximum.
RETRY_FIRST_S: Final = 0.1
RETRY_MAX_S: Final = 2.0
#: A consumer group or consumer name: printable ASCII without spaces.
_NAME = re.compile(r"[\x21-\x7e]{1,200}")
_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


class InvalidOption(PermanentError):
    """An argument of ``wait`` or of a consumer is unusable; the message names it."""

    error_code = "invalid_option"


class UnknownChange(PermanentError):
    """The ledger does not know the change: never enqueued, or finished before the retention."""

    error_code = "unknown_change"

    def __init__(self, account: str, idempotency_key: str) -> None:
        self.account, self.idempotency_key = account, idempotency_key
        super().__init__(
            f"no change with idempotency key {idempotency_key!r} for account {account!r} "
            "(never enqueued, or finished longer ago than the ledger retention)"
        )


def _where(status: Mapping[str, object]) -> str:
    text = f"it is {status['state']} after {status['attempts']} attempt(s)"
    if status.get("next_attempt_at"):
        text += f", next attempt at {status['next_attempt_at']}"
    history = status.get("history")
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        last = history[-1]
        if last.get("error_code"):
            text += f", last error {last['error_code']}: {last.get('error_message', '')}"
    return text


class WaitTimeout(RetryableError):
    """No terminal event within the timeout; ``status`` is where the change stands (the ledger's)."""

    error_code = "wait_timeout"

    def __init__(self, status: Mapping[str, object], timeout: float) -> None:
        self.status = dict(status)
        self.timeout = timeout
        super().__init__(
            f"change {status['idempotency_key']!r} of account {status['account']!r} has no terminal event "
            f"after {timeout:g} s: {_where(status)}"
        )


class OutcomeUnavailable(LeadstageError):
    """The change ended (``status`` says how) but its event is no longer in the results stream."""

    error_code = "outcome_unavailable"

    def __init__(self, status: Mapping[str, object]) -> None:
        self.status = dict(status)
        super().__init__(
            f"change {status['idempotency_key']!r} of account {status['account']!r} is {status['state']}, "
            "but its event has been trimmed from the results stream (LEADSTAGE_RESULTS_MAXLEN)"
        )


async def standing(
    client: RedisClient, settings: Settings, account: str, idempotency_key: str
) -> tuple[dict[str, object] | None, ResultEvent | None]:
    """Where a change stands (``readers.change_status``) and its terminal event once it has one.

    The event is the one ``finish.lua`` recorded in the ledger (``event_id``) for the current
    generation; None while the change is not finished, or when the stream no longer holds it.
    """
    for _ in range(2):
        status = await readers.change_status(client, settings, account, idempotency_key)
        if status is None or status["state"] not in TERMINAL:
            return status, None
        with redis_errors():
            event_id = await client.hget(keys.ledger_key(keys.job_id(account, idempotency_key)), "event_id")  # type: ignore[misc]  # redis-py's async stubs
            entries = await client.xrange(settings.results_stream, min=event_id, max=event_id) if event_id else []
        if not entries:
            break  # trimmed from the stream (or finished before event ids were recorded)
        event = ResultEvent.from_entry(entries[0][0].decode(), _decoded(entries[0][1]))
        if event.generation == status["generation"]:
            return status, event
        # A replay started a new generation between the two reads: read where it stands now.
    return status, None


def _decoded(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


def _translated(exc: redis.exceptions.ResponseError, stream: str) -> ConfigError:
    """Redis refused a stream command: the key is not a stream, or the server is too old."""
    return ConfigError(f"Redis refused to read {stream!r} as a stream: {exc}")


# -- wait: one shared reader -------------------------------------------------------------------

Delivery = ResultEvent | LeadstageError


class SharedReader:
    """One blocking XREAD over the results stream, handing terminal events to the waits for them."""

    def __init__(self, client: RedisClient, stream: str) -> None:
        self.client, self.stream = client, stream
        self._waiters: dict[str, set[asyncio.Queue[Delivery]]] = {}
        self._task: asyncio.Task[None] | None = None
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
                    self._task = asyncio.create_task(self._run(position), name="leadstage-outcomes-reader")
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
            self._task.cancel()
            self._task = None

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _last_id(self) -> str:
        try:
            with redis_errors():
                last = await self.client.xrevrange(self.stream, count=1)
        except redis.exceptions.ResponseError as exc:
            raise _translated(exc, self.stream) from None
        return last[0][0].decode() if last else "0-0"

    async def _run(self, position: str) -> None:
        pause = RETRY_FIRST_S
        while True:
            try:
                with redis_errors():
                    answer = await self.client.xread(
                        {self.stream: position}, count=readers.PAGE, block=int(BLOCK_S * 1000)
                    )
            except RetryableError as exc:
                # Waits keep their deadlines; the reader resumes from its position, losing nothing.
                _log().warning("outcomes.reader_retry", error=str(exc), retry_in_s=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)
                continue
            except redis.exceptions.ResponseError as exc:
                self._fail_all(_translated(exc, self.stream))
                return
            pause = RETRY_FIRST_S
            for _, entries in answer:
                for raw_id, fields in entries:
                    position = raw_id.decode()
                    self._deliver(position, fields)

    def _deliver(self, entry_id: str, fields: Mapping[bytes, bytes]) -> None:
        job = fields.get(b"job_id", b"").decode()
        if job not in self._waiters or fields.get(b"event", b"").decode() not in TERMINAL_EVENTS:
            return
        delivery: Delivery
        try:
            delivery = ResultEvent.from_entry(entry_id, _decoded(fields))
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

    redis: aioredis.Redis
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
        if status["state"] in TERMINAL:
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


# -- consumer groups ---------------------------------------------------------------------------

E = TypeVar("E", bound=ResultEvent)
Start = Literal["new", "all"] | str


def _start_id(start: str) -> str:
    if start == "new":
        return "$"
    if start == "all":
        return "0"
    if isinstance(start, str) and _STREAM_ID.fullmatch(start):
        return start
    raise InvalidOption(f'start must be "new", "all" or a stream id such as 1764590000000-0, not {start!r}')


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidOption(f"{name} must be a finite number > 0, not {value!r}")
    return value


class _GroupConsumer(Generic[E]):
    """A consumer of one stream through a consumer group (see the module docstring)."""

    #: What each entry is read as (its ``from_entry`` raises ``InvalidEvent`` for one that is not).
    event_type: type[E]

    def __init__(
        self,
        group: str,
        consumer: str,
        *,
        settings: Settings | None = None,
        redis: RedisClient | None = None,
        start: Start = "new",
        claim_idle_s: float = 60.0,
        batch: int = 100,
        block_s: float = BLOCK_S,
        follow: bool = True,
    ) -> None:
        """``settings`` default to ``Settings.from_env()`` (the stream's name, REDIS_URL: a single
        Redis or a Redis Cluster); without ``redis`` a client is opened and ``aclose`` closes it.
        ``follow=False`` ends once nothing new is left instead of waiting for more."""
        for name, value in (("group", group), ("consumer", consumer)):
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise InvalidOption(f"{name} must be 1..200 printable ASCII characters without spaces, not {value!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= readers.PAGE:
            raise InvalidOption(f"batch must be an integer 1..{readers.PAGE}, not {batch!r}")
        self.settings = Settings.from_env() if settings is None else settings
        self.group, self.consumer, self.stream = group, consumer, self._stream(self.settings)
        self.start_id = _start_id(start)
        self.claim_idle_ms = int(_positive("claim_idle_s", claim_idle_s) * 1000)
        self.block_ms = int(_positive("block_s", block_s) * 1000)
        self.batch, self.follow = batch, follow
        self._owns_client = redis is None
        self.redis = connect_redis_or_cluster(self.settings.redis_url) if redis is None else redis

    @staticmethod
    def _stream(settings: Settings) -> str:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Redis client if this consumer opened it (pending entries stay pending)."""
        if self._owns_client:
            await self.redis.aclose()

    async def ack(self, *events: E | str) -> int:
        """Acknowledge events (or stream ids): the group will not deliver them again. Returns how many were pending."""
        ids = [e if isinstance(e, str) else e.id for e in events]
        if not ids:
            return 0
        with redis_errors():
            return int(await self.redis.xack(self.stream, self.group, *ids))

    def __aiter__(self) -> AsyncIterator[E]:
        return self._events()

    async def _events(self) -> AsyncIterator[E]:
        await self._ensure_group()
        # Our own pending entries first: a restart under the same name resumes where it stopped.
        cursor = "0"
        while True:
            entries = await self._read(cursor, block=False)
            for entry in entries:
                yield entry
            if not entries:
                break
            cursor = entries[-1].id
        claimed_at = -math.inf
        while True:
            if time.monotonic() - claimed_at >= min(self.claim_idle_ms, self.block_ms) / 1000:
                async for entry in self._claim():
                    yield entry
                claimed_at = time.monotonic()
            entries = await self._read(">", block=self.follow)
            for entry in entries:
                yield entry
            if not entries and not self.follow:
                return

    async def _ensure_group(self) -> None:
        try:
            with redis_errors():
                try:
                    await self.redis.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
                except redis.exceptions.ResponseError as exc:
                    # An existing group keeps its position. (Checked before redis_errors, which
                    # would take BUSYGROUP for BUSY, a refusal.)
                    if not str(exc).startswith("BUSYGROUP"):
                        raise
        except redis.exceptions.ResponseError as exc:
            raise _translated(exc, self.stream) from None

    async def _read(self, cursor: str, *, block: bool) -> list[E]:
        try:
            with redis_errors():
                answer = await self.redis.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: cursor},
                    count=self.batch,
                    block=self.block_ms if block else None,
                )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the group was destroyed under us: create it again, go on
                await self._ensure_group()
                return []
            raise _translated(exc, self.stream) from None
        raw: list[tuple[bytes, Mapping[bytes, bytes] | None]] = [entry for _, entries in answer for entry in entries]
        return await self._parsed(raw)

    async def _claim(self) -> AsyncIterator[E]:
        """Entries other consumers left unacked for ``claim_idle_s``, now ours (XAUTOCLAIM)."""
        cursor = "0-0"
        while True:
            try:
                with redis_errors():
                    answer = await self.redis.xautoclaim(
                        self.stream, self.group, self.consumer, self.claim_idle_ms, start_id=cursor, count=self.batch
                    )
            except redis.exceptions.ResponseError as exc:
                raise _translated(exc, self.stream) from None
            cursor = answer[0].decode()
            deleted: Sequence[bytes] = answer[2] if len(answer) > 2 else []
            if deleted:
                # Trimmed (LEADSTAGE_RESULTS_MAXLEN) or deleted (a replayed dead letter) before anyone
                # acked them: Redis drops them from the pending list.
                _log().warning("outcomes.entries_gone", group=self.group, stream=self.stream, count=len(deleted))
            for entry in await self._parsed(answer[1]):
                yield entry
            if cursor == "0-0":
                return

    async def _parsed(self, raw: Sequence[tuple[bytes, Mapping[bytes, bytes] | None]]) -> list[E]:
        events: list[E] = []
        gone: list[str] = []
        for raw_id, fields in raw:
            if not fields:
                gone.append(raw_id.decode())  # pending, but gone from the stream: nothing to deliver
                continue
            events.append(self.event_type.from_entry(raw_id.decode(), _decoded(fields)))
        if gone:
            _log().warning("outcomes.entries_gone", group=self.group, stream=self.stream, count=len(gone))
            await self.ack(*gone)
        return events


class ResultsConsumer(_GroupConsumer[ResultEvent]):
    """Every results event through consumer group ``group``, as ``consumer`` (see the module docstring).

    An entry that is not an event raises ``InvalidEvent`` (its ``entry_id``): ack it to skip it.
    """

    event_type = ResultEvent

    @staticmethod
    def _stream(settings: Settings) -> str:
        return settings.results_stream


class DeadLetterConsumer(_GroupConsumer[DeadLetter]):
    """Every dead letter through consumer group ``group``: like ``ResultsConsumer``, typed ``DeadLetter``."""

    event_type = DeadLetter

    @staticmethod
    def _stream(settings: Settings) -> str:
        return settings.dlq_stream
