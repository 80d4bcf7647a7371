"""Helpers that run the real pieces for worker tests: workers (in-process or as processes) and streams."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path

import redis.exceptions

from worker.core.processes import python_module
from worker.core.redis_connection import RedisClient
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET, Account, Secret, Settings
from worker.core.states import TERMINAL


def worker_settings(redis_url: str, ivvy_url: str, **overrides: object) -> Settings:
    """Settings for a fast test worker against the fake iVvy with its demo credentials."""
    values: dict[str, object] = {
        "redis_url": redis_url,
        "accounts": {"default": Account("default", ivvy_url, DEMO_API_KEY, Secret(DEMO_API_SECRET), 1000.0)},
        "rate_limit": 1000.0,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.2,
        "request_timeout_s": 1.0,
        # The round trip between the recovery point and the POST is on loopback here: a change
        # that failed mid-POST is retried after the request timeout and this, not a whole second.
        "in_flight_margin_s": 0.02,
        # A test's batch takes a fraction of a second: polled at most 0.1 s apart, not 5 s.
        "batch_poll_min_s": 0.02,
        "batch_poll_max_s": 0.1,
        "job_timeout_s": 30.0,
        "lease_s": 2.0,
        # Batch mode is on by default: its wait must fit in the job timeout above (a batch that is
        # not done within it is an unknown outcome, its stages held for another wait).
        "batch_wait_s": 3.0,
        "poll_delay_s": 0.01,
        "concurrency": 20,
        "shutdown_grace_s": 5.0,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]  # the keys above are Settings' fields


def reconciling_soon(settings: Settings) -> Settings:
    """``settings`` with a short request timeout: an add whose attempt failed waits a request timeout
    before its next run reconciles it, and the fake on loopback answers within milliseconds."""
    return dataclasses.replace(settings, request_timeout_s=0.3)


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``leadstage worker`` use ``settings``, logging JSON lines."""
    return {**os.environ, **dataclasses.replace(settings, log_format="json").to_env()}


def start_worker_process(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``leadstage worker`` as a real process (so that it can be SIGKILLed)."""
    with log_path.open("ab") as log:
        argv = python_module("worker.cli", "worker")
        # Unbuffered: a SIGKILLed worker's last lines are what a test looks for.
        unbuffered = {**env, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(argv, env=unbuffered, stdout=log, stderr=log)  # noqa: S603 - our interpreter, fixed arguments


def stop_processes(
    processes: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, timeout: float = 15
) -> None:
    """Send ``sig`` to each process and wait for all of them, ``timeout`` seconds in all.

    One that does not stop in time is SIGKILLed, with every other still running, before the test
    fails: a worker left running would take the jobs of the tests after it (same database).
    """
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    deadline = time.monotonic() + timeout
    stuck = []
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stuck.append(process)
    for process in stuck:
        process.kill()
        process.wait()
    if stuck:
        raise AssertionError(f"pids {[p.pid for p in stuck]} did not stop within {timeout} s of signal {sig} (killed)")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    stop_processes([process], sig, timeout)
    return process.returncode


async def eventually(condition: Callable[[], Awaitable[bool]], *, within_s: float = 10.0) -> None:
    """Poll a condition of a real system (no event to wait on) until it holds."""
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {within_s}s")
        await asyncio.sleep(0.01)


def stream_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id's place in its stream (ms, then sequence): ``1-10`` comes after ``1-2``,
    as a batch's events finished together in one millisecond are."""
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def read_events(client: RedisClient, stream: str = "leadstage:results") -> list[dict[str, str]]:
    entries = await client.xrange(stream)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def wait_for_terminal(
    client: RedisClient, keys: Iterable[str], *, within_s: float = 30.0, stream: str = "leadstage:results"
) -> dict[str, list[dict[str, str]]]:
    """Wait until every idempotency key has a terminal event; return all terminal events by key.
    Each poll reads the whole stream again: after a failover it holds what the new primary has.
    A poll that finds no Redis to answer (a server that closed its connections as Sentinel moved
    it to another role) polls again, until the deadline."""
    wanted = set(keys)
    deadline = time.monotonic() + within_s
    missing, unanswered = wanted, ""
    while time.monotonic() <= deadline:
        terminal: dict[str, list[dict[str, str]]] = {}
        try:
            events = await read_events(client, stream)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            unanswered = f" (the last poll: {exc})"
            await asyncio.sleep(0.1)
            continue
        for event in events:
            if event["event"] in TERMINAL:
                terminal.setdefault(event["idempotency_key"], []).append(event)
        missing = wanted - terminal.keys()
        if not missing:
            return terminal
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"{len(missing)} changes have no terminal event after {within_s}s: {sorted(missing)[:5]}{unanswered}"
    )


class LosingCancellations:
    """A task's body that swallows its first ``count`` cancellations, as redis-py 5.3 (with a socket
    timeout) can lose one that lands while it reads a reply; ``lost`` counts them."""

    def __init__(self, count: int) -> None:
        self.count, self.lost = count, 0

    async def run(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if self.lost == self.count:
                    raise
                self.lost += 1
