"""What the soak enqueues, and what every stage must look like at the end.

Adds create stages; updates change seeded stages and stages created by earlier adds (once their
add has succeeded, so their id is known), several times each: part of the updates go to a small
set of "hot" stages, so that many changes of one stage are queued, retried and superseded at the
same time, which is where ordering can go wrong. Updates of added stages never rename them, so
that "each add's name appears exactly once" can be checked on the fake's stages directly.

``expected`` follows the changes in the order they were enqueued (the order the product must
honour): a field's expected value is the value of the last enqueued change that sets it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: The fields of a stage as the fake shows them (GET /_admin/stages).
StageFields = dict[str, object]


@dataclass(frozen=True, slots=True)
class Planned:
    """One change of the soak: its idempotency key and the change as the producer is given it."""

    key: str
    change: Mapping[str, object]

    @property
    def is_add(self) -> bool:
        return "id" not in self.change


def normalised(change: Mapping[str, object]) -> StageFields:
    """The fields a change sets, as the fake stores them (aliases resolved, colour lower-case, applyTo a number)."""
    words = {"opportunity": 1, "lead": 2}
    fields: StageFields = {}
    for given, value in change.items():
        name = {"color": "colour", "appliesTo": "applyTo"}.get(given, given)
        if name == "id":
            continue
        if name == "colour" and isinstance(value, str):
            value = value.lower()
        if name == "applyTo" and isinstance(value, str):
            value = words.get(value.lower(), int(value) if value.isdigit() else value)
        if name == "name" and isinstance(value, str):
            value = value.strip()
        fields[name] = value
    return fields


@dataclass
class Workload:
    """Generates the changes (deterministically from ``rng``, given the order adds succeed in)."""

    rng: random.Random
    total: int
    add_share: float
    hot_count: int = 20
    hot_share: float = 0.4
    #: stage id -> the fields it must end with.
    expected: dict[int, StageFields] = field(default_factory=dict)
    #: idempotency key -> planned add.
    adds: dict[str, Planned] = field(default_factory=dict)
    #: idempotency key -> stage id, for adds that succeeded.
    add_stage: dict[str, int] = field(default_factory=dict)
    planned: list[Planned] = field(default_factory=list)
    seeded: list[int] = field(default_factory=list)
    _added: list[int] = field(default_factory=list)
    _versions: dict[int, int] = field(default_factory=dict)

    @property
    def remaining(self) -> int:
        return self.total - len(self.planned)

    @property
    def hot(self) -> Sequence[int]:
        return self.seeded[: self.hot_count]

    def seed_stage(self, stage_id: int, fields: StageFields) -> None:
        """A stage created before the run (through the fake's admin endpoint)."""
        self.seeded.append(stage_id)
        self.expected[stage_id] = dict(fields)

    def next_batch(self, size: int) -> list[Planned]:
        """The next ``size`` changes (fewer at the end); call ``enqueued`` once they are on the queue."""
        batch = []
        for _ in range(min(size, self.remaining)):
            index = len(self.planned)
            planned = self._add(index) if self.rng.random() < self.add_share else self._update(index)
            self.planned.append(planned)
            batch.append(planned)
        return batch

    def enqueued(self, batch: Sequence[Planned]) -> None:
        """The batch is on the queue, in this order: its updates are now the newest of their fields."""
        for planned in batch:
            if planned.is_add:
                self.adds[planned.key] = planned
            else:
                self._apply(planned)

    def replayed(self, planned: Planned) -> None:
        """A dead letter was replayed: a replay is the newest change of its fields (README)."""
        if not planned.is_add:
            self._apply(planned)

    def add_succeeded(self, key: str, stage_id: int) -> None:
        """An add's terminal event said it created (or adopted) ``stage_id``: updates may now target it."""
        if key in self.add_stage or key not in self.adds:
            return
        self.add_stage[key] = stage_id
        self.expected[stage_id] = {"colour": None, **normalised(self.adds[key].change)}
        self._added.append(stage_id)

    def _apply(self, planned: Planned) -> None:
        stage_id = planned.change["id"]
        assert isinstance(stage_id, int)
        self.expected[stage_id].update(normalised(planned.change))

    def _add(self, index: int) -> Planned:
        change: dict[str, object] = {"name": f"soak add {index}", "applyTo": self.rng.choice([1, 2, "lead"])}
        if self.rng.random() < 0.7:
            change["colour"] = self._colour()
        return Planned(f"soak-{index}", change)

    def _update(self, index: int) -> Planned:
        if not self.seeded and not self._added:
            return self._add(index)
        if self.hot and self.rng.random() < self.hot_share:
            stage_id = self.rng.choice(self.hot)
        else:
            pick = self.rng.randrange(len(self.seeded) + len(self._added))
            stage_id = self.seeded[pick] if pick < len(self.seeded) else self._added[pick - len(self.seeded)]
        renamable = stage_id in self.seeded
        change: dict[str, object] = {"id": stage_id}
        while len(change) == 1:
            if renamable and self.rng.random() < 0.5:
                version = self._versions[stage_id] = self._versions.get(stage_id, 0) + 1
                change["name"] = f"soak stage {stage_id} v{version}"
            if self.rng.random() < 0.6:
                change["color" if self.rng.random() < 0.2 else "colour"] = self._colour()
            if self.rng.random() < 0.4:
                change["applyTo"] = self.rng.choice([1, 2, "opportunity", "lead", "2"])
        return Planned(f"soak-{index}", change)

    def _colour(self) -> str:
        colour = f"#{self.rng.randrange(16**6):06x}"
        return colour.upper() if self.rng.random() < 0.2 else colour
