"""What a benchmarked system must offer the shared phase code: the seam between driver and measurement.

``bench.baseline.BaselineSide`` and ``bench.product.ProductSide`` implement it; ``bench.phases``
uses nothing else, which is what keeps the two sides measured the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from bench.measure import Probe
from bench.workload import Change, Item


class Side(Protocol):
    """One system under test."""

    #: "baseline" or "product": the JSON keys and table columns.
    name: str
    #: The sorted set its worker polls; arq keeps ``{queue_name}:health-check`` next to it.
    queue_name: str
    #: Environment of its worker on top of the run's (a variant's settings).
    worker_env: Mapping[str, str]

    async def connect(self) -> None:
        """Open (and warm up) the enqueuing client, so that connection set-up is outside every phase."""

    async def aclose(self) -> None: ...

    def worker_args(self) -> list[str]:
        """Arguments of ``python -m bench.procs`` that run this side's worker."""
        ...

    async def enqueue_one(self, key: str, change: Change) -> str:
        """Enqueue one change as a producer of single changes would; returns its handle."""
        ...

    async def enqueue_bulk(self, items: Sequence[Item]) -> list[str]:
        """Enqueue a batch the fastest way this side offers; returns the handles in order."""
        ...

    async def finished_count(self, probe: Probe, enqueued: int) -> int:
        """How many of the ``enqueued`` changes are finished, roughly (one cheap probe command)."""
        ...

    async def settled(self, probe: Probe, expected: int) -> bool:
        """Whether ``expected`` changes are finished and nothing is left in flight (probe commands only)."""
        ...

    async def finish_times(self, handles: Sequence[str]) -> Mapping[str, float]:
        """handle -> epoch seconds when the system recorded the change as done.

        Raises ``BenchError`` unless every handle finished exactly once and successfully: a fast
        wrong answer must not count.
        """
        ...
