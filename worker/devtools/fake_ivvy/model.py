"""The fake iVvy's state and its actions: stages, the request log, and the calls it answers.

The HTTP side (routing, signatures, faults, admin endpoints) is ``worker.devtools.fake_ivvy.app``;
each action here takes a call's parameters and returns its answer or raises ``ApiError``.

addOrUpdateLeadStage (the docs give codes, not which input causes which; these are our choices):

* without ``id``: add. Answers ``200 {"success": true, "id": N}``; new ids count up from 1000.
* with ``id``: update only the fields given (an update with none is a successful no-op).
* the name is stored trimmed, the colour lower-case, applyTo as an int. Unknown fields are
  ignored, as an RPC endpoint ignores parameters it does not take.

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
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from worker.core.errors import SignatureRejected
from worker.core.settings import DEMO_API_KEY, DEMO_API_SECRET
from worker.devtools.fake_ivvy.batch import BatchStore
from worker.devtools.fake_ivvy.faults import FaultName, Faults
from worker.devtools.fake_ivvy.params import (
    ApiError,
    apply_to_type,
    checked_values,
    does_not_validate,
    filters,
    string,
    whole_number,
)
from worker.signing import format_ivvy_date, verify_request

FIRST_STAGE_ID: Final = 1000
DEFAULT_PER_PAGE: Final = 10
MAX_PER_PAGE: Final = 100
REQUEST_LOG_SIZE: Final = 200_000


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

    def _shown(self) -> dict[str, Any]:
        """What every view of a stage shows, in iVvy's field names."""
        return {"id": self.id, "name": self.name, "colour": self.colour, "applyTo": self.apply_to}

    def public(self) -> dict[str, Any]:
        """As getLeadStageList shows it."""
        return {**self._shown(), "reasons": [{"id": r.id, "reason": r.reason} for r in self.reasons]}

    def admin(self) -> dict[str, Any]:
        """As GET /_admin/stages shows it."""
        return {**self._shown(), "editable": self.editable}


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
        stage_id = whole_number(params, "id")
        name = string(params, "name")
        colour = string(params, "colour")
        apply_to = apply_to_type(params)
        stage = None
        if stage_id is not None:
            stage = self.stages.get(stage_id)
            if stage is None:
                raise ApiError(404, "The crm lead stage does not exist", 24320, field="id")
            if not stage.editable:
                raise ApiError(400, "The crm lead stage is not editable", 24321, field="id")
        fields = checked_values(name, colour, apply_to, adding=stage is None)
        if stage is None:
            stage = self.add_stage(fields["name"], apply_to=fields["applyTo"], colour=fields.get("colour"))
        else:
            stage.name = fields.get("name", stage.name)
            stage.colour = fields.get("colour", stage.colour)
            stage.apply_to = fields.get("applyTo", stage.apply_to)
        return {"success": True, "id": stage.id}

    def get_lead_stage_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        start = whole_number(params, "start")
        per_page = whole_number(params, "perPage")
        if start is None:
            start = 0
        elif start < 0:
            raise does_not_validate("start", "Value must be 0 or more")
        if per_page is None:
            per_page = DEFAULT_PER_PAGE
        elif per_page < 1:
            raise does_not_validate("perPage", "Value must be 1 or more")
        per_page = min(per_page, MAX_PER_PAGE)
        kept = [stage.public() for stage in self.stages.values()]
        for field, test in filters(params.get("filter")):
            kept = [stage for stage in kept if test(stage[field])]
        page = kept[start : start + per_page]
        return {
            "meta": {"totalResults": len(kept), "start": start, "perPage": per_page, "count": len(page)},
            "results": page,
        }

    def batch_run(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.batches.run(params, self.faults, self.rng, self._batch_job)

    def batch_progress(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.batches.progress(params, self.faults)

    def batch_results(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.batches.results(params, self.faults)

    def _batch_job(self, namespace: str, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """One job of a batch, answered as the single call is (no batches inside batches)."""
        call = ACTIONS.get(namespace, {}).get(action) if namespace != "batch" else None
        if call is None:
            raise ApiError(404, "Not Found", additional_messages=[f"Unknown call {namespace}?action={action}"])
        return call(self, params)

    def over_rate_limit(self, key: str | None) -> bool:
        """Whether this request of ``key`` is one too many in the last window (``rate_limit_per_s`` in
        ``rate_limit_window_s``)."""
        limit = self.faults.rate_limit_per_s
        if limit <= 0 or key is None:
            return False
        now = time.monotonic()
        recent = self.recent_by_key.setdefault(key, deque())
        while recent and recent[0] <= now - self.faults.rate_limit_window_s:
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
