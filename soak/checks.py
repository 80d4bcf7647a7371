"""The soak's verdict: docs/contract.md's guarantees checked from the fake iVvy's own state and the streams.

Each check returns human-readable violations (empty when it holds), each naming the keys or
stages concerned (the first few), so that a failed run says where to start looking.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from soak.observe import Event
from soak.workload import Planned, Workload
from worker.core.states import TERMINAL

#: The fake's built-in stages (1 Quoted, 2 Won, 3 Lost): not ours, never changed.
BUILT_IN_STAGES = 3
SHOWN = 5


def _found(check: str, items: Sequence[object], what: str) -> list[str]:
    """One violation of ``check`` naming how many ``items`` (each a ``what``) broke it and the first
    few of them; none when there are none."""
    if not items:
        return []
    more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return [f"{check}: {len(items)} {what}: " + ", ".join(str(i) for i in items[:SHOWN]) + more]


def nothing_lost(planned: Sequence[Planned], terminal: Mapping[tuple[str, str], list[Event]]) -> list[str]:
    """Every enqueued change has a terminal event (its first generation)."""
    missing = [p.key for p in planned if (p.key, "0") not in terminal]
    return _found("lost", missing, "changes have no terminal event")


def exactly_one_terminal(planned: Sequence[Planned], terminal: Mapping[tuple[str, str], list[Event]]) -> list[str]:
    """No key (per generation) has two terminal events, and none has an event it was never enqueued for."""
    keys = {p.key for p in planned}
    doubled = [
        f"{key}@{gen}:{'+'.join(e['event'] for e in events)}"
        for (key, gen), events in terminal.items()
        if len(events) > 1
    ]
    strangers = sorted({key for key, _ in terminal} - keys)
    return _found("doubled", doubled, "keys have more than one terminal event") + _found(
        "unknown keys", strangers, "keys never enqueued have terminal events"
    )


def adds_once(
    workload: Workload, terminal: Mapping[tuple[str, str], list[Event]], stages: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Each add created exactly one stage (its name appears once), the one its event names; and no
    stage exists that no change of ours made."""
    by_name = Counter(str(s["name"]) for s in stages)
    ids_by_name = {str(s["name"]): int(s["id"]) for s in stages}
    twice, absent, wrong_id = [], [], []
    for key, planned in workload.adds.items():
        name = str(planned.change["name"]).strip()
        count = by_name.get(name, 0)
        events = terminal.get((key, "0"), [])
        succeeded = any(e["event"] == "succeeded" for e in events)
        if count > 1:
            twice.append(f"{key} {name!r} x{count}")
        elif count == 0 and succeeded:
            absent.append(f"{key} {name!r}")
        elif count == 1 and succeeded and not any(e.get("stage_id") == str(ids_by_name[name]) for e in events):
            wrong_id.append(f"{key}: event says {[e.get('stage_id') for e in events]}, stage is {ids_by_name[name]}")
    violations = (
        _found("stage created twice", twice, "adds")
        + _found("succeeded add without its stage", absent, "adds")
        + _found("add event names another stage", wrong_id, "adds")
    )
    made = (
        BUILT_IN_STAGES
        + len(workload.seeded)
        + sum(1 for key in workload.adds if by_name.get(str(workload.adds[key].change["name"]).strip()))
    )
    if len(stages) != made:
        violations.append(f"the fake has {len(stages)} stages; the run made {made} (built-in, seeded, added)")
    return violations


def last_value_wins(workload: Workload, stages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every field of every stage we changed is at the value of the change enqueued last."""
    actual = {int(s["id"]): s for s in stages}
    wrong = []
    for stage_id, fields in sorted(workload.expected.items()):
        stage = actual.get(stage_id)
        if stage is None:
            wrong.append(f"stage {stage_id} is gone")
            continue
        diff = {f: (stage.get(f), v) for f, v in fields.items() if stage.get(f) != v}
        if diff:
            wrong.append(f"stage {stage_id} (actual, expected): {diff}")
    return _found("order", wrong, "stages are not at their last enqueued values")


def ledgers_terminal(states: Mapping[str, str], queue_depth: int) -> list[str]:
    """Every change's ledger entry is terminal and the queue is empty."""
    open_ = [f"{key}={state}" for key, state in states.items() if state not in TERMINAL]
    violations = _found("ledger", open_, "changes not terminal in the ledger")
    if queue_depth:
        violations.append(f"queue: {queue_depth} jobs still queued after every change ended")
    return violations
