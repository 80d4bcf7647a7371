"""What the fake iVvy does wrong, and how often: ``Faults``, one frozen set of settings.

Set at start (``Faults``, or the flags ``--latency-ms`` etc.) and at run time
(``POST /_admin/faults``). One random draw per API request (``--seed`` makes the sequence
repeatable) picks at most one of the rate faults, so each rate is the exact share of requests
it affects; the rates may add up to at most 1.

================  =======  ==================================================================
setting           default  effect
================  =======  ==================================================================
latency_ms        0        every request waits this long before anything else happens
error_rate        0        share answered 500, 502 or 503 (an error body), change not applied
rate_limit_rate   0        share answered 429 with ``Retry-After: retry_after_s``, not applied
retry_after_s     1        whole seconds
hang_rate         0        share held open unanswered for ``hang_s`` seconds, NOT applied, then
                           the connection is closed: the client times out
hang_s            30       past any sane client timeout
drop_rate         0        share processed completely (an add or update is committed), then
                           the TCP connection is aborted without a byte of answer
error_24322_rate  0        share of addOrUpdateLeadStage answered 500/24322, not applied
                           (other actions drawing it are answered normally)
gateway_5xx_rate  0        share of addOrUpdateLeadStage committed, then answered 504 as a
                           gateway does when the backend was slow: the 5xx lies
late_commit_rate  0        share of addOrUpdateLeadStage held for ``late_commit_s``, then
                           committed and answered (the client has usually given up by then)
late_commit_s     2        how long such a request is held before it is committed
rate_limit_per_s  0        the server's own limit per API key: past it in a window, 429 with
                           ``Retry-After`` the window, not applied (0: off)
rate_limit_       1        the window of ``rate_limit_per_s``, in seconds (iVvy's: a second;
window_s                   tests shorten it)
batch_delay_s     0.2      how long a batch takes: its jobs are applied one by one over it
batch_results_s   172800   how long a batch's results are kept after its run (iVvy: 2 days)
batch_run_drop_   0        share of batch runs accepted (their jobs applied), then dropped
rate                       without an answer (drawn once per batch, apart from the rates above)
batch_never_      0        share of batches that never complete: progress 0, results 24114
ready_rate                 (drawn once per batch)
batch_job_24322_  0        share of batch jobs answered 500/24322 in the results instead of
rate                       applied (drawn once per job)
errors_as_200_    0        share of error answers (signature, input, faults) sent with HTTP
rate                       status 200 and the same error body, as some iVvy endpoints do
                           (drawn separately, only for error answers)
clock_offset_s    0        the fake's clock runs this many seconds ahead (negative: behind)
                           of the host's: its signature check (23005 beyond 5 minutes), its
                           ``Date`` header and ping's timestamp use it
================  =======  ==================================================================
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

FaultName = Literal[
    "latency", "5xx", "429", "hang", "drop", "24322", "gateway_5xx", "late_commit", "batch_drop", "limit"
]
#: Faults that only addOrUpdateLeadStage draws (other actions drawing them are answered normally).
CHANGE_FAULTS: Final[frozenset[FaultName]] = frozenset({"24322", "gateway_5xx", "late_commit"})


class InvalidFaults(ValueError):
    """A fault setting out of range or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field} {reason}")


#: The rate settings, in the order a request's random draw is matched against them.
_RATE_FAULTS: tuple[tuple[str, FaultName], ...] = (
    ("hang_rate", "hang"),
    ("error_rate", "5xx"),
    ("rate_limit_rate", "429"),
    ("drop_rate", "drop"),
    ("error_24322_rate", "24322"),
    ("gateway_5xx_rate", "gateway_5xx"),
    ("late_commit_rate", "late_commit"),
)


@dataclass(frozen=True, slots=True)
class Faults:
    """What the fake does wrong, and how often (see the module docstring)."""

    latency_ms: float = 0.0
    #: The rate faults: one draw per request picks at most one of them (``_RATE_FAULTS``).
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after_s: int = 1
    hang_rate: float = 0.0
    hang_s: float = 30.0
    drop_rate: float = 0.0
    #: Rate faults that only addOrUpdateLeadStage draws (``CHANGE_FAULTS``).
    error_24322_rate: float = 0.0
    gateway_5xx_rate: float = 0.0
    late_commit_rate: float = 0.0
    late_commit_s: float = 2.0
    #: The batch namespace (worker.devtools.fake_ivvy.batch): processing time, how long results are kept, faults.
    batch_delay_s: float = 0.2
    batch_results_s: float = 172_800.0
    batch_run_drop_rate: float = 0.0
    batch_never_ready_rate: float = 0.0
    batch_job_24322_rate: float = 0.0
    #: The server's own rate limit per API key: requests past this many in a window (a second, as
    #: iVvy's) get 429 with that window as their Retry-After (0: off).
    rate_limit_per_s: float = 0.0
    rate_limit_window_s: float = 1.0
    errors_as_200_rate: float = 0.0
    clock_offset_s: float = 0.0

    def __post_init__(self) -> None:
        for name in FAULT_FIELDS:
            value = getattr(self, name)
            if name == "clock_offset_s":
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise InvalidFaults(name, "must be a number of seconds (negative: behind)")
            elif name == "retry_after_s":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidFaults(name, "must be a whole number of seconds, 0 or more")
            elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidFaults(name, "must be a number")
            elif value < 0 or (name.endswith("_rate") and value > 1):
                raise InvalidFaults(name, "must be between 0 and 1" if name.endswith("_rate") else "must be 0 or more")
        if sum(getattr(self, name) for name, _ in _RATE_FAULTS) > 1 + 1e-9:
            raise InvalidFaults("+".join(name for name, _ in _RATE_FAULTS), "must add up to at most 1")

    def merged(self, changes: Mapping[str, object]) -> Faults:
        """These faults with some settings replaced; ``InvalidFaults`` names a bad one."""
        for name in changes:
            if name not in FAULT_FIELDS:
                raise InvalidFaults(name, f"is not a fault setting (known: {', '.join(FAULT_FIELDS)})")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]  # checked in __post_init__

    def pick(self, rng: random.Random) -> FaultName | None:
        """The rate fault for one request, or None: one draw, so each rate is an exact share."""
        draw = rng.random()
        for name, fault in _RATE_FAULTS:
            rate: float = getattr(self, name)
            if draw < rate:
                return fault
            draw -= rate
        return None

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


FAULT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Faults))
