"""What the fake iVvy does wrong, and how often: ``Faults``, one frozen set of settings.

Set at start (``Faults``, or the options ``--latency-ms`` etc., one per setting) and at run time
(``POST /_admin/faults``). Each setting declares beside itself its default, its kind (``Kind``:
a rate, an amount, whole seconds, a clock offset) and its effect, which is the option's help:
``leadstage fake-ivvy --help`` lists them all. One random draw per API request (``--seed`` makes
the sequence repeatable) picks at most one of the rate faults, so each rate is the exact share of
requests it affects; those rates may add up to at most 1.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, TypeVar, cast

FaultName = Literal[
    "latency", "5xx", "429", "hang", "drop", "24322", "gateway_5xx", "late_commit", "batch_drop", "limit"
]
_Value = TypeVar("_Value", int, float)

#: Faults that only addOrUpdateLeadStage draws (other actions drawing them are answered normally).
CHANGE_FAULTS: Final[frozenset[FaultName]] = frozenset({"24322", "gateway_5xx", "late_commit"})


class InvalidFaults(ValueError):
    """A fault setting out of range or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field} {reason}")


class Kind(Enum):
    """What a fault setting holds; its value is the rule, as an error names it."""

    RATE = "must be a share between 0 and 1"
    AMOUNT = "must be a number 0 or more"
    WHOLE_SECONDS = "must be a whole number of seconds, 0 or more"
    OFFSET = "must be a number of seconds (negative: behind)"

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self is Kind.OFFSET:
            return True
        if self is Kind.WHOLE_SECONDS and not isinstance(value, int):
            return False
        return value >= 0 and (self is not Kind.RATE or value <= 1)


def _fault(default: _Value, kind: Kind, effect: str) -> _Value:
    """A ``Faults`` field: its default, what kind of value it holds, and what it does."""
    return dataclasses.field(default=default, metadata={"kind": kind, "effect": effect})


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
    """What the fake does wrong, and how often: each setting's default, kind and effect."""

    latency_ms: float = _fault(
        0.0,
        Kind.AMOUNT,
        "every API request waits this long, in ms, before anything else",
    )
    #: The rate faults: one draw per request picks at most one of them (``_RATE_FAULTS``).
    error_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share answered 500, 502 or 503 (an error body), not applied",
    )
    rate_limit_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share answered 429 with Retry-After: --retry-after-s, not applied",
    )
    retry_after_s: int = _fault(
        1,
        Kind.WHOLE_SECONDS,
        "the Retry-After of those 429s",
    )
    hang_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share held open unanswered for --hang-s, not applied, then closed: the client times out",
    )
    hang_s: float = _fault(
        30.0,
        Kind.AMOUNT,
        "how long a hung request is held, in seconds (past any client timeout)",
    )
    drop_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share processed completely (an add or update committed), then its connection aborted",
    )
    #: Rate faults that only addOrUpdateLeadStage draws (``CHANGE_FAULTS``; other actions drawing
    #: them are answered normally).
    error_24322_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share of addOrUpdateLeadStage answered 500/24322, not applied",
    )
    gateway_5xx_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share of addOrUpdateLeadStage committed, then answered 504 (a slow gateway): the 5xx lies",
    )
    late_commit_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share of addOrUpdateLeadStage held for --late-commit-s, then committed and answered",
    )
    late_commit_s: float = _fault(
        2.0,
        Kind.AMOUNT,
        "how long a late commit is held, in seconds",
    )
    #: The batch namespace (worker.devtools.fake_ivvy.batch); its rates are drawn apart from the above.
    batch_delay_s: float = _fault(
        0.2,
        Kind.AMOUNT,
        "seconds a batch takes (as set when its run came in): its jobs are applied one by one over it",
    )
    batch_results_s: float = _fault(
        172_800.0,
        Kind.AMOUNT,
        "seconds a batch's results are kept after its run (iVvy: 2 days)",
    )
    batch_run_drop_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share of batch runs accepted (their jobs applied), then dropped unanswered (once per batch)",
    )
    batch_never_ready_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share of batches that never complete: progress 0, results 24114 (once per batch)",
    )
    batch_job_24322_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share of batch jobs answered 500/24322 in the results instead of applied (once per job)",
    )
    rate_limit_per_s: float = _fault(
        0.0,
        Kind.AMOUNT,
        "the server's own limit per API key: past it in a window: 429, not applied (0: off)",
    )
    rate_limit_window_s: float = _fault(
        1.0,
        Kind.AMOUNT,
        "the window of --rate-limit-per-s and the Retry-After of its 429s (iVvy's: a second)",
    )
    errors_as_200_rate: float = _fault(
        0.0,
        Kind.RATE,
        "share of error answers (signature, input, faults) sent with status 200 and the same body",
    )
    clock_offset_s: float = _fault(
        0.0,
        Kind.OFFSET,
        "seconds the fake's clock is ahead of the host's: for its signature check (23005), Date, ping",
    )

    def __post_init__(self) -> None:
        for setting in FAULT_SETTINGS:
            if not setting.kind.accepts(getattr(self, setting.name)):
                raise InvalidFaults(setting.name, setting.kind.value)
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


@dataclass(frozen=True, slots=True)
class FaultSetting:
    """One setting of ``Faults``, as declared: the fake's command line makes an option of each."""

    name: str
    default: float
    kind: Kind
    effect: str


FAULT_SETTINGS: Final = tuple(
    # Every field is a _fault(): its default is a number, never MISSING.
    FaultSetting(f.name, cast("float", f.default), f.metadata["kind"], f.metadata["effect"])
    for f in dataclasses.fields(Faults)
)
FAULT_FIELDS: Final = tuple(setting.name for setting in FAULT_SETTINGS)
