"""Learning outcomes in Python: wait for one change, or consume every event with a consumer group.

Public API (re-exported by ``producers``)::

    receipt = await producer.enqueue(change, idempotency_key="crm-42")
    event = await producer.wait(receipt, timeout=30)            # or wait("crm-42", account=...)
    event.event, event.stage_id                                 # "succeeded", 1042

    async with ResultsConsumer("billing", "billing-1", settings=settings) as consumer:
        async for event in consumer:                            # typed ResultEvent, oldest first
            handle(event)
            await consumer.ack(event)                           # explicit: unacked ones come again

* ``wait`` returns the change's terminal event (``producers.waits``, which says how).
* ``ResultsConsumer`` (results) and ``DeadLetterConsumer`` (dead letters, ``DeadLetter``) read a
  Redis consumer group: at least once, each entry until it is acked. At start a consumer first
  gets its own pending entries back (a restart under the same name resumes), then entries other
  consumers have left unacked for ``claim_idle_s`` (XAUTOCLAIM: a dead consumer's batch is taken
  over), then new ones. ``start`` places a new group: ``"new"`` (entries added from now on),
  ``"all"`` (everything still in the stream) or a stream id (the entries after it); an existing
  group keeps its place. A consumer without a client of its own opens one with
  LEADSTAGE_REDIS_TIMEOUT and LEADSTAGE_REDIS_CONNECT_TIMEOUT: a Redis that does not answer is a
  ``RedisUnavailable`` within those, not a hang; each blocking read blocks ``block_s``, but at most
  half of LEADSTAGE_REDIS_TIMEOUT.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Generic, Literal, TypeVar

from producers.clients import RedisUser
from producers.waits import BLOCK_S, blocking_read_s, decoded, outcomes_log
from worker.core import readers
from worker.core.errors import InvalidOption, StreamRefused, stream_errors
from worker.core.redis_connection import RedisClient, connect_redis_or_cluster_of
from worker.core.results import DeadLetter, ResultEvent
from worker.core.settings import Settings

__all__ = ["DeadLetterConsumer", "ResultsConsumer"]

#: A consumer group or consumer name: printable ASCII without spaces.
_NAME = re.compile(r"[\x21-\x7e]{1,200}")
_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


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


class _GroupConsumer(RedisUser[RedisClient], Generic[E]):
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
        self.block_ms = int(blocking_read_s(self.settings, _positive("block_s", block_s)) * 1000)
        self.batch, self.follow = batch, follow
        super().__init__(self.settings, redis, connect_redis_or_cluster_of)

    @staticmethod
    def _stream(settings: Settings) -> str:
        raise NotImplementedError

    async def ack(self, *events: E | str) -> int:
        """Acknowledge events (or stream ids): the group will not deliver them again. Returns how many were pending."""
        ids = [e if isinstance(e, str) else e.id for e in events]
        if not ids:
            return 0
        with stream_errors(self.stream):
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
            with stream_errors(self.stream):
                await self.redis.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except StreamRefused as exc:
            if exc.reply != "BUSYGROUP":  # an existing group keeps its position
                raise

    async def _read(self, cursor: str, *, block: bool) -> list[E]:
        try:
            with stream_errors(self.stream):
                answer = await self.redis.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: cursor},
                    count=self.batch,
                    block=self.block_ms if block else None,
                )
        except StreamRefused as exc:
            if exc.reply != "NOGROUP":
                raise
            # The group was destroyed under us: create it again (at its start) and read on, so an
            # iteration that does not follow still gets what the new group holds.
            await self._ensure_group()
            return await self._read(cursor, block=block)
        raw: list[tuple[bytes, Mapping[bytes, bytes] | None]] = [entry for _, entries in answer for entry in entries]
        return await self._parsed(raw)

    async def _claim(self) -> AsyncIterator[E]:
        """Entries other consumers left unacked for ``claim_idle_s``, now ours (XAUTOCLAIM)."""
        cursor = "0-0"
        while True:
            with stream_errors(self.stream):
                answer = await self.redis.xautoclaim(
                    self.stream, self.group, self.consumer, self.claim_idle_ms, start_id=cursor, count=self.batch
                )
            cursor = answer[0].decode()
            deleted: Sequence[bytes] = answer[2] if len(answer) > 2 else []
            if deleted:
                # Trimmed (LEADSTAGE_RESULTS_MAXLEN) or deleted (a replayed dead letter) before anyone
                # acked them: Redis drops them from the pending list.
                outcomes_log().warning(
                    "outcomes.entries_gone", group=self.group, stream=self.stream, count=len(deleted)
                )
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
            events.append(self.event_type.from_entry(raw_id.decode(), decoded(fields)))
        if gone:
            outcomes_log().warning("outcomes.entries_gone", group=self.group, stream=self.stream, count=len(gone))
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
