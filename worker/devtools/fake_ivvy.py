"""A fake iVvy: a real aiohttp server that answers like the parts of the iVvy API we use.

The demo, the tests and the benchmarks run against it instead of iVvy, so it has to be faithful
where the product depends on iVvy's behaviour (signatures, error bodies, paging, specific codes)
and able to misbehave on request (faults), because handling misbehaviour is the product's job.

API (every call is ``POST /api/1.0/{namespace}?action={action}``, signed)
--------------------------------------------------------------------------
``crm?action=addOrUpdateLeadStage``, ``crm?action=getLeadStageList``, ``test?action=ping``.

Checks, in this order; the first that fails answers:

1. method not POST: 405. Unknown API version, namespace or action (or no ``action``): 404.
2. the signature, with ``worker.signing.verify_request`` (the client signs with the same
   module; tests cross-check both against an independent implementation): a missing or bad
   X-Api-Authorization, unknown key, wrong Content-MD5 or signature, or a missing or unreadable
   date: 401. A date more than 5 minutes from the server's clock: 401, specific code 23005
   ("Request is stale").
3. faults (below), only for requests that passed 1 and 2.
4. the body: empty means no parameters; otherwise it must be a JSON object sent as
   ``application/json``: else 400, specific code 23016.
5. the action.

Every error answer is iVvy's exception body (getting-started/interpreting-the-response/
exceptions), ``Content-Type: application/json``::

    {"errorCode": <HTTP status>, "message": "...", "specificCode": <int or null>,
     "additionalMessages": ["..."]}      # additionalMessages only when there are any

``specificCode`` is null where the docs give no code (401 other than stale, 404, 405, 429, 5xx).

addOrUpdateLeadStage (the docs give codes, not which input causes which; these are our choices):

* without ``id``: add. Answers ``200 {"success": true, "id": N}``; new ids count up from 1000.
* with ``id``: update only the fields given (an update with none is a successful no-op).
* the name is stored trimmed, the colour lower-case, applyTo as an int. Unknown fields are
  ignored, as an RPC endpoint ignores parameters it does not take.

=====  ======  ====================================================================
code   status  input
=====  ======  ====================================================================
23016  400     a parameter of the wrong JSON type, the first one found in the order id,
               name, colour, applyTo: id not a whole number (a string, a fraction, a
               bool, null); name or colour not a string; applyTo neither a whole number
               nor a string. additionalMessages says what was expected. Also a body that
               is not a JSON object.
24320  404     ``id`` names no stage (0 and negative ids included)
24321  400     ``id`` names a built-in stage (ids 1 Quoted, 2 Won, 3 Lost)
24323  400     the name: missing on an add, empty after trimming, or longer than 255
               characters after trimming; or applyTo missing on an add
24324  400     a value out of range: colour not ``#rrggbb`` (hex, any case), or applyTo
               not 1 (Opportunity) / 2 (Lead) (as a number or a string of digits)
24322  500     never from input: only the ``error_24322_rate`` fault ("An error has occurred")
=====  ======  ====================================================================

Only one error is reported, the first found: 23016, then 24320/24321, then 24323, then 24324.
404 for 24320 and 400 for 24321 keep both permanent for ``worker.core.errors`` (403 would read as a
credentials problem).

getLeadStageList: ``start`` (zero-based, default 0) and ``perPage`` (default 10, capped at 100:
a bigger perPage has no effect beyond the cap, as the docs say); a non-whole-number, a negative
start or a perPage below 1 is 23016. ``filter`` (getting-started/interpreting-the-response/
filtering) keeps the stages whose field equals the value, for the fields id, name, colour and
applyTo, with the modifiers __CONTAINS, __NOTCONTAINS, __BEGINS, __ENDS and __NOT (case-sensitive);
a filter that is not an object, or names another field or modifier, is 23016. Answers the
collection of what the filter keeps, ordered by id::

    {"meta": {"totalResults", "start", "perPage", "count"},
     "results": [{"id", "name", "colour", "applyTo", "reasons": [{"id", "reason"}]}]}

ping: ``{"ack": "pong", "timestamp": "yyyy-mm-dd HH:mm:ss UTC"}`` (the server's clock).

Credentials: ``IVVY_API_KEY``/``IVVY_API_SECRET``, else ``worker.core.settings.DEMO_API_KEY``/
``DEMO_API_SECRET``; more key:secret pairs with ``--credentials`` (repeatable) or
``FakeIvvy(credentials=...)``, for multi-account tests.

Faults
------
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
rate_limit_per_s  0        the server's own limit per API key: past it in a second, 429 with
                           ``Retry-After: 1``, not applied (0: off)
batch_*                    the batch namespace's timing and faults: ``worker.devtools.fake_batch``
errors_as_200_    0        share of error answers (signature, input, faults) sent with HTTP
rate                       status 200 and the same error body, as some iVvy endpoints do
                           (drawn separately, only for error answers)
clock_offset_s    0        the fake's clock runs this many seconds ahead (negative: behind)
                           of the host's: its signature check (23005 beyond 5 minutes), its
                           ``Date`` header and ping's timestamp use it
================  =======  ==================================================================

Every API answer carries a ``Date`` header from the fake's clock (offset included).

Admin endpoints (no signature; the server binds to loopback unless told otherwise)
----------------------------------------------------------------------------------
* ``GET /_admin/stages`` -> ``{"stages": [{"id", "name", "colour", "applyTo", "editable"}]}``
* ``POST /_admin/stages`` ``{"name", "applyTo", "colour"?, "editable"?}`` -> ``{"id"}``:
  seed a stage directly, checked like an add (a 400 ``{"error", "field"}`` otherwise).
* ``GET /_admin/requests`` -> ``{"requests": [{"at", "namespace", "action", "key", "body",
  "status", "fault"}]}``: every API request, oldest first, the last 200 000 kept. ``at`` is
  unix seconds at receipt; ``key`` the key named in X-Api-Authorization (also when refused);
  ``body`` the parsed JSON or null; ``status`` the answer's status, null when hung or dropped;
  ``fault`` null, "latency", "5xx", "429", "hang", "drop", "24322", "gateway_5xx" or
  "late_commit".
* ``GET /_admin/faults`` -> the faults; ``POST /_admin/faults`` merges a partial object and
  returns the result, or 400 ``{"error", "field"}`` naming the bad setting.
* ``POST /_admin/reset`` (optional body ``{"faults": true}``): back to the built-in stages and
  id 1000, the request log emptied, and with ``faults`` the faults too.

Speed: it serves benchmarks at thousands of requests a second, so there is no access log and
no per-request output unless asked (``log_requests``), and the request log is a bounded deque.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import http
import math
import os
import random
import re
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Literal, TypedDict, Unpack

import orjson
from aiohttp import web

from worker.core.processes import is_loopback, signalled
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET
from worker.devtools.fake_batch import BatchStore, DropAnswer
from worker.signing import API_VERSION, CONTENT_TYPE, SignatureRejected, format_ivvy_date, verify_request

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
FIRST_STAGE_ID = 1000
DEFAULT_PER_PAGE = 10
MAX_PER_PAGE = 100
NAME_MAX_CHARS = 255
REQUEST_LOG_SIZE = 200_000
APPLY_TO_VALUES = (1, 2)  # 1 = Opportunity, 2 = Lead

FaultName = Literal[
    "latency", "5xx", "429", "hang", "drop", "24322", "gateway_5xx", "late_commit", "batch_drop", "limit"
]
#: Faults that only addOrUpdateLeadStage draws (other actions drawing them are answered normally).
_CHANGE_FAULTS: frozenset[FaultName] = frozenset({"24322", "gateway_5xx", "late_commit"})

_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
_DIGITS = re.compile(r"[0-9]+")
_ERROR_5XX = (500, 502, 503)


@dataclass(frozen=True, slots=True)
class Reason:
    id: int
    reason: str


@dataclass(slots=True)
class Stage:
    """One lead stage as the fake stores it."""

    id: int
    name: str
    colour: str | None
    apply_to: int
    editable: bool = True
    reasons: tuple[Reason, ...] = ()

    def public(self) -> dict[str, Any]:
        """As getLeadStageList shows it."""
        return {
            "id": self.id,
            "name": self.name,
            "colour": self.colour,
            "applyTo": self.apply_to,
            "reasons": [{"id": r.id, "reason": r.reason} for r in self.reasons],
        }

    def admin(self) -> dict[str, Any]:
        """As GET /_admin/stages shows it."""
        return {
            "id": self.id,
            "name": self.name,
            "colour": self.colour,
            "applyTo": self.apply_to,
            "editable": self.editable,
        }


def _built_in_stages() -> list[Stage]:
    """The stages every account has and nobody may edit (24321), as in the docs' example."""
    return [
        Stage(1, "Quoted", "#1f77b4", 1, editable=False),
        Stage(
            2,
            "Won",
            "#2ca02c",
            1,
            editable=False,
            reasons=(Reason(11, "Price under budget"), Reason(12, "Repeat client")),
        ),
        Stage(3, "Lost", "#d62728", 1, editable=False),
    ]


@dataclass(slots=True)
class RequestRecord:
    """One API request, as GET /_admin/requests shows it (orjson serialises it directly)."""

    at: float
    namespace: str
    action: str | None
    key: str | None
    body: Any
    status: int | None = None
    fault: FaultName | None = None


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
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after_s: int = 1
    hang_rate: float = 0.0
    hang_s: float = 30.0
    drop_rate: float = 0.0
    error_24322_rate: float = 0.0
    gateway_5xx_rate: float = 0.0
    late_commit_rate: float = 0.0
    late_commit_s: float = 2.0
    #: The batch namespace (worker.devtools.fake_batch): processing time, how long results are kept, faults.
    batch_delay_s: float = 0.2
    batch_results_s: float = 172_800.0
    batch_run_drop_rate: float = 0.0
    batch_never_ready_rate: float = 0.0
    batch_job_24322_rate: float = 0.0
    #: The server's own rate limit per API key: requests past this many in a second get 429 (0: off).
    rate_limit_per_s: float = 0.0
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


class ApiError(Exception):
    """An iVvy error answer; ``field`` names the parameter at fault, when one is."""

    def __init__(
        self,
        status: int,
        message: str,
        specific_code: int | None = None,
        additional_messages: Sequence[str] = (),
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.specific_code = specific_code
        self.additional_messages = list(additional_messages)
        self.field = field
        self.headers = headers
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errorCode": self.status, "message": self.message, "specificCode": self.specific_code}
        if self.additional_messages:
            body["additionalMessages"] = self.additional_messages
        return body


def _does_not_validate(name: str, why: str) -> ApiError:
    return ApiError(400, f"'{name}' does not validate", 23016, [why], field=name)


def _invalid_data(code: int, name: str, why: str) -> ApiError:
    return ApiError(400, "The request contains invalid data", code, [why], field=name)


def default_credentials(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The account the fake accepts by default: IVVY_API_KEY/IVVY_API_SECRET, else the demo pair."""
    env = os.environ if env is None else env
    key = env.get("IVVY_API_KEY", "").strip() or DEMO_API_KEY
    secret = env.get("IVVY_API_SECRET", "").strip() or DEMO_API_SECRET
    return {key: secret}


def _utcnow() -> datetime:
    return datetime.now(UTC)


class FakeIvvy:
    """The fake's state (stages, faults, request log) and its actions, independent of HTTP."""

    def __init__(
        self,
        *,
        credentials: Mapping[str, str] | None = None,
        faults: Faults | None = None,
        seed: int | None = None,
        clock: Callable[[], datetime] = _utcnow,
        request_log_size: int = REQUEST_LOG_SIZE,
        log_requests: bool = False,
    ) -> None:
        self.credentials: dict[str, str] = dict(default_credentials() if credentials is None else credentials)
        self.faults = faults or Faults()
        self.rng = random.Random(seed)  # noqa: S311 - draws faults, not secrets
        self.clock = clock
        self.log_requests = log_requests
        self.requests: deque[RequestRecord] = deque(maxlen=request_log_size)
        self.batches = BatchStore()
        #: API key -> when its requests of the last second arrived (the server-side rate limit).
        self.recent_by_key: dict[str, deque[float]] = {}
        # Insertion order is id order (ids only grow), which paging relies on.
        self.stages: dict[int, Stage]
        self._next_id: int
        self.reset()

    def reset(self, *, faults: bool = False) -> None:
        """Back to the built-in stages, with an empty request log (and no faults, if asked)."""
        self.stages = {stage.id: stage for stage in _built_in_stages()}
        self._next_id = FIRST_STAGE_ID
        self.requests.clear()
        self.batches.clear()
        self.recent_by_key.clear()
        if faults:
            self.faults = Faults()

    def update_faults(self, changes: Mapping[str, object]) -> Faults:
        self.faults = self.faults.merged(changes)
        return self.faults

    def add_stage(self, name: str, *, apply_to: int, colour: str | None = None, editable: bool = True) -> Stage:
        """Create a stage without any checks (callers check); it gets the next id."""
        stage = Stage(self._next_id, name, colour, apply_to, editable)
        self.stages[stage.id] = stage
        self._next_id += 1
        return stage

    def now(self) -> datetime:
        """The fake's clock: ``clock`` plus the ``clock_offset_s`` fault."""
        return self.clock() + timedelta(seconds=self.faults.clock_offset_s)

    def verify(self, method: str, request_uri: str, headers: Iterable[tuple[str, str]], body: bytes) -> str:
        """The key a request was signed with, or ``ApiError`` 401 (23005 when stale)."""
        try:
            return verify_request(
                method=method,
                request_uri=request_uri,
                headers=headers,
                body=body,
                secrets=self.credentials,
                now=self.now(),
            )
        except SignatureRejected as exc:
            raise ApiError(401, str(exc), exc.specific_code) from None

    # The actions. Each takes the request's parameters and returns the answer or raises ApiError.

    def add_or_update_lead_stage(self, params: Mapping[str, Any]) -> dict[str, Any]:
        stage_id = _whole_number(params, "id")
        name = _string(params, "name")
        colour = _string(params, "colour")
        apply_to = _apply_to_type(params)
        stage = None
        if stage_id is not None:
            stage = self.stages.get(stage_id)
            if stage is None:
                raise ApiError(404, "The crm lead stage does not exist", 24320, field="id")
            if not stage.editable:
                raise ApiError(400, "The crm lead stage is not editable", 24321, field="id")
        fields = _checked_values(name, colour, apply_to, adding=stage is None)
        if stage is None:
            stage = self.add_stage(fields["name"], apply_to=fields["applyTo"], colour=fields.get("colour"))
        else:
            stage.name = fields.get("name", stage.name)
            stage.colour = fields.get("colour", stage.colour)
            stage.apply_to = fields.get("applyTo", stage.apply_to)
        return {"success": True, "id": stage.id}

    def get_lead_stage_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        start = _whole_number(params, "start")
        per_page = _whole_number(params, "perPage")
        if start is None:
            start = 0
        elif start < 0:
            raise _does_not_validate("start", "Value must be 0 or more")
        if per_page is None:
            per_page = DEFAULT_PER_PAGE
        elif per_page < 1:
            raise _does_not_validate("perPage", "Value must be 1 or more")
        per_page = min(per_page, MAX_PER_PAGE)
        kept = [stage.public() for stage in self.stages.values()]
        for field, test in _filters(params.get("filter")):
            kept = [stage for stage in kept if test(stage[field])]
        page = kept[start : start + per_page]
        return {
            "meta": {"totalResults": len(kept), "start": start, "perPage": per_page, "count": len(page)},
            "results": page,
        }

    def batch_run(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.batches.run(params, self.faults, self.rng, self._batch_job, ApiError)

    def batch_progress(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.batches.progress(params, ApiError)

    def batch_results(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.batches.results(params, self.faults, ApiError)

    def _batch_job(self, namespace: str, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """One job of a batch, answered as the single call is (no batches inside batches)."""
        call = ACTIONS.get(namespace, {}).get(action) if namespace != "batch" else None
        if call is None:
            raise ApiError(404, "Not Found", additional_messages=[f"Unknown call {namespace}?action={action}"])
        return call(self, params)

    def over_rate_limit(self, key: str | None) -> bool:
        """Whether this request of ``key`` is one too many in the last second (``rate_limit_per_s``)."""
        limit = self.faults.rate_limit_per_s
        if limit <= 0 or key is None:
            return False
        now = time.monotonic()
        recent = self.recent_by_key.setdefault(key, deque())
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) >= limit:
            return True
        recent.append(now)
        return False

    def ping(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"ack": "pong", "timestamp": format_ivvy_date(self.now()) + " UTC"}


#: namespace -> action -> the FakeIvvy method that answers it.
ACTIONS: dict[str, dict[str, Callable[[FakeIvvy, Mapping[str, Any]], dict[str, Any]]]] = {
    "crm": {
        "addOrUpdateLeadStage": FakeIvvy.add_or_update_lead_stage,
        "getLeadStageList": FakeIvvy.get_lead_stage_list,
    },
    "test": {"ping": FakeIvvy.ping},
    "batch": {"run": FakeIvvy.batch_run, "progress": FakeIvvy.batch_progress, "results": FakeIvvy.batch_results},
}


_FILTER_FIELDS = ("id", "name", "colour", "applyTo")
_FILTER_MODIFIERS: dict[str, Callable[[str, str], bool]] = {
    "": lambda value, wanted: value == wanted,
    "__NOT": lambda value, wanted: value != wanted,
    "__CONTAINS": lambda value, wanted: wanted in value,
    "__NOTCONTAINS": lambda value, wanted: wanted not in value,
    "__BEGINS": lambda value, wanted: value.startswith(wanted),
    "__ENDS": lambda value, wanted: value.endswith(wanted),
}


def _filters(raw: object) -> list[tuple[str, Callable[[object], bool]]]:
    """getLeadStageList's ``filter``: (field, test of a stage's value) pairs, compared as text."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        raise _does_not_validate("filter", "Value must be an object")
    tests: list[tuple[str, Callable[[object], bool]]] = []
    for key, wanted in raw.items():
        field, modifier = next(
            ((f, key[len(f) :]) for f in _FILTER_FIELDS if key.startswith(f) and key[len(f) :] in _FILTER_MODIFIERS),
            (None, ""),
        )
        if field is None:
            raise _does_not_validate("filter", f"Cannot filter by {key}")
        tests.append((field, functools.partial(_matches, _FILTER_MODIFIERS[modifier], str(wanted))))
    return tests


def _matches(compare: Callable[[str, str], bool], wanted: str, value: object) -> bool:
    return compare("" if value is None else str(value), wanted)


def _whole_number(params: Mapping[str, Any], name: str) -> int | None:
    if name not in params:
        return None
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _does_not_validate(name, "Value must be a whole number")
    return value


def _string(params: Mapping[str, Any], name: str) -> str | None:
    if name not in params:
        return None
    value = params[name]
    if not isinstance(value, str):
        raise _does_not_validate(name, "Value must be a string")
    return value


def _apply_to_type(params: Mapping[str, Any]) -> int | str | None:
    """applyTo as sent: the docs type it as a string and show a number, so both are accepted."""
    if "applyTo" not in params:
        return None
    value = params["applyTo"]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _does_not_validate("applyTo", "Value must be a whole number or a string")
    return value


def _checked_values(
    name: str | None, colour: str | None, apply_to: int | str | None, *, adding: bool
) -> dict[str, Any]:
    """The given fields, normalised; 24323 for the name and a missing applyTo, 24324 for values."""
    fields: dict[str, Any] = {}
    if name is not None:
        name = name.strip()
        if not name:
            raise _invalid_data(24323, "name", "name must not be empty")
        if len(name) > NAME_MAX_CHARS:
            raise _invalid_data(24323, "name", f"name must be at most {NAME_MAX_CHARS} characters")
        fields["name"] = name
    elif adding:
        raise _invalid_data(24323, "name", "name is required when id is missing")
    if apply_to is None and adding:
        raise _invalid_data(24323, "applyTo", "applyTo is required when id is missing")
    if colour is not None:
        if not _COLOUR.fullmatch(colour):
            raise _invalid_data(24324, "colour", "colour must be a hex colour such as #7ee546")
        fields["colour"] = colour.lower()
    if apply_to is not None:
        number = int(apply_to) if isinstance(apply_to, int) or _DIGITS.fullmatch(apply_to) else None
        if number not in APPLY_TO_VALUES:
            raise _invalid_data(24324, "applyTo", "applyTo must be 1 (Opportunity) or 2 (Lead)")
        fields["applyTo"] = number
    return fields


def _json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _claimed_key(authorization: str | None) -> str | None:
    if not authorization or not authorization.startswith("IWS "):
        return None
    return authorization[4:].partition(":")[0] or None


class _Body:
    """Stand-ins for a body that has no JSON value: empty, or not JSON at all."""

    EMPTY = object()
    NOT_JSON = object()


def _parse_json(body: bytes) -> Any:
    """The decoded body, or ``_Body.EMPTY`` / ``_Body.NOT_JSON``."""
    if not body.strip():
        return _Body.EMPTY
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _Body.NOT_JSON


def _params(content_type: str, parsed: Any) -> Mapping[str, Any]:
    """The parameters of a call: the body's JSON object (an empty body has none), else 23016."""
    if parsed is _Body.EMPTY:
        return {}
    if content_type.partition(";")[0].strip().lower() != CONTENT_TYPE:
        raise ApiError(400, "The request body does not validate", 23016, [f"Content-Type must be {CONTENT_TYPE}"])
    if not isinstance(parsed, dict):
        raise ApiError(400, "The request body does not validate", 23016, ["The body must be a JSON object"])
    return parsed


def _abort(request: web.Request) -> None:
    """Drop the connection without a byte of answer (the client sees a disconnect)."""
    if request.transport is not None:
        request.transport.abort()


class _Handlers:
    """The HTTP side of one app: routing, signatures, faults, admin."""

    def __init__(self, fake: FakeIvvy) -> None:
        self.fake = fake
        # Set at shutdown so that hanging requests end at once instead of holding the server.
        self.closing = asyncio.Event()

    async def on_shutdown(self, app: web.Application) -> None:
        self.closing.set()

    async def api(self, request: web.Request) -> web.StreamResponse:
        fake = self.fake
        body = await request.read()
        parsed = _parse_json(body)
        record = RequestRecord(
            at=time.time(),
            namespace=request.match_info["namespace"],
            action=request.query.get("action"),
            key=_claimed_key(request.headers.get("X-Api-Authorization")),
            body=None if parsed is _Body.EMPTY or parsed is _Body.NOT_JSON else parsed,
        )
        fake.requests.append(record)
        fault: FaultName | None = None
        try:
            action = self._route(request, record)
            fake.verify(request.method, request.raw_path, request.headers.items(), body)
            if fake.over_rate_limit(record.key):
                record.fault = "limit"
                raise ApiError(429, "Too Many Requests", headers={"Retry-After": "1"})
            fault = fake.faults.pick(fake.rng)
            if fault in _CHANGE_FAULTS and action is not FakeIvvy.add_or_update_lead_stage:
                fault = None
            record.fault = fault
            if fake.faults.latency_ms > 0:
                record.fault = fault or "latency"
                await asyncio.sleep(fake.faults.latency_ms / 1000)
            if fault == "hang":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(fake.faults.hang_s):
                        await self.closing.wait()
                return self._dropped(request, record)
            _raise_fault(fault, fake)
            if fault == "late_commit":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(fake.faults.late_commit_s):
                        await self.closing.wait()
            try:
                response = _json_response(200, action(fake, _params(request.headers.get("Content-Type", ""), parsed)))
            except DropAnswer:
                record.fault = "batch_drop"
                return self._dropped(request, record)
            if fault == "gateway_5xx":
                # Committed above; the gateway in front answers as if nothing happened.
                response = _json_response(504, ApiError(504, "Gateway Timeout").body())
        except ApiError as error:
            as_200 = fake.faults.errors_as_200_rate > 0 and fake.rng.random() < fake.faults.errors_as_200_rate
            response = _json_response(200 if as_200 else error.status, error.body(), error.headers)
        response.headers["Date"] = format_datetime(fake.now(), usegmt=True)
        if fault == "drop":
            return self._dropped(request, record)
        record.status = response.status
        if fake.log_requests:
            print(orjson.dumps(record).decode(), flush=True)
        return response

    def _route(self, request: web.Request, record: RequestRecord) -> Callable[[FakeIvvy, Mapping[str, Any]], Any]:
        if request.method != "POST":
            raise ApiError(405, "Method Not Allowed", additional_messages=["Every iVvy API call is a POST"])
        version = request.match_info["version"]
        if version != API_VERSION:
            raise ApiError(404, "Not Found", additional_messages=[f"API version {version!r} is not supported"])
        action = ACTIONS.get(record.namespace, {}).get(record.action or "")
        if action is None:
            raise ApiError(
                404, "Not Found", additional_messages=[f"Unknown call {record.namespace}?action={record.action}"]
            )
        return action

    def _dropped(self, request: web.Request, record: RequestRecord) -> web.Response:
        _abort(request)
        if self.fake.log_requests:
            print(orjson.dumps(record).decode(), flush=True)
        return web.Response(status=204)  # never written: the transport is gone

    async def not_found(self, request: web.Request) -> web.Response:
        return _json_response(404, ApiError(404, "Not Found").body())

    # Admin.

    async def get_stages(self, request: web.Request) -> web.Response:
        return _json_response(200, {"stages": [stage.admin() for stage in self.fake.stages.values()]})

    async def post_stage(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        editable = data.pop("editable", True)
        if not isinstance(editable, bool):
            return _admin_error("editable", "must be true or false")
        unknown = set(data) - {"name", "colour", "applyTo"}
        if unknown:
            return _admin_error(sorted(unknown)[0], "is not a stage field (name, colour, applyTo, editable)")
        try:
            fields = _checked_values(_string(data, "name"), _string(data, "colour"), _apply_to_type(data), adding=True)
        except ApiError as error:
            return _admin_error(error.field or "stage", "; ".join(error.additional_messages) or error.message)
        stage = self.fake.add_stage(
            fields["name"], apply_to=fields["applyTo"], colour=fields.get("colour"), editable=editable
        )
        return _json_response(200, {"id": stage.id})

    async def get_requests(self, request: web.Request) -> web.Response:
        return _json_response(200, {"requests": list(self.fake.requests)})

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json_response(200, self.fake.faults.as_dict())

    async def post_faults(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        try:
            faults = self.fake.update_faults(data)
        except InvalidFaults as exc:
            return _admin_error(exc.field, str(exc))
        return _json_response(200, faults.as_dict())

    async def post_reset(self, request: web.Request) -> web.Response:
        data = await _admin_json(request)
        with_faults = data.get("faults", False)
        if not isinstance(with_faults, bool):
            return _admin_error("faults", "must be true or false")
        self.fake.reset(faults=with_faults)
        return _json_response(200, {"reset": True, "faults": self.fake.faults.as_dict()})


def _raise_fault(fault: FaultName | None, fake: FakeIvvy) -> None:
    """Answer instead of the action for the faults that answer (5xx, 429, 24322)."""
    if fault == "5xx":
        status = fake.rng.choice(_ERROR_5XX)
        raise ApiError(status, http.HTTPStatus(status).phrase)
    if fault == "429":
        raise ApiError(429, "Too Many Requests", headers={"Retry-After": str(fake.faults.retry_after_s)})
    if fault == "24322":
        raise ApiError(500, "An error has occurred", 24322)


async def _admin_json(request: web.Request) -> dict[str, Any]:
    """The admin request's JSON object ({} when empty); a 400 for anything else."""
    parsed = _parse_json(await request.read())
    if parsed is _Body.EMPTY:
        return {}
    if not isinstance(parsed, dict):
        raise web.HTTPBadRequest(
            text=orjson.dumps({"error": "the body must be a JSON object", "field": None}).decode(),
            content_type="application/json",
        )
    return parsed


def _admin_error(field: str, message: str) -> web.Response:
    return _json_response(400, {"error": message, "field": field})


#: Where other modules (and tests) find the fake of an app made by ``create_app``.
FAKE_IVVY_KEY = web.AppKey("fake_ivvy", FakeIvvy)


def create_app(fake: FakeIvvy) -> web.Application:
    """The aiohttp application serving ``fake``: the API and the admin endpoints."""
    handlers = _Handlers(fake)
    app = web.Application()
    app[FAKE_IVVY_KEY] = fake
    app.on_shutdown.append(handlers.on_shutdown)
    app.router.add_route("*", "/api/{version}/{namespace}", handlers.api)
    app.router.add_get("/_admin/stages", handlers.get_stages)
    app.router.add_post("/_admin/stages", handlers.post_stage)
    app.router.add_get("/_admin/requests", handlers.get_requests)
    app.router.add_get("/_admin/faults", handlers.get_faults)
    app.router.add_post("/_admin/faults", handlers.post_faults)
    app.router.add_post("/_admin/reset", handlers.post_reset)
    # Anything else outside /_admin/ gets iVvy's 404 body (admin keeps aiohttp's 404/405).
    app.router.add_route("*", r"/{tail:(?!_admin/).*}", handlers.not_found)
    return app


class FakeOptions(TypedDict, total=False):
    """The keyword arguments of ``FakeIvvy``, passed through ``running_fake_ivvy``."""

    credentials: Mapping[str, str] | None
    faults: Faults | None
    seed: int | None
    clock: Callable[[], datetime]
    request_log_size: int
    log_requests: bool


@dataclass(frozen=True, slots=True)
class RunningFakeIvvy:
    """A fake being served: ``url`` is the base URL clients use (``IVVY_BASE_URL``)."""

    url: str
    host: str
    port: int
    fake: FakeIvvy


@contextlib.asynccontextmanager
async def running_fake_ivvy(
    host: str = DEFAULT_HOST, port: int = 0, **options: Unpack[FakeOptions]
) -> AsyncIterator[RunningFakeIvvy]:
    """Serve a new ``FakeIvvy(**options)`` on a real socket (port 0: a free one) until exit."""
    fake = FakeIvvy(**options)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    bound_port: int = sock.getsockname()[1]
    runner = web.AppRunner(create_app(fake), access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, backlog=1024).start()
        url_host = f"[{host}]" if ":" in host else host
        yield RunningFakeIvvy(url=f"http://{url_host}:{bound_port}", host=host, port=bound_port, fake=fake)
    finally:
        await runner.cleanup()


# The command line (``leadstage fake-ivvy``): the CLI module calls these two.


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number 0 or more")
    return value


def _seconds(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of seconds")
    return int(text)


def _credential(text: str) -> tuple[str, str]:
    key, sep, secret = text.partition(":")
    if not sep or not key or not secret:
        raise argparse.ArgumentTypeError("must be KEY:SECRET (the key without ':')")
    return key, secret


_FAULT_HELP = {
    "latency_ms": "added latency of every API request, in ms",
    "error_rate": "share of requests answered 500/502/503",
    "rate_limit_rate": "share of requests answered 429 with Retry-After",
    "retry_after_s": "the Retry-After of those 429s, in whole seconds",
    "hang_rate": "share of requests held open unanswered (not applied) for --hang-s, then closed",
    "hang_s": "how long a hung request is held, in seconds",
    "drop_rate": "share of requests applied, then dropped without an answer",
    "error_24322_rate": "share of addOrUpdateLeadStage answered 500 with specific code 24322",
    "gateway_5xx_rate": "share of addOrUpdateLeadStage committed, then answered 504",
    "late_commit_rate": "share of addOrUpdateLeadStage held for --late-commit-s, then committed and answered",
    "late_commit_s": "how long a late commit is held, in seconds",
    "batch_delay_s": "seconds a batch takes before its jobs are applied",
    "batch_results_s": "seconds a finished batch's results are kept (iVvy: 2 days)",
    "batch_run_drop_rate": "share of batch runs accepted, then dropped without an answer",
    "batch_never_ready_rate": "share of batches that never complete",
    "batch_job_24322_rate": "share of batch jobs answered 500/24322 instead of applied",
    "rate_limit_per_s": "the server's own limit per API key: requests past it in a second get 429 (0: off)",
    "errors_as_200_rate": "share of error answers sent with HTTP status 200 (the error body unchanged)",
    "clock_offset_s": "seconds the fake's clock is ahead of the host's (negative: behind); beyond 300: 23005",
}
_FAULT_TYPES: dict[str, Callable[[str], float]] = {
    "clock_offset_s": float,
    "latency_ms": _non_negative,
    "retry_after_s": _seconds,
    "hang_s": _non_negative,
    "late_commit_s": _non_negative,
    "batch_delay_s": _non_negative,
    "batch_results_s": _non_negative,
    "rate_limit_per_s": _non_negative,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fake's options to ``parser`` (``leadstage fake-ivvy``)."""
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument(
        "--credentials",
        type=_credential,
        action="append",
        default=[],
        metavar="KEY:SECRET",
        help="accept this API key and secret too (repeatable); IVVY_API_KEY/IVVY_API_SECRET or the demo pair always",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault draws, for repeatable runs")
    parser.add_argument("--log-requests", action="store_true", help="print every API request as a JSON line")
    defaults = Faults()
    for name in FAULT_FIELDS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_FAULT_TYPES.get(name, _rate),
            default=getattr(defaults, name),
            help=f"{_FAULT_HELP[name]} (default {getattr(defaults, name)})",
        )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the exit status (2: bad options, 1: cannot listen)."""
    try:
        faults = Faults(**{name: getattr(args, name) for name in FAULT_FIELDS})
    except InvalidFaults as exc:
        print(f"leadstage fake-ivvy: {exc}", file=sys.stderr)
        return 2
    options: FakeOptions = {
        "credentials": {**default_credentials(), **dict(args.credentials)},
        "faults": faults,
        "seed": args.seed,
        "log_requests": args.log_requests,
    }
    try:
        asyncio.run(_serve_until_signalled(args.host, args.port, options))
    except OSError as exc:
        print(f"leadstage fake-ivvy: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signalled(host: str, port: int, options: FakeOptions) -> None:
    async with running_fake_ivvy(host, port, **options) as server:
        keys = ", ".join(sorted(server.fake.credentials))
        print(f"fake iVvy listening on {server.url} (API keys: {keys})", flush=True)
        if not is_loopback(host):
            print("warning: the /_admin endpoints are reachable from other hosts", file=sys.stderr, flush=True)
        await signalled()
