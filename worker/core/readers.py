"""Reading what the product wrote, for the ``leadstage`` commands results, status, dlq and stats,
and for the console (``worker.console``: overview, failures, a change's timeline).

Everything here reads Redis the way the worker writes it (``worker.core.keys``, ``worker.core.ledger``,
``worker.core.results``, the heartbeats of ``worker.runner``) and changes nothing, except ``replay``, which goes through
``Ledger.replay`` like every other enqueue, and ``discard``, which deletes one dead letter. Streams are read in
pages, so a stream of 100,000 entries costs a hundred round trips and bounded memory, not one huge reply.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from worker.core import keys
from worker.core.change import parse_change, parse_envelope
from worker.core.errors import STALE_REQUEST_CODE, PermanentError, redis_errors
from worker.core.ledger import Ledger
from worker.core.results import TERMINAL_EVENTS, iso_ms
from worker.core.settings import Settings
from worker.core.states import State

__all__ = [
    "PAGE",
    "RATE_WINDOWS_S",
    "BadFilter",
    "RateHistory",
    "ReplayOutcome",
    "change_status",
    "change_timeline",
    "dead_letters",
    "discard",
    "failures",
    "overview",
    "parse_duration",
    "redis_now_ms",
    "replay",
    "results",
    "since_as_ms",
    "stats",
]

#: Stream entries per round trip.
PAGE = 1000
#: The windows of ``stats``' recent rates: name -> seconds.
RATE_WINDOWS_S: Mapping[str, int] = {"1m": 60, "5m": 300}
#: The events counted in the recent rates (terminal outcomes, and retries as a sign of trouble).
RATE_EVENTS = ("succeeded", "failed", "superseded", "retrying")

Entry = dict[str, str]
#: The key of ``stats``' recent counts of stale-clock answers (not an event: a kind of retry).
_CLOCK_SKEW = "clock_skew_pauses"
#: How terminal events say their change was sent (``sent_as``), counted by ``stats`` as ``sent_<how>``.
SENT_AS = ("alone", "coalesced")


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
    error_code: str | None = None,
    since_ms: int | None = None,
) -> AsyncIterator[Entry]:
    """The dead-letter stream, oldest first, optionally only some accounts', keys' or error codes',
    and only those dead-lettered at or after ``since_ms`` (Redis's clock, as ``redis_now_ms``)."""
    async for entry in _pages(client, settings.dlq_stream, start="-" if since_ms is None else str(since_ms)):
        if (
            _matches(entry, None, account)
            and (idempotency_keys is None or entry.get("idempotency_key") in idempotency_keys)
            and (error_code is None or entry.get("error_code") == error_code)
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

    * ``queue_depth``: ZCARD of the accounts' queues: every change not finished yet;
    * ``in_progress``: the changes the live workers are attempting, as each worker's heartbeat
      reports them (``keys.WORKERS``; a worker silent for a whole lease is dead and not counted);
      ``workers`` is how many are alive;
    * ``retrying``: changes scheduled for later (backoff, rate limit, a locked stage): the queue's
      future scores, less the running changes (whose scores are pushed one lease ahead);
    * ``waiting``: changes due now and not yet taken;
    * ``dead_letters`` and ``results``: XLEN of the two streams;
    * ``recent``: events per outcome in the last minute and five minutes, read from the results
      stream by entry id (ids are Redis's clock, so no host clock skew), with the terminal events
      per second and ``clock_skew_pauses``: attempts iVvy refused as stale (23005, a worker's
      clock is off), each of which paused its account, and ``sent_alone`` / ``sent_coalesced``:
      the changes among the terminal ones that were sent alone or in a coalesced request.
    """
    with redis_errors():
        (seconds, micros) = await client.time()
        now_ms = seconds * 1000 + micros // 1000
        async with client.pipeline(transaction=False) as pipe:
            pipe.hvals(keys.WORKERS)
            pipe.xlen(settings.dlq_stream)
            pipe.xlen(settings.results_stream)
            pipe.hgetall(keys.PENDING)
            heartbeats, dead, result_count, pending = await pipe.execute()
        # Each account has its own queue: those with changes not yet terminal, and the configured ones.
        queues = [keys.queue_key(settings.queue_name, a) for a in {*(a.decode() for a in pending), *settings.accounts}]
        async with client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zcard(queue)
                pipe.zcount(queue, f"({now_ms}", "+inf")
            sizes: list[int] = await pipe.execute()
        depth, later = sum(sizes[0::2]), sum(sizes[1::2])

    alive = [
        running for running, seen in (_heartbeat(raw) for raw in heartbeats) if seen >= now_ms - settings.lease_s * 1000
    ]
    in_progress = sum(alive)
    longest = max(RATE_WINDOWS_S.values())
    since: dict[str, Counter[str]] = {name: Counter() for name in RATE_WINDOWS_S}
    stale = str(STALE_REQUEST_CODE)
    async for entry in _pages(client, settings.results_stream, start=str(now_ms - longest * 1000)):
        age_ms = now_ms - int(entry["id"].partition("-")[0])
        for name, window_s in RATE_WINDOWS_S.items():
            if age_ms <= window_s * 1000:
                since[name][entry.get("event", "")] += 1
                if entry.get("error_code") == stale:
                    since[name][_CLOCK_SKEW] += 1
                if entry.get("event") in TERMINAL_EVENTS and entry.get("sent_as"):
                    since[name]["sent_" + entry["sent_as"]] += 1
    recent: dict[str, dict[str, float]] = {}
    for name, window_s in RATE_WINDOWS_S.items():
        counts: dict[str, float] = {event: since[name][event] for event in RATE_EVENTS}
        terminal = sum(since[name][event] for event in TERMINAL_EVENTS)
        counts["terminal_per_s"] = round(terminal / window_s, 3)
        counts[_CLOCK_SKEW] = since[name][_CLOCK_SKEW]
        for how in SENT_AS:
            counts["sent_" + how] = since[name]["sent_" + how]
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


# -- the console (``worker.console``) and the filters of ``leadstage dlq`` ------------------------


class BadFilter(PermanentError):
    """A filter given to a reader (``since``, a page cursor) is not usable as given."""

    error_code = "bad_filter"


_DURATION = re.compile(r"(?:\d+[smhd])+")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Longer than any sensible duration, short enough that no number in it is costly to read.
_DURATION_MAX_CHARS = 32
_STREAM_ID = re.compile(r"\d+-\d+")
#: The events of the results stream that are failures, for ``failures``' recent counts.
FAILURE_EVENTS = ("failed", "retrying")
#: What a dead letter shows of itself (its fields are the results event's, plus the original change).
DEAD_LETTER_FIELDS = (
    "account", "idempotency_key", "job_id", "operation", "attempt", "http_status", "error_code", "error_message",
    "retryable", "generation", "source", "enqueued_at", "finished_at",
)  # fmt: skip


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``2h``, ``7d`` or a sum such as ``1h30m``, in seconds; ``BadFilter`` otherwise."""
    cleaned = text.strip().lower()
    if len(cleaned) > _DURATION_MAX_CHARS or not _DURATION.fullmatch(cleaned):
        raise BadFilter(f"since must be a duration such as 90s, 15m, 2h or 7d (units s, m, h, d), not {text[:40]!r}")
    seconds = sum(int(number) * _UNIT_S[unit] for number, unit in re.findall(r"(\d+)([smhd])", cleaned))
    if seconds <= 0:
        raise BadFilter(f"since must be longer than zero, not {text!r}")
    return seconds


async def since_as_ms(client: aioredis.Redis, since: str | None) -> int | None:
    """A ``since`` duration (``parse_duration``) as a moment of Redis's clock, never before 1970."""
    if since is None:
        return None
    return max(await redis_now_ms(client) - parse_duration(since) * 1000, 0)


async def redis_now_ms(client: aioredis.Redis) -> int:
    """Redis's clock in ms: the clock of stream ids, so that windows do not depend on this host's."""
    with redis_errors():
        seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _id_ms(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


def _id_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class RateHistory:
    """Results events per ``BUCKET_S`` over the last ``SPAN_S``, read from the stream incrementally:
    per event, requests per account, and failures per account and error code.

    The console keeps one: each ``update`` reads only the entries added since the last one, so a
    page polling every few seconds costs a few entries, not an hour of the stream.
    """

    BUCKET_S = 10
    SPAN_S = 3600
    SERIES = ("succeeded", "failed", "retrying")
    #: The window of ``used_per_s``.
    USE_WINDOW_S = 60

    def __init__(self) -> None:
        self._after: str | None = None
        self._events: dict[int, Counter[str]] = defaultdict(Counter)
        #: Per bucket, per account: events that posted a body to iVvy (each one request).
        self._requests: dict[int, Counter[str]] = defaultdict(Counter)
        #: Per bucket: failure events (``FAILURE_EVENTS``) by (account, error code, event).
        self._failures: dict[int, Counter[tuple[str, str, str]]] = defaultdict(Counter)
        self._lock = asyncio.Lock()

    async def update(self, client: aioredis.Redis, settings: Settings, now_ms: int) -> None:
        async with self._lock:
            oldest = now_ms - self.SPAN_S * 1000
            after = self._after
            start = str(oldest) if after is None or _id_ms(after) < oldest else "(" + after
            async for entry in _pages(client, settings.results_stream, start=start):
                self._after = entry["id"]
                bucket = _id_ms(entry["id"]) // (self.BUCKET_S * 1000)
                self._events[bucket][entry.get("event", "")] += 1
                if entry.get("change"):
                    self._requests[bucket][entry.get("account", "")] += 1
                if entry.get("event") in FAILURE_EVENTS:
                    self._failures[bucket][entry.get("account", ""), entry.get("error_code", ""), entry["event"]] += 1
            first = oldest // (self.BUCKET_S * 1000)
            tables: tuple[dict[int, Counter[Any]], ...] = (self._events, self._requests, self._failures)
            for table in tables:
                for bucket in [b for b in table if b < first]:
                    del table[bucket]

    def used_per_s(self, account: str, now_ms: int) -> float:
        """Requests per second that ``account`` sent to iVvy over about the last minute."""
        last = now_ms // (self.BUCKET_S * 1000)
        buckets = range(last - self.USE_WINDOW_S // self.BUCKET_S + 1, last + 1)
        requests = sum(self._requests[b][account] for b in buckets if b in self._requests)
        return round(requests / self.USE_WINDOW_S, 3)

    def failures_since(self, since_ms: int) -> Counter[tuple[str, str, str]]:
        """Failure events by (account, error code, event) from the bucket holding ``since_ms`` on."""
        first = since_ms // (self.BUCKET_S * 1000)
        total: Counter[tuple[str, str, str]] = Counter()
        for bucket, counts in self._failures.items():
            if bucket >= first:
                total.update(counts)
        return total

    def series(self, now_ms: int) -> dict[str, object]:
        """Events per second in each bucket of the span, oldest first (the last bucket is still filling)."""
        last = now_ms // (self.BUCKET_S * 1000)
        buckets = range(last - self.SPAN_S // self.BUCKET_S + 1, last + 1)
        rates: dict[str, object] = {"bucket_s": self.BUCKET_S, "start": iso_ms(buckets[0] * self.BUCKET_S * 1000)}
        for event in self.SERIES:
            counts = [self._events[b][event] if b in self._events else 0 for b in buckets]
            rates[event] = [round(count / self.BUCKET_S, 3) for count in counts]
            rates[f"{event}_last_hour"] = sum(counts)
        return rates


async def _queue_by_account(client: aioredis.Redis, settings: Settings, now_ms: int) -> dict[str, Counter[str]]:
    """queued, due, in_progress and retrying per account, from the queue and the ledger states."""
    scores: dict[str, float] = {}
    with redis_errors():
        pending = await client.hkeys(keys.PENDING)  # type: ignore[misc]  # redis-py's async stubs
    # Each account has its own queue: the configured accounts and those with changes not yet terminal.
    for account in sorted({*settings.accounts, *(a.decode() for a in pending)}):
        cursor = 0
        while True:
            with redis_errors():
                cursor, page = await client.zscan(keys.queue_key(settings.queue_name, account), cursor, count=PAGE)
            # ZSCAN may return a member twice while the set is rehashed: keyed by member, counted once.
            scores.update((member.decode(), score) for member, score in page)
            if cursor == 0:
                break
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    later = []
    for job, score in scores.items():
        account = keys.split_job_id(job)[0]
        counts[account]["queued"] += 1
        if score <= now_ms:
            counts[account]["due"] += 1
        else:
            later.append(job)
    # A running change is hidden one lease ahead, like a deferred one: its ledger state tells them apart.
    for start in range(0, len(later), PAGE):
        chunk = later[start : start + PAGE]
        with redis_errors():
            async with client.pipeline(transaction=False) as pipe:
                for job in chunk:
                    pipe.hget(keys.ledger_key(job), "state")
                states = await pipe.execute()
        for job, state in zip(chunk, states, strict=True):
            running = state is not None and state.decode() == State.RUNNING
            counts[keys.split_job_id(job)[0]]["in_progress" if running else "retrying"] += 1
    return counts


async def overview(client: aioredis.Redis, settings: Settings, history: RateHistory) -> dict[str, object]:
    """Per account: queued, due now, in progress, retrying, dead letters, paused until, the rate
    limit and its use; the workers with their heartbeat age; events per second over the last hour.

    Accounts are the configured ones and any the queue or the dead letters name. Nothing of an
    account's credentials is read: only its name and rate limit.
    """
    now = await redis_now_ms(client)
    counts = await _queue_by_account(client, settings, now)
    async for entry in _pages(client, settings.dlq_stream):
        counts[entry.get("account", "")]["dead_letters"] += 1
    accounts = sorted(set(settings.accounts) | {name for name in counts if name})
    with redis_errors():
        async with client.pipeline(transaction=False) as pipe:
            for account in accounts:
                pipe.hget(keys.rate_key(account), "pause_until")
            pipe.hgetall(keys.WORKERS)
            *pauses, heartbeats = await pipe.execute()
    await history.update(client, settings, now)
    rows = []
    for account, pause in zip(accounts, pauses, strict=True):
        configured = settings.account(account)
        pause_until = int(pause or 0)
        rows.append(
            {
                "account": account,
                **{field: counts[account][field] for field in ("queued", "due", "in_progress", "retrying")},
                "dead_letters": counts[account]["dead_letters"],
                "paused_until": iso_ms(pause_until) if pause_until > now else None,
                "rate_limit": {
                    "per_s": configured.rate_limit if configured else settings.rate_limit,
                    "used_per_s": history.used_per_s(account, now),
                },
            }
        )
    workers = []
    for worker_id, raw in sorted(heartbeats.items()):
        running, seen = _heartbeat(raw)
        age_s = max(now - seen, 0) / 1000
        workers.append(
            {
                "id": worker_id.decode(),
                "running": running,
                "heartbeat_age_s": round(age_s, 1),
                "alive": age_s <= settings.lease_s,
            }
        )
    return {"now": iso_ms(now), "accounts": rows, "workers": workers, "rates": history.series(now)}


def _dead_letter_view(entry: Entry) -> dict[str, object]:
    view: dict[str, object] = {"id": entry["id"], "dead_lettered_at": iso_ms(_id_ms(entry["id"]))}
    view.update({field: entry.get(field, "") for field in DEAD_LETTER_FIELDS})
    view["original_change"] = orjson.loads(entry["original_change"]) if entry.get("original_change") else None
    return view


async def failures(
    client: aioredis.Redis,
    settings: Settings,
    history: RateHistory,
    *,
    account: str | None = None,
    error_code: str | None = None,
    since_ms: int | None = None,
    limit: int = 50,
    before: str | None = None,
) -> dict[str, object]:
    """Dead letters and recent failures grouped by account and error code, and one page of the
    matching dead letters, newest first (``before``: the ``next`` of the previous page).

    Recent failures are the results stream's ``failed`` and ``retrying`` events of the last hour
    (``RateHistory.SPAN_S``), or since ``since_ms`` when that is later, counted by ``history``.
    """
    if before is not None and not _STREAM_ID.fullmatch(before):
        raise BadFilter(f"before must be a dead-letter id such as 1764590000000-0, not {before!r}")
    letters = [
        entry
        async for entry in dead_letters(client, settings, account=account, error_code=error_code, since_ms=since_ms)
    ]
    groups: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for entry in letters:
        groups[entry.get("account", ""), entry.get("error_code", "")]["dead_letters"] += 1
    now = await redis_now_ms(client)
    await history.update(client, settings, now)
    recent_from = max(since_ms or 0, now - history.SPAN_S * 1000)
    for (event_account, code, event), count in history.failures_since(recent_from).items():
        if (account is None or event_account == account) and (error_code is None or code == error_code):
            groups[event_account, code][event] += count
    newest = letters[::-1]
    if before is not None:
        newest = [entry for entry in newest if _id_order(entry["id"]) < _id_order(before)]
    page = newest[:limit]
    return {
        "dead_letters_matching": len(letters),
        "recent_since": iso_ms(recent_from),
        "groups": [
            {
                "account": group_account,
                "error_code": code,
                "dead_letters": counter["dead_letters"],
                "recent_failed": counter["failed"],
                "recent_retrying": counter["retrying"],
            }
            for (group_account, code), counter in sorted(
                groups.items(), key=lambda item: (-item[1]["dead_letters"], -item[1].total(), item[0])
            )
        ],
        "dead_letters": [_dead_letter_view(entry) for entry in page],
        "next": page[-1]["id"] if len(newest) > limit else None,
    }


async def discard(client: aioredis.Redis, settings: Settings, entry: Entry) -> str:
    """Delete one dead letter (the ledger keeps its ``failed`` state until it expires):
    ``discarded``, or ``not_found`` when it was already gone (replayed or discarded meanwhile)."""
    with redis_errors():
        deleted = await client.xdel(settings.dlq_stream, entry["id"])
    return "discarded" if deleted else "not_found"


def _iso_to_ms(text: str | None) -> int | None:
    return int(datetime.fromisoformat(text).timestamp() * 1000) if text else None


#: How far before its first attempt the results stream is searched for a change's events: the
#: ledger's times are the workers' clocks, stream ids Redis's.
_CLOCK_MARGIN_MS = 300_000


async def change_timeline(
    client: aioredis.Redis, settings: Settings, account: str, idempotency_key: str
) -> dict[str, object] | None:
    """One change (``change_status``) and its timeline, oldest first: enqueued, then each attempt
    with its HTTP status, error code and, from the results stream, its duration and whole event.

    The ledger's ``history`` is the record of every attempt; the results stream adds what the
    history leaves out, for as long as the stream still holds the events (``results_maxlen``).
    """
    status = await change_status(client, settings, account, idempotency_key)
    if status is None:
        return None
    history = cast(list[dict[str, str]], status["history"])
    moments = [cast(str | None, status["enqueued_at"]), *(h.get("finished_at") for h in history)]
    times = [t for t in map(_iso_to_ms, moments) if t is not None]
    start = str(max(min(times) - _CLOCK_MARGIN_MS, 0)) if times else "-"
    events: dict[tuple[str, str, str], Entry] = {}
    async for entry in _pages(client, settings.results_stream, start=start):
        if _matches(entry, idempotency_key, account):
            events[entry.get("event", ""), entry.get("attempt", ""), entry.get("finished_at", "")] = entry
    # The ledger keeps the enqueue of the current generation; each event names its own generation's.
    enqueued = {int(e.get("generation") or 0): e["enqueued_at"] for e in events.values() if e.get("enqueued_at")}
    enqueued[cast(int, status["generation"])] = cast(str, status["enqueued_at"])
    timeline: list[dict[str, object]] = [
        {"kind": "enqueued", "at": at, "generation": generation} for generation, at in sorted(enqueued.items())
    ]
    for attempt in history:
        event = events.get((attempt.get("event", ""), attempt.get("attempt", ""), attempt.get("finished_at", "")))
        timeline.append(
            {
                "kind": "attempt",
                "at": attempt.get("finished_at"),
                "event": attempt.get("event"),
                "attempt": int(attempt.get("attempt") or 0),
                "http_status": int(attempt["http_status"]) if attempt.get("http_status") else None,
                "error_code": attempt.get("error_code") or None,
                "error_message": attempt.get("error_message") or None,
                "duration_ms": int(event["duration_ms"]) if event and event.get("duration_ms") else None,
                "stage_id": int(event["stage_id"]) if event and event.get("stage_id") else None,
                "result": event,
            }
        )
    timeline.sort(key=lambda item: str(item["at"] or ""))
    return {"change": status, "timeline": timeline}
