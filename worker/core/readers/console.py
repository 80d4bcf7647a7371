"""What the console (``worker.console``) shows: the overview, the failures, and dead-letter discards."""

from __future__ import annotations

import asyncio
import re
from collections import Counter, defaultdict
from typing import Any

import orjson

from worker.core import keys
from worker.core.errors import BadFilter, redis_errors
from worker.core.pending import backlogs
from worker.core.readers.stats import parse_heartbeat
from worker.core.readers.streams import PAGE, Entry, dead_letters, id_ms, id_order, redis_now_ms, stream_pages
from worker.core.redis_connection import RedisClient
from worker.core.results import iso_ms
from worker.core.settings import Settings
from worker.core.states import Outcome, State

_STREAM_ID = re.compile(r"\d+-\d+")
#: The events of the results stream that are failures, for ``failures``' recent counts.
FAILURE_EVENTS = (Outcome.FAILED.value, Outcome.RETRYING.value)
#: What a dead letter shows of itself (its fields are the results event's, plus the original change).
DEAD_LETTER_FIELDS = (
    "account",
    "idempotency_key",
    "job_id",
    "operation",
    "attempt",
    "http_status",
    "error_code",
    "error_message",
    "retryable",
    "generation",
    "source",
    "enqueued_at",
    "finished_at",
)


class RateHistory:
    """Results events per ``BUCKET_S`` over the last ``SPAN_S``, read from the stream incrementally:
    per event, requests per account, and failures per account and error code.

    The console keeps one: each ``update`` reads only the entries added since the last one, so a
    page polling every few seconds costs a few entries, not an hour of the stream.
    """

    BUCKET_S = 10
    SPAN_S = 3600
    SERIES = tuple(event.value for event in (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.RETRYING))
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

    async def update(self, client: RedisClient, settings: Settings, now_ms: int) -> None:
        async with self._lock:
            oldest = now_ms - self.SPAN_S * 1000
            after = self._after
            start = str(oldest) if after is None or id_ms(after) < oldest else "(" + after
            async for entry in stream_pages(client, settings.results_stream, start=start):
                self._after = entry["id"]
                bucket = id_ms(entry["id"]) // (self.BUCKET_S * 1000)
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


async def _queue_by_account(client: RedisClient, settings: Settings, now_ms: int) -> dict[str, Counter[str]]:
    """queued, due, in_progress and retrying per account, from the queue and the ledger states."""
    scores: dict[str, float] = {}
    pending = await backlogs(client, settings)
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


async def overview(client: RedisClient, settings: Settings, history: RateHistory) -> dict[str, object]:
    """Per account: queued, due now, in progress, retrying, dead letters, paused until, the rate
    limit and its use; the workers with their heartbeat age; events per second over the last hour.

    Accounts are the configured ones and any the queue or the dead letters name. Nothing of an
    account's credentials is read: only its name and rate limit.
    """
    now = await redis_now_ms(client, settings.results_stream)
    counts = await _queue_by_account(client, settings, now)
    async for entry in stream_pages(client, settings.dlq_stream):
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
        running, seen = parse_heartbeat(raw)
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
    view: dict[str, object] = {"id": entry["id"], "dead_lettered_at": iso_ms(id_ms(entry["id"]))}
    view.update({field: entry.get(field, "") for field in DEAD_LETTER_FIELDS})
    view["original_change"] = orjson.loads(entry["original_change"]) if entry.get("original_change") else None
    return view


async def failures(
    client: RedisClient,
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
    now = await redis_now_ms(client, settings.results_stream)
    await history.update(client, settings, now)
    recent_from = max(since_ms or 0, now - history.SPAN_S * 1000)
    for (event_account, code, event), count in history.failures_since(recent_from).items():
        if (account is None or event_account == account) and (error_code is None or code == error_code):
            groups[event_account, code][event] += count
    newest = letters[::-1]
    if before is not None:
        newest = [entry for entry in newest if id_order(entry["id"]) < id_order(before)]
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


async def discard(client: RedisClient, settings: Settings, entry: Entry) -> str:
    """Delete one dead letter (the ledger keeps its ``failed`` state until it expires):
    ``discarded``, or ``not_found`` when it was already gone (replayed or discarded meanwhile)."""
    with redis_errors():
        deleted = await client.xdel(settings.dlq_stream, entry["id"])
    return "discarded" if deleted else "not_found"
