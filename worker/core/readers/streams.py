"""The results and dead-letter streams read in pages, and the time filters of the readers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass

from redis.asyncio.cluster import RedisCluster

from worker.core.errors import BadFilter, redis_errors
from worker.core.redis_connection import RedisClient
from worker.core.settings import Settings

PAGE = 1000

Entry = dict[str, str]


def as_entry(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Entry:
    """A stream entry as flat strings, its stream id first (``id``)."""
    return {"id": entry_id.decode(), **{k.decode(): v.decode() for k, v in fields.items()}}


def matches(entry: Entry, idempotency_key: str | None, account: str | None) -> bool:
    return (idempotency_key is None or entry.get("idempotency_key") == idempotency_key) and (
        account is None or entry.get("account") == account
    )


async def stream_pages(client: RedisClient, stream: str, start: str = "-") -> AsyncIterator[Entry]:
    """Every entry of ``stream`` from ``start`` on, oldest first, one page per round trip."""
    while True:
        with redis_errors():
            page = await client.xrange(stream, min=start, max="+", count=PAGE)
        for entry_id, fields in page:
            yield as_entry(entry_id, fields)
        if len(page) < PAGE:
            return
        start = "(" + page[-1][0].decode()


async def results(
    client: RedisClient,
    settings: Settings,
    *,
    idempotency_key: str | None = None,
    account: str | None = None,
    follow: bool = False,
    block_ms: int = 5000,
) -> AsyncIterator[Entry]:
    """The results stream, oldest first; with ``follow``, then every new entry as it arrives.

    Following blocks in XREAD for up to ``block_ms`` at a time and never ends by itself: the
    caller cancels it (``leadstage results --follow`` does on SIGINT/SIGTERM).
    """
    last = "0-0"
    async for entry in stream_pages(client, settings.results_stream):
        last = entry["id"]
        if matches(entry, idempotency_key, account):
            yield entry
    while follow:
        with redis_errors():
            answer = await client.xread({settings.results_stream: last}, count=PAGE, block=block_ms)
        for _, stream_entries in answer:
            for entry_id, fields in stream_entries:
                entry = as_entry(entry_id, fields)
                last = entry["id"]
                if matches(entry, idempotency_key, account):
                    yield entry


async def dead_letters(
    client: RedisClient,
    settings: Settings,
    *,
    account: str | None = None,
    idempotency_keys: Collection[str] | None = None,
    error_code: str | None = None,
    since_ms: int | None = None,
) -> AsyncIterator[Entry]:
    """The dead-letter stream, oldest first, optionally only some accounts', keys' or error codes',
    and only those dead-lettered at or after ``since_ms`` (Redis's clock, as ``redis_now_ms``)."""
    async for entry in stream_pages(client, settings.dlq_stream, start="-" if since_ms is None else str(since_ms)):
        if (
            matches(entry, None, account)
            and (idempotency_keys is None or entry.get("idempotency_key") in idempotency_keys)
            and (error_code is None or entry.get("error_code") == error_code)
        ):
            yield entry


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a replay or discard is about (the console's and ``leadstage dlq replay``'s):
    some keys of one account, or a filter; a field left ``None`` matches every dead letter."""

    keys: Collection[str] | None = None
    account: str | None = None
    error_code: str | None = None
    #: A duration (``parse_duration``): only those dead-lettered within it.
    since: str | None = None


async def selected_dead_letters(client: RedisClient, settings: Settings, selection: Selection) -> AsyncIterator[Entry]:
    """The dead letters ``selection`` chooses, oldest first."""
    async for entry in dead_letters(
        client,
        settings,
        account=selection.account,
        idempotency_keys=selection.keys,
        error_code=selection.error_code,
        since_ms=await since_as_ms(client, selection.since, settings.dlq_stream),
    ):
        yield entry


_DURATION = re.compile(r"(?:\d+[smhd])+")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Longer than any sensible duration, short enough that no number in it is costly to read.
_DURATION_MAX_CHARS = 32


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``2h``, ``7d`` or a sum such as ``1h30m``, in seconds; ``BadFilter`` otherwise."""
    cleaned = text.strip().lower()
    if len(cleaned) > _DURATION_MAX_CHARS or not _DURATION.fullmatch(cleaned):
        raise BadFilter(f"since must be a duration such as 90s, 15m, 2h or 7d (units s, m, h, d), not {text[:40]!r}")
    seconds = sum(int(number) * _UNIT_S[unit] for number, unit in re.findall(r"(\d+)([smhd])", cleaned))
    if seconds <= 0:
        raise BadFilter(f"since must be longer than zero, not {text!r}")
    return seconds


async def since_as_ms(client: RedisClient, since: str | None, stream: str) -> int | None:
    """A ``since`` duration (``parse_duration``) as a moment of ``stream``'s Redis clock, never before 1970."""
    if since is None:
        return None
    return max(await redis_now_ms(client, stream) - parse_duration(since) * 1000, 0)


async def redis_now_ms(client: RedisClient, stream: str) -> int:
    """Redis's clock in ms: the clock of ``stream``'s ids, so that windows do not depend on this
    host's (on a Redis Cluster, the clock of the stream's master: each has its own)."""
    with redis_errors():
        if isinstance(client, RedisCluster):
            await client.initialize()  # the slot map, asked once
            seconds, micros = await client.time(target_nodes=client.get_node_from_key(stream))
        else:
            seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def id_ms(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


def id_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
