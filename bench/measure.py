"""How both sides are measured: Redis command counts and memory, CPU time, latency and throughput.

One copy of this code measures the baseline and the product, so their figures differ only where
the systems differ. The rules:

* Commands: ``INFO commandstats`` before and after a phase, on a Redis the run has to itself.
  Commands run inside Lua scripts are counted by Redis under their own names, as well as the
  EVALSHA that ran them. The benchmark's own probing (polling for completion, the INFO calls)
  goes through ``Probe``, which counts what it sends; those counts are taken off the delta, so
  what remains is what the system under test sent.
* Round trips: Redis's ``total_reads_processed`` (one read event per batch of commands a client
  sends, so a pipeline counts once), with the probe's own taken off the same way.
* CPU: ``CpuMeter`` reads /proc for the worker, the fake iVvy and Redis, so a figure per change
  says which process a cost lands in, and varies less with a neighbour's load than a rate does.
* Times: ``Completion`` pairs are epoch seconds. Enqueue times are taken by the driver just
  before it calls the enqueue function; finish times come from what each system recorded in
  Redis (millisecond resolution on both sides), so polling intervals never enter a latency.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from bench.infra import BenchError, cpu_seconds


class Probe:
    """The benchmark's own connection to Redis; counts every command it sends, by commandstats name."""

    def __init__(self, url: str) -> None:
        # One connection, used sequentially: its set-up commands happen once, before any phase.
        self.client = aioredis.Redis.from_url(url, single_connection_client=True)
        self.sent: Counter[str] = Counter()

    async def connect(self) -> None:
        await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()

    def _count(self, command: str) -> None:
        self.sent[command] += 1

    async def counters(self) -> tuple[dict[str, tuple[int, int]], int]:
        """(command -> (calls, usec), read events) since the server started, from one INFO call.

        Redis counts one read event per batch of commands it reads from a connection, so the
        read events are the round trips clients made (a pipeline is one).
        """
        raw = await self.client.info("commandstats", "stats")
        self._count("info")
        commands = {
            name.removeprefix("cmdstat_"): (int(values["calls"]), int(values["usec"]))
            for name, values in raw.items()
            if name.startswith("cmdstat_") and isinstance(values, dict)
        }
        return commands, int(raw["total_reads_processed"])

    async def used_memory(self) -> int:
        raw = await self.client.info("memory")
        self._count("info")
        return int(raw["used_memory"])

    async def xlen(self, stream: str) -> int:
        self._count("xlen")
        return int(await self.client.xlen(stream))

    async def zcard(self, key: str) -> int:
        self._count("zcard")
        return int(await self.client.zcard(key))

    async def exists(self, key: str) -> bool:
        self._count("exists")
        return bool(await self.client.exists(key))

    async def flushdb(self) -> None:
        self._count("flushdb")
        await self.client.flushdb(asynchronous=False)


@dataclass(frozen=True)
class CommandDelta:
    """What the system under test sent during a phase: name -> (calls, server µs), and round trips.

    The µs of an EVALSHA include the commands its script ran, which have their own µs too, so
    per-command µs are kept for reading but never summed.
    """

    by_command: Mapping[str, tuple[int, int]]
    round_trips: int

    @property
    def calls(self) -> int:
        return sum(calls for calls, _ in self.by_command.values())

    def per_change(self, changes: int) -> dict[str, float]:
        """Calls per change by command, largest first."""
        ordered = sorted(self.by_command.items(), key=lambda item: (-item[1][0], item[0]))
        return {name: round(calls / changes, 3) for name, (calls, _) in ordered if calls}

    def usec_per_change(self, changes: int) -> dict[str, float]:
        """Server µs per change by command (EVALSHA's include its script's commands)."""
        ordered = sorted(self.by_command.items(), key=lambda item: (-item[1][1], item[0]))
        return {name: round(usec / changes, 2) for name, (_, usec) in ordered if usec}


class CommandWindow:
    """Counts the commands of one phase; ``close`` gives them minus the probe's own."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self._before: dict[str, tuple[int, int]] = {}
        self._reads_before = 0
        self._probe_before: Counter[str] = Counter()

    async def open(self) -> None:
        self._probe_before = Counter(self.probe.sent)
        self._before, self._reads_before = await self.probe.counters()

    async def close(self) -> CommandDelta:
        # An INFO does not count itself in its own commandstats, so the closing one is not in the
        # delta while the opening one is: take the probe's counts before sending the closing INFO.
        # (Read events are counted on arrival, so there it is the other way round: same number.)
        probe_sent = self.probe.sent - self._probe_before
        after, reads_after = await self.probe.counters()
        delta: dict[str, tuple[int, int]] = {}
        for name, (calls, usec) in after.items():
            calls_before, usec_before = self._before.get(name, (0, 0))
            ours = calls - calls_before - probe_sent.get(name, 0)
            if ours < 0:
                raise BenchError(f"commandstats went backwards for {name}: was the Redis reset during the phase?")
            if ours:
                delta[name] = (ours, usec - usec_before)
        return CommandDelta(delta, reads_after - self._reads_before - sum(probe_sent.values()))


@dataclass
class CpuMeter:
    """CPU seconds used by named processes between ``start`` and ``stop``."""

    pids: dict[str, int]
    _start: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: round(cpu_seconds(pid) - self._start.get(name, 0.0), 3) for name, pid in self.pids.items()}


@dataclass(frozen=True)
class Completion:
    """One change: when the driver enqueued it (0 when not tracked) and when the system finished it."""

    enqueued_at: float
    finished_at: float


def percentile(values: Iterable[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0..1): a value that was actually observed."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no values to take a percentile of")
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def throughput(finished: Iterable[float]) -> tuple[float, float]:
    """(changes per second, span in seconds) from first to last completion.

    N completions span N - 1 intervals; counting N would flatter short runs.
    """
    times = sorted(finished)
    if len(times) < 2:
        raise BenchError("a throughput needs at least two completions")
    span = times[-1] - times[0]
    if span <= 0:
        raise BenchError("every completion has the same timestamp; the run is too short to measure")
    return (len(times) - 1) / span, span


def latency_ms(completions: Mapping[str, Completion]) -> dict[str, float]:
    """p50, p99 and max of finish - enqueue, in ms."""
    latencies = [(c.finished_at - c.enqueued_at) * 1000 for c in completions.values()]
    return {
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
        "mean_ms": round(sum(latencies) / len(latencies), 2),
    }


async def wait_until(condition: Callable[[], Awaitable[bool]], *, within: float, interval: float, what: str) -> float:
    """Poll ``condition`` until it holds; returns the seconds waited, or raises after ``within`` s."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            raise BenchError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started
