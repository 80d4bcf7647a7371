"""Reading what the product wrote, for the ``leadstage`` commands results, status, dlq and stats.

Everything here reads Redis the way the worker writes it (``worker.keys``, ``worker.ledger``,
``worker.results``, the heartbeats of ``worker.runner``) and changes nothing, except ``replay``, which goes through
``Ledger.replay`` like every other enqueue. Streams are read in pages, so a stream of 100,000
entries costs a hundred round trips and bounded memory, not one huge reply.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from worker import keys
from worker.change import parse_change, parse_envelope
from worker.errors import redis_errors
from worker.ledger import Ledger
from worker.results import TERMINAL_EVENTS, iso_ms
from worker.settings import Settings

__all__ = [
    "PAGE",
    "RATE_WINDOWS_S",
    "ReplayOutcome",
    "change_status",
    "dead_letters",
    "replay",
    "results",
    "stats",
]

#: Stream entries per round trip.
PAGE = 1000
#: The windows of ``stats``' recent rates: name -> seconds.
RATE_WINDOWS_S: Mapping[str, int] = {"1m": 60, "5m": 300}
#: The events counted in the recent rates (terminal outcomes, and retries as a sign of trouble).
RATE_EVENTS = ("succeeded", "failed", "superseded", "retrying")

Entry = dict[str, str]


def _entry(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Entry:
    """A stream entry as flat strings, its stream id first (``id``)."""
    return {"id": entry_id.decode(), **{k.decode(): v.decode() for k, v in fields.items()}}


def _matches(entry: Entry, idempotency_key: str | None, account: str | None) -> bool:
    return (idempotency_key is None or entry.get("idempotency_key") == idempotency_key) and (
        account is None or entry.get("account") == account
    )


async def _pages(client: aioredis.Redis, stream: str, start: str = "-") -> AsyncIterator[Entry]:
    """Every entry of ``stream`` from ``start`` on, oldest first, one page per round trip."""
    while True:
        with redis_errors():
            page = await client.xrange(stream, min=start, max="+", count=PAGE)
        for entry_id, fields in page:
            yield _entry(entry_id, fields)
        if len(page) < PAGE:
            return
        start = "(" + page[-1][0].decode()


async def results(
    client: aioredis.Redis,
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
    async for entry in _pages(client, settings.results_stream):
        last = entry["id"]
        if _matches(entry, idempotency_key, account):
            yield entry
    while follow:
        with redis_errors():
            answer = await client.xread({settings.results_stream: last}, count=PAGE, block=block_ms)
        for _, stream_entries in answer:
            for entry_id, fields in stream_entries:
                entry = _entry(entry_id, fields)
                last = entry["id"]
                if _matches(entry, idempotency_key, account):
                    yield entry


async def change_status(
    client: aioredis.Redis, settings: Settings, account: str, idempotency_key: str
) -> dict[str, object] | None:
    """Where one change stands, from its ledger entry; None when the key is unknown (or expired).

    ``history`` has one object per finished attempt (event, attempt, finished_at, http_status,
    error_code, error_message), oldest first.
    """
    job = keys.job_id(account, idempotency_key)
    entry = await Ledger(client, settings).entry(job)
    if entry is None:
        return None

    def when(field: str) -> str | None:
        value = int(entry.get(field) or 0)
        return iso_ms(value) if value > 0 else None

    state = entry.get("state", "")
    return {
        "job_id": job,
        "idempotency_key": idempotency_key,
        "account": account,
        "state": state,
        "operation": entry.get("op", ""),
        "stage_id": int(entry["stage_id"]) if entry.get("stage_id") else None,
        "change": orjson.loads(entry["change"]) if entry.get("change") else None,
        "source": entry.get("source", ""),
        "attempts": int(entry.get("attempts") or 0),
        "generation": int(entry.get("gen") or 0),
        "enqueued_at": when("enqueued_at"),
        "last_attempt_at": when("attempt_at"),
        "next_attempt_at": when("next_at") if state == "retrying" else None,
        "finished_at": when("finished_at"),
        "history": [orjson.loads(line) for line in entry.get("history", "").splitlines() if line],
    }


async def dead_letters(
    client: aioredis.Redis,
    settings: Settings,
    *,
    account: str | None = None,
    idempotency_keys: Collection[str] | None = None,
) -> AsyncIterator[Entry]:
    """The dead-letter stream, oldest first, optionally only some accounts' or keys'."""
    async for entry in _pages(client, settings.dlq_stream):
        if _matches(entry, None, account) and (
            idempotency_keys is None or entry.get("idempotency_key") in idempotency_keys
        ):
            yield entry


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """What ``replay`` did with one dead letter."""

    dead_letter_id: str
    job_id: str
    idempotency_key: str
    account: str
    #: ``queued``, or ``not_failed`` when the ledger says the change is not failed (already
    #: replayed, say): then the dead letter is left alone.
    status: str
    generation: int

    def as_dict(self) -> dict[str, object]:
        return {
            "job_id": self.job_id,
            "idempotency_key": self.idempotency_key,
            "account": self.account,
            "status": self.status,
            "generation": self.generation,
            "dead_letter_id": self.dead_letter_id,
        }


async def replay(client: aioredis.Redis, settings: Settings, entry: Entry) -> ReplayOutcome:
    """Put one dead-lettered change back on the queue under its own key (a new generation).

    The dead letter carries the whole original change (``original_change``), its key, account
    and source; ``Ledger.replay`` re-enqueues it and deletes the dead letter in one script.
    """
    change = parse_change(orjson.loads(entry["original_change"]))
    envelope = parse_envelope(
        idempotency_key=entry["idempotency_key"], account=entry["account"], source=entry.get("source") or None
    )
    status, generation = await Ledger(client, settings).replay(
        change, envelope, dlq_entry_id=entry["id"], generation=entry.get("generation", "0")
    )
    return ReplayOutcome(
        entry["id"], keys.job_id(envelope.account, envelope.idempotency_key), envelope.idempotency_key,
        envelope.account, status, generation,
    )  # fmt: skip


async def stats(client: aioredis.Redis, settings: Settings) -> dict[str, object]:
    """Queue depth, in progress, retrying, dead letters and recent rates, in two round trips.

    * ``queue_depth``: ZCARD of the queue: every change not finished yet;
    * ``in_progress``: the changes the live workers are attempting, as each worker's heartbeat
      reports them (``keys.WORKERS``; a worker silent for a whole lease is dead and not counted);
      ``workers`` is how many are alive;
    * ``retrying``: changes scheduled for later (backoff, rate limit, a locked stage): the queue's
      future scores, less the running changes (whose scores are pushed one lease ahead);
    * ``waiting``: changes due now and not yet taken;
    * ``dead_letters`` and ``results``: XLEN of the two streams;
    * ``recent``: events per outcome in the last minute and five minutes, read from the results
      stream by entry id (ids are Redis's clock, so no host clock skew), with the terminal events
      per second.
    """
    with redis_errors():
        (seconds, micros) = await client.time()
        now_ms = seconds * 1000 + micros // 1000
        async with client.pipeline(transaction=False) as pipe:
            pipe.zcard(settings.queue_name)
            pipe.zcount(settings.queue_name, f"({now_ms}", "+inf")
            pipe.hvals(keys.WORKERS)
            pipe.xlen(settings.dlq_stream)
            pipe.xlen(settings.results_stream)
            pipe.hgetall(keys.PENDING)
            depth, later, heartbeats, dead, result_count, pending = await pipe.execute()

    alive = [
        running for running, seen in (_heartbeat(raw) for raw in heartbeats) if seen >= now_ms - settings.lease_s * 1000
    ]
    in_progress = sum(alive)
    longest = max(RATE_WINDOWS_S.values())
    since: dict[str, Counter[str]] = {name: Counter() for name in RATE_WINDOWS_S}
    async for entry in _pages(client, settings.results_stream, start=str(now_ms - longest * 1000)):
        age_ms = now_ms - int(entry["id"].partition("-")[0])
        for name, window_s in RATE_WINDOWS_S.items():
            if age_ms <= window_s * 1000:
                since[name][entry.get("event", "")] += 1
    recent: dict[str, dict[str, float]] = {}
    for name, window_s in RATE_WINDOWS_S.items():
        counts: dict[str, float] = {event: since[name][event] for event in RATE_EVENTS}
        terminal = sum(since[name][event] for event in TERMINAL_EVENTS)
        counts["terminal_per_s"] = round(terminal / window_s, 3)
        recent[name] = counts
    return {
        "queue_depth": depth,
        "waiting": depth - later,
        "in_progress": in_progress,
        "retrying": max(later - in_progress, 0),
        "workers": len(alive),
        "dead_letters": dead,
        "results": result_count,
        "recent": recent,
        "accounts": _backlogs(pending, settings),
    }


def _backlogs(pending: dict[bytes, bytes], settings: Settings) -> dict[str, dict[str, object]]:
    """Per account: changes not yet terminal, when the newest of them can be expected to start at
    the account's rate limit, and whether that is past LEADSTAGE_MAX_AGE (they would fail as too old)."""
    accounts: dict[str, dict[str, object]] = {}
    for raw_account, raw_count in sorted(pending.items()):
        account, backlog = raw_account.decode(), int(raw_count)
        wait_s = backlog / settings.rate_limit_for(account)
        accounts[account] = {
            "backlog": backlog,
            "expected_start_in_s": round(wait_s, 1),
            "past_max_age": wait_s > settings.max_age_s,
        }
    return accounts


def _heartbeat(raw: bytes) -> tuple[int, int]:
    """A worker's heartbeat value, ``{running}|{last seen ms}``, as numbers."""
    running, _, seen = raw.decode().partition("|")
    return int(running or 0), int(seen or 0)
