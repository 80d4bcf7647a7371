"""``leadstage stats``: queue depth, work in progress, dead letters, recent rates, backlogs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from worker.core import keys
from worker.core.errors import STALE_REQUEST_CODE, redis_errors
from worker.core.pending import backlogs
from worker.core.readers.streams import redis_now_ms, stream_pages
from worker.core.redis_connection import RedisClient
from worker.core.settings import Settings
from worker.core.states import TERMINAL, Outcome

#: The windows of ``stats``' recent rates: name -> seconds.
RATE_WINDOWS_S: Mapping[str, int] = {"1m": 60, "5m": 300}
#: The events counted in the recent rates (terminal outcomes, and retries as a sign of trouble).
RATE_EVENTS = tuple(event.value for event in (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.SUPERSEDED, Outcome.RETRYING))

#: The key of ``stats``' recent counts of stale-clock answers (not an event: a kind of retry).
_CLOCK_SKEW = "clock_skew_pauses"
#: How terminal events say their change was sent (``sent_as``), counted by ``stats`` as ``sent_<how>``.
SENT_AS = ("alone", "coalesced", "batch")


async def stats(client: RedisClient, settings: Settings) -> dict[str, object]:
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
        now_ms = await redis_now_ms(client, settings.results_stream)
        async with client.pipeline(transaction=False) as pipe:
            pipe.hvals(keys.WORKERS)
            pipe.xlen(settings.dlq_stream)
            pipe.xlen(settings.results_stream)
            heartbeats, dead, result_count = await pipe.execute()
    pending = await backlogs(client, settings)
    with redis_errors():
        # Each account has its own queue: those with changes not yet terminal, and the configured ones.
        queues = [keys.queue_key(settings.queue_name, a) for a in {*(a.decode() for a in pending), *settings.accounts}]
        async with client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zcard(queue)
                pipe.zcount(queue, f"({now_ms}", "+inf")
            sizes: list[int] = await pipe.execute()
        depth, later = sum(sizes[0::2]), sum(sizes[1::2])

    alive = [
        running
        for running, seen in (parse_heartbeat(raw) for raw in heartbeats)
        if seen >= now_ms - settings.lease_s * 1000
    ]
    in_progress = sum(alive)
    longest = max(RATE_WINDOWS_S.values())
    since: dict[str, Counter[str]] = {name: Counter() for name in RATE_WINDOWS_S}
    stale = str(STALE_REQUEST_CODE)
    async for entry in stream_pages(client, settings.results_stream, start=str(now_ms - longest * 1000)):
        age_ms = now_ms - int(entry["id"].partition("-")[0])
        for name, window_s in RATE_WINDOWS_S.items():
            if age_ms <= window_s * 1000:
                since[name][entry.get("event", "")] += 1
                if entry.get("error_code") == stale:
                    since[name][_CLOCK_SKEW] += 1
                if entry.get("event") in TERMINAL and entry.get("sent_as"):
                    since[name]["sent_" + entry["sent_as"]] += 1
    recent: dict[str, dict[str, float]] = {}
    for name, window_s in RATE_WINDOWS_S.items():
        counts: dict[str, float] = {event: since[name][event] for event in RATE_EVENTS}
        terminal = sum(since[name][event] for event in TERMINAL)
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


def parse_heartbeat(raw: bytes) -> tuple[int, int]:
    """A worker's heartbeat value, ``{running}|{last seen ms}``, as numbers."""
    running, _, seen = raw.decode().partition("|")
    return int(running or 0), int(seen or 0)


# -- the console (``worker.console``) and the filters of ``leadstage dlq`` ------------------------
