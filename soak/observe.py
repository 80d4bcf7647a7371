"""What the soak watches while it runs: the results stream, the fake iVvy's admin endpoints, and how
long a killed worker's changes stay orphaned.

Everything here rides through Redis restarts: a read that fails because Redis is down is tried
again on the next poll, never counted as a finding by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
import redis.exceptions

from worker.core import keys
from worker.core.ledger import now_ms
from worker.core.settings import Settings
from worker.core.states import TERMINAL

#: Errors of a Redis that is restarting (connection refused or reset, loading its data).
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

Event = dict[str, str]


def _decode(fields: Mapping[bytes, bytes]) -> Event:
    return {k.decode(): v.decode() for k, v in fields.items()}


@dataclass
class ResultsTail:
    """Reads the results stream as it grows and keeps what the checks and figures need."""

    settings: Settings
    on_add_succeeded: Callable[[str, int], None]
    last_id: str = "0-0"
    #: (idempotency key, generation) -> its terminal events (exactly one, if all is well).
    terminal: dict[tuple[str, str], list[Event]] = field(default_factory=dict)
    #: error_code -> retrying events.
    retries: Counter[str] = field(default_factory=Counter)
    #: event -> terminal events.
    outcomes: Counter[str] = field(default_factory=Counter)
    #: error_code -> failed events.
    failures: Counter[str] = field(default_factory=Counter)

    async def poll(self, client: aioredis.Redis) -> int:
        """Read what is new; returns how many entries were read (0 also when Redis is down)."""
        try:
            answer = await client.xread({self.settings.results_stream: self.last_id}, count=5000)
        except REDIS_DOWN:
            return 0
        read = 0
        for _, entries in answer:
            for entry_id, fields in entries:
                self.last_id = entry_id.decode()
                self._take(_decode(fields))
                read += 1
        return read

    def _take(self, event: Event) -> None:
        kind = event.get("event", "")
        if kind == "retrying":
            self.retries[event.get("error_code") or "?"] += 1
            return
        if kind not in TERMINAL:
            return
        self.outcomes[kind] += 1
        key = event.get("idempotency_key", "")
        self.terminal.setdefault((key, event.get("generation", "0")), []).append(event)
        if kind == "failed":
            self.failures[event.get("error_code") or "?"] += 1
        if kind == "succeeded" and event.get("operation") == "add" and event.get("stage_id"):
            self.on_add_succeeded(key, int(event["stage_id"]))

    def finished(self, key: str, generation: str = "0") -> bool:
        return (key, generation) in self.terminal


class FakeAdmin:
    """The fake iVvy's admin endpoints (no signature; loopback only)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def close(self) -> None:
        await self.session.close()

    async def _call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else None
        async with self.session.request(method, self.base_url + path, data=data, headers=headers) as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def add_stage(self, stage: Mapping[str, object]) -> int:
        answer = await self._call("POST", "/_admin/stages", stage)
        return int(answer["id"])

    async def stages(self) -> list[dict[str, Any]]:
        answer = await self._call("GET", "/_admin/stages")
        return list(answer["stages"])

    async def requests(self) -> list[dict[str, Any]]:
        answer = await self._call("GET", "/_admin/requests")
        return list(answer["requests"])

    async def set_faults(self, faults: Mapping[str, float]) -> None:
        await self._call("POST", "/_admin/faults", dict(faults))


@dataclass
class Takeover:
    """One killed worker's orphaned changes: when each became due again, and when it was taken up.

    docs/contract.md promises the first within 15 s (the lease, not arq's job timeout, hides a running
    job). The second also waits for every change that was due before it: with a backlog in the
    queue it is the backlog's wait, which ``due_backlog`` (due changes at the kill) shows.
    """

    pid: int
    killed_at: float
    orphans: int
    due_backlog: int = 0
    #: Seconds from the kill until each orphan was due again (its lease ran out).
    due_after: list[float] = field(default_factory=list)
    #: Seconds from the kill until each orphan was taken up (started by another worker, or ended).
    taken_after: list[float] = field(default_factory=list)
    #: Orphans still not taken up when the probe gave up.
    stuck: list[str] = field(default_factory=list)


async def orphans_of(client: aioredis.Redis, settings: Settings, pid: int) -> tuple[list[str], int]:
    """The changes a just-killed worker (by pid) was attempting, and how many changes are due now.

    A running change is hidden in the queue at most one lease ahead, so only that slice of the
    queue is read, not the whole backlog.
    """
    now = now_ms()
    async with client.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(
            keys.queue_key(settings.queue_name, "default"), now, now + int(settings.lease_s * 1000) + 2000
        )
        pipe.zcount(keys.queue_key(settings.queue_name, "default"), "-inf", now)
        members, due = await pipe.execute()
    if not members:
        return [], due
    async with client.pipeline(transaction=False) as pipe:
        for member in members:
            pipe.hmget(keys.ledger_key(member.decode()), ["state", "worker"])
        answers = await pipe.execute()
    orphans = []
    for member, (state, worker) in zip(members, answers, strict=True):
        if state == b"running" and worker is not None and _worker_pid(worker.decode()) == pid:
            orphans.append(member.decode())
    return orphans, due


def _worker_pid(worker_id: str) -> int:
    """The pid in a worker id ``host:pid:suffix`` (worker.runner)."""
    parts = worker_id.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1


async def probe_takeover(
    client: aioredis.Redis, settings: Settings, takeover: Takeover, jobs: list[str], *, give_up_s: float = 180.0
) -> None:
    """Poll the orphans until each is taken up: its ledger state is no longer ``running``, or another
    worker's name is on it (start.lua writes it when it starts an attempt). On the way, note when
    its queue score (its lease) fell due."""
    not_due, remaining = set(jobs), set(jobs)
    while remaining:
        await asyncio.sleep(0.1)
        elapsed = time.monotonic() - takeover.killed_at
        if elapsed > give_up_s:
            takeover.stuck = sorted(remaining)
            return
        order = sorted(remaining)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for job in order:
                    pipe.hmget(keys.ledger_key(job), ["state", "worker"])
                    pipe.zscore(keys.queue_key(settings.queue_name, keys.split_job_id(job)[0]), job)
                answers = await pipe.execute()
        except REDIS_DOWN:
            continue
        now = now_ms()
        for index, job in enumerate(order):
            (state, worker), score = answers[2 * index], answers[2 * index + 1]
            taken = state != b"running" or worker is None or _worker_pid(worker.decode()) != takeover.pid
            if job in not_due and (taken or score is None or score <= now):
                takeover.due_after.append(elapsed)
                not_due.discard(job)
            if taken:
                takeover.taken_after.append(elapsed)
                remaining.discard(job)
