"""What every job of one worker process shares (``Runtime``), and one running attempt's lease
(``Lease``): made by ``worker.runner``, used by the job, coalescing and batches."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.core.errors import LeadstageError, StaleRun
from worker.core.ledger import Ledger
from worker.core.settings import Settings
from worker.ivvy import IvvyClient

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


@dataclass
class Lease:
    """One running attempt as its worker knows it: the run it holds, until when (this host's
    monotonic clock) its lease is known to last, and the timer that cancels the attempt before
    that moment unless the heartbeat renews the lease first."""

    run: int
    confirmed_until: float
    #: From when (monotonic) it may send: the claim's answer plus the wait for its slot (never early).
    send_at: float = 0.0
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    #: Set when the attempt was cancelled for its lease (not by a shutdown).
    lost: bool = False

    def confirm(self, until: float, margin_s: float) -> None:
        """The lease holds until ``until``: cancel the attempt ``margin_s`` before, unless renewed."""
        self.confirmed_until = until
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + (until - margin_s - time.monotonic()), self.give_up)

    def give_up(self) -> None:
        if self.task is not None and not self.task.done():
            self.lost = True
            self.task.cancel()

    def end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


@dataclass
class Runtime:
    """What every job of one worker process shares, made once at start-up."""

    settings: Settings
    ledger: Ledger
    clients: Mapping[str, IvvyClient]
    worker_id: str
    running: dict[str, Lease] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def wall_ms(self) -> int:
        """This host's clock (with the test offset): event times only, never a decision."""
        return int((time.time() + self.settings.clock_offset_s) * 1000)

    async def guarded(
        self,
        work: Awaitable[object],
        leases: Mapping[str, Lease],
        timeout_s: float,
        log: FilteringBoundLogger,
        what: str,
        **context: object,
    ) -> None:
        """A job's (or a batch's, ``what`` naming its log lines) work, never raising: whatever it could
        not record, its leases bring back; they end with it."""
        try:
            await asyncio.wait_for(work, timeout_s)
        except asyncio.CancelledError:
            # By its lease timer (another worker may take over now), or by the stop past its grace: not
            # raised, as arq's close gathers the tasks and one cancelled would cut its shutdown short.
            lost = any(lease.lost for lease in leases.values())
            log.warning(f"{what}.lease_lost" if lost else f"{what}.stopped", **context)
        except (LeadstageError, TimeoutError) as error:
            log.warning(f"{what}.interrupted", error=str(error) or type(error).__name__, **context)
        except Exception:  # a bug in one job must not stop the worker; logged with its traceback
            log.exception(f"{what}.crashed", **context)
        finally:
            for job_id, lease in leases.items():
                lease.end()
                if self.running.get(job_id) is lease:
                    del self.running[job_id]

    async def wait_for_slot(self, job_id: str) -> None:
        """Until the rate-limit slot the run's claim took opens; ``StaleRun`` unless its lease holds then."""
        lease = self.running.get(job_id)
        await asyncio.sleep(max(0.0, lease.send_at - time.monotonic()) if lease is not None else 0.0)
        self.check_lease(job_id)

    def check_lease(self, job_id: str) -> None:
        """``StaleRun`` unless this run's lease is still known to hold, with the margin to spare."""
        lease = self.running.get(job_id)
        if lease is None or lease.confirmed_until - self.settings.lease_margin_s <= time.monotonic():
            raise StaleRun(job_id, lease.run if lease else 0)
