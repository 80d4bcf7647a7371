"""The soak's verdict: docs/contract.md's guarantees checked from the fake iVvy's own state and the streams.

Each check returns human-readable violations (empty when it holds), each naming the keys or
stages concerned (the first few), so that a failed run says where to start looking.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from soak.observe import Event
from soak.workload import Planned, Workload
from worker.core.states import TERMINAL

#: The fake's built-in stages (1 Quoted, 2 Won, 3 Lost): not ours, never changed.
BUILT_IN_STAGES = 3
SHOWN = 5


def _few(items: Iterable[object]) -> str:
    listed = list(items)
    more = f" (and {len(listed) - SHOWN} more)" if len(listed) > SHOWN else ""
    return ", ".join(str(i) for i in listed[:SHOWN]) + more


def nothing_lost(planned: Sequence[Planned], terminal: Mapping[tuple[str, str], list[Event]]) -> list[str]:
    """Every enqueued change has a terminal event (its first generation)."""
    missing = [p.key for p in planned if (p.key, "0") not in terminal]
    return [f"lost: {len(missing)} changes have no terminal event: {_few(missing)}"] if missing else []


def exactly_one_terminal(planned: Sequence[Planned], terminal: Mapping[tuple[str, str], list[Event]]) -> list[str]:
    """No key (per generation) has two terminal events, and none has an event it was never enqueued for."""
    keys = {p.key for p in planned}
    doubled = [
        f"{key}@{gen}:{'+'.join(e['event'] for e in events)}"
        for (key, gen), events in terminal.items()
        if len(events) > 1
    ]
    strangers = sorted({key for key, _ in terminal} - keys)
    violations = []
    if doubled:
        violations.append(f"doubled: {len(doubled)} keys have more than one terminal event: {_few(doubled)}")
    if strangers:
        violations.append(f"unknown keys with terminal events: {_few(strangers)}")
    return violations


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
    violations = []
    if twice:
        violations.append(f"stage created twice: {len(twice)} adds: {_few(twice)}")
    if absent:
        violations.append(f"succeeded add without its stage: {len(absent)}: {_few(absent)}")
    if wrong_id:
        violations.append(f"add event names another stage: {len(wrong_id)}: {_few(wrong_id)}")
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
    return [f"order: {len(wrong)} stages are not at their last enqueued values: {_few(wrong)}"] if wrong else []


def ledgers_terminal(states: Mapping[str, str], queue_depth: int) -> list[str]:
    """Every change's ledger entry is terminal and the queue is empty."""
    open_ = [f"{key}={state}" for key, state in states.items() if state not in TERMINAL]
    violations = []
    if open_:
        violations.append(f"ledger: {len(open_)} changes not terminal in the ledger: {_few(open_)}")
    if queue_depth:
        violations.append(f"queue: {queue_depth} jobs still queued after every change ended")
    return violations
