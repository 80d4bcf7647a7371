"""One change: where it stands (``leadstage status``), its timeline (the console), its replay."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import orjson

from worker.core import keys
from worker.core.change import parse_change, parse_envelope
from worker.core.errors import redis_errors
from worker.core.ledger import Ledger
from worker.core.readers.streams import Entry, matches, stream_pages
from worker.core.redis_connection import RedisClient
from worker.core.results import iso_ms
from worker.core.settings import Settings
from worker.core.states import State


async def change_status(
    client: RedisClient, settings: Settings, account: str, idempotency_key: str
) -> dict[str, object] | None:
    """Where one change stands, from its ledger entry; None when the key is unknown (or expired).

    ``history`` has one object per finished attempt (event, attempt, finished_at, http_status,
    error_code, error_message), oldest first.
    """
    job = keys.job_id(account, idempotency_key)
    with redis_errors():
        raw = await client.hgetall(keys.ledger_key(job))  # type: ignore[misc]  # redis-py's async stubs
    if not raw:
        return None
    entry = {k.decode(): v.decode() for k, v in raw.items()}

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
        "next_attempt_at": when("next_at") if state == State.RETRYING else None,
        "finished_at": when("finished_at"),
        "history": [orjson.loads(line) for line in entry.get("history", "").splitlines() if line],
    }


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """What ``replay`` did with one dead letter."""

    job_id: str
    idempotency_key: str
    account: str
    #: ``queued``, or ``not_failed`` when the ledger says the change is not failed (already
    #: replayed, say): then the dead letter is left alone.
    status: str
    generation: int
    dead_letter_id: str

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


async def replay(client: RedisClient, settings: Settings, entry: Entry) -> ReplayOutcome:
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
        job_id=keys.job_id(envelope.account, envelope.idempotency_key),
        idempotency_key=envelope.idempotency_key,
        account=envelope.account,
        status=status,
        generation=generation,
        dead_letter_id=entry["id"],
    )


def _iso_to_ms(text: str | None) -> int | None:
    return int(datetime.fromisoformat(text).timestamp() * 1000) if text else None


#: How far before its first attempt the results stream is searched for a change's events: the
#: ledger's times are the workers' clocks, stream ids Redis's.
_CLOCK_MARGIN_MS = 300_000


async def change_timeline(
    client: RedisClient, settings: Settings, account: str, idempotency_key: str
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
    async for entry in stream_pages(client, settings.results_stream, start=start):
        if matches(entry, idempotency_key, account):
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
